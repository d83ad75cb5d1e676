"""Random baseline: seeded, uniform, without replacement (paper section 5.3).

The k rows come back in ascending order. Asked for every row (k = N: the driver does that for a
token budget, then keeps the prefix that fits), they come back in the seeded random order, so the
prefix is a uniform random sample and not the start of the pool.
"""
from __future__ import annotations

import numpy as np

from spokes_lightning.selectors.base import SelectionInputs, SelectionResult, Selector, register


@register
class RandomSelector(Selector):
    name = "random"
    summary = "uniform sample without replacement (seeded)"

    def select(self, inputs: SelectionInputs, k: int, seed: int = 0) -> SelectionResult:
        n = inputs.n
        rng = np.random.default_rng(seed)
        order = rng.permutation(n).astype(np.int64)
        chosen = order if k >= n else np.sort(order[:k])
        return SelectionResult(indices=chosen, scores=None, stats={"seed": seed})
