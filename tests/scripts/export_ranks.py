"""WORLD gloo ranks call export_selection on the same input; each writes OUT_DIR/rank<r>.json with
the result it got (or its error) and the shards it tokenized.

usage: export_ranks.py TOKENIZER_DIR RUN_DIR OUT_DIR WORLD SHARD_DOCS [FAIL_RANK]
"""
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

TESTS = Path(__file__).resolve().parents[1]


def worker(rank, world, port, args):
    tok_dir, run_dir, out_dir, shard_docs, fail_rank = args
    sys.path.insert(0, str(TESTS / "helpers"))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TOKENIZERS_PARALLELISM="false")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from export_store import export_case
    from transformers import PreTrainedTokenizerFast

    import spokes_lightning.megatron.shards as shards
    from spokes_lightning.utils.errors import UserError
    from spokes_lightning.megatron.export import export_selection

    seen = []
    real = shards.tokenize_shard

    def spy(documents, job, *a, **kw):
        seen.append(job.index)
        if rank == fail_rank:
            raise UserError("planted failure")
        return real(documents, job, *a, **kw)

    shards.tokenize_shard = spy
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    corpus, selection, copies = export_case()
    try:
        res = export_selection(corpus, selection, "m", run_dir, tok, copies=copies, shard_docs=shard_docs)
        report = {"result": res.to_dict(), "timings": res.timings}
    except Exception as exc:  # reported, so the test sees every rank's outcome
        report = {"error": f"{type(exc).__name__}: {exc}"}
    report["shards"] = seen
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    tok_dir, run_dir, out_dir, world, shard_docs = sys.argv[1:6]
    fail_rank = int(sys.argv[6]) if len(sys.argv) > 6 else -1
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
    from ports import free_port  # a port block of this xdist worker's own

    port = free_port()
    mp.spawn(worker, args=(int(world), port, (tok_dir, run_dir, out_dir, int(shard_docs), fail_rank)),
             nprocs=int(world), join=True)
