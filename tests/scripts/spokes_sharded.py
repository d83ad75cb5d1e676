"""Run SPOKES with W gloo ranks on a saved feature matrix; rank 0 writes the result.

usage: spokes_sharded.py FEATURES.npy QUALITY.npy|- K ALPHA WORLD OUT.npz CHUNK_ROWS [ROUNDING [SEED]]
"""
import os
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, world, port, args):
    features_path, quality_path, k, alpha, out, chunk_rows, rounding, seed = args
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from spokes_lightning.core.distributed import shard_bounds
    from spokes_lightning.core.spokes import run_spokes

    x = np.load(features_path, mmap_mode="r")
    q = None if quality_path == "-" else np.load(quality_path)
    start, stop = shard_bounds(x.shape[0], rank, world, align=chunk_rows)
    res = run_spokes(x[start:stop], None if q is None else q[start:stop], alpha=alpha, k=k,
                     chunk_rows=chunk_rows, rounding=rounding, seed=seed, log=lambda m: None)
    weights = [None] * world
    dist.all_gather_object(weights, res.weights)
    if rank == 0:
        np.savez(out, indices=res.indices, weights=np.concatenate(weights),
                 objective=np.array(res.objective), gvendi=res.gvendi)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    f, q, k, alpha, world, out, chunk = sys.argv[1:8]
    rounding = sys.argv[8] if len(sys.argv) > 8 else "greedy"
    seed = int(sys.argv[9]) if len(sys.argv) > 9 else 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
    from ports import free_port  # a port block of this xdist worker's own

    port = free_port()
    mp.spawn(worker, args=(int(world), port, (f, q, int(k), float(alpha), out, int(chunk), rounding, seed)),
             nprocs=int(world), join=True)
