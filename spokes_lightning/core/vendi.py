"""G-Vendi: the Vendi score of (gradient) features, computed from the d x d Gram matrix.

Paper section 2.1, eq. (1): with l2-normalized rows x_i, K = X X^T, lambda = eig(K) / tr(K),
``G-Vendi = exp(-sum_j lambda_j ln lambda_j)``. K (n x n) and the Gram G = X^T D_w X (d x d)
share their non-zero eigenvalues, so everything here works on G, streamed over row chunks:
an ``np.load(..., mmap_mode="r")`` matrix larger than RAM never has to fit in memory.

Weighted form (eq. 6): K(w)_ij = sqrt(w_i w_j) x_i.x_j shares its spectrum with
G(w) = sum_i w_i x_i x_i^T.

Determinism: per-chunk Grams are computed in float64 and summed in 62-bit fixed point
(:class:`ExactGramSum`), so the total is the same bits whatever the order of the chunks or
the number of ranks that contributed them.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from spokes_lightning.utils.errors import UserError

DEFAULT_CHUNK_ROWS = 8192
EIGEN_FLOOR = 1e-12  # eigenvalue clamp: 0 ln 0 = 0


def iter_unit_row_chunks(
    features: np.ndarray,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    *,
    row_offset: int = 0,
    drop_zero_rows: bool = False,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, unit_rows, keep_mask)`` for consecutive row chunks, in float64.

    Chunks are cut on the GLOBAL grid (multiples of ``chunk_rows`` counted from global row 0,
    where this array's first row is global row ``row_offset``), so every rank and every
    chunk-size-preserving re-run sees the same chunk boundaries. ``start`` is local.
    Raises :class:`UserError` on NaN/Inf (naming the first bad row) and on zero-norm rows
    (naming them) unless ``drop_zero_rows`` (then those rows get ``keep_mask=False``).
    """
    for start, block, keep, norms in _validated_chunks(features, chunk_rows, row_offset, drop_zero_rows):
        block /= norms[:, None]
        yield start, block, keep


class UnitRows:
    """This rank's feature rows, l2-normalized on the fly: validated once, then read in any dtype.

    One pass at construction checks NaN/Inf (naming the first bad global row), computes the
    row norms in float64 and the keep mask (zero-norm rows are an error unless
    ``drop_zero_rows``). Later passes only cast and scale, so an optimizer that reads the
    rows every step (SPOKES) pays the checks once. Chunks follow the global grid of
    :func:`iter_unit_row_chunks`.
    """

    def __init__(self, features, chunk_rows: int = DEFAULT_CHUNK_ROWS, *, row_offset: int = 0,
                 drop_zero_rows: bool = False):
        self.features, self.chunk_rows, self.row_offset = features, chunk_rows, row_offset
        n = features.shape[0]
        self.inv_norm = np.zeros(n, dtype=np.float64)
        self.keep = np.zeros(n, dtype=bool)
        for start, _, keep, norms in _validated_chunks(features, chunk_rows, row_offset, drop_zero_rows):
            self.keep[start : start + len(keep)] = keep
            self.inv_norm[start : start + len(keep)] = np.where(keep, 1.0 / norms, 0.0)

    def __len__(self) -> int:
        return self.features.shape[0]

    def chunks(self, dtype=np.float32) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(local start, unit rows in dtype)``; dropped rows are all-zero."""
        for start, stop in chunk_grid(len(self), self.chunk_rows, self.row_offset):
            yield start, self.take(slice(start, stop), dtype)

    def take(self, rows, dtype=np.float32) -> np.ndarray:
        """Unit rows for a slice or an ascending array of local indices."""
        block = np.array(self.features[rows], dtype=dtype)  # always a copy: scaled in place
        block *= self.inv_norm[rows].astype(dtype)[:, None]
        return block


def chunk_grid(n: int, chunk_rows: int, row_offset: int = 0):
    """(start, stop) of the local pieces of the global chunk grid (multiples of chunk_rows)."""
    start = 0
    while start < n:
        stop = min(n, start + chunk_rows - ((row_offset + start) % chunk_rows))
        yield start, stop
        start = stop


def _validated_chunks(features, chunk_rows, row_offset, drop_zero_rows):
    """(start, float64 block, keep mask, norms) per chunk, raising on NaN/Inf and zero rows."""
    if features.ndim != 2:
        raise UserError(f"features must be a 2-d N x d matrix, got shape {tuple(features.shape)}")
    for start, stop in chunk_grid(features.shape[0], chunk_rows, row_offset):
        block = np.array(features[start:stop], dtype=np.float64)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            bad = row_offset + start + int(np.flatnonzero(~finite)[0])
            raise UserError(f"features contain NaN or Inf (first bad row: {bad})")
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        zero = norms == 0.0
        if zero.any() and not drop_zero_rows:
            idx = (row_offset + start + np.flatnonzero(zero)).tolist()
            shown = ", ".join(map(str, idx[:10])) + (" ..." if len(idx) > 10 else "")
            raise UserError(
                f"{len(idx)} feature rows have zero norm (rows {shown}); "
                "pass drop_zero_rows / --drop-zero-rows to drop them"
            )
        norms[zero] = 1.0
        yield start, block, ~zero, norms


class ExactGramSum:
    """Order-independent sum of float64 d x d matrices (62-bit fixed point, exact int64 adds).

    ``bound`` must bound the absolute value of every entry of the final sum (for unit rows
    and non-negative weights, the total weight does). Quantization error per add is
    ``bound * 2**-62``, far below float64 rounding of the entries themselves.
    """

    def __init__(self, dim: int, bound: float):
        if not bound > 0:
            bound = 1.0
        self.exponent = 61 - math.ceil(math.log2(bound + 1e-300))
        self.total = np.zeros((dim, dim), dtype=np.int64)

    def add(self, gram: np.ndarray) -> None:
        self.total += np.rint(np.ldexp(gram, self.exponent)).astype(np.int64)

    def value(self) -> np.ndarray:
        return np.ldexp(self.total.astype(np.float64), -self.exponent)


def gram_matrix(
    features: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    row_offset: int = 0,
    drop_zero_rows: bool = False,
    total_weight: float | None = None,
    reduce=None,
) -> tuple[np.ndarray, int]:
    """G = sum_i w_i x_i x_i^T over unit rows (d x d, float64), plus the number of rows dropped.

    ``reduce`` (optional) sums the fixed-point int64 accumulator across ranks in place
    (see :mod:`spokes_lightning.core.distributed`); ``total_weight`` must then be the global one.
    """
    d = features.shape[1]
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape[0] != features.shape[0]:
            raise UserError(f"{weights.shape[0]} weights for {features.shape[0]} feature rows")
    bound = total_weight if total_weight is not None else (
        float(weights.sum()) if weights is not None else float(features.shape[0])
    )
    acc = ExactGramSum(d, bound)
    dropped = 0
    for start, block, keep in iter_unit_row_chunks(
        features, chunk_rows, row_offset=row_offset, drop_zero_rows=drop_zero_rows
    ):
        dropped += int((~keep).sum())
        if weights is None:
            w = keep.astype(np.float64)
        else:
            w = weights[start : start + len(block)] * keep
        acc.add((block * w[:, None]).T @ block)
    if reduce is not None:
        reduce(acc.total)
    return acc.value(), dropped


def spectrum_entropy(eigenvalues: np.ndarray) -> float:
    """Shannon entropy of lambda = sigma / sum(sigma), eigenvalues clamped at EIGEN_FLOOR."""
    sigma = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    total = sigma.sum()
    if total <= 0:
        return 0.0
    lam = sigma / total
    lam = lam[lam > EIGEN_FLOOR]
    return float(-(lam * np.log(lam)).sum())


def vendi_from_gram(gram: np.ndarray) -> float:
    """exp(entropy of the normalized spectrum) of a PSD Gram matrix (paper eq. 1)."""
    return float(math.exp(spectrum_entropy(np.linalg.eigvalsh(gram))))


def vendi_score(
    features: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    drop_zero_rows: bool = False,
) -> float:
    """G-Vendi of the rows of ``features`` (optionally weighted), from the d x d Gram.

    Zero-norm rows raise :class:`UserError` naming them, or are dropped with a counted
    warning when ``drop_zero_rows`` is set.
    """
    if weights is not None and np.any(np.asarray(weights) < 0):
        raise UserError("vendi_score weights must be non-negative")
    gram, dropped = gram_matrix(
        features, weights, chunk_rows=chunk_rows, drop_zero_rows=drop_zero_rows
    )
    if dropped:
        import warnings

        warnings.warn(f"vendi_score: dropped {dropped} zero-norm rows", stacklevel=2)
    return vendi_from_gram(gram)


def batch_vendi_score(
    features: np.ndarray,
    batch_size: int,
    batches: int,
    *,
    seed: int = 0,
    indices: np.ndarray | None = None,
) -> float:
    """The paper's "batch G-Vendi" (sections 3.2, 5): mean G-Vendi of ``batches`` random batches.

    Each batch is ``batch_size`` rows drawn without replacement (from ``indices`` when
    given, e.g. a selection), seeded.
    """
    pool = np.arange(features.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64)
    if batch_size <= 0 or batches <= 0:
        raise UserError("batch size and number of batches must be positive")
    if batch_size > len(pool):
        raise UserError(f"batch size {batch_size} is larger than the {len(pool)} rows available")
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(batches):
        rows = np.sort(rng.choice(pool, size=batch_size, replace=False))
        scores.append(vendi_score(np.asarray(features[rows])))
    return float(np.mean(scores))


def vendi_score_kernel(features: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Reference definition on the n x n kernel (O(n^2 d + n^3)); for tests and benchmarks."""
    x = np.asarray(features, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    kernel = x @ x.T
    if weights is not None:
        s = np.sqrt(np.asarray(weights, dtype=np.float64))
        kernel = kernel * s[:, None] * s[None, :]
    return float(math.exp(spectrum_entropy(np.linalg.eigvalsh(kernel))))
