"""The online SPOKES objective: what to train on next, given what was already trained on.

Paper section 3.1 selects once: maximise ``alpha ln Q(S) + (1 - alpha) ln Vendi(K_S)`` (eq. 7 at
the vertices of the simplex) over a subset ``S`` of a fixed pool. Online, the set grows while the
model trains: at reselection ``j`` the model has been (or is about to be) trained on ``T`` and the
next picks ``P`` come from a fresh window of candidates; we maximise the SAME objective of the
union,

    F(P) = alpha ln Q(T u P) + (1 - alpha) ln Vendi(G_T + G_P),   G_X = sum_{x in X} x x^T,

where ``x`` are unit gradient sketches (cosine kernel, so the d x d Gram carries the spectrum of
the n x n kernel, paper section 3.1 "computing Vendi from the d x d matrix"). ``G_T`` is kept in
:class:`TrainedOnGram` (d x d float64), so one reselection costs the window's sketches plus
d x d work, whatever ``|T|``.

Picking ``P`` is the toolkit's greedy rounding applied to this objective
(:func:`spokes_lightning.core.rounding.set_gain_scores`, the optimizer's own gradient at the current
set): in blocks of ``block`` documents, each block the best first-order gains given ``G_T + G_P``
so far, until :meth:`SegmentFiller.full` says the picks fill the next training segment.
"""
from __future__ import annotations

import math

import numpy as np

from spokes_lightning.utils.errors import UserError
from spokes_lightning.core.rounding import set_gain_scores
from spokes_lightning.core.vendi import EIGEN_FLOOR, spectrum_entropy


def unit_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 rows scaled to unit norm, and the mask of rows that had a non-zero norm."""
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1)
    keep = norms > 0
    out = np.zeros_like(rows)
    out[keep] = rows[keep] / norms[keep, None]
    return out, keep


class TrainedOnGram:
    """``G_T = sum_t x_t x_t^T`` over the unit sketches of the trained-on documents, ``|T|`` and
    ``sum_t q_t``. Picks are added in a fixed order, so every rank holds the same bits."""

    def __init__(self, dim: int):
        self.gram = np.zeros((int(dim), int(dim)), dtype=np.float64)
        self.count = 0
        self.quality_sum = 0.0

    def add(self, unit: np.ndarray, quality: np.ndarray | None = None) -> None:
        if len(unit):
            self.gram += unit.T @ unit
            self.count += len(unit)
            if quality is not None:
                self.quality_sum += float(np.sum(quality, dtype=np.float64))

    def vendi(self) -> float:
        """G-Vendi of the trained-on set (paper eq. 1), from the d x d Gram."""
        return math.exp(spectrum_entropy(np.linalg.eigvalsh(self.gram))) if self.count else 0.0

    def state(self) -> dict[str, np.ndarray]:
        return {"gram": self.gram.copy(), "count": np.array(self.count), "quality_sum": np.array(self.quality_sum)}

    @classmethod
    def from_state(cls, state) -> "TrainedOnGram":
        out = cls(state["gram"].shape[0])
        out.gram = np.array(state["gram"], dtype=np.float64)
        out.count, out.quality_sum = int(state["count"]), float(state["quality_sum"])
        return out


def online_objective(gram: np.ndarray, count: int, quality_sum: float, alpha: float) -> float:
    """``alpha ln Q + (1 - alpha) ln Vendi`` of a set given by its Gram, size and quality sum."""
    log_vendi = spectrum_entropy(np.linalg.eigvalsh(gram))
    if alpha == 0.0:
        return (1.0 - alpha) * log_vendi
    return alpha * math.log(max(quality_sum / max(count, 1), 1e-300)) + (1.0 - alpha) * log_vendi


def greedy_window_picks(unit: np.ndarray, keep: np.ndarray, quality: np.ndarray | None, alpha: float,
                        trained: TrainedOnGram, filler, block: int) -> list[int]:
    """Window rows to train on next, in the order picked (see the module docstring).

    ``unit``/``keep`` come from :func:`unit_rows` of the window's sketches; ``filler.add(i)`` is
    called for each pick and ``filler.full`` ends the loop. Ties in gain go to the lower row.
    Raises :class:`UserError` when the whole window cannot fill the segment.
    """
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"online alpha must be in [0, 1], got {alpha}")
    if alpha > 0 and quality is None:
        raise UserError(f"online alpha = {alpha} > 0 needs quality scores for the candidates")
    gram = trained.gram.copy()
    count, quality_sum = trained.count, trained.quality_sum
    available = keep.copy()
    picks: list[int] = []
    block = max(1, int(block))
    while not filler.full:
        candidates = np.flatnonzero(available)
        if len(candidates) == 0:
            raise UserError(f"the reselection window ({len(unit)} candidates, {int(keep.sum())} usable) "
                            f"cannot fill the next segment ({filler.describe()}): raise online.window")
        sigma, eigvecs = np.linalg.eigh(gram)
        sigma = np.clip(sigma, 0.0, None)
        log_lambda = (np.log(np.maximum(sigma / sigma.sum(), EIGEN_FLOOR)) if sigma.sum() > 0
                      else np.zeros_like(sigma))
        set_quality = quality_sum / count if count and quality_sum > 0 else 1.0
        gain = set_gain_scores(unit[candidates], eigvecs, log_lambda,
                               None if quality is None else quality[candidates], alpha, set_quality)
        order = candidates[np.lexsort((candidates, -gain))]  # best gain first, ties -> lower row
        for i in order[:block]:
            picks.append(int(i))
            available[i] = False
            gram += np.outer(unit[i], unit[i])
            count += 1
            if quality is not None:
                quality_sum += float(quality[i])
            filler.add(int(i))
            if filler.full:
                break
    return picks
