"""Who does which task: ranks of a ``torchrun`` / Lightning process group, and local workers.

A data step is a list of tasks (input files, output shards) that are pure functions of their
index. Task ``t`` belongs to rank ``t % world`` (the process group's ranks, e.g. ``torchrun
--nnodes 8 --nproc-per-node 16``; without a group, one rank); inside a rank, ``workers`` processes
of :mod:`concurrent.futures` share its tasks. Since every output depends on its task alone, any
``world`` and ``workers`` write the same bytes. No scheduler of our own: placement is torchrun's
(or Slurm's), retries are a rerun that skips finished tasks.
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Sequence

from spokes_lightning.core.distributed import process_group, world


def init_from_environment(backend: str = "gloo") -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (RANK / WORLD_SIZE / MASTER_ADDR); (0, 1) alone.

    Alone (no WORLD_SIZE above 1), torch is not imported: a run that only checks its settings or
    finds every stage done starts in a fraction of a second."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return world()
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        # rank 0 alone runs the tokenizer, proxy and report stages while the others wait here
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=48))
    return world()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    dist = process_group()
    if dist is not None:
        dist.barrier()


def my_tasks(n_tasks: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """The task indices of ``rank`` (default: this process's rank): ``t % world == rank``."""
    if rank is None or world_size is None:
        rank, world_size = world()
    return list(range(rank, n_tasks, world_size))


def run_tasks(fn: Callable[..., Any], tasks: Sequence[Any], workers: int = 1) -> list[Any]:
    """``[fn(t) for t in tasks]``, in ``workers`` spawned processes when > 1 (results in task order)."""
    workers = max(1, min(int(workers), len(tasks)))
    if workers == 1:
        return [fn(t) for t in tasks]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(fn, tasks))
