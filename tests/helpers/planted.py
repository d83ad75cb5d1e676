"""Test helper: synthetic feature matrices with known structure.

The SPOKES acceptance check (foundation issue) uses :func:`planted_clusters`: uneven
cluster sizes (Dirichlet(0.5)), Gaussian clusters around random centres.
"""
from __future__ import annotations

import numpy as np


def planted_clusters(
    n_clusters: int = 40, n: int = 4016, d: int = 128, *, noise: float = 0.5, seed: int = 0,
    dtype=np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """(features N x d, cluster label per row); every cluster has at least one row."""
    rng = np.random.default_rng(seed)
    sizes = np.floor(rng.dirichlet(np.full(n_clusters, 0.5)) * (n - n_clusters)).astype(int) + 1
    sizes[np.argmax(sizes)] += n - sizes.sum()
    centres = rng.standard_normal((n_clusters, d))
    labels = np.repeat(np.arange(n_clusters), sizes)
    x = centres[labels] + noise * rng.standard_normal((n, d))
    perm = rng.permutation(n)
    return x[perm].astype(dtype), labels[perm]
