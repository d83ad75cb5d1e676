"""The ``quadmix`` selector: QuaDMix (Liu et al. 2025, arXiv 2504.16511, section 3) on named quality
scores and domain labels.

* ``params``: the parameters theta (see :mod:`.parameters` for the JSON form), or ``auto``: the
  pipeline's select stage runs the paper's search (:meth:`QuaDMixSelector.resolve_auto`: proxy runs
  on Algorithm 1 samples, LightGBM, 100,000 candidates, mean of the top 10). Explicit parameters skip
  the search (the CLI has no texts to train proxies on).
* ``criteria``: which named quality scores enter Eq. 1 (default: all the pool has, sorted by name);
  the quality families hand them on as ``quality_scores.<name>`` (the quality source and, when a
  method uses this selector, :mod:`~spokes_lightning.pipeline.families.quality_heuristics`).
* ``normalize`` (sigma), ``percentile_sample`` (section 3.4), ``budget_rule``: see :mod:`.sampling`.
* ``proxy_*``, ``search_*``, ``regressor``: the size of the search (:mod:`.proxy_runs`, :mod:`.search`).

The result carries multiplicities (copies per selected row, a.b rounding, seeded) and, as scores,
every pool row's expected copies; rows come in a seeded random order (a prefix is a proportional
thinning, so a token budget keeps the sampled mix).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from spokes_lightning.utils.atomic import write_json_atomic
from spokes_lightning.utils.errors import UserError
from spokes_lightning.selectors.base import Param, SelectionInputs, SelectionResult, Selector, register
from spokes_lightning.selectors.quadmix.parameters import QuaDMixParams, load_params
from spokes_lightning.selectors.quadmix.sampling import BUDGET_RULES, NORMALIZATIONS, PERCENTILE_SAMPLE, normalize_criteria, quadmix_sample
from spokes_lightning.selectors.quadmix.search import DEFAULT_CANDIDATES, DEFAULT_TOP, search
from spokes_lightning.utils.settings_hash import settings_hash

_pos = lambda v: v > 0  # noqa: E731


def _log(message: str) -> None:
    print(f"[spokes] {message}", file=sys.stderr, flush=True)


@register
class QuaDMixSelector(Selector):
    name = "quadmix"
    token_budget = "share"  # samples a set: under a token budget, the same share of documents
    requires = ("quality_scores", "domains")
    reads = ("lengths",)
    summary = "QuaDMix: per-domain merged quality rank -> sigmoid sampling with copies; params searched by proxies + LightGBM"
    params_spec = {
        "params": Param(object, None, auto=True),
        "criteria": Param(object, None),
        "normalize": Param(str, "rank", choices=NORMALIZATIONS),
        "percentile_sample": Param(int, PERCENTILE_SAMPLE, _pos, "> 0"),
        "budget_rule": Param(str, "scale", choices=BUDGET_RULES),
        "proxy_runs": Param(int, 8, lambda v: v >= 2, ">= 2"),
        "proxy_layers": Param(int, 2, _pos, "> 0"),
        "proxy_hidden": Param(int, 64, _pos, "> 0"),
        "proxy_heads": Param(int, 4, _pos, "> 0"),
        "proxy_seq_length": Param(int, 128, lambda v: v >= 2, ">= 2"),
        "proxy_steps": Param(int, 40, _pos, "> 0"),
        "proxy_batch_size": Param(int, 8, _pos, "> 0"),
        "proxy_lr": Param(float, 3e-3, _pos, "> 0"),
        "proxy_val_tokens": Param(int, 16384, lambda v: v >= 0, ">= 0 (0 = every target token)"),
        "search_candidates": Param(int, DEFAULT_CANDIDATES, _pos, "> 0"),
        "search_top": Param(int, DEFAULT_TOP, _pos, "> 0"),
        "regressor": Param(object, None),
        "log": Param(object, None),
    }

    # ------------------------------------------------------------------ pieces shared with the search

    def criteria(self, inputs: SelectionInputs) -> list[str]:
        available = sorted(inputs.quality_scores or {})
        wanted = self.params["criteria"]
        if wanted is None:
            return available
        if isinstance(wanted, str):
            wanted = [c.strip() for c in wanted.split(",") if c.strip()]
        if not isinstance(wanted, list) or not wanted or not all(isinstance(c, str) for c in wanted):
            raise UserError(f"method '{self.name}': parameter criteria must list quality score names, got {wanted!r}")
        missing = [c for c in wanted if c not in available]
        if missing:
            raise UserError(f"method '{self.name}': criteria {', '.join(missing)} not among the quality scores "
                            f"({', '.join(available) or 'none'})")
        return list(dict.fromkeys(wanted))

    @staticmethod
    def domain_names(inputs: SelectionInputs) -> list[str]:
        domains = np.asarray(inputs.domains, dtype=np.int64)
        if inputs.domain_names is not None:
            return [str(d) for d in inputs.domain_names]
        return [str(d) for d in range(int(domains.max()) + 1 if len(domains) else 0)]

    def sigma(self, inputs: SelectionInputs, criteria: list[str], seed: int) -> np.ndarray:
        matrix = np.stack([np.asarray(inputs.quality_scores[c], dtype=np.float64) for c in criteria], 1)
        return normalize_criteria(matrix, self.params["normalize"], self.params["percentile_sample"],
                                  np.random.default_rng([int(seed), 0x516]))

    def sample(self, inputs, sigma, theta: QuaDMixParams, k: int, seed: int):
        lengths = None if inputs.lengths is None else np.asarray(inputs.lengths, dtype=np.float64)
        return quadmix_sample(sigma, np.asarray(inputs.domains, dtype=np.int64), lengths, theta, k, seed,
                              rule=self.params["budget_rule"], percentile_sample=self.params["percentile_sample"])

    # ------------------------------------------------------------------ selection

    def select(self, inputs: SelectionInputs, k: int, seed: int = 0) -> SelectionResult:
        self.check_inputs(inputs)
        if self.params["params"] is None:
            raise UserError(f"method '{self.name}' needs params: explicit QuaDMix parameters (JSON or a .json "
                            "file) or 'auto' (searched by the pipeline's select stage)")
        names = self.domain_names(inputs)
        theta = load_params(self.params["params"], self.criteria(inputs), names)
        sigma = self.sigma(inputs, theta.criteria, seed)
        drawn = self.sample(inputs, sigma, theta, k, seed)
        domains = np.asarray(inputs.domains, dtype=np.int64)
        per_domain = {}
        for m, name in enumerate(names):
            rows = domains == m
            chosen = rows[drawn.indices]
            per_domain[name] = {"documents": int(rows.sum()), "selected": int(chosen.sum()),
                                "copies": int(drawn.multiplicity[chosen].sum()),
                                "expected_copies": float(drawn.expected[rows].sum())}
        stats = {"criteria": theta.criteria, "normalize": self.params["normalize"],
                 "budget_rule": self.params["budget_rule"], "sampling_total": drawn.raw_total,
                 "scale": drawn.scale, "n_copies": int(drawn.multiplicity.sum()),
                 "weighted_by": "documents" if inputs.lengths is None else "tokens", "domains": per_domain}
        return SelectionResult(indices=drawn.indices, scores=drawn.expected, stats=stats,
                               multiplicity=drawn.multiplicity)

    # ------------------------------------------------------------------ params: auto

    @classmethod
    def resolve_auto(cls, key, params, pool, k, seed, options):
        """``params = auto``: the paper's search on this pool (section 3.2-3.3); see :func:`parameter_search`."""
        if key != "params":
            return super().resolve_auto(key, params, pool, k, seed, options)
        selector = cls(**params)
        inputs = pool.inputs_for(selector)
        context = {name: pool.need(cls.name, name) for name in ("texts", "validation_texts", "tokenizer", "work_dir")}
        record = parameter_search(selector, inputs, k, seed, **context)
        return record["params"], record


def parameter_search(selector: QuaDMixSelector, inputs: SelectionInputs, k: int, seed: int, *, texts,
                     validation_texts, tokenizer, work_dir, evaluate=None) -> dict:
    """Proxy runs on Algorithm 1 samples -> LightGBM -> the mean of the top predicted parameter sets.

    ``evaluate(theta, indices, copies) -> loss`` replaces the proxy training (tests). Proxy runs are
    cached under ``work_dir/quadmix/proxies`` and the search's record is written next to them.
    """
    from spokes_lightning.selectors.quadmix.proxy_runs import ProxyRunner, ProxySettings

    p = selector.params
    log = p["log"] or _log
    criteria, names = selector.criteria(inputs), selector.domain_names(inputs)
    if len(texts) != inputs.n:
        raise UserError(f"quadmix: {len(texts)} pool texts for {inputs.n} pool rows")
    sigma = selector.sigma(inputs, criteria, seed)
    work = Path(work_dir) / "quadmix"
    runner = None
    if evaluate is None:
        settings = ProxySettings(n_layers=p["proxy_layers"], hidden=p["proxy_hidden"], heads=p["proxy_heads"],
                                 seq_length=p["proxy_seq_length"], steps=p["proxy_steps"],
                                 batch_size=p["proxy_batch_size"], lr=p["proxy_lr"],
                                 val_tokens=p["proxy_val_tokens"], seed=int(seed))
        runner = ProxyRunner(list(texts), list(validation_texts), tokenizer, work / "proxies", settings)

    def score(vector):
        theta = QuaDMixParams.from_vector(vector, criteria, names)
        drawn = selector.sample(inputs, sigma, theta, k, seed)
        if evaluate is not None:
            return evaluate(theta, drawn.indices, drawn.multiplicity)
        return runner.loss(drawn.indices, drawn.multiplicity, vector)

    start = time.perf_counter()
    log(f"quadmix: searching {len(criteria) + 4} x {len(names)} parameters with {p['proxy_runs']} proxy runs "
        f"({', '.join(criteria)}; domains {', '.join(names)})")
    found = search(score, len(criteria), len(names), runs=p["proxy_runs"], candidates=p["search_candidates"],
                   top=p["search_top"], seed=seed, regressor=p["regressor"], log=log)
    theta = QuaDMixParams.from_vector(found["theta"], criteria, names)
    record = {"params": theta.to_dict(), "k": int(k), "seed": int(seed), "proxy_runs": p["proxy_runs"],
              "trained_here": None if runner is None else runner.runs,
              "proxy_losses": [float(v) for v in found["proxy_losses"]],
              "best_proxy_loss": float(found["proxy_losses"].min()),
              "predicted_loss": found["predicted_at_theta"], "top_predicted": [float(v) for v in found["top_predicted"]],
              "regressor_train_mae": found["train_mae"], "search_candidates": p["search_candidates"],
              "search_top": p["search_top"], "seconds": round(time.perf_counter() - start, 2)}
    tag = settings_hash([{q: v for q, v in p.items() if q not in ("log", "params")}, int(k), int(seed),
                         criteria, names, None if runner is None else runner.identity], length=12)
    write_json_atomic(work / f"search-{tag}.json", record)
    log(f"quadmix: best proxy loss {record['best_proxy_loss']:.4f}, predicted at the chosen parameters "
        f"{record['predicted_loss']:.4f} ({record['seconds']:.0f} s, {record['trained_here'] or 0} proxies trained here)")
    return record
