"""The ``datamask`` selector (see the package docstring)."""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from spokes_lightning.utils.errors import UserError
from spokes_lightning.core.vendi import UnitRows
from spokes_lightning.selectors.base import Param, SelectionInputs, SelectionResult, Selector, register, top_k_indices
from spokes_lightning.selectors.datamask.objective import DIVERSITY, DIVERSITY_INPUT, NORMALIZE, build_objective, combined_quality
from spokes_lightning.selectors.datamask.policy import ADVANTAGE, learn_mask

# ----------------------------------------------------------------------------------------
# the selector
# ----------------------------------------------------------------------------------------

@register
class DatamaskSelector(Selector):
    name = "datamask"
    token_budget = "share"  # samples a set: under a token budget, the same share of documents
    requires = ("quality",)
    reads = ("quality_scores", "features", "embeddings")
    summary = ("DATAMASK: policy-gradient mask learning on lam*quality + (1-lam)*diversity "
               "(G masks of size k per step), top-k logits")
    params_spec = {
        "lam": Param(float, 0.5, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
        "diversity": Param(str, "gvendi", choices=DIVERSITY),
        "scores": Param(str, None),
        "normalize": Param(str, "rank", choices=NORMALIZE),
        "group_size": Param(int, 8, lambda v: v >= 2, ">= 2"),
        "steps": Param(int, 300, lambda v: v >= 0, ">= 0"),
        "lr": Param(float, 0.5, lambda v: v > 0, "> 0"),
        "advantage": Param(str, "group", choices=ADVANTAGE),
        "prune": Param(float, 0.0, lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
        "init": Param(str, "quality", choices=("quality", "uniform")),
        "init_scale": Param(float, 4.0, lambda v: v >= 0, ">= 0"),
        "block_size": Param(int, None, lambda v: v >= 2, ">= 2"),
        "reference_size": Param(int, 1024, lambda v: v >= 1, ">= 1"),
        "drop_zero_rows": Param(bool, False),
        "progress": Param(bool, True),
        "log": Param(object, None),
    }

    def __init__(self, **params: Any):
        super().__init__(**params)
        # the diversity term decides which matrix is needed (the pool checks these)
        self.requires = ("quality", DIVERSITY_INPUT[self.params["diversity"]])

    def select(self, inputs: SelectionInputs, k: int, seed: int = 0) -> SelectionResult:
        self.check_inputs(inputs)
        p = self.params
        t0 = time.perf_counter()
        q, names = combined_quality(inputs, p["scores"], p["normalize"])
        n = len(q)
        if not 1 <= k <= n:
            raise UserError(f"method 'datamask': budget k={k} must be in [1, {n}] (the pool's documents)")
        keep = max(k, int(math.ceil((1.0 - p["prune"]) * n)))
        candidates = np.sort(top_k_indices(q, keep))
        if p["drop_zero_rows"]:
            matrix = getattr(inputs, DIVERSITY_INPUT[p["diversity"]])
            nonzero = UnitRows(matrix, drop_zero_rows=True).keep
            candidates = candidates[nonzero[candidates]]
            if len(candidates) < k:
                raise UserError(f"method 'datamask': only {len(candidates)} candidates with non-zero rows "
                                f"for a budget of {k}")
        objective, _, candidates = build_objective(
            inputs, k, lam=p["lam"], diversity=p["diversity"], scores=p["scores"], normalize=p["normalize"],
            reference_size=p["reference_size"], candidates=candidates, seed=seed,
            drop_zero_rows=p["drop_zero_rows"])
        cq = q[candidates]
        if p["init"] == "quality" and cq.std() > 0:
            init = p["init_scale"] * (cq - cq.mean()) / cq.std()
        else:
            init = np.zeros(len(candidates))
        init_pick = top_k_indices(init, k)
        if k < len(candidates):
            logits, stats = learn_mask(objective, k, init, steps=p["steps"], group_size=p["group_size"],
                                       lr=p["lr"], advantage=p["advantage"], block_size=p["block_size"],
                                       seed=seed, show_progress=p["progress"], log=p["log"])
        else:  # every mask is the whole candidate pool: nothing to learn
            logits, stats = init, {"steps": 0, "note": "k covers every candidate: ranked by initial logits"}
        local = top_k_indices(logits, k)
        indices = candidates[local]
        scores = np.full(n, float(logits.min()) - 2.0) + q  # pruned rows: after every candidate, by quality
        scores[candidates] = logits
        parts = objective.parts(local)
        stats.update(parts, objective_init=objective.value(init_pick), candidates=int(len(candidates)),
                     pruned=int(n - len(candidates)), quality_scores=names, diversity=p["diversity"],
                     lam=p["lam"], seconds=time.perf_counter() - t0)
        return SelectionResult(indices=indices.astype(np.int64), scores=scores, stats=stats)
