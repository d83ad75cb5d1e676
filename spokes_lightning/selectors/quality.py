"""Quality filtering baseline: top-k by score, or every document above a threshold.

The paper (section 5.3) thresholds the FineWeb-Edu classifier score at 3.0625 (DCLM) and
1.0693 (FineWeb). Ties are broken toward the lower row index, so the result is exact.
"""
from __future__ import annotations

import numpy as np

from spokes_lightning.utils.errors import UserError
from spokes_lightning.selectors.base import Param, SelectionInputs, SelectionResult, Selector, register, top_k_indices


@register
class QualitySelector(Selector):
    name = "quality"
    requires = ("quality",)
    summary = "top-k by quality score (or --param threshold=T: all scores >= T)"
    params_spec = {"threshold": Param(float, None)}

    def select(self, inputs: SelectionInputs, k: int, seed: int = 0) -> SelectionResult:
        self.check_inputs(inputs)
        q = np.asarray(inputs.quality, dtype=np.float64)
        threshold = self.params.get("threshold")
        if threshold is not None:
            ranked = top_k_indices(q, len(q))
            ranked = ranked[q[ranked] >= float(threshold)]
            if len(ranked) == 0:
                raise UserError(f"no document has quality >= {threshold}")
            chosen = ranked
        else:
            chosen = top_k_indices(q, k)
        return SelectionResult(
            indices=chosen,
            scores=q,
            stats={"threshold": threshold, "min_selected_quality": float(q[chosen].min())},
        )
