"""QuaDMix's sampling function (paper section 3.1, Eq. 1-3) and how it meets a budget.

Sign convention. The paper ranks with *smaller = better* everywhere: a smaller normalised
criterion, a smaller merged quality ``q_bar`` and a smaller rank ``r_bar`` mean a better
document (``r_bar = 0.05``: 95% of the domain's tokens are worse). The toolkit's quality
scores are the other way round (higher = better), so the normalisation ``sigma`` below flips
them: after it, everything here follows the paper's convention.

* ``sigma`` (the paper leaves it open), per criterion over the pool, estimated on the same
  sample as the percentiles: ``rank`` (default) is the share of the sample that scores better
  than the document, with ties counted half (0 = best, 1 = worst; insensitive to the criterion's
  scale and tails); ``zscore`` is ``-(q - mean) / std``.
* Eq. 1: ``q_bar = sum_n sigma(q_n) alpha_{n,m}`` with the document's domain ``m``.
* Eq. 2: ``r_bar`` = the token share of the domain whose ``q_bar`` is <= the document's
  (inclusive, so the best document has its own token share). Section 3.4: the mapping
  ``q_bar -> r_bar`` is estimated on a random sample of ``percentile_sample`` documents (10,000)
  *per domain*, exact when a domain is no larger (the paper draws 10,000 overall; per domain keeps
  a small domain's percentiles as precise as a large one's). Tokens are ``lengths`` when given,
  else every document counts 1.
* Eq. 3 exactly as printed: ``S = (2 / (1 + exp(-lambda (omega - r))))^eta + epsilon`` for
  ``r <= omega``, else ``epsilon``. ``S`` decreases as ``r`` grows, is ``1 + epsilon`` at
  ``r = omega`` and at most ``2^eta + epsilon``.

A value ``a.b`` means ``a`` copies plus one more with probability ``b``. Budget (``rule``):

* ``scale`` (default): the values are multiplied by ``k / sum(S)`` so the expected number of
  copies is the budget ``k`` (copies count, as in the driver's token budget), then drawn by
  systematic sampling over a seeded random order: every document gets ``floor(x)`` or
  ``floor(x) + 1`` copies with P(+1) = ``frac(x)`` (exactly the a.b rule, marginally) and the
  total is exactly ``k``. Only the scale is changed: the shape across ranks and domains is the
  parameters'.
* ``raw``: the values as they are (the paper: the dataset size follows from the parameters),
  drawn the same way; ``k`` then only caps the copies (a prefix of the random order).

The selected rows come back in that seeded random order (not ranked): any prefix, e.g. the
driver's token budget, is a proportional thinning of the sampled multiset.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spokes_lightning.utils.errors import UserError

NORMALIZATIONS = ("rank", "zscore")
BUDGET_RULES = ("scale", "raw")
PERCENTILE_SAMPLE = 10_000


def sampling_value(r, lam, omega, eta, eps) -> np.ndarray:
    """Eq. 3 for ranks ``r`` (broadcasts over per-document parameters)."""
    r = np.asarray(r, dtype=np.float64)
    lam, omega, eta, eps = (np.asarray(v, dtype=np.float64) for v in (lam, omega, eta, eps))
    # omega - r >= 0 where it is used, so exp() of a non-positive number never overflows
    gap = np.maximum(omega - r, 0.0)
    inside = (2.0 / (1.0 + np.exp(-lam * gap))) ** eta + eps
    return np.where(r <= omega, inside, eps + 0.0 * r)


def _sample_rows(rows: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    return rows if len(rows) <= size else np.sort(rng.choice(rows, size, replace=False))


def normalize_criteria(scores: np.ndarray, method: str = "rank", sample: int = PERCENTILE_SAMPLE,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """``sigma``: an n x N matrix of toolkit scores (higher = better) -> paper convention (smaller = better)."""
    if method not in NORMALIZATIONS:
        raise UserError(f"quadmix: normalize must be one of {', '.join(NORMALIZATIONS)}, got {method!r}")
    scores = np.asarray(scores, dtype=np.float64)
    rng = rng or np.random.default_rng(0)
    ref = scores[_sample_rows(np.arange(len(scores)), sample, rng)]
    out = np.empty_like(scores)
    for j in range(scores.shape[1]):
        col, s = scores[:, j], ref[:, j]
        if method == "zscore":
            sd = s.std()
            out[:, j] = 0.0 if sd == 0 else -(col - s.mean()) / sd
        else:
            s = np.sort(s)
            above = len(s) - np.searchsorted(s, col, side="right")  # better than the document
            ties = np.searchsorted(s, col, side="right") - np.searchsorted(s, col, side="left")
            out[:, j] = (above + 0.5 * ties) / len(s)
    return out


def merged_quality(sigma: np.ndarray, domains: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Eq. 1: ``q_bar_x = sum_n sigma(q_n)_x alpha[d_x, n]`` (alpha is M x N)."""
    return np.einsum("ij,ij->i", sigma, np.asarray(alpha, dtype=np.float64)[domains])


def quality_rank(q_bar: np.ndarray, domains: np.ndarray, lengths: np.ndarray | None, n_domains: int,
                 sample: int = PERCENTILE_SAMPLE, rng: np.random.Generator | None = None) -> np.ndarray:
    """Eq. 2: the token-weighted share of the domain with ``q_bar <= q_bar_x`` (smaller = better)."""
    rng = rng or np.random.default_rng(0)
    weight = np.ones(len(q_bar)) if lengths is None else np.asarray(lengths, dtype=np.float64)
    r = np.ones(len(q_bar))
    for m in range(n_domains):
        rows = np.flatnonzero(domains == m)
        if not len(rows):
            continue
        ref = _sample_rows(rows, sample, rng)
        order = np.argsort(q_bar[ref], kind="stable")
        values, cum = q_bar[ref][order], np.cumsum(weight[ref][order])
        total = cum[-1]
        if total <= 0:  # every sampled document is empty: fall back to document counts
            cum, total = np.arange(1, len(ref) + 1, dtype=np.float64), float(len(ref))
        at = np.searchsorted(values, q_bar[rows], side="right")
        r[rows] = np.where(at > 0, cum[np.maximum(at - 1, 0)], 0.0) / total
    return r


def draw_copies(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Systematic sampling of expected copies ``x``: (copies per row, the random row order used).

    Row ``i`` gets ``floor(x_i)`` or ``floor(x_i) + 1`` copies, the latter with probability
    ``frac(x_i)``; the total is ``floor(sum + u) - floor(u)`` for the one uniform ``u``
    (exactly ``sum(x)`` when that is an integer).
    """
    x = np.asarray(x, dtype=np.float64)
    order = rng.permutation(len(x))
    u = rng.random()
    edges = np.floor(np.concatenate([[0.0], np.cumsum(x[order])]) + u)
    copies = np.empty(len(x), dtype=np.int64)
    copies[order] = np.diff(edges).astype(np.int64)
    return copies, order


@dataclass
class Sampled:
    """One QuaDMix draw: selected rows (random order), their copies, and the whole pool's values."""

    indices: np.ndarray
    multiplicity: np.ndarray
    expected: np.ndarray  # expected copies of every pool row (after the budget rule)
    rank: np.ndarray  # r_bar of every pool row (smaller = better)
    raw_total: float  # sum of Eq. 3 over the pool, before the budget rule
    scale: float


def quadmix_sample(sigma: np.ndarray, domains: np.ndarray, lengths: np.ndarray | None, params, k: int,
                   seed: int, *, rule: str = "scale", percentile_sample: int = PERCENTILE_SAMPLE) -> Sampled:
    """Eq. 1-3 with ``params`` (a :class:`~.parameters.QuaDMixParams` in pool domain order) at budget ``k``."""
    if rule not in BUDGET_RULES:
        raise UserError(f"quadmix: budget_rule must be one of {', '.join(BUDGET_RULES)}, got {rule!r}")
    rng = np.random.default_rng([int(seed), 0x9DA])
    q_bar = merged_quality(sigma, domains, params.alpha)
    r = quality_rank(q_bar, domains, lengths, len(params.lam), percentile_sample, rng)
    s = sampling_value(r, params.lam[domains], params.omega[domains], params.eta[domains], params.eps[domains])
    total = float(s.sum())
    if not total > 0:
        raise UserError("quadmix: the sampling function is 0 on every document (omega and epsilon are 0); "
                        "give epsilon > 0 or a larger omega")
    scale = k / total if rule == "scale" else 1.0
    x = s * scale
    copies, order = draw_copies(x, rng)
    chosen = order[copies[order] > 0]
    mult = copies[chosen]
    if rule == "raw":  # k caps the copies: keep a prefix of the random order
        keep = np.cumsum(mult) <= k
        chosen, mult = chosen[keep], mult[keep]
    if not len(chosen):
        raise UserError("quadmix: the sampling drew no document; raise the budget or the parameters' values")
    return Sampled(chosen.astype(np.int64), mult.astype(np.int64), x, r, total, scale)
