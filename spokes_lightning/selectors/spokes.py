"""SPOKES as a selector (paper section 3.1): gradient features + optional quality -> relaxed w -> k rows."""
from __future__ import annotations

from ..rounding import DEFAULT_ROUNDING, GREEDY_GROUPS, GREEDY_ROUNDS, GREEDY_SEED_FRACTION
from ..spokes import DEFAULT_ETA_SCALE, DEFAULT_STEPS, DEFAULT_TOL, run_spokes
from .base import SelectionInputs, SelectionResult, Selector, register


@register
class SpokesSelector(Selector):
    name = "spokes"
    requires = ("features",)
    summary = "maximize alpha ln Q + (1-alpha) ln G-Vendi by exponentiated gradient, round w to k rows"
    #: run_spokes all-reduces across ranks when a process group exists: every rank must call it
    collective = True

    def select(self, inputs: SelectionInputs, k: int, seed: int = 0) -> SelectionResult:
        self.check_inputs(inputs)
        p = self.params
        alpha = float(p.get("alpha", 0.0))
        result = run_spokes(
            inputs.features,
            inputs.quality if alpha > 0 else None,
            alpha=alpha,
            k=k,
            steps=int(p.get("steps", DEFAULT_STEPS)),
            tol=float(p.get("tol", DEFAULT_TOL)),
            step_rule=str(p.get("step_rule", "backtracking")),
            lr=None if p.get("lr") is None else float(p["lr"]),
            eta_scale=float(p.get("eta_scale", DEFAULT_ETA_SCALE)),
            rounding=str(p.get("rounding", DEFAULT_ROUNDING)),
            seed=seed,
            seed_fraction=float(p.get("seed_fraction", GREEDY_SEED_FRACTION)),
            greedy_rounds=int(p.get("greedy_rounds", GREEDY_ROUNDS)),
            greedy_groups=int(p.get("greedy_groups", GREEDY_GROUPS)),
            drop_zero_rows=bool(p.get("drop_zero_rows", False)),
            log=p.get("log"),
        )
        stats = dict(result.stats)
        stats.update(objective=result.objective, step_sizes=result.step_sizes,
                     gvendi=result.gvendi, mean_quality=result.mean_quality)
        return SelectionResult(indices=result.indices, scores=result.weights, stats=stats)
