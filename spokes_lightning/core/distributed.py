"""Thin wrappers over ``torch.distributed`` for row-sharded SPOKES (docs/design.md, "Determinism").

Each rank holds a contiguous block of rows, in rank order. Everything SPOKES needs across
ranks is a sum (Gram in int64 fixed point, scalars in float64), a max, and a gather of the
per-rank top-k candidates. With no process group every function is the identity.
"""
from __future__ import annotations

import math
import sys

import numpy as np


def process_group():
    """``torch.distributed`` when a process group is up, else None.

    A process group needs torch imported first: when it is not, there is none, and a command
    that needs no torch does not pay a second of importing it to find that out."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without a process group."""
    dist = process_group()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def collective_device(backend: str) -> str:
    """Where a collective's tensors must live: ``"cuda"`` for a group that is NCCL only (as
    Lightning's and Accelerate's GPU process groups are), else ``"cpu"`` (gloo, or a group with
    a CPU backend such as ``"cpu:gloo,cuda:nccl"``)."""
    return "cuda" if str(backend).strip().lower() == "nccl" else "cpu"


def _on_group_device(dist, t):
    import torch

    if collective_device(dist.get_backend()) == "cuda":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def all_reduce_sum_(array: np.ndarray) -> np.ndarray:
    """In-place sum across ranks of a numpy array (int64 or float64)."""
    dist = process_group()
    if dist is None:
        return array
    import torch

    t = _on_group_device(dist, torch.from_numpy(np.ascontiguousarray(array)))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    array[...] = t.cpu().numpy()
    return array


def all_reduce_scalar(value: float, op: str = "sum") -> float:
    dist = process_group()
    if dist is None:
        return float(value)
    import torch

    t = _on_group_device(dist, torch.tensor([float(value)], dtype=torch.float64))
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_objects(obj) -> list:
    dist = process_group()
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


def exact_sum(values: np.ndarray, bound: float) -> float:
    """Sum across ranks of ``values`` (|total| <= bound), the same bits for any sharding.

    Each value is rounded to a fixed-point grid of bound * 2**-61 and the int64 sums are
    all-reduced: integer addition is exact and order-free, unlike float sums.
    """
    exponent = 61 - math.ceil(math.log2(max(bound, 1e-300)))
    local = np.array([int(np.rint(np.ldexp(np.asarray(values, dtype=np.float64), exponent)).astype(np.int64).sum())],
                     dtype=np.int64)
    all_reduce_sum_(local)
    return float(np.ldexp(float(local[0]), -exponent))


def shard_bounds(n_total: int, rank: int, world_size: int, align: int = 1) -> tuple[int, int]:
    """Contiguous near-equal row block [start, stop) of rank ``rank`` out of ``world_size``.

    With ``align`` (e.g. the SPOKES chunk size) every boundary is a multiple of it, so each
    global chunk lies on one rank and float32 chunk products are the same bits at any world size.
    """
    units = -(-n_total // align)
    base, extra = divmod(units, world_size)
    start = (rank * base + min(rank, extra)) * align
    stop = start + (base + (1 if rank < extra else 0)) * align
    return min(start, n_total), min(stop, n_total)
