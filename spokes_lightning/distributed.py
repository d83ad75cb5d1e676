"""Thin wrappers over ``torch.distributed`` for row-sharded SPOKES (math notes, "Sharding").

Each rank holds a contiguous block of rows, in rank order. Everything SPOKES needs across
ranks is a sum (Gram in int64 fixed point, scalars in float64), a max, and a gather of the
per-rank top-k candidates. With no process group every function is the identity.
"""
from __future__ import annotations

import numpy as np


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without a process group."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def all_reduce_sum_(array: np.ndarray) -> np.ndarray:
    """In-place sum across ranks of a numpy array (int64 or float64)."""
    dist = _dist()
    if dist is None:
        return array
    import torch

    t = torch.from_numpy(np.ascontiguousarray(array))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    array[...] = t.numpy()
    return array


def all_reduce_scalar(value: float, op: str = "sum") -> float:
    dist = _dist()
    if dist is None:
        return float(value)
    import torch

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_objects(obj) -> list:
    dist = _dist()
    if dist is None:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_offset(n_local: int) -> tuple[int, int]:
    """(global index of this rank's first row, global N) for contiguous rank-ordered shards."""
    counts = all_gather_objects(int(n_local))
    rank, _ = world()
    return int(sum(counts[:rank])), int(sum(counts))


def shard_bounds(n_total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous near-equal row block [start, stop) of rank ``rank`` out of ``world_size``."""
    base, extra = divmod(n_total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
