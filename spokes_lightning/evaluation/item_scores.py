"""Per-item 0/1 correctness from an lm-eval run, for paired comparisons between methods.

``lm_eval.simple_evaluate(..., log_samples=True)`` (lm-eval 0.4.13) returns
``raw["samples"][<lm-eval task name>]``: a list with one dict per (document, filter), holding
``doc_id`` (int, position in the evaluated split), ``doc``, ``filter`` (``"none"`` for our
tasks), the request arguments/responses and one float (0.0 or 1.0) per metric of the task,
e.g. ``sample["acc"]``, ``sample["acc_norm"]``, ``sample["acc_mutual_info"]``. lm-eval's
aggregated ``raw["results"][name]["<metric>,none"]`` is the plain mean of those floats.

:func:`item_correct` keeps, per task, the samples of filter ``"none"`` ordered by ``doc_id``
and returns the task's OLMES metric (``TASK_SPECS[task].metric``) as a ``uint8`` vector.
:func:`stack_seeds` stacks several pretraining seeds into ``(seeds, items)`` arrays.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from spokes_lightning.utils.atomic import atomic_path
from spokes_lightning.evaluation.tasks import TASK_SPECS, check_task_names, lm_eval_task_name

FILTER = "none"


def item_correct(raw: dict, tasks) -> dict[str, np.ndarray]:
    """``{task: uint8 array (items,)}`` of per-item correctness in the task's OLMES metric.

    ``raw`` is lm-eval's result dict from a run with ``log_samples=True``. Items are in
    ``doc_id`` order (the order of the evaluated split). The item mean is checked against
    lm-eval's own aggregated value of the same metric.
    """
    if not raw.get("samples"):
        raise ValueError("lm-eval result has no per-item samples; run it with log_samples=True")
    scores = {}
    for task in check_task_names(tasks):
        name, metric = lm_eval_task_name(task), TASK_SPECS[task].metric
        if name not in raw["samples"]:
            raise ValueError(f"lm-eval samples lack task {name!r}")
        samples = sorted((s for s in raw["samples"][name] if s.get("filter", FILTER) == FILTER),
                         key=lambda s: s["doc_id"])
        doc_ids = [int(s["doc_id"]) for s in samples]
        if doc_ids != list(range(len(samples))):
            raise ValueError(f"{task}: sample doc_ids are not 0..{len(samples) - 1} (duplicates or gaps)")
        values = np.array([float(s[metric]) for s in samples], dtype=np.float64)
        if not np.all((values == 0.0) | (values == 1.0)):
            raise ValueError(f"{task}: metric {metric} is not 0/1 per item")
        reported = raw.get("results", {}).get(name, {}).get(f"{metric},{FILTER}")
        if isinstance(reported, (int, float)) and abs(float(values.mean()) - float(reported)) > 1e-9:
            raise ValueError(f"{task}: item mean {values.mean()} != lm-eval's {metric} {reported}")
        scores[task] = values.astype(np.uint8)
    return scores


def stack_seeds(runs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-seed ``{task: (items,)}`` dicts -> ``{task: (seeds, items)}``; tasks and item counts must agree."""
    if not runs:
        raise ValueError("no runs to stack")
    tasks = list(runs[0])
    for run in runs[1:]:
        if list(run) != tasks:
            raise ValueError(f"seed runs cover different tasks: {tasks} vs {list(run)}")
    out = {}
    for task in tasks:
        rows = [np.asarray(run[task]).reshape(-1) for run in runs]
        if len({len(r) for r in rows}) != 1:
            raise ValueError(f"{task}: seed runs have different item counts {[len(r) for r in rows]}")
        out[task] = np.stack(rows)
    return out


def save_item_scores(path: str | os.PathLike, scores: dict[str, np.ndarray]) -> None:
    """Write ``{task: 0/1 array}`` (any shape) to a ``.npz`` file atomically, as ``uint8``."""
    arrays = {}
    for task, values in scores.items():
        values = np.asarray(values)
        if values.size and not np.all((values == 0) | (values == 1)):
            raise ValueError(f"{task}: item scores must be 0/1")
        arrays[str(task)] = values.astype(np.uint8)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def load_item_scores(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read what :func:`save_item_scores` wrote, tasks in their saved order."""
    with np.load(Path(path), allow_pickle=False) as data:
        return {task: data[task] for task in data.files}
