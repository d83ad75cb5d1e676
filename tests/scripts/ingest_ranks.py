"""Run the corpus ingest on W gloo ranks (torch.multiprocessing); every rank calls ``ingest``.

usage: ingest_ranks.py SETTINGS.json OUT_DIR WORLD [WORKERS]
"""
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, world, port, settings_path, out, workers):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from spokes_lightning.data.ingest import IngestSettings, ingest

    raw = json.loads(open(settings_path).read())
    raw["paths"] = tuple(raw.get("paths", ()))
    summary = ingest(IngestSettings(**raw), out, workers=workers)
    if rank == 0:
        with open(os.path.join(out, "summary.json"), "w") as fh:
            json.dump(summary, fh, sort_keys=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    settings_path, out, world = sys.argv[1], sys.argv[2], int(sys.argv[3])
    workers = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
    from ports import free_port  # a port block of this xdist worker's own

    port = free_port()
    mp.spawn(worker, args=(world, port, settings_path, out, workers), nprocs=world, join=True)
