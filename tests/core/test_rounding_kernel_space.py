"""Greedy rounding's |S| x |S| kernel path (spokes_lightning/core/rounding.py) against the d x d Gram path.

While the set has fewer rows than the feature dimension, greedy rounding eigendecomposes the
kernel X_S X_S^T instead of the Gram X_S^T X_S; both share their non-zero spectrum, so the
entropy, the gain scores and the selections must agree.
"""
import numpy as np
import pytest

from spokes_lightning.core.rounding import gram_space_basis, greedy_rounding, kernel_space_basis, set_gain_scores
from spokes_lightning.core.vendi import UnitRows, spectrum_entropy


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def data(n, d, seed, rank=None):
    rng = np.random.default_rng(seed)
    if rank is None:
        return rng.standard_normal((n, d)).astype(np.float32)
    return (rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d))).astype(np.float32)


@pytest.mark.parametrize("m, d, rank, seed", [(20, 64, None, 0), (50, 300, None, 1), (40, 64, 6, 2), (63, 64, None, 3)])
def test_kernel_and_gram_give_the_same_entropy_and_gains(m, d, rank, seed):
    x = data(m + 200, d, seed, rank)
    s, candidates = unit(x[:m]), unit(x[m:])
    kernel, gram = s @ s.T, s.T @ s
    h_kernel = spectrum_entropy(np.linalg.eigvalsh(kernel))
    h_gram = spectrum_entropy(np.linalg.eigvalsh(gram))
    assert h_kernel == pytest.approx(h_gram, rel=1e-9)
    quality = np.random.default_rng(seed).random(len(candidates))
    basis, log_lambda, null = kernel_space_basis(s, kernel)
    assert basis.shape[1] <= min(m, rank or m) and null is not None
    eigvecs, full_log_lambda, _ = gram_space_basis(gram)
    for alpha in (0.0, 0.3):
        by_kernel = set_gain_scores(candidates, basis, log_lambda, quality, alpha, 0.5, null)
        by_gram = set_gain_scores(candidates, eigvecs, full_log_lambda, quality, alpha, 0.5)
        np.testing.assert_allclose(by_kernel, by_gram, rtol=1e-9, atol=1e-9 * np.abs(by_gram).max())


@pytest.mark.parametrize("n, d, k, rank, seed", [
    (400, 64, 40, None, 10),    # |S| < d throughout: kernel path only
    (600, 32, 150, None, 11),   # the set passes d rows: kernel path, then the d x d Gram
    (500, 128, 100, 8, 12),     # low rank: most of the kernel's spectrum at the floor
    (700, 96, 90, None, 13),
])
def test_both_paths_select_the_same_rows(n, d, k, rank, seed):
    x = data(n, d, seed, rank)
    rng = np.random.default_rng(seed + 100)
    log_w = np.log(rng.dirichlet(np.full(n, 0.5)) + 1e-300)
    quality = rng.gamma(2.0, 1.0, n)
    for alpha, q in ((0.0, None), (0.2, quality)):
        picks = {}
        for kernel_space in (True, False):
            rows = UnitRows(x, chunk_rows=128)
            picks[kernel_space] = greedy_rounding(rows, log_w, k, quality=q, alpha=alpha, relaxed_quality=1.0,
                                                  seed=seed, kernel_space=kernel_space)
        assert np.array_equal(picks[True], picks[False])
        chosen = unit(x[np.sort(picks[True])])
        assert len(np.unique(picks[True])) == k
        h_kernel = spectrum_entropy(np.linalg.eigvalsh(chosen @ chosen.T))
        assert h_kernel == pytest.approx(spectrum_entropy(np.linalg.eigvalsh(chosen.T @ chosen)), rel=1e-9)
