"""Numbers behind the report's paper Figures 3, 4 and 5 and Table 1, computed on the run's own pool.

Fig 3 (paper section 6.1): G-Vendi of the k-subset that each rounding rule makes from the
SPOKES relaxed weights, for a grid of k, beside random k-subsets. With alpha = 0 the relaxed
problem does not depend on k, so one optimization serves every k.
Fig 4 (paper section 6.2): random vs SPOKES under two representations, gradient features and
embeddings, with SPOKES run on each representation and each subset scored in its own.
Table 1 (paper section 4.1) and Fig 5 (paper section 4.2, appendix A): the calibration studies
of :mod:`spokes_lightning.pipeline.calibration` on the run's own proxy and pool documents.
The paper's own numbers for these are in ``paper_figures.json`` (:func:`paper_figures`).
"""
from __future__ import annotations

import numpy as np

from spokes_lightning.core.rounding import ROUNDING_RULES, round_weights
from spokes_lightning.core.spokes import run_spokes
from spokes_lightning.core.vendi import UnitRows, vendi_score


def _quiet(msg: str) -> None:
    pass


def rounding_curves(features, spokes_params: dict, seed: int, fractions=(0.05, 0.1, 0.25, 0.5)):
    """(ks, {rule: G-Vendi per k}, random G-Vendi per k) from one relaxed SPOKES solve.

    The last k is the whole pool, where every rule and random coincide (computed once).
    """
    n = features.shape[0]
    params = {key: v for key, v in spokes_params.items() if key in ("steps", "tol", "step_rule", "lr", "eta_scale")}
    relaxed = run_spokes(features, k=1, rounding="topk", seed=seed, log=_quiet, **params)
    log_w = np.log(np.maximum(relaxed.weights, 1e-300))
    rows = UnitRows(features, drop_zero_rows=True)
    ks = sorted({max(2, int(n * f)) for f in fractions if int(n * f) < n})
    everything = vendi_score(np.asarray(features), drop_zero_rows=True)
    curves = {rule: [vendi_score(np.asarray(features[np.sort(round_weights(rule, rows, log_w, k, seed=seed))]))
                     for k in ks] + [everything] for rule in ROUNDING_RULES}
    perm = np.random.default_rng(seed).permutation(n)
    rand = [vendi_score(np.asarray(features[np.sort(perm[:k])])) for k in ks] + [everything]
    return ks + [n], curves, rand


def representation_table(features, embeddings, spokes_indices, spokes_params: dict, seed: int, random_seeds: int = 5):
    """Rows {representation, dim (its dimension), k, random (mean of seeds), spokes}: each subset scored
    in its own space.

    On gradients the SPOKES subset is the run's own ``spokes`` selection; on embeddings SPOKES
    runs again with the same settings and budget.
    """
    params = {key: v for key, v in spokes_params.items() if key not in ("selector", "alpha", "log", "drop_zero_rows")}
    k = len(spokes_indices)
    out = []
    for name, rep in (("gradients", features), ("embeddings", embeddings)):
        rep = np.asarray(rep, dtype=np.float32)
        rng = np.random.default_rng(seed)
        rand = float(np.mean([vendi_score(rep[np.sort(rng.choice(len(rep), k, replace=False))])
                              for _ in range(random_seeds)]))
        chosen = spokes_indices if name == "gradients" else run_spokes(
            rep, k=k, seed=seed, log=_quiet, drop_zero_rows=True, **params).indices
        out.append({"representation": name, "dim": int(rep.shape[1]), "k": int(k), "random": rand,
                    "spokes": vendi_score(rep[np.sort(chosen)])})
    return out


# --------------------------------------------------------------------------- paper Table 1, Fig. 5


def paper_figures() -> dict:
    """The paper's own numbers (or, where a figure has none readable, its claim) for Table 1 and
    Figs. 2, 3 and 5, each entry with its ``source`` (``paper_figures.json`` beside this module)."""
    import json
    from pathlib import Path

    return json.loads(Path(__file__).with_name("paper_figures.json").read_text())


def calibration_draw(n: int, count: int, seed: int) -> np.ndarray:
    """``min(count, n)`` distinct pool rows in a seeded random order (O(count) for a large pool).

    A study over c documents takes the first c of the draw (sorted), so Table 1's documents are
    among Fig. 5's.
    """
    return np.random.default_rng([seed, 4242]).choice(n, size=min(int(count), n), replace=False)


def table1_study(proxy, max_layers: int, method: str, k: int, seed: int, include_head: bool = True) -> dict:
    """Paper Table 1 on the run's proxy: Spearman of the last-n-layer kernels against the full one.

    ``proxy`` is a :class:`spokes_lightning.pipeline.calibration.ProxyContext` over the documents; n runs
    from 1 to ``max_layers`` or the proxy's depth, whichever is smaller.
    """
    from spokes_lightning.pipeline.calibration import layers_study

    depth = proxy.n_model_layers
    rows = layers_study(proxy, min(int(max_layers), depth), method, int(k), seed, include_head)
    return {"rows": rows, "n_model_layers": depth, "documents": len(proxy.ids), "max_length": proxy.max_length,
            "method": method, "include_head": include_head}


def fig5_study(reference: np.ndarray, k_values, fractions, seed: int) -> list[dict]:
    """Paper Fig. 5 (appendix A): overlap (%) of the diversity-only SPOKES subset of each JL map
    of ``reference`` to k dims with the subset of ``reference`` itself, per selection fraction."""
    from spokes_lightning.pipeline.calibration import k_overlap_rows

    return k_overlap_rows(np.asarray(reference, dtype=np.float32), [int(k) for k in k_values],
                          [float(f) for f in fractions], seed, log=_quiet)


def proxy_model_ref(ctx) -> str | None:
    """The run's proxy LM (its directory, or the configured hub id), or None when the gradient
    features were imported (then they did not come from this run's proxy)."""
    from spokes_lightning.pipeline.outputs import FeaturesOutput, ProxyOutput

    if ctx.output(FeaturesOutput).gradients_imported_from:
        return None
    proxy = ctx.output(ProxyOutput)
    return str(ctx.run_dir / proxy.model) if proxy.trained else str(proxy.model)


def calibration_studies(ctx, pool) -> dict:
    """``{"table1": ..., "fig5": ...}`` from ``report.table1`` / ``report.fig5`` on the run's own
    proxy and pool (each a dict of results, or ``{"skipped": why}``).

    Both draw their documents from one seeded sample of the selectable pool (Table 1's are
    among Fig. 5's). Table 1 needs the proxy; Fig. 5's reference rows are a fresh proxy sketch at
    ``k_ref`` (``k_ref`` null, or imported gradient features: the run's own gradient features).
    """
    from spokes_lightning.pipeline.data_stages import documents_by_ids

    cfg = ctx.cfg
    seed = int(cfg.seed)
    grads = cfg.features.gradients
    t1, f5 = cfg.report.get("table1"), cfg.report.get("fig5")
    t1_on, f5_on = bool(t1 is not None and t1.enabled), bool(f5 is not None and f5.enabled)
    model = proxy_model_ref(ctx)
    k_ref = None if not f5_on or f5.get("k_ref") is None else int(f5.k_ref)
    out = {"table1": {"skipped": "report.table1.enabled is false"} if not t1_on else None,
           "fig5": {"skipped": "report.fig5.enabled is false"} if not f5_on else None}
    if t1_on and model is None:
        out["table1"] = {"skipped": "the gradient features were imported (features.gradients.store): "
                                    "there is no proxy in this run to compute gradients with"}
    need_proxy = model is not None and ((t1_on and out["table1"] is None) or (f5_on and k_ref is not None))
    counts = {"table1": int(t1.documents) if t1_on else 0, "fig5": int(f5.documents) if f5_on else 0}
    draw = calibration_draw(pool.n, max(counts.values()), seed)
    rows = np.sort(draw)  # the union of both studies' documents, in pool order
    proxy, docs = None, []
    if need_proxy:
        from spokes_lightning.pipeline.calibration import ProxyContext

        docs = documents_by_ids(ctx, [pool.ids[i] for i in rows])
        proxy = ProxyContext.from_texts(model, None, [d.id for d in docs], [d.text for d in docs], 2)
    for name in ("table1", "fig5"):
        if out[name] is not None:
            continue
        settings = t1 if name == "table1" else f5
        mine = np.sort(draw[: counts[name]])
        sub = None
        if proxy is not None:
            picked = [docs[i] for i in np.searchsorted(rows, mine) if docs[i].text.strip()]
            sub = proxy.with_documents([d.id for d in picked], [d.text for d in picked], int(settings.max_length))
        if name == "table1":
            out[name] = _table1(sub, t1, bool(grads.include_head), seed)
        else:
            out[name] = _fig5(pool, mine, sub if k_ref is not None else None, f5, k_ref, grads, seed)
    return out


#: where a run keeps its last calibration studies, with the key they were computed under
CALIBRATION_RECORD = ("calibration", "studies.json")


def calibration_key(ctx, pool) -> str:
    """What :func:`calibration_studies` derives from: the settings, the proxy and corpus stage keys,
    the sampled documents' ids and (for Fig. 5 from stored features) their feature rows."""
    import hashlib

    from spokes_lightning.pipeline.stage import to_plain
    from spokes_lightning.utils.settings_hash import settings_hash

    cfg = ctx.cfg
    t1, f5 = cfg.report.get("table1"), cfg.report.get("fig5")
    count = max([int(s.documents) for s in (t1, f5) if s is not None and s.enabled] or [0])
    rows = np.sort(calibration_draw(pool.n, count, int(cfg.seed)))
    digest = hashlib.sha256(np.ascontiguousarray(pool.inputs.features[rows]).tobytes()).hexdigest()
    return settings_hash({"report": {"table1": to_plain(t1), "fig5": to_plain(f5)},
                          "gradients": to_plain(cfg.features.gradients), "seed": int(cfg.seed),
                          "proxy": proxy_model_ref(ctx) is not None and ctx.keys.get("proxy"),
                          "corpus": ctx.keys.get("corpus"), "ids": [str(pool.ids[i]) for i in rows],
                          "feature_rows": digest})


def cached_calibration_studies(ctx, pool) -> dict:
    """:func:`calibration_studies`, or the run's record of them when it was made under the same
    :func:`calibration_key` (a report made again for other methods does not load the proxy again)."""
    import json

    from spokes_lightning.utils.atomic import json_round_trip, write_json_atomic

    key = calibration_key(ctx, pool)
    record = ctx.run_dir.joinpath(*CALIBRATION_RECORD)
    try:
        old = json.loads(record.read_text())
        if old["key"] == key:
            return old["studies"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    studies = json_round_trip(calibration_studies(ctx, pool))
    write_json_atomic(record, {"key": key, "studies": studies})
    return studies


def _table1(proxy, settings, include_head: bool, seed: int) -> dict:
    method = str(settings.get("method") or "exact")
    if method == "exact":
        params = sum(p.numel() for p in proxy.model.parameters())
        need_gb = len(proxy.ids) * params * 4 / 2**30
        limit = float(settings.get("max_gradient_gb") or 4.0)
        if need_gb > limit:
            return {"skipped": f"exact gradients of {len(proxy.ids)} documents x {params:,} parameters would hold "
                               f"{need_gb:.1f} GiB (report.table1.max_gradient_gb = {limit:g}); set "
                               "report.table1.method: dense or use `python -m spokes_lightning.pipeline.calibration layers`"}
    result = table1_study(proxy, int(settings.max_layers), method, int(settings.get("k") or 8192), seed,
                          include_head)
    return result


def _fig5(pool, rows, proxy, settings, k_ref, grads, seed: int) -> dict:
    fractions = [float(f) for f in settings.fractions]
    if proxy is not None:
        from spokes_lightning.pipeline.calibration import reference_sketch

        reference = reference_sketch(proxy, int(grads.n_layers), str(grads.projection), k_ref, seed,
                                     include_head=bool(grads.include_head))
        source = "proxy_sketch"
    else:
        reference = np.asarray(pool.inputs.features[rows], dtype=np.float32)
        note = (f"report.fig5.k_ref = {k_ref} needs the proxy, and the gradient features were imported"
                if k_ref is not None else None)
        k_ref, source = reference.shape[1], "gradient_features"
    k_values = sorted({int(k) for k in settings.k_values if int(k) <= k_ref})
    base = {"k_ref": int(k_ref), "reference": source, "documents": int(len(reference)),
            "run_k": int(pool.inputs.features.shape[1]), "fractions": fractions}
    if source == "proxy_sketch":
        base.update(n_layers=int(grads.n_layers), projection=str(grads.projection), max_length=proxy.max_length)
    elif note:
        base["note"] = note
    if not k_values:
        return {**base, "skipped": f"no report.fig5.k_values at or below the reference dimension {k_ref}"}
    return {**base, "k_values": k_values, "rows": fig5_study(reference, k_values, fractions, seed)}
