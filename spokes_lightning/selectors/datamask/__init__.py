"""DATAMASK: joint quality-and-diversity selection by policy-gradient mask learning.

Fan, Xian, Sun, Shen, *Joint Selection for Large-Scale Pre-Training Data via Policy
Gradient-based Mask Learning* (arXiv:2512.24265). Only the paper's ABSTRACT was available when
this was written (see docs/selectors/peers.md): this module builds the method the abstract
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
    :mod:`spokes_lightning.core.vendi` form) when d <= k; when k < d the k x k kernel
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

from spokes_lightning.selectors.datamask.objective import (  # noqa: F401
    DIVERSITY,
    NORMALIZE,
    JointObjective,
    build_objective,
    combined_quality,
    greedy_objective_selection,
    normalise_scores,
)
from spokes_lightning.selectors.datamask.policy import ADVANTAGE, gumbel_topk, learn_mask, plackett_luce_logprob, policy_gradient  # noqa: F401
from spokes_lightning.selectors.datamask.selector import DatamaskSelector  # noqa: F401  (registers "datamask")
