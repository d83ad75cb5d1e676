"""DATAMASK's joint objective f = lam * f_quality + (1 - lam) * f_diversity and the greedy baseline on it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spokes_lightning.utils.errors import UserError
from spokes_lightning.utils.progress import progress
from spokes_lightning.core.vendi import EIGEN_FLOOR, UnitRows
from spokes_lightning.selectors.base import INPUT_HINTS, SelectionInputs

DIVERSITY = ("gvendi", "cosine", "facility")
NORMALIZE = ("rank", "minmax")
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


