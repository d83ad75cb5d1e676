"""Bootstrap intervals for benchmark accuracies and paired method differences (pure numpy).

Inputs are per-item 0/1 correctness ``{task: array (seeds, items)}`` (a 1-D array is one
seed). A method's score is the unweighted mean over tasks of the task accuracy, in percent,
where a task's accuracy is the mean over its seeds and items.

Resampling is hierarchical: each bootstrap replicate draws the pretraining seeds with
replacement (only when there are several; one draw shared by all tasks, since a seed is
one trained model) and, per task, the items with replacement (one draw shared by every
seed). A resample is represented by multiplicity weights (multinomial counts), so a
replicate is ``seed_weights @ X @ item_weights`` and all ``B`` replicates are one product.
Intervals are 95 % percentile intervals. Everything is deterministic given ``seed``.
"""
from __future__ import annotations

import math

import numpy as np

B_DEFAULT = 2000
LEVEL = 0.95


def _as_matrix(task: str, values) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    x = x.reshape(1, -1) if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{task}: expected an array (seeds, items) with at least one of each, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{task}: item scores must be finite")
    return x


def _weights(rng: np.random.Generator, n: int, B: int) -> np.ndarray:
    """(B, n) resampling weights that sum to 1 per row; the identity resample when n == 1."""
    if n == 1:
        return np.ones((B, 1))
    idx = rng.integers(0, n, size=(B, n))  # B resamples of n indices with replacement ...
    counts = np.bincount((idx + n * np.arange(B)[:, None]).ravel(), minlength=B * n)  # ... as counts
    return counts.reshape(B, n) / n


def _replicates(x: np.ndarray, seed_w: np.ndarray, item_w: np.ndarray) -> np.ndarray:
    """Accuracy (%) of each of the B resamples: sum_s,i seed_w[b,s] * x[s,i] * item_w[b,i]."""
    return 100.0 * np.einsum("bi,bi->b", seed_w @ x, item_w)


def _interval(reps: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _check_B(B: int) -> int:
    if int(B) < 100:
        raise ValueError(f"B must be at least 100 resamples, got {B}")
    return int(B)


def _seed_count(x: dict[str, np.ndarray]) -> int:
    counts = {m.shape[0] for m in x.values()}
    if len(counts) != 1:
        raise ValueError(f"tasks have different seed counts {sorted(counts)}")
    return counts.pop()


def mean_ci(per_item: dict, B: int = B_DEFAULT, seed: int = 0, level: float = LEVEL) -> dict:
    """The method's task average (%) with a hierarchical (seeds x items) bootstrap interval.

    Returns ``{"mean", "lo", "hi", "per_task": {task: {"mean", "lo", "hi", "n_items"}},
    "n_seeds", "B", "level"}``.
    """
    B = _check_B(B)
    x = {t: _as_matrix(t, v) for t, v in per_item.items()}
    if not x:
        raise ValueError("no tasks")
    rng = np.random.default_rng(seed)
    n_seeds = _seed_count(x)
    seed_w = _weights(rng, n_seeds, B)
    reps, per_task = [], {}
    for task, m in x.items():
        r = _replicates(m, seed_w, _weights(rng, m.shape[1], B))
        lo, hi = _interval(r, level)
        per_task[task] = {"mean": 100.0 * float(m.mean()), "lo": lo, "hi": hi, "n_items": int(m.shape[1])}
        reps.append(r)
    avg_reps = np.mean(reps, axis=0)
    lo, hi = _interval(avg_reps, level)
    return {"mean": float(np.mean([p["mean"] for p in per_task.values()])), "lo": lo, "hi": hi,
            "per_task": per_task, "n_seeds": n_seeds, "B": B, "level": level}


def _difference(reps: np.ndarray, point: float, level: float) -> dict:
    lo, hi = _interval(reps, level)
    # two-sided bootstrap p-value-like fraction: twice the smaller tail beyond 0, capped at 1
    p = min(1.0, 2.0 * min(float(np.mean(reps <= 0.0)), float(np.mean(reps >= 0.0))))
    return {"diff": point, "lo": lo, "hi": hi, "p": p, "excludes_zero": bool(lo > 0.0 or hi < 0.0)}


def paired_difference(a: dict, b: dict, B: int = B_DEFAULT, seed: int = 0, level: float = LEVEL,
                      paired: bool = True) -> dict:
    """Method ``a`` minus baseline ``b`` (percentage points) on the same items, average and per task.

    Paired: per task one item resample applied to both methods, and (when both have the same
    number of seeds > 1) one seed resample applied to both, seed ``k`` of ``a`` paired with
    seed ``k`` of ``b``; with different seed counts the seeds are resampled separately.
    ``paired=False`` resamples the two methods independently (for comparison only).
    Returns ``{"diff", "lo", "hi", "p", "excludes_zero", "per_task": {task: same keys},
    "seeds_paired", "B", "level"}``; ``p`` is ``2 * min(P*(d <= 0), P*(d >= 0))``.
    """
    B = _check_B(B)
    xa = {t: _as_matrix(t, v) for t, v in a.items()}
    xb = {t: _as_matrix(t, v) for t, v in b.items()}
    if list(xa) != list(xb) or not xa:
        raise ValueError(f"methods cover different tasks: {list(xa)} vs {list(xb)}")
    for task in xa:
        if xa[task].shape[1] != xb[task].shape[1]:
            raise ValueError(f"{task}: item counts differ ({xa[task].shape[1]} vs {xb[task].shape[1]}); "
                             "a paired comparison needs the same items")
    rng = np.random.default_rng(seed)
    sa, sb = _seed_count(xa), _seed_count(xb)
    seeds_paired = paired and sa == sb
    wa = _weights(rng, sa, B)
    wb = wa if seeds_paired else _weights(rng, sb, B)
    reps, per_task = [], {}
    for task in xa:
        n = xa[task].shape[1]
        ia = _weights(rng, n, B)
        ib = ia if paired else _weights(rng, n, B)
        r = _replicates(xa[task], wa, ia) - _replicates(xb[task], wb, ib)
        point = 100.0 * (float(xa[task].mean()) - float(xb[task].mean()))
        per_task[task] = _difference(r, point, level)
        reps.append(r)
    point = float(np.mean([d["diff"] for d in per_task.values()]))
    return {**_difference(np.mean(reps, axis=0), point, level), "per_task": per_task,
            "seeds_paired": seeds_paired, "B": B, "level": level}


def _two_sided_t_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(2, df - 1, 2):  # 1 + 1/2 c^2 + (1*3)/(2*4) c^4 + ... up to c^(df-2)
            term *= c2 * (k - 1) / k
            total += term
        return s * total
    if df == 1:
        return 2.0 * theta / math.pi
    term, total = 1.0, 1.0
    for k in range(3, df - 1, 2):  # 1 + 2/3 c^2 + (2*4)/(3*5) c^4 + ... up to c^(df-3)
        term *= c2 * (k - 1) / k
        total += term
    return 2.0 / math.pi * (theta + s * math.cos(theta) * total)


def t_quantile(level: float, df: int) -> float:
    """Critical value ``t`` with P(|T| <= t) = ``level`` (two-sided), by bisection."""
    if not 0.0 < level < 1.0 or int(df) < 1:
        raise ValueError(f"need 0 < level < 1 and df >= 1, got {level}, {df}")
    lo, hi = 0.0, 1.0
    while _two_sided_t_mass(hi, int(df)) < level:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _two_sided_t_mass(mid, int(df)) < level else (lo, mid)
    return 0.5 * (lo + hi)


def validation_loss_ci(values_per_seed, level: float = LEVEL) -> dict:
    """Mean validation loss over pretraining seeds with a Student-t interval.

    Returns ``{"mean", "lo", "hi", "sd", "n_seeds", "level", "note"}``; with one seed
    ``lo``/``hi``/``sd`` are None and ``note`` says there is no interval.
    """
    v = np.asarray([float(x) for x in values_per_seed], dtype=np.float64)
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError(f"need finite validation losses, got {values_per_seed!r}")
    out = {"mean": float(v.mean()), "n_seeds": int(v.size), "level": level}
    if v.size == 1:
        return {**out, "lo": None, "hi": None, "sd": None,
                "note": "one pretraining seed: no interval across seeds"}
    sd = float(v.std(ddof=1))
    half = t_quantile(level, v.size - 1) * sd / math.sqrt(v.size)
    return {**out, "lo": out["mean"] - half, "hi": out["mean"] + half, "sd": sd,
            "note": f"Student-t interval over {v.size} seeds"}
