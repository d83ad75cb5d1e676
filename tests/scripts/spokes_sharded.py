"""Run SPOKES with W gloo ranks on saved feature matrices; rank 0 writes each result.

usage: spokes_sharded.py JOBS.json WORLD

``JOBS.json``: a list of runs, each ``{"features": X.npy, "quality": Q.npy or null, "k", "alpha",
"chunk_rows", "rounding", "seed", "out": OUT.npz}``. All runs share one process group, so a test
pays the start of W processes once for all its cases.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp


def run_job(rank, world, job):
    from spokes_lightning.core.distributed import shard_bounds
    from spokes_lightning.core.spokes import run_spokes

    x = np.load(job["features"], mmap_mode="r")
    q = None if job.get("quality") is None else np.load(job["quality"])
    chunk_rows = int(job["chunk_rows"])
    start, stop = shard_bounds(x.shape[0], rank, world, align=chunk_rows)
    res = run_spokes(x[start:stop], None if q is None else q[start:stop], alpha=float(job["alpha"]), k=int(job["k"]),
                     chunk_rows=chunk_rows, rounding=job.get("rounding", "greedy"), seed=int(job.get("seed", 0)),
                     log=lambda m: None)
    weights = [None] * world
    dist.all_gather_object(weights, res.weights)
    if rank == 0:
        np.savez(job["out"], indices=res.indices, weights=np.concatenate(weights),
                 objective=np.array(res.objective), gvendi=res.gvendi)


def worker(rank, world, port, jobs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for job in jobs:
        run_job(rank, world, job)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    jobs_path, world = sys.argv[1], int(sys.argv[2])
    jobs = json.loads(Path(jobs_path).read_text())
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
    from ports import free_port  # a port block of this xdist worker's own

    mp.spawn(worker, args=(world, free_port(), jobs), nprocs=world, join=True)
