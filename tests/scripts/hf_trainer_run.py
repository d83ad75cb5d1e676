"""A Trainer user's script: a tiny LLaMA trained by a stock ``transformers.Trainer`` on a selection
(tests/integrations/test_hf_trainer.py). Launched with ``python`` (1 process) or ``accelerate launch`` (2).

usage: hf_trainer_run.py SPEC.json
SPEC: {"tokenizer": DIR, "n_docs": N, "selection": {id: copies} | [ids], "seq_length": S,
       "batch_size": B, "out": DIR, "runs": [{"name", "output_dir", and optionally "epochs", "max_steps",
       "save_steps", "batch_size", "trainer_batch_size", "selection", "dispatch_batches", "num_workers",
       "resume", "restore_callbacks"}]}
Each run trains one Trainer; a forward pre-hook records every batch the model sees, with the
global step, into OUT/NAME.rankR.json. Bad input: one line on stderr, exit 2.
"""
import json
import math
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from tiny_text import tiny_corpus  # noqa: E402


def build_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


def train(spec, run, tokenizer, out):
    from transformers import Trainer, TrainingArguments

    from spokes_lightning.integrations.hf_trainer import SelectionDataset, SelectionTrainerCallback

    batch_size = run.get("batch_size", spec["batch_size"])
    dataset = SelectionDataset(tiny_corpus(spec["n_docs"]), run.get("selection", spec["selection"]), tokenizer,
                               seq_length=spec["seq_length"], batch_size=batch_size, seed=spec.get("seed", 0))
    save_steps = run.get("save_steps", 0)
    args = TrainingArguments(
        output_dir=run["output_dir"], per_device_train_batch_size=run.get("trainer_batch_size", batch_size),
        num_train_epochs=run.get("epochs", 1), max_steps=run.get("max_steps", -1), learning_rate=3e-3,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, logging_steps=1,
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=run.get("num_workers", 0),
        ddp_find_unused_parameters=False, accelerator_config={"dispatch_batches": run.get("dispatch_batches")},
        restore_callback_states_from_checkpoint=run.get("restore_callbacks", False))
    trainer = Trainer(model=build_model(tokenizer), args=args, train_dataset=dataset,
                      callbacks=[SelectionTrainerCallback()])
    seen = []

    def record(module, positional, kwargs):
        seen.append({"step": trainer.state.global_step, "input_ids": kwargs["input_ids"].tolist(),
                     "labels": kwargs["labels"].tolist()})

    trainer.model.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train(resume_from_checkpoint=run.get("resume"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    rank = trainer.args.process_index
    (out / f"{run['name']}.rank{rank}.json").write_text(json.dumps({
        "world": trainer.args.world_size, "type": str(trainer.accelerator.distributed_type),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "batches_per_epoch": dataset.batches_per_epoch(), "len_dataloader": len(trainer.get_train_dataloader()),
        "fingerprint": dataset.fingerprint, "batches": seen, "losses": losses,
        "global_step": trainer.state.global_step,
        "finite": all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters()),
        "losses_finite": all(math.isfinite(x) for x in losses)}))


def main(argv):
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import transformers
    from transformers import PreTrainedTokenizerFast

    from spokes_lightning.utils.errors import user_errors_exit

    transformers.logging.set_verbosity_error()
    spec = json.loads(Path(argv[0]).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(spec["tokenizer"])
    with user_errors_exit():
        for run in spec["runs"]:
            train(spec, run, tokenizer, out)


if __name__ == "__main__":
    main(sys.argv[1:])
