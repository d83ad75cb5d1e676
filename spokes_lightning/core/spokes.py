"""SPOKES: maximize alpha ln Q(w) + (1 - alpha) ln Vendi(K_w) over the simplex, then round to k rows.

Paper: "Spokes: Optimizing for Diverse Pretraining Data Selection" (Lee, Choi, Zettlemoyer,
Koh, Chieu), section 3.1, eq. (5)-(7) and Algorithm 1; the derivations and our departures from
the paper are written up in docs/selectors/spokes.md.
Reading order: :func:`relaxed_objective` (eq. 7), :func:`log_vendi_gradient` (closed form),
:func:`objective_gradient`, :func:`exponentiated_gradient_step` (Algorithm 1 lines 10-11),
:func:`armijo_accepts` (our step rule), :func:`run_spokes` (the loop, the stopping rule and the
rounding, see :mod:`.rounding`).

One step costs O(N d^2): the Gram of the trial weights (N d^2), one d x d eigh (d^3), and
one quadratic form per row for the gradient (N d^2). Rows are streamed in chunks, so a
features ``np.memmap`` larger than RAM works; the two matmuls run in float32 (``dtype``), the
per-chunk Grams go into the order-independent fixed-point sum, and the eigh is float64.
Under ``torch.distributed`` each rank passes its own contiguous row shard: Grams and scalars
are all-reduced, the eigh is replicated, and the rounding is global; the result equals the
single-rank run. The reported G-Vendi of the selection is a float64 pass over its rows.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from spokes_lightning.core import distributed as D
from spokes_lightning.utils.errors import UserError
from spokes_lightning.core.rounding import (
    DEFAULT_ROUNDING, GREEDY_GROUPS, GREEDY_ROUNDS, GREEDY_SEED_FRACTION, check_rounding, round_weights,
)
from spokes_lightning.core.vendi import DEFAULT_CHUNK_ROWS, EIGEN_FLOOR, ExactGramSum, UnitRows, gram_matrix, spectrum_entropy

ARMIJO_C = 1e-4
MAX_BACKTRACKS = 30
DEFAULT_STEPS = 20
DEFAULT_ETA_SCALE = 1.0
DEFAULT_TOL = 1e-4  # stop when a step raises the relaxed objective by less than tol * max(1, |objective|)


@dataclass
class SpokesResult:
    indices: np.ndarray  # global row indices of the k selected rows, in the rounding rule's order
    weights: np.ndarray  # this rank's final simplex weights w_T (float64)
    objective: list[float]  # relaxed objective (eq. 7) at w_0 .. w_T
    step_sizes: list[float]  # accepted eta per step
    backtracks: int
    gvendi: float  # G-Vendi of the selected rows (unweighted, paper eq. 1)
    mean_quality: float | None  # mean q over the selected rows
    stats: dict = field(default_factory=dict)


@dataclass
class _Point:
    """Everything known at one weight vector: log weights, spectrum, objective parts."""

    log_w: np.ndarray
    eigvals: np.ndarray
    eigvecs: np.ndarray
    log_vendi: float
    quality: float | None
    objective: float

    @property
    def w(self) -> np.ndarray:
        return np.exp(self.log_w)


def relaxed_objective(alpha: float, expected_quality: float | None, log_vendi: float) -> float:
    """Eq. (7): alpha ln Q(w) + (1 - alpha) ln Vendi(K_w); Q(w) = sum_i w_i q_i (eq. 5)."""
    if alpha == 0.0 or expected_quality is None:
        return (1.0 - alpha) * log_vendi
    return alpha * math.log(expected_quality) + (1.0 - alpha) * log_vendi


def log_vendi_gradient(unit_rows: np.ndarray, eigvecs: np.ndarray, log_lambda: np.ndarray) -> np.ndarray:
    """d ln Vendi / d w_i on the simplex, up to the additive constant -H (derivation in docs/selectors/spokes.md).

    dH/dw_i = -(1/s) (x_i^T U diag(ln lambda) U^T x_i + H) with s = sum w = 1; EG is
    invariant to adding a constant to every coordinate, so we return -x_i^T U diag(ln l) U^T x_i.
    """
    projected = unit_rows @ eigvecs
    np.square(projected, out=projected)
    return -(projected @ log_lambda)


def objective_gradient(
    alpha: float, vendi_grad: np.ndarray, quality: np.ndarray | None, expected_quality: float | None
) -> np.ndarray:
    """grad_i L for L = -(alpha ln Q + (1 - alpha) ln Vendi) (Algorithm 1, line 9)."""
    grad = -(1.0 - alpha) * vendi_grad
    if alpha > 0.0 and quality is not None:
        grad = grad - alpha * quality / expected_quality
    return grad


def exponentiated_gradient_step(log_w: np.ndarray, grad: np.ndarray, eta: float) -> np.ndarray:
    """Algorithm 1 lines 10-11 in log space: w <- w exp(-eta g) / sum_j w_j exp(-eta g_j).

    The normalizer is a global log-sum-exp (max all-reduced, the sum in exact fixed point so
    every sharding gives the same bits). Rows with w_i = 0 (log w_i = -inf, dropped) stay at 0.
    """
    trial = log_w - eta * grad
    finite = np.isfinite(trial)
    local_max = float(trial[finite].max()) if finite.any() else -np.inf
    shift = D.all_reduce_scalar(local_max, op="max")
    total = D.exact_sum(np.exp(trial[finite] - shift), bound=float(D.all_reduce_scalar(float(finite.sum()))))
    return trial - (shift + math.log(total))


def armijo_accepts(old: _Point, new: _Point, grad: np.ndarray) -> bool:
    """Sufficient decrease of L along the EG move: L(w') <= L(w) + c grad.(w' - w)."""
    bound = 2.0 * D.all_reduce_scalar(float(np.abs(grad).max(initial=0.0)), op="max")
    slope = D.exact_sum(grad * (new.w - old.w), bound=bound)
    return -new.objective <= -old.objective + ARMIJO_C * slope


class _Problem:
    """The data side of one SPOKES run on this rank's shard: unit rows, quality, reductions."""

    def __init__(self, features, quality, alpha, chunk_rows, drop_zero_rows, dtype=np.float32):
        self.features = features
        self.quality = None if quality is None else np.asarray(quality, dtype=np.float64)
        self.alpha = alpha
        self.chunk_rows = chunk_rows
        self.dtype = np.dtype(dtype)
        self.row_offset, self.n_total = D.shard_offset(features.shape[0])
        self.rows = UnitRows(features, chunk_rows, row_offset=self.row_offset, drop_zero_rows=drop_zero_rows)
        self.keep = self.rows.keep
        self.n_kept = int(D.all_reduce_scalar(float(self.keep.sum())))
        self.quality_bound = 1.0 if self.quality is None else D.all_reduce_scalar(
            float(np.abs(self.quality).max(initial=0.0)), op="max")

    def weighted_gram(self, w: np.ndarray) -> np.ndarray:
        """G(w) = sum_i w_i x_i x_i^T (eq. 6), chunk Grams in ``dtype``, summed exactly across ranks."""
        acc = ExactGramSum(self.features.shape[1], 1.0)
        for start, block in self.rows.chunks(self.dtype):
            block *= np.sqrt(w[start : start + len(block)]).astype(self.dtype)[:, None]
            acc.add((block.T @ block).astype(np.float64))  # B^T B: numpy's symmetric rank-k kernel
        D.all_reduce_sum_(acc.total)
        return acc.value()

    def point(self, log_w: np.ndarray) -> _Point:
        """Gram of w (all-reduced), its eigh, ln Vendi, Q(w) and the objective."""
        w = np.exp(log_w)
        eigvals, eigvecs = np.linalg.eigh(self.weighted_gram(w))
        log_vendi = spectrum_entropy(eigvals)
        q = None
        if self.quality is not None:
            q = D.exact_sum(w * self.quality, bound=self.quality_bound)
        return _Point(log_w, eigvals, eigvecs, log_vendi, q, relaxed_objective(self.alpha, q, log_vendi))

    def gradient(self, p: _Point) -> np.ndarray:
        sigma = np.clip(p.eigvals, 0.0, None)
        log_lambda = np.log(np.maximum(sigma / sigma.sum(), EIGEN_FLOOR)).astype(self.dtype)
        eigvecs = p.eigvecs.astype(self.dtype)
        vendi_grad = np.zeros(self.features.shape[0])
        for start, block in self.rows.chunks(self.dtype):
            vendi_grad[start : start + len(block)] = log_vendi_gradient(block, eigvecs, log_lambda)
        grad = objective_gradient(self.alpha, vendi_grad, self.quality, p.quality)
        grad[~self.keep] = 0.0
        return grad

    def gradient_spread(self, p: _Point, grad: np.ndarray) -> float:
        """sqrt of the w-weighted variance of the gradient (the scale of an EG move)."""
        w = p.w
        bound = D.all_reduce_scalar(float(np.abs(grad).max(initial=0.0)), op="max")
        mean = D.exact_sum(w * grad, bound=bound)
        var = D.exact_sum(w * (grad - mean) ** 2, bound=4.0 * bound * bound)
        return math.sqrt(max(var, 0.0))


def check_spokes_inputs(features: np.ndarray, quality: np.ndarray | None, alpha: float) -> None:
    if not (0.0 <= alpha <= 1.0) or math.isnan(alpha):
        raise UserError(f"alpha must be in [0, 1], got {alpha}")
    if features.ndim != 2:
        raise UserError(f"features must be a 2-d N x d matrix, got shape {tuple(features.shape)}")
    if quality is None:
        if alpha > 0:
            raise UserError(f"alpha = {alpha} > 0 needs quality scores (--quality)")
        return
    q = np.asarray(quality)
    if q.ndim != 1 or q.shape[0] != features.shape[0]:
        raise UserError(f"quality has shape {tuple(q.shape)} but features have {features.shape[0]} rows")
    if not np.isfinite(q).all():
        raise UserError(f"quality contains NaN or Inf (first bad row: {int(np.flatnonzero(~np.isfinite(q))[0])})")
    if alpha > 0:
        if (q < 0).any():
            raise UserError(f"quality must be non-negative for ln Q (first negative row: {int(np.flatnonzero(q < 0)[0])})")
        if D.all_reduce_scalar(float(q.sum())) <= 0:
            raise UserError("mean quality is zero: ln Q is undefined with alpha > 0")


def run_spokes(
    features: np.ndarray,
    quality: np.ndarray | None = None,
    *,
    alpha: float = 0.0,
    k: int,
    steps: int = DEFAULT_STEPS,
    tol: float = DEFAULT_TOL,
    step_rule: str = "backtracking",
    lr: float | None = None,
    eta_scale: float = DEFAULT_ETA_SCALE,
    rounding: str = DEFAULT_ROUNDING,
    seed: int = 0,
    seed_fraction: float = GREEDY_SEED_FRACTION,
    greedy_rounds: int = GREEDY_ROUNDS,
    greedy_groups: int = GREEDY_GROUPS,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    drop_zero_rows: bool = False,
    dtype=np.float32,
    log=None,
) -> SpokesResult:
    """Algorithm 1 from uniform w_0: at most ``steps`` exponentiated-gradient steps, then rounding.

    ``step_rule="fixed"`` is the paper's plain update with ``lr`` = eta. ``"backtracking"``
    (default) starts from eta = lr, or eta_scale / (w-weighted std of the gradient), and
    halves eta until the Armijo condition holds, so the objective never decreases; the
    accepted trial's Gram and eigh are reused for the next step. The loop stops early when a
    step raises the objective by less than ``tol * max(1, |objective|)`` (``tol=0``: never).
    ``rounding`` turns w into k rows (:mod:`.rounding`: ``greedy``, ``topk`` = the paper's
    Algorithm 1, ``systematic``); ``seed`` drives the rounding's randomness only.
    ``k`` is the GLOBAL count. Under torch.distributed, ``features``/``quality`` are this
    rank's contiguous row shard.
    """
    check_spokes_inputs(features, quality, alpha)
    check_rounding(rounding)
    if step_rule not in ("backtracking", "fixed"):
        raise UserError(f"step rule must be 'backtracking' or 'fixed', got {step_rule!r}")
    if step_rule == "fixed" and (lr is None or not math.isfinite(lr) or lr <= 0):
        raise UserError("--step-rule fixed needs a positive, finite --lr")
    if lr is not None and (not math.isfinite(lr) or lr <= 0):
        raise UserError(f"lr must be a positive, finite number, got {lr}")
    if not (math.isfinite(eta_scale) and eta_scale > 0):
        raise UserError(f"eta_scale must be a positive, finite number, got {eta_scale}")
    if steps < 0:
        raise UserError(f"steps must be >= 0, got {steps}")
    if not (math.isfinite(tol) and tol >= 0):
        raise UserError(f"tol must be a finite number >= 0, got {tol}")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    problem = _Problem(features, quality, alpha, chunk_rows, drop_zero_rows, dtype)
    if problem.n_kept == 0:
        raise UserError(f"all {problem.n_total} feature rows have zero norm: nothing to select")
    if not (1 <= k <= problem.n_kept):
        raise UserError(f"budget must be in [1, {problem.n_kept}] documents, got {k}")
    log_w = np.where(problem.keep, -math.log(problem.n_kept), -np.inf)
    point = problem.point(log_w)
    history, etas, backtracks, step_seconds = [point.objective], [], 0, []
    eta, converged = lr, False
    for step in range(steps):
        t_step = time.perf_counter()
        grad = problem.gradient(point)
        if eta is None:
            spread = problem.gradient_spread(point, grad)
            if spread == 0.0:
                log(f"spokes: gradient is constant at step {step}; stopping")
                converged = True
                break
            eta = eta_scale / spread
        trial = problem.point(exponentiated_gradient_step(point.log_w, grad, eta))
        if step_rule == "backtracking":
            tries = 0
            while not armijo_accepts(point, trial, grad):
                tries += 1
                if tries > MAX_BACKTRACKS:
                    break
                eta *= 0.5
                trial = problem.point(exponentiated_gradient_step(point.log_w, grad, eta))
            backtracks += tries
            if tries > MAX_BACKTRACKS:
                log(f"spokes: no ascent step found at step {step} (converged); stopping")
                converged = True
                break
        gain = trial.objective - point.objective
        point = trial
        history.append(point.objective)
        etas.append(eta)
        step_seconds.append(time.perf_counter() - t_step)
        log(f"spokes: step {step + 1}/{steps} objective {point.objective:.6f} "
            f"ln_vendi {point.log_vendi:.4f} eta {eta:.4g}")
        if tol > 0 and gain < tol * max(1.0, abs(point.objective)):
            log(f"spokes: objective rose by {gain:.3g} < tol; converged after {step + 1} steps")
            converged = True
            break
    t_round = time.perf_counter()
    indices = round_weights(rounding, problem.rows, point.log_w, k, seed=seed,
                            quality=problem.quality if alpha > 0 else None, alpha=alpha,
                            relaxed_quality=point.quality, seed_fraction=seed_fraction,
                            rounds=greedy_rounds, groups=greedy_groups, dtype=problem.dtype)
    rounding_seconds = time.perf_counter() - t_round
    log(f"spokes: {len(etas)} of at most {steps} steps ({'converged' if converged else 'step limit'}); "
        f"rounding {rounding} (seed {seed}) took {rounding_seconds:.2f} s")
    gvendi, mean_q = selection_scores(features, quality, indices, problem.row_offset, chunk_rows)
    stats = {
        "alpha": alpha, "steps_run": len(etas), "max_steps": steps, "tol": tol, "converged": converged,
        "step_rule": step_rule, "backtracks": backtracks, "rounding": rounding, "rounding_seed": seed,
        "relaxed_vendi": math.exp(point.log_vendi), "relaxed_quality": point.quality,
        "n_total": problem.n_total, "n_dropped": problem.n_total - problem.n_kept,
        "seconds": time.perf_counter() - t0, "step_seconds": step_seconds, "rounding_seconds": rounding_seconds,
    }
    if rounding == "greedy":
        stats.update(seed_fraction=seed_fraction, greedy_rounds=greedy_rounds, greedy_groups=greedy_groups)
    return SpokesResult(indices, point.w, history, etas, backtracks, gvendi, mean_q, stats)


def selection_scores(features, quality, indices, row_offset=0, chunk_rows=DEFAULT_CHUNK_ROWS):
    """G-Vendi (eq. 1) and mean quality of the selected global ``indices`` (all ranks agree).

    A float64 pass over the selected rows, read ``chunk_rows`` at a time (a large selection
    from a memmap is never copied whole).
    """
    local = np.sort(indices[(indices >= row_offset) & (indices < row_offset + features.shape[0])]) - row_offset
    acc = ExactGramSum(features.shape[1], float(len(indices)))
    for start in range(0, len(local), chunk_rows):
        block = np.asarray(features[local[start : start + chunk_rows]])
        gram, _ = gram_matrix(block, None, chunk_rows=chunk_rows, drop_zero_rows=True, total_weight=float(len(indices)))
        acc.add(gram)
    D.all_reduce_sum_(acc.total)
    gvendi = math.exp(spectrum_entropy(np.linalg.eigvalsh(acc.value())))
    mean_q = None
    if quality is not None:
        mean_q = D.all_reduce_scalar(float(np.asarray(quality, dtype=np.float64)[local].sum())) / len(indices)
    return gvendi, mean_q
