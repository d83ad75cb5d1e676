"""Run under ``torchrun --nproc_per_node 2``: write Megatron checkpoints of model-parallel models.

    megatron_parallel_checkpoints.py FLAGS.json VOCAB_SIZE OUT_DIR

* TP=2 (flags as given, fixed seed): a torch_dist checkpoint (OUT/tp2_dist), the two legacy
  rank files (OUT/tp2_legacy), and on rank 0 OUT/tp2_logits.pt = {"tokens", "logits"}, the full
  (vocab-gathered) logits of the TP=2 model for comparison after conversion.
* PP=2 (untied embeddings: megatron-core moves the tied copy of a later stage to CUDA): the same
  model in both formats (OUT/pp2_dist, OUT/pp2_legacy), to check the stage merge.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from spokes_lightning.megatron.checkpoint import (megatron_args_namespace, save_legacy_checkpoint,
                                                  save_megatron_checkpoint)
from spokes_lightning.megatron.runtime import build_cpu_gpt_model, megatron_on_cpu

ITERATION = 7


def causal_mask(seq: int) -> torch.Tensor:
    return torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]  # True = masked


def main(flags_path: str, vocab_size: str, out: str) -> None:
    flags = json.loads(Path(flags_path).read_text())
    vocab_size, out = int(vocab_size), Path(out)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    with megatron_on_cpu(tensor_parallel=2):
        torch.manual_seed(1234)
        model = build_cpu_gpt_model(flags, vocab_size, parallel_output=False)
        args = megatron_args_namespace(flags, vocab_size, tensor_model_parallel_size=2)
        tokens = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            logits = model(input_ids=tokens, position_ids=torch.arange(12).expand(2, 12),
                           attention_mask=causal_mask(12))
        if dist.get_rank() == 0:
            torch.save({"tokens": tokens, "logits": logits}, out / "tp2_logits.pt")
        save_megatron_checkpoint(model, args, out / "tp2_dist", ITERATION)
        save_legacy_checkpoint(model, args, out / "tp2_legacy", ITERATION)
    untied = {**flags, "--untie-embeddings-and-output-weights": True}
    with megatron_on_cpu(pipeline_parallel=2):
        torch.manual_seed(99)
        model = build_cpu_gpt_model(untied, vocab_size)
        args = megatron_args_namespace(untied, vocab_size, pipeline_model_parallel_size=2)
        save_megatron_checkpoint(model, args, out / "pp2_dist", ITERATION)
        save_legacy_checkpoint(model, args, out / "pp2_legacy", ITERATION)
    dist.destroy_process_group()


if __name__ == "__main__":  # megatron-core's checkpoint writer spawns a helper process
    main(*sys.argv[1:])
