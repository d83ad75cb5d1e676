"""DATAMASK: joint quality-and-diversity selection by policy-gradient mask learning.

Fan, Xian, Sun, Shen, *Joint Selection for Large-Scale Pre-Training Data via Policy
Gradient-based Mask Learning* (arXiv 2512.24265). Only the ABSTRACT is available here
(../shared/papers/datamask_abstract.txt): this module builds the method the abstract
describes ("iterative sampling of data masks, computation of policy gradients based on
predefined objectives with sampled masks, and updating of mask sampling logits"), and every
detail below that the abstract leaves open is our choice, marked **choice**.

The method
----------
Every candidate document i has a mask logit ``L_i``. One step:

1. draw a group of ``group_size`` (G) masks, each of EXACTLY the budget size k, without
   replacement from softmax(L): Gumbel top-k (add Gumbel(0, 1) noise, keep the k largest,
   in decreasing order), which draws an ordered Plackett-Luce sample;
2. score each mask S with the joint objective
   ``f(S) = lam * f_quality(S) + (1 - lam) * f_diversity(S)``;
3. group-relative advantages ``A_g = (f_g - mean_G f) / std_G f`` (**choice** of the
   default, GRPO-like, as public summaries of the paper describe; ``advantage="loo"`` gives
   the leave-one-out baseline ``f_g - mean of the others``, an unbiased estimator of the
   gradient of E[f]);
4. a policy-gradient ascent step ``L += lr * (1/G) sum_g A_g grad log P(order_g)``.

The final selection is the k largest logits (best first; ties toward the lower row).

The objective
-------------
* ``f_quality(S)``: the mean over S of the per-document quality, itself the mean of the
  named quality scores (``scores``: comma-separated names; default every named score, or
  the primary ``quality`` when there are no named ones), each normalised to [0, 1] over the
  pool first. **choice**: ``normalize="rank"`` (default; average rank of ties / (N - 1):
  robust to the scores' scales and outliers, so two classifiers weigh the same) or
  ``"minmax"``. A constant score normalises to 0.5 under both.
* ``f_diversity(S)`` (``diversity``), each in [0, 1] at realistic sizes:

  - ``gvendi`` (default): G-Vendi of the unit gradient features of S divided by its
    largest possible value min(k, d). Computed from the d x d Gram ``X_S^T X_S`` (the
    :mod:`spokes_lightning.vendi` form) when d <= k; when k < d the k x k kernel
    ``X_S X_S^T`` has the same non-zero spectrum and is cheaper, so that one is used.
  - ``cosine``: mean pairwise cosine dissimilarity of the embeddings,
    ``1 - mean_{i != j} cos(e_i, e_j)``, from the sum of unit rows in O(k e).
  - ``facility``: facility location on the embeddings,
    ``mean_{r in R} max_{i in S} (1 + cos(e_r, e_i)) / 2`` over a reference set R of
    ``reference_size`` documents drawn (seeded) from the whole pool (**choice**: a sample,
    so one evaluation costs O(k |R| e), not O(k N e); the whole pool when it is smaller).

The log-probability (Plackett-Luce) in O(N)
-------------------------------------------
For an ordered sample s_1..s_k, ``log P = sum_j L_{s_j} - sum_j log D_j`` with
``D_j = Z_U + sum_{t >= j} exp(L_{s_t})`` (Z_U the mass of the unsampled rows): one
log-sum-exp over the unsampled rows and a reverse cumulative log-add-exp over the sampled
order. Its gradient: ``-exp(L_i) sum_j 1/D_j`` for an unsampled i and
``1 - exp(L_{s_t}) sum_{j <= t} 1/D_j`` for the t-th pick (a forward cumulative sum).
Both are O(N) numpy passes, no Python loop over picks (:func:`plackett_luce_logprob`).

Practical settings (the abstract's "various acceleration enhancements"; ours)
-----------------------------------------------------------------------------
* ``prune``: drop the bottom share of the pool by quality before learning (the pool
  keeps at least k candidates); pruned rows rank after every candidate, by quality.
* ``init="quality"``: logits start at ``init_scale`` times the z-scored quality
  (``"uniform"``: zeros).
* ``block_size``: each step updates a random block B of that many candidates only. The
  masks of that step keep the current top-k documents outside B fixed and sample the
  k_B = |top-k inside B| others from softmax(L_B) (a conditional Plackett-Luce policy on
  the block), so each mask is still a full k-document mask scored on the true objective,
  and the sampled part, the gradient and the update cost O(|B|) (the fixed part's
  aggregates are computed once per step). None (default): the whole candidate pool.

:func:`greedy_objective_selection` is the baseline the abstract compares against: greedy
on the same objective, adding at each step the document with the largest exact f(S + i).

Budgets in tokens: the driver asks for a full ranking (k = N), where every mask is the whole
pool; the ranking is then the initial logits (quality), recorded in ``stats``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import UserError
from ..progress import progress
from ..vendi import EIGEN_FLOOR, UnitRows
from .base import Param, SelectionInputs, SelectionResult, Selector, register, top_k_indices

DIVERSITY = ("gvendi", "cosine", "facility")
NORMALIZE = ("rank", "minmax")
ADVANTAGE = ("group", "loo")
#: the input each diversity term reads
DIVERSITY_INPUT = {"gvendi": "features", "cosine": "embeddings", "facility": "embeddings"}
_SIM_MATRIX_MAX = 50_000_000  # greedy facility: precompute candidates x reference sims up to this size


# ----------------------------------------------------------------------------------------
# quality
# ----------------------------------------------------------------------------------------

def normalise_scores(values, how: str = "rank") -> np.ndarray:
    """Scores mapped to [0, 1] (float64): ``rank`` (average rank of ties / (N - 1)) or ``minmax``.

    A constant vector maps to 0.5 under both rules (its average rank is the middle one).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    n = len(v)
    if not np.isfinite(v).all():
        raise UserError("datamask: quality scores must be finite")
    if n <= 1:
        return np.full(n, 0.5)
    if how == "minmax":
        lo, hi = float(v.min()), float(v.max())
        return np.full(n, 0.5) if hi == lo else (v - lo) / (hi - lo)
    if how != "rank":
        raise UserError(f"datamask: normalize must be one of {', '.join(NORMALIZE)}, got {how!r}")
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    # average rank of each run of equal values
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], n]
    avg = (starts + ends - 1) / 2.0
    ranks = np.empty(n)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks / (n - 1)


def combined_quality(inputs: SelectionInputs, names: str | None, how: str) -> tuple[np.ndarray, list[str]]:
    """Mean of the named quality scores, each normalised to [0, 1]; and the names used."""
    named = inputs.quality_scores or {}
    if names:
        wanted = [s.strip() for s in str(names).split(",") if s.strip()]
        missing = [s for s in wanted if s not in named]
        if missing:
            have = ", ".join(sorted(named)) or "(none: only the primary quality score)"
            raise UserError(f"method 'datamask': quality score(s) {', '.join(missing)} not found; available: {have}")
        chosen = {s: named[s] for s in wanted}
    elif named:
        chosen = dict(named)
    elif inputs.quality is not None:
        chosen = {"quality": inputs.quality}
    else:
        raise UserError("method 'datamask' needs quality: one quality score per document "
                        "(the features stage, or --quality)")
    q = np.mean([normalise_scores(v, how) for v in chosen.values()], axis=0)
    return q, list(chosen)


# ----------------------------------------------------------------------------------------
# the joint objective
# ----------------------------------------------------------------------------------------

@dataclass
class _State:
    """Aggregates of a (partial) mask: what f needs to add more rows in O(rows added)."""

    size: int
    qsum: float
    vec: np.ndarray | None = None  # cosine: sum of unit rows
    gram: np.ndarray | None = None  # gvendi, Gram form: X^T X (d x d)
    rows: np.ndarray | None = None  # gvendi, kernel form: the unit rows themselves
    kernel: np.ndarray | None = None  # gvendi, kernel form: X X^T
    maxsim: np.ndarray | None = None  # facility: max similarity of each reference row


def _vendi_from_eigs(eigs: np.ndarray) -> np.ndarray:
    """exp(entropy of the normalised spectrum) along the last axis (eigenvalues clamped at 0)."""
    sigma = np.clip(eigs, 0.0, None)
    total = sigma.sum(axis=-1, keepdims=True)
    lam = np.divide(sigma, total, out=np.zeros_like(sigma), where=total > 0)
    ent = -np.where(lam > EIGEN_FLOOR, lam * np.log(np.where(lam > EIGEN_FLOOR, lam, 1.0)), 0.0).sum(axis=-1)
    return np.exp(ent)


class JointObjective:
    """``f(S) = lam * mean quality + (1 - lam) * diversity`` over candidate rows 0..M-1.

    ``quality`` are the candidates' [0, 1] scores, ``rows`` their unit rows (features for
    ``gvendi``, embeddings otherwise), ``reference`` the unit reference rows of ``facility``.
    ``k`` is the mask size the diversity is normalised for (G-Vendi / min(k, d)).
    """

    def __init__(self, quality: np.ndarray, rows: np.ndarray, diversity: str, k: int, lam: float,
                 reference: np.ndarray | None = None):
        if diversity not in DIVERSITY:
            raise UserError(f"datamask: diversity must be one of {', '.join(DIVERSITY)}, got {diversity!r}")
        self.quality = np.asarray(quality, dtype=np.float64)
        self.rows = rows
        self.diversity, self.k, self.lam = diversity, int(k), float(lam)
        self.dim = rows.shape[1]
        self.kernel_form = diversity == "gvendi" and self.k < self.dim
        self.vendi_max = float(min(self.k, self.dim))
        self.reference = reference
        if diversity == "facility" and reference is None:
            raise UserError("datamask: facility location needs a reference set")

    @property
    def m(self) -> int:
        return len(self.quality)

    def empty(self) -> _State:
        d = self.dim
        if self.diversity == "cosine":
            return _State(0, 0.0, vec=np.zeros(d))
        if self.diversity == "facility":
            return _State(0, 0.0, maxsim=np.zeros(len(self.reference)))
        if self.kernel_form:
            return _State(0, 0.0, rows=np.zeros((0, d), dtype=self.rows.dtype), kernel=np.zeros((0, 0)))
        return _State(0, 0.0, gram=np.zeros((d, d)))

    def sims(self, idx) -> np.ndarray:
        """(1 + cos) / 2 of rows ``idx`` against the reference rows (len(idx) x R)."""
        return (1.0 + np.asarray(self.rows[idx] @ self.reference.T, dtype=np.float64)) * 0.5

    def state(self, idx) -> _State:
        """The aggregates of the set ``idx`` (candidate rows)."""
        return self.extend(self.empty(), idx)

    def extend(self, st: _State, idx) -> _State:
        idx = np.asarray(idx, dtype=np.int64)
        x = self.rows[idx]
        out = _State(st.size + len(idx), st.qsum + float(self.quality[idx].sum()))
        if self.diversity == "cosine":
            out.vec = st.vec + x.sum(axis=0, dtype=np.float64)
        elif self.diversity == "facility":
            out.maxsim = st.maxsim if len(idx) == 0 else np.maximum(st.maxsim, self.sims(idx).max(axis=0))
        elif self.kernel_form:
            cross = np.asarray(st.rows @ x.T, dtype=np.float64)
            inner = np.asarray(x @ x.T, dtype=np.float64)
            out.kernel = np.block([[st.kernel, cross], [cross.T, inner]])
            out.rows = np.concatenate([st.rows, x])
        else:
            out.gram = st.gram + np.asarray(x.T @ x, dtype=np.float64)
        return out

    def diversity_of(self, st: _State) -> float:
        if st.size == 0:
            return 0.0
        if self.diversity == "cosine":
            if st.size < 2:
                return 0.0
            pairs = float(st.vec @ st.vec) - st.size  # unit rows: sum over i != j of cos
            return 1.0 - pairs / (st.size * (st.size - 1))
        if self.diversity == "facility":
            return float(st.maxsim.mean())
        matrix = st.kernel if self.kernel_form else st.gram
        return float(_vendi_from_eigs(np.linalg.eigvalsh(matrix))) / self.vendi_max

    def value_of(self, st: _State) -> float:
        if st.size == 0:
            return 0.0
        return self.lam * st.qsum / st.size + (1.0 - self.lam) * self.diversity_of(st)

    def value(self, idx) -> float:
        """f of the candidate rows ``idx``."""
        return self.value_of(self.state(idx))

    def parts(self, idx) -> dict[str, float]:
        st = self.state(idx)
        """f of ``idx`` and its two terms (mean [0, 1] quality, normalised diversity)."""
        return {"objective": self.value_of(st), "quality_term": st.qsum / max(1, st.size),
                "diversity_term": self.diversity_of(st)}


def build_objective(inputs: SelectionInputs, k: int, *, lam: float = 0.5, diversity: str = "gvendi",
                    scores: str | None = None, normalize: str = "rank", reference_size: int = 1024,
                    candidates: np.ndarray | None = None, seed: int = 0,
                    drop_zero_rows: bool = False) -> tuple[JointObjective, np.ndarray, np.ndarray]:
    """The objective over ``candidates`` (default: every row), the pool's [0, 1] quality and the names.

    Returns ``(objective, quality over the whole pool, candidates)``; the facility reference
    is a seeded sample of the whole pool.
    """
    field = DIVERSITY_INPUT.get(diversity)
    if field is None:
        raise UserError(f"datamask: diversity must be one of {', '.join(DIVERSITY)}, got {diversity!r}")
    matrix = getattr(inputs, field)
    if matrix is None:
        from .base import INPUT_HINTS

        raise UserError(f"method 'datamask' with diversity={diversity} needs {field}: {INPUT_HINTS[field]}")
    q, _ = combined_quality(inputs, scores, normalize)
    n = len(q)
    if matrix.shape[0] != n:
        raise UserError(f"datamask: {field} has {matrix.shape[0]} rows but quality has {n}")
    unit = UnitRows(matrix, drop_zero_rows=drop_zero_rows)
    cand = np.arange(n, dtype=np.int64) if candidates is None else np.asarray(candidates, dtype=np.int64)
    rows = unit.take(cand, np.float32)
    reference = None
    if diversity == "facility":
        rng = np.random.default_rng([seed, 1])
        ref = np.arange(n) if n <= reference_size else np.sort(rng.choice(n, reference_size, replace=False))
        ref = ref[unit.keep[ref]]
        reference = unit.take(ref, np.float32)
    return JointObjective(q[cand], rows, diversity, k, lam, reference), q, cand


# ----------------------------------------------------------------------------------------
# Plackett-Luce: sampling, log-probability and its gradient
# ----------------------------------------------------------------------------------------

def _logsumexp(x: np.ndarray) -> float:
    if len(x) == 0:
        return -math.inf
    m = float(x.max())
    if m == -math.inf:
        return m
    return m + math.log(float(np.exp(x - m).sum()))


def gumbel_topk(logits: np.ndarray, k: int, groups: int, rng: np.random.Generator) -> np.ndarray:
    """``groups`` ordered samples of k rows without replacement from softmax(logits) (groups x k).

    Gumbel top-k: the k largest of ``logits + Gumbel(0, 1)`` in decreasing order are an
    ordered Plackett-Luce sample (the Gumbel-max trick applied k times).
    """
    logits = np.asarray(logits, dtype=np.float64)
    keys = logits[None, :] + rng.gumbel(size=(groups, len(logits)))
    if k < len(logits):
        part = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(len(logits)), (groups, len(logits))).copy()
    top = np.take_along_axis(keys, part, axis=1)
    return np.take_along_axis(part, np.argsort(-top, axis=1, kind="stable"), axis=1).astype(np.int64)


def plackett_luce_logprob(logits: np.ndarray, order: np.ndarray, grad: bool = False):
    """log P(order) of an ordered sample without replacement from softmax(logits), O(N).

    ``log P = sum_j L_{s_j} - sum_j log D_j``, ``log D_j = logaddexp(log Z_U, reverse
    cumulative logaddexp of L over the picks j..k)``. With ``grad``, also d log P / d L
    (length N): ``-exp(L_i) sum_j 1/D_j`` off the sample and ``1 - exp(L_{s_t}) sum_{j<=t} 1/D_j``
    for the t-th pick, via a cumulative logaddexp of ``-log D`` (stable for any logit range).
    """
    logits = np.asarray(logits, dtype=np.float64)
    order = np.asarray(order, dtype=np.int64)
    picked = logits[order]
    unsampled = np.ones(len(logits), dtype=bool)
    unsampled[order] = False
    log_zu = _logsumexp(logits[unsampled])
    log_d = np.logaddexp(log_zu, np.logaddexp.accumulate(picked[::-1])[::-1])
    logp = float(picked.sum() - log_d.sum())
    if not grad:
        return logp
    log_inv = np.logaddexp.accumulate(-log_d)  # log sum_{j <= t} 1 / D_j
    g = np.zeros(len(logits))
    g[unsampled] = -np.exp(logits[unsampled] + log_inv[-1])
    g[order] = 1.0 - np.exp(picked + log_inv)
    return logp, g


def policy_gradient(logits: np.ndarray, orders: np.ndarray, rewards: np.ndarray,
                    advantage: str = "group") -> np.ndarray:
    """The group estimate of d E[f] / d L: ``(1/G) sum_g A_g grad log P(order_g)``.

    ``group``: ``A_g = (f_g - mean f) / std f`` (GRPO-like; zero when the group's rewards are
    all equal). ``loo``: ``A_g = f_g - mean of the other G - 1 rewards`` (unbiased).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    groups = len(rewards)
    if groups < 2:
        raise UserError("datamask: a group needs at least 2 masks")
    if advantage == "group":
        std = float(rewards.std())
        if not std > 1e-12 * max(1.0, float(np.abs(rewards).max())):
            return np.zeros(len(logits))
        adv = (rewards - rewards.mean()) / std
    elif advantage == "loo":
        adv = rewards - (rewards.sum() - rewards) / (groups - 1)
    else:
        raise UserError(f"datamask: advantage must be one of {', '.join(ADVANTAGE)}, got {advantage!r}")
    total = np.zeros(len(logits))
    for a, order in zip(adv, orders):  # G masks (a handful), each an O(N) pass
        if a != 0.0:
            total += a * plackett_luce_logprob(logits, order, grad=True)[1]
    return total / groups


# ----------------------------------------------------------------------------------------
# the learner and the greedy baseline
# ----------------------------------------------------------------------------------------

def learn_mask(objective: JointObjective, k: int, init_logits: np.ndarray, *, steps: int = 300,
               group_size: int = 8, lr: float = 0.5, advantage: str = "group",
               block_size: int | None = None, seed: int = 0, show_progress: bool = True,
               log: Callable[[str], None] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Policy-gradient mask learning on candidate rows 0..M-1: (final logits, stats)."""
    rng = np.random.default_rng([seed, 2])
    logits = np.array(init_logits, dtype=np.float64)
    m = len(logits)
    whole = block_size is None or block_size >= m
    trace, best, skipped = [], -math.inf, 0
    empty = objective.empty()
    bar = progress(range(steps), desc="datamask", disable=not show_progress or steps < 20, unit="step")
    for step in bar:
        if whole:
            block, fixed_state, kb = np.arange(m), empty, k
        else:
            block = np.sort(rng.choice(m, block_size, replace=False))
            incumbent = np.argpartition(-logits, k - 1)[:k]
            inside = np.isin(incumbent, block)
            kb = int(inside.sum())
            if kb == 0 or kb == len(block):
                skipped += 1
                continue
            fixed_state = objective.state(incumbent[~inside])
        local = logits[block]
        orders = gumbel_topk(local, kb, group_size, rng)
        rewards = np.array([objective.value_of(objective.extend(fixed_state, block[o])) for o in orders])
        logits[block] += lr * policy_gradient(local, orders, rewards, advantage)
        trace.append(float(rewards.mean()))
        if rewards.max() > best:
            best = float(rewards.max())
        if log is not None and (step + 1) % max(1, steps // 10) == 0:
            log(f"datamask: step {step + 1}/{steps}: mean reward {trace[-1]:.4f}, best {best:.4f}")
    every = max(1, len(trace) // 50)
    stats = {"steps": int(steps), "steps_skipped": skipped, "best_sampled": None if best == -math.inf else best,
             "mean_reward_first": trace[0] if trace else None, "mean_reward_last": trace[-1] if trace else None,
             "reward_trace": trace[::every]}
    return logits, stats


def greedy_objective_selection(objective: JointObjective, k: int, show_progress: bool = True) -> np.ndarray:
    """Greedy on the same objective: k times add the candidate with the largest exact f(S + i).

    Every remaining candidate is scored exactly at every step (vectorised per diversity term:
    the cosine sum, the facility max-similarities, batched eigenvalues of each candidate's
    Gram or kernel), ties toward the lower row. Returns candidate rows in pick order.
    """
    obj, m = objective, objective.m
    if not 1 <= k <= m:
        raise UserError(f"greedy: k must be in [1, {m}], got {k}")
    chosen = np.zeros(m, dtype=bool)
    picks: list[int] = []
    st = obj.empty()
    sims = None
    if obj.diversity == "facility" and m * len(obj.reference) <= _SIM_MATRIX_MAX:
        sims = obj.sims(np.arange(m)).astype(np.float32)
    for t in progress(range(k), desc="greedy", disable=not show_progress or k < 20, unit="pick"):
        size = t + 1
        qual = (st.qsum + obj.quality) / size
        div = np.empty(m)
        for lo in range(0, m, 256):
            hi = min(m, lo + 256)
            idx = np.arange(lo, hi)
            x = obj.rows[lo:hi]
            if obj.diversity == "cosine":
                if size < 2:
                    div[lo:hi] = 0.0
                else:
                    sq = float(st.vec @ st.vec) + 2.0 * np.asarray(x @ st.vec, dtype=np.float64) + 1.0
                    div[lo:hi] = 1.0 - (sq - size) / (size * (size - 1))
            elif obj.diversity == "facility":
                s = sims[lo:hi] if sims is not None else obj.sims(idx)
                div[lo:hi] = np.maximum(st.maxsim[None, :], s).mean(axis=1)
            elif obj.kernel_form:
                cross = np.asarray(x @ st.rows.T, dtype=np.float64)  # c x t
                c = hi - lo
                mats = np.empty((c, size, size))
                mats[:, :t, :t] = st.kernel
                mats[:, :t, t] = cross
                mats[:, t, :t] = cross
                mats[:, t, t] = np.einsum("ij,ij->i", x, x)
                div[lo:hi] = _vendi_from_eigs(np.linalg.eigvalsh(mats)) / obj.vendi_max
            else:
                xd = np.asarray(x, dtype=np.float64)
                mats = st.gram[None] + xd[:, :, None] * xd[:, None, :]
                div[lo:hi] = _vendi_from_eigs(np.linalg.eigvalsh(mats)) / obj.vendi_max
        gain = obj.lam * qual + (1.0 - obj.lam) * div
        gain[chosen] = -np.inf
        best = int(np.argmax(gain))
        chosen[best] = True
        picks.append(best)
        st = obj.extend(st, [best])
    return np.array(picks, dtype=np.int64)


# ----------------------------------------------------------------------------------------
# the selector
# ----------------------------------------------------------------------------------------

@register
class DatamaskSelector(Selector):
    name = "datamask"
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
