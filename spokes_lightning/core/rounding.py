"""From SPOKES's relaxed simplex weights w to a k-subset: the rounding rules.

Paper section 3.1, Algorithm 1, line 13 keeps the top-k of w (:func:`top_k_rounding`, rule
``topk``). At the relaxed optimum every cluster of similar rows gets about the same total
mass, spread over its members, so a member of a small cluster has a far larger w_i than a
member of a large one: top-k takes whole small clusters first and can cover fewer clusters
than a random subset. Two more rules:

- ``systematic`` (:func:`systematic_rounding`): inclusion probabilities pi_i = min(1, c w_i)
  with sum pi = k (:func:`inclusion_probabilities`), then systematic sampling with one
  seeded start over the fixed global row order (global prefix sums), so each region of the
  data gets about the mass the relaxed optimum gave it.
- ``greedy`` (:func:`greedy_rounding`, the default): keep the top ``seed_fraction`` of w, then
  grow the set in ``rounds`` blocks; each block adds the rows with the largest first-order gain
  of the objective of the set itself (the linearized d F / d w_j at the current set, the same
  closed form as the optimizer's gradient), scored on one of ``groups`` seeded random groups of
  row tiles (stochastic greedy, Mirzasoleiman et al., AAAI 2015), so the cost is about
  rounds / groups passes of quadratic forms over the data plus one eigendecomposition per round:
  of the |S| x |S| kernel X_S X_S^T while the set has fewer rows than the feature dimension d
  (:func:`kernel_space_basis`: it shares its non-zero spectrum with the d x d Gram X_S^T X_S),
  of the d x d Gram (:func:`gram_space_basis`) from then on.

The default was chosen from ``bench/bench_rounding.py`` (table in docs/selectors/rounding.md). Every rule is
deterministic given the seed and gives the same subset for any number of ranks: each rank
holds a contiguous shard of the global rows; sums are all-reduced and every "take the best b"
is a global top-b over gathered candidates, ties going to the lower global index.
"""
from __future__ import annotations

import math

import numpy as np

from spokes_lightning.core import distributed as D
from spokes_lightning.utils.errors import UserError
from spokes_lightning.core.vendi import EIGEN_FLOOR, ExactGramSum, UnitRows, chunk_grid

ROUNDING_RULES = ("greedy", "topk", "systematic")
DEFAULT_ROUNDING = "greedy"
GREEDY_ROUNDS = 64
GREEDY_GROUPS = 8
GREEDY_SEED_FRACTION = 0.25
TILE_ROWS = 64  # candidate groups are drawn per tile of up to 64 consecutive rows (cheap memmap reads)
TILES_PER_GROUP = 64  # ... but every group gets at least this many tiles, so small N keeps fine groups


def global_top_k(scores: np.ndarray, k: int, global_index: np.ndarray) -> np.ndarray:
    """Global indices of the k largest ``scores`` across ranks (largest first, ties to the lower index)."""
    local = np.lexsort((global_index, -scores))[:k]
    candidates = D.all_gather_objects((scores[local], global_index[local]))
    values = np.concatenate([c[0] for c in candidates])
    index = np.concatenate([c[1] for c in candidates]).astype(np.int64)
    return index[np.lexsort((index, -values))[:k]]


def top_k_rounding(log_w: np.ndarray, k: int, row_offset: int) -> np.ndarray:
    """Algorithm 1, line 13: the k rows of largest w (the paper's rule)."""
    return global_top_k(log_w, k, row_offset + np.arange(len(log_w), dtype=np.int64))


def inclusion_probabilities(w: np.ndarray, k: int, iterations: int = 100) -> np.ndarray:
    """pi_i = min(1, c w_i) with sum_i pi_i = k (global), c found by bisection on ln c."""
    w = np.asarray(w, dtype=np.float64)
    n_total = D.all_reduce_scalar(float(len(w)))
    positive = D.all_reduce_scalar(float((w > 0).sum()))
    if positive < k:
        raise UserError(f"only {int(positive)} rows have positive weight; cannot sample {k}")
    w_max = D.all_reduce_scalar(float(w.max(initial=0.0)), op="max")
    w_min = -D.all_reduce_scalar(-float(w[w > 0].min()) if (w > 0).any() else -np.inf, op="max")
    lo, hi = math.log(k / (positive * w_max)), math.log(k / w_min) + 1.0  # sum(lo) <= k <= sum(hi)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if D.exact_sum(np.minimum(1.0, math.exp(mid) * w), bound=n_total) < k:
            lo = mid
        else:
            hi = mid
    return np.minimum(1.0, math.exp(hi) * w)


def systematic_rounding(log_w: np.ndarray, k: int, row_offset: int, seed: int) -> np.ndarray:
    """Systematic sampling of exactly k rows with inclusion probabilities pi ~ w.

    Points u, u + 1, ..., u + k - 1 (u ~ U(0, 1) from ``seed``) fall on the cumulative sums of
    pi over the global row order; row i is taken when a point lands in its interval, so
    P(i taken) = pi_i, and since pi_i <= 1 a row is hit at most once. The sums run in int64
    fixed point (pi on a grid of 2**-S), exact for any sharding. Drift of sum(pi) from k is
    repaired by a global top-up / trim on pi. Returned best (largest w) first.
    """
    pi = inclusion_probabilities(np.exp(log_w), k)
    scale = 61 - math.ceil(math.log2(k + 2))
    pi_q = np.rint(np.ldexp(pi, scale)).astype(np.int64)
    totals = D.all_gather_objects(int(pi_q.sum()))
    rank, _ = D.world()
    u_q = int(np.ldexp(float(np.random.default_rng([seed, 7919]).random()), scale))
    cum = int(sum(totals[:rank])) + np.concatenate([[0], np.cumsum(pi_q)])
    unit = np.int64(1) << np.int64(scale)
    points_below = -((u_q - cum) // unit)  # ceil((cum - u) / unit): points u + m * unit below cum
    hits = np.diff(points_below) > 0
    index = row_offset + np.arange(len(pi), dtype=np.int64)
    count = int(D.all_reduce_scalar(float(hits.sum())))
    if count > k:  # trim the hits with the smallest pi
        hits &= ~np.isin(index, global_top_k(np.where(hits, -pi, -np.inf), count - k, index))
    elif count < k:  # top up with the largest pi not yet hit
        hits |= np.isin(index, global_top_k(np.where(hits, -np.inf, pi), k - count, index))
    return global_top_k(np.where(hits, log_w, -np.inf), k, index)


def tile_groups(n_local: int, row_offset: int, n_total: int, groups: int, seed: int) -> np.ndarray:
    """Seeded group id in [0, groups) per row, constant over tiles of consecutive global rows.

    Tiles hold min(TILE_ROWS, N / (groups * TILES_PER_GROUP)) rows (at least 1); the group of
    a tile is a splitmix64 hash of (seed, global tile index): the same for any sharding.
    """
    tile_rows = max(1, min(TILE_ROWS, n_total // (groups * TILES_PER_GROUP)))
    tile = (row_offset + np.arange(n_local, dtype=np.uint64)) // np.uint64(tile_rows)
    with np.errstate(over="ignore"):
        z = tile + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(groups)).astype(np.int64)


def set_gain_scores(unit_rows: np.ndarray, eigvecs: np.ndarray, log_lambda: np.ndarray,
                    quality: np.ndarray | None, alpha: float, set_quality: float | None,
                    null_log_lambda: float | None = None) -> np.ndarray:
    """First-order gain of F(S) = alpha ln Q_S + (1 - alpha) ln Vendi_S from adding each row.

    d F / d t of the mixture (1 - t) * uniform(S) + t * e_j at t = 0, less a constant shared
    by every row: (1 - alpha) * (-x_j^T U diag(ln lambda) U^T x_j) + alpha * q_j / Q_S
    (the optimizer's gradient, :func:`spokes_lightning.core.spokes.log_vendi_gradient`, at the set).
    ``eigvecs`` (d x r) may span part of the space only: with ``null_log_lambda`` set, every
    direction orthogonal to them has that ln lambda, and ``log_lambda`` holds ln lambda_m -
    ``null_log_lambda`` (so x^T U diag(ln lambda) U^T x = null |x|^2 + sum_m (x.u_m)^2 log_lambda_m).
    """
    projected = unit_rows @ eigvecs.astype(unit_rows.dtype)
    np.square(projected, out=projected)
    quad = (projected @ log_lambda.astype(unit_rows.dtype)).astype(np.float64)
    if null_log_lambda is not None:
        quad += null_log_lambda * np.einsum("ij,ij->i", unit_rows, unit_rows, dtype=np.float64)
    gain = (1.0 - alpha) * -quad
    if alpha > 0.0 and quality is not None:
        gain += alpha * quality / set_quality
    return gain


LOG_EIGEN_FLOOR = math.log(EIGEN_FLOOR)


def gram_space_basis(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray, float | None]:
    """(eigenvectors, ln lambda, None) of the set's d x d Gram G = X_S^T X_S (lambda = sigma / tr G).

    The arguments :func:`set_gain_scores` takes after ``unit_rows``; one d x d eigh.
    """
    sigma, eigvecs = np.linalg.eigh(gram)
    sigma = np.clip(sigma, 0.0, None)
    return eigvecs, np.log(np.maximum(sigma / sigma.sum(), EIGEN_FLOOR)), None


def kernel_space_basis(set_rows: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The same quadratic form as :func:`gram_space_basis` from the m x m kernel K = X_S X_S^T.

    K = V diag(sigma) V^T and G = X_S^T X_S share their non-zero eigenvalues (so tr K = tr G and
    the same lambda), and u_m = X_S^T v_m / sqrt(sigma_m) are G's unit eigenvectors. Directions
    with lambda at or below :data:`EIGEN_FLOOR` (G's null space included) all get
    ln EIGEN_FLOOR, exactly as the d x d path clamps them, so only the r eigenvectors above the
    floor are formed: returns (U_r (d x r), ln lambda_r - ln EIGEN_FLOOR, ln EIGEN_FLOOR), for
    :func:`set_gain_scores`. Cost O(m^2 d + m^3) instead of the d x d eigh's O(d^3).
    """
    sigma, vecs = np.linalg.eigh(kernel)
    sigma = np.clip(sigma, 0.0, None)
    log_lambda = np.log(np.maximum(sigma / sigma.sum(), EIGEN_FLOOR))
    above = log_lambda > LOG_EIGEN_FLOOR
    basis = set_rows.T @ (vecs[:, above] / np.sqrt(sigma[above]))
    return basis, log_lambda[above] - LOG_EIGEN_FLOOR, LOG_EIGEN_FLOOR


class _SetKernel:
    """The picked rows (float64, in the order added) and their kernel K = X_S X_S^T, grown block by block."""

    def __init__(self, d: int):
        self.rows = np.zeros((0, d))
        self.kernel = np.zeros((0, 0))
        self.bounds = [0]  # rows[bounds[i] : bounds[i + 1]] is the i-th block added

    def add(self, block: np.ndarray) -> None:
        cross = self.rows @ block.T
        m, b = len(self.rows), len(block)
        kernel = np.empty((m + b, m + b))
        kernel[:m, :m] = self.kernel
        kernel[:m, m:] = cross
        kernel[m:, :m] = cross.T
        kernel[m:, m:] = block @ block.T
        self.rows, self.kernel = np.concatenate([self.rows, block]), kernel
        self.bounds.append(m + b)

    def blocks(self):
        """The blocks as added (for the d x d Gram once the set reaches d rows)."""
        for start, stop in zip(self.bounds, self.bounds[1:]):
            yield self.rows[start:stop]


def greedy_rounding(
    rows: UnitRows, log_w: np.ndarray, k: int, *, quality: np.ndarray | None = None, alpha: float = 0.0,
    relaxed_quality: float | None = None, seed: int = 0, seed_fraction: float = GREEDY_SEED_FRACTION,
    rounds: int = GREEDY_ROUNDS, groups: int = GREEDY_GROUPS, dtype=np.float32, kernel_space: bool = True,
) -> np.ndarray:
    """Top ``seed_fraction * k`` rows of w, then ``rounds`` blocks of stochastic linearized greedy.

    Round r adds ceil(remaining / rounds left) rows: the best-gain rows (:func:`set_gain_scores`)
    among the unselected rows of tile group r mod ``groups`` (all unselected rows once a group
    runs short), plus, when alpha > 0, the 2b best unselected rows by quality, so that the
    static quality part of the gain is never missed (alpha = 1 gives the quality top-k). The Gram of the set is a float64 fixed-point sum over the picked rows: each
    round's picks are gathered in global index order and every rank adds the same block, so
    the Gram (and the float64 null space of a small set) is the same bits at any world size;
    candidates are scored in blocks of the global chunk grid for the same reason.
    While the set has fewer rows than d (and ``kernel_space``), each round's eigendecomposition is
    of the |S| x |S| kernel of the gathered set rows instead (:func:`kernel_space_basis`, the same
    scores up to rounding; the rows are the same on every rank); the Gram is summed (from the same
    blocks, so the same bits) only when the set reaches d rows. ``kernel_space=False`` always uses
    the d x d Gram (the reference path).
    ``rows`` is this rank's :class:`UnitRows`; returns global indices in the order picked.
    """
    if not 0.0 <= seed_fraction <= 1.0:
        raise UserError(f"seed_fraction must be in [0, 1], got {seed_fraction}")
    if rounds < 1 or groups < 1:
        raise UserError(f"greedy rounds and groups must be >= 1, got {rounds} and {groups}")
    n_local, d = rows.features.shape
    index = rows.row_offset + np.arange(n_local, dtype=np.int64)
    eligible = np.isfinite(log_w) & rows.keep
    selected = np.zeros(n_local, dtype=bool)
    total = ExactGramSum(d, float(k))
    set_kernel = _SetKernel(d) if kernel_space else None  # while |S| < d: the set rows and their kernel
    q_bound = 1.0 if quality is None else D.all_reduce_scalar(float(np.abs(quality).max(initial=0.0)), op="max")
    quality_sum = 0.0
    order: list[np.ndarray] = []

    def take(picks: np.ndarray) -> None:
        """Add the picks to the set; every rank adds the same float64 Gram of the same gathered rows."""
        nonlocal quality_sum
        ordered = np.sort(picks)  # the same on every rank; shards are contiguous, so gathering a
        for start in range(0, len(ordered), rows.chunk_rows):  # slice in rank order keeps it sorted
            part = ordered[start : start + rows.chunk_rows]
            mine = part[(part >= rows.row_offset) & (part < rows.row_offset + n_local)] - rows.row_offset
            block = np.concatenate(D.all_gather_objects(rows.take(mine, np.float64)))
            if set_kernel is not None:
                set_kernel.add(block)
            else:
                total.add(block.T @ block)
        local = picks[(picks >= rows.row_offset) & (picks < rows.row_offset + n_local)] - rows.row_offset
        selected[local] = True
        if quality is not None:
            quality_sum += D.exact_sum(quality[local], bound=q_bound * len(picks))
        order.append(picks)

    take(top_k_rounding(log_w, max(1, int(seed_fraction * k)), rows.row_offset))
    n_total = int(D.all_reduce_scalar(float(n_local)))
    group_of = tile_groups(n_local, rows.row_offset, n_total, groups, seed)
    picked = len(order[0])
    for r in range(rounds):
        if picked >= k:
            break
        b = math.ceil((k - picked) / (rounds - r))
        candidates = eligible & ~selected & (group_of == r % groups)
        if D.all_reduce_scalar(float(candidates.sum())) < b:
            candidates = eligible & ~selected
        elif quality is not None and alpha > 0:  # the quality part of the gain is static: always
            best_q = global_top_k(np.where(eligible & ~selected, quality, -np.inf), 2 * b, index)  # offer the
            candidates[best_q[(best_q >= rows.row_offset) & (best_q < rows.row_offset + n_local)]
                       - rows.row_offset] = True  # 2b best unselected rows by quality as well
        if set_kernel is not None and picked >= d:  # the set has reached d rows: the d x d Gram from now on
            for block in set_kernel.blocks():
                total.add(block.T @ block)
            set_kernel = None
        if set_kernel is not None:
            eigvecs, log_lambda, null_log_lambda = kernel_space_basis(set_kernel.rows, set_kernel.kernel)
        else:
            eigvecs, log_lambda, null_log_lambda = gram_space_basis(total.value())
        set_quality = quality_sum / picked if quality is not None and quality_sum > 0 else relaxed_quality
        gain = np.full(n_local, -np.inf)
        for start, stop in chunk_grid(n_local, rows.chunk_rows, rows.row_offset):  # same blocks at any world size
            part = start + np.flatnonzero(candidates[start:stop])
            if len(part):
                gain[part] = set_gain_scores(rows.take(part, dtype), eigvecs, log_lambda,
                                             None if quality is None else quality[part], alpha, set_quality,
                                             null_log_lambda)
        local = np.flatnonzero(candidates)
        picks = global_top_k(gain[local], b, index[local])
        take(picks)
        picked += len(picks)
    return np.concatenate(order)


def round_weights(rule: str, rows: UnitRows, log_w: np.ndarray, k: int, *, seed: int = 0,
                  quality: np.ndarray | None = None, alpha: float = 0.0, relaxed_quality: float | None = None,
                  seed_fraction: float = GREEDY_SEED_FRACTION, rounds: int = GREEDY_ROUNDS,
                  groups: int = GREEDY_GROUPS, dtype=np.float32) -> np.ndarray:
    """k global row indices from the relaxed weights ``exp(log_w)`` with rounding ``rule``."""
    check_rounding(rule)
    if rule == "topk":
        return top_k_rounding(log_w, k, rows.row_offset)
    if rule == "systematic":
        return systematic_rounding(log_w, k, rows.row_offset, seed)
    return greedy_rounding(rows, log_w, k, quality=quality, alpha=alpha, relaxed_quality=relaxed_quality,
                           seed=seed, seed_fraction=seed_fraction, rounds=rounds, groups=groups, dtype=dtype)


def check_rounding(rule: str) -> str:
    if rule not in ROUNDING_RULES:
        raise UserError(f"unknown rounding {rule!r}; choose one of: {', '.join(ROUNDING_RULES)}")
    return rule
