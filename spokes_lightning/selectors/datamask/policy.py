"""DATAMASK's policy: Gumbel top-k masks, the O(N) Plackett-Luce log-probability, the policy gradient."""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from spokes_lightning.utils.errors import UserError
from spokes_lightning.utils.progress import progress
from spokes_lightning.selectors.datamask.objective import JointObjective

ADVANTAGE = ("group", "loo")

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


