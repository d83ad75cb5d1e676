"""Stage 4: run every configured selection method on the same aligned pool.

The selectable pool is the set of documents that have gradient features, embeddings and a
finite quality score (documents the proxy skipped, e.g. empty ones, are counted, not
selected). Budgets are in documents or in tokens of the export tokenizer (paper section 4.3:
SPOKES favours long documents, so a token budget is the fair comparison); a token budget
takes each method's ranking until the tokens run out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np

from ..atomic import write_json_atomic
from ..budget import budget_to_count, parse_budget
from ..errors import UserError
from ..features.store import open_feature_store
from ..rounding import DEFAULT_ROUNDING
from ..selection_artifact import array_sha256, write_selection
from ..selectors import SelectionInputs, get_selector, top_k_indices
from .data_stages import pool_documents
from .stage import RunContext, Stage, log, to_plain


@dataclass
class AlignedPool:
    ids: list[str]
    inputs: SelectionInputs
    lengths: np.ndarray
    n_unselectable: int
    memo: dict = field(default_factory=dict)  # selections computed in this process (run_selector)


def aligned_pool(ctx: RunContext) -> AlignedPool:
    if "aligned" in ctx.cache:
        return ctx.cache["aligned"]
    feats = ctx.output("features")
    grads = open_feature_store(ctx.run_dir / feats["gradients"])
    emb = open_feature_store(ctx.run_dir / feats["embeddings"])
    quality = np.load(ctx.run_dir / feats["quality"])
    q_ids = json.loads((ctx.run_dir / "features" / "quality_ids.json").read_text())
    lengths_all = np.load(ctx.run_dir / ctx.output("tokenizer")["lengths"])
    pool_pos = {d.id: i for i, d in enumerate(pool_documents(ctx))}
    q_by_id = dict(zip(q_ids, quality))
    e_row = {i: r for r, i in enumerate(emb.ids)}
    keep = [r for r, i in enumerate(grads.ids) if i in e_row and np.isfinite(q_by_id.get(i, np.nan))]
    ids = [grads.ids[r] for r in keep]
    g = grads.matrix
    inputs = SelectionInputs(
        features=g if len(keep) == len(grads.ids) else np.asarray(g[keep]),
        embeddings=np.asarray(emb.matrix[[e_row[i] for i in ids]], dtype=np.float32),
        quality=np.array([q_by_id[i] for i in ids], dtype=np.float64),
        ids=ids,
        lengths=lengths_all[[pool_pos[i] for i in ids]],
    )
    out = AlignedPool(ids, inputs, inputs.lengths, len(pool_pos) - len(ids))
    ctx.cache["aligned"] = out
    return out


def ranking(result, n: int) -> np.ndarray:
    """The method's full order, best first (from its scores when it returned fewer rows)."""
    if len(result.indices) == n:
        return np.asarray(result.indices, dtype=np.int64)
    if result.scores is None:
        raise UserError("a token budget needs a method that ranks every document")
    return top_k_indices(np.asarray(result.scores), n)


def token_prefix(order: np.ndarray, lengths: np.ndarray, budget_tokens: int) -> np.ndarray:
    """Longest prefix of ``order`` whose tokens fit the budget (at least one document)."""
    fits = np.cumsum(lengths[order]) <= budget_tokens
    return order[: max(1, int(fits.sum()) if fits.all() else int(np.argmin(fits)))]


def ordered_methods(cfg, methods) -> list[str]:
    """The methods of ``methods`` (a dict or list) in selection.methods order, whether they were
    selected in this process or read back from run_dir (where markers keep keys sorted)."""
    configured = [str(m) for m in cfg.selection.methods]
    return [m for m in configured if m in methods] + sorted(m for m in methods if m not in configured)


def method_spec(cfg, method: str) -> dict:
    specs = to_plain(cfg.selection.specs)
    if method not in specs:
        raise UserError(f"unknown method '{method}' in selection.methods; known: {', '.join(sorted(specs))}")
    spec = dict(specs[method])
    return spec


def run_selector(pool: AlignedPool, name: str, params: dict, k: int, seed: int):
    """``get_selector(name, **params).select(pool, k, seed)``, computed once per settings in a stage.

    Selectors are deterministic, so the alpha sweep's diversity-only and chosen-alpha runs are
    the very selections of ``spokes`` and ``spokes_quality``: they are not computed twice.
    """
    selector = get_selector(name, **params)
    settings = {key: v for key, v in selector.params.items() if key != "log"}
    key = json.dumps([name, settings, int(k), int(seed)], sort_keys=True, default=str)
    if key not in pool.memo:
        pool.memo[key] = selector.select(pool.inputs, k, seed)
    return replace(pool.memo[key])


def select_one(pool: AlignedPool, spec: dict, budget, unit: str, seed: int):
    spec = dict(spec)
    name = spec.pop("selector")
    n = len(pool.ids)
    if unit == "documents":
        k = budget_to_count(budget, n)
        result = run_selector(pool, name, spec, k, seed)
        return result, np.asarray(result.indices, dtype=np.int64)
    selector = get_selector(name, **spec)
    total = int(pool.lengths.sum())
    target = int(budget * total) if isinstance(budget, float) else int(budget)
    if not 0 < target <= total:
        raise UserError(f"token budget {budget} is outside (0, {total}] tokens")
    result = selector.select(pool.inputs, n, seed)
    return result, token_prefix(ranking(result, n), pool.lengths, target)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return 100.0 * len(np.intersect1d(a, b)) / max(1, min(len(a), len(b)))


def spokes_params(cfg) -> dict:
    """The ``spokes`` spec's settings (steps, rounding, ...) without selector and alpha."""
    spec = dict(to_plain(cfg.selection.specs).get("spokes", {}))
    for key in ("selector", "alpha"):
        spec.pop(key, None)
    return spec


def alpha_sweep(pool: AlignedPool, cfg, k: int, seed: int) -> dict:
    """Section 3.2: overlap of the joint subset with quality-only and diversity-only subsets.

    Every SPOKES run of the sweep uses the ``spokes`` spec's settings, so its rounding too.
    """
    from ..spokes import selection_scores

    params = spokes_params(cfg)
    q_only = run_selector(pool, "quality", {}, k, seed).indices
    d_only = run_selector(pool, "spokes", {**params, "alpha": 0.0}, k, seed).indices
    rows = []
    for alpha in [0.0, *map(float, cfg.selection.alpha_grid), 1.0]:
        idx = run_selector(pool, "spokes", {**params, "alpha": alpha}, k, seed).indices
        gv, mq = selection_scores(pool.inputs.features, pool.inputs.quality, idx)
        rows.append({"alpha": alpha, "overlap_quality": overlap(idx, q_only), "overlap_diversity": overlap(idx, d_only),
                     "gvendi": gv, "mean_quality": mq})
        log(f"select: alpha {alpha:g}: overlap with quality-only {rows[-1]['overlap_quality']:.1f}%, "
            f"diversity-only {rows[-1]['overlap_diversity']:.1f}%, G-Vendi {gv:.1f}, quality {mq:.3f}")
    inner = [r for r in rows if 0.0 < r["alpha"] < 1.0]
    best = min(inner, key=lambda r: (abs(r["overlap_quality"] - r["overlap_diversity"]), r["alpha"]))
    return {"k": k, "rows": rows, "auto_alpha": best["alpha"], "rounding": params.get("rounding", DEFAULT_ROUNDING)}


class SelectStage(Stage):
    name = "select"
    volatile = ("manifest.json",)  # selection manifests hold a creation time and the selector's timings
    needs = ("corpus", "tokenizer", "features")

    def settings(self, cfg):
        return {"selection": cfg.selection, "seed": cfg.seed}

    def handed_on(self, outputs):
        return [v["selection"] for v in outputs["methods"].values()] + (
            [outputs["alpha_sweep"]] if outputs.get("alpha_sweep") else [])

    def run(self, ctx):
        cfg = ctx.cfg
        sel = cfg.selection
        seed = int(cfg.seed)
        pool = aligned_pool(ctx)
        budget = parse_budget(str(sel.budget))
        unit = str(sel.budget_unit)
        if unit not in ("documents", "tokens"):
            raise UserError(f"selection.budget_unit must be 'documents' or 'tokens', got {unit!r}")
        n = len(pool.ids)
        if unit == "documents":
            k_docs = budget_to_count(budget, n)
        else:  # the alpha sweep compares document sets: use the same share of documents
            share = float(budget) if isinstance(budget, float) else budget / max(1, int(pool.lengths.sum()))
            k_docs = max(1, min(n, int(n * share)))
        sweep = alpha_sweep(pool, cfg, k_docs, seed) if sel.alpha == "auto" or sel.alpha_sweep else None
        if sweep is not None:
            write_json_atomic(ctx.path("select", "alpha_sweep.json"), sweep)
        alpha = sweep["auto_alpha"] if sel.alpha == "auto" else float(sel.alpha)
        hashes = {"gradients": array_sha256(pool.inputs.features), "embeddings": array_sha256(pool.inputs.embeddings),
                  "quality": array_sha256(pool.inputs.quality)}
        out = {"n_pool": n, "n_unselectable": pool.n_unselectable, "alpha": alpha, "methods": {},
               "alpha_sweep": "select/alpha_sweep.json" if sweep else None}
        for method in sel.methods:
            spec = method_spec(cfg, method)
            if spec["selector"] == "spokes" and (spec.get("alpha") == "auto"
                                                 or (spec.get("alpha") is None and method != "spokes")):
                spec["alpha"] = alpha  # the sweep's (or selection.alpha's) value
            result, chosen = select_one(pool, spec, budget, unit, seed)
            result.indices = chosen
            tokens = int(pool.lengths[chosen].sum())
            path = write_selection(ctx.run_dir / "selections", method, result, pool.ids, spec, seed, hashes, tokens)
            out["methods"][method] = {"selection": ctx.rel(path), "n_selected": int(len(chosen)), "n_tokens": tokens}
            log(f"select: {method}: {len(chosen)} documents, {tokens} tokens")
        return out
