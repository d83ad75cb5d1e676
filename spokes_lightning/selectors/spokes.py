"""SPOKES as a selector (paper section 3.1): gradient features + optional quality -> relaxed w -> k rows."""
from __future__ import annotations

from spokes_lightning.utils.errors import UserError
from spokes_lightning.core.rounding import DEFAULT_ROUNDING, GREEDY_GROUPS, GREEDY_ROUNDS, GREEDY_SEED_FRACTION, ROUNDING_RULES
from spokes_lightning.core.overlap import subset_overlap_pct
from spokes_lightning.core.spokes import DEFAULT_ETA_SCALE, DEFAULT_STEPS, DEFAULT_TOL, run_spokes, selection_scores
from spokes_lightning.selectors.base import Param, SelectionInputs, SelectionResult, Selector, get_selector, register

#: alpha values tried by the section 3.2 sweep (between 0 and 1, which are always run)
DEFAULT_ALPHA_GRID = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3)


@register
class SpokesSelector(Selector):
    name = "spokes"
    requires = ("features",)
    reads = ("quality",)
    summary = "maximize alpha ln Q + (1-alpha) ln G-Vendi by exponentiated gradient, round w to k rows"
    #: run_spokes all-reduces across ranks when a process group exists: every rank must call it
    collective = True
    params_spec = {
        "alpha": Param(float, 0.0, lambda v: 0.0 <= v <= 1.0, "in [0, 1]", auto=True),
        "steps": Param(int, DEFAULT_STEPS, lambda v: v >= 0, ">= 0"),
        "tol": Param(float, DEFAULT_TOL, lambda v: v >= 0, ">= 0"),
        "step_rule": Param(str, "backtracking", choices=("backtracking", "fixed")),
        "lr": Param(float, None, lambda v: v > 0, "> 0"),
        "eta_scale": Param(float, DEFAULT_ETA_SCALE, lambda v: v > 0, "> 0"),
        "rounding": Param(str, DEFAULT_ROUNDING, choices=ROUNDING_RULES),
        "seed_fraction": Param(float, GREEDY_SEED_FRACTION, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
        "greedy_rounds": Param(int, GREEDY_ROUNDS, lambda v: v >= 1, ">= 1"),
        "greedy_groups": Param(int, GREEDY_GROUPS, lambda v: v >= 1, ">= 1"),
        "drop_zero_rows": Param(bool, False),
        "log": Param(object, None),
    }

    def select(self, inputs: SelectionInputs, k: int, seed: int = 0) -> SelectionResult:
        self.check_inputs(inputs)
        p = self.params
        result = run_spokes(
            inputs.features, inputs.quality if p["alpha"] > 0 else None, k=k, seed=seed,
            alpha=p["alpha"], steps=p["steps"], tol=p["tol"], step_rule=p["step_rule"], lr=p["lr"],
            eta_scale=p["eta_scale"], rounding=p["rounding"], seed_fraction=p["seed_fraction"],
            greedy_rounds=p["greedy_rounds"], greedy_groups=p["greedy_groups"],
            drop_zero_rows=p["drop_zero_rows"], log=p["log"],
        )
        stats = dict(result.stats)
        stats.update(objective=result.objective, step_sizes=result.step_sizes,
                     gvendi=result.gvendi, mean_quality=result.mean_quality)
        return SelectionResult(indices=result.indices, scores=result.weights, stats=stats)

    @classmethod
    def resolve_auto(cls, key, params, pool, k, seed, options):
        """alpha = "auto": the paper's section 3.2 procedure (:func:`alpha_sweep`)."""
        if key != "alpha":
            return super().resolve_auto(key, params, pool, k, seed, options)
        sweep = alpha_sweep(pool, params, k, seed, options.get("alpha_grid") or DEFAULT_ALPHA_GRID)
        return sweep["auto_alpha"], sweep


def alpha_sweep(pool, params: dict, k: int, seed: int, grid=DEFAULT_ALPHA_GRID, log=None) -> dict:
    """Section 3.2: overlap of the joint subset with the quality-only and diversity-only subsets.

    For alpha in {0, grid, 1}: SPOKES with ``params`` (the method's settings, its rounding
    too) at ``k`` documents, its overlap (%) with the quality top-k and with the alpha = 0
    subset, its G-Vendi and mean quality. ``auto_alpha`` is the inner alpha where the two
    overlaps are closest (ties: the smaller alpha). Runs on every rank.
    """
    params = {p: v for p, v in params.items() if p != "alpha"}
    inputs = pool.inputs_for(get_selector("quality"))
    q_only = pool.run("quality", {}, k, seed, everywhere=True).indices
    d_only = pool.run("spokes", {**params, "alpha": 0.0}, k, seed).indices
    rows = []
    for alpha in [0.0, *map(float, grid), 1.0]:
        idx = pool.run("spokes", {**params, "alpha": alpha}, k, seed).indices
        gv, mq = selection_scores(inputs.features, inputs.quality, idx)
        rows.append({"alpha": alpha, "overlap_quality": subset_overlap_pct(idx, q_only),
                     "overlap_diversity": subset_overlap_pct(idx, d_only), "gvendi": gv, "mean_quality": mq})
        if log is not None:
            log(f"select: alpha {alpha:g}: overlap with quality-only {rows[-1]['overlap_quality']:.1f}%, "
                f"diversity-only {rows[-1]['overlap_diversity']:.1f}%, G-Vendi {gv:.1f}, quality {mq:.3f}")
    inner = [r for r in rows if 0.0 < r["alpha"] < 1.0]
    if not inner:
        raise UserError("the alpha sweep needs at least one alpha strictly between 0 and 1 in its grid")
    best = min(inner, key=lambda r: (abs(r["overlap_quality"] - r["overlap_diversity"]), r["alpha"]))
    return {"k": int(k), "rows": rows, "auto_alpha": best["alpha"],
            "rounding": params.get("rounding", DEFAULT_ROUNDING)}
