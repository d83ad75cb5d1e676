"""SPOKES as a selector (paper section 3.1): gradient features + optional quality -> relaxed w -> k rows."""
from __future__ import annotations

from ..rounding import DEFAULT_ROUNDING, GREEDY_GROUPS, GREEDY_ROUNDS, GREEDY_SEED_FRACTION, ROUNDING_RULES
from ..spokes import DEFAULT_ETA_SCALE, DEFAULT_STEPS, DEFAULT_TOL, run_spokes
from .base import Param, SelectionInputs, SelectionResult, Selector, register


@register
class SpokesSelector(Selector):
    name = "spokes"
    requires = ("features",)
    summary = "maximize alpha ln Q + (1-alpha) ln G-Vendi by exponentiated gradient, round w to k rows"
    #: run_spokes all-reduces across ranks when a process group exists: every rank must call it
    collective = True
    params_spec = {
        "alpha": Param(float, 0.0, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
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
