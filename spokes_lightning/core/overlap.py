"""Comparing two selections of the same pool."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def subset_overlap_pct(a: Sequence[int], b: Sequence[int]) -> float:
    """Shared rows of two subsets, in percent of the smaller one (paper section 3.2, appendix A).

    Not the n-gram overlap of training text with evaluation items: that is
    :mod:`spokes_lightning.evaluation.decontamination`.
    """
    a, b = np.unique(np.asarray(a, dtype=np.int64)), np.unique(np.asarray(b, dtype=np.int64))
    return 100.0 * len(np.intersect1d(a, b, assume_unique=True)) / max(1, min(len(a), len(b)))
