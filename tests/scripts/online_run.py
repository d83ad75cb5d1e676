"""Online reselection on a tiny LLaMA, for tests/integrations/test_online_lightning.py.

    online_run.py fit CORPUS TOKENIZER OUT DEVICES MODE    # Lightning fit (devices=2: DDP over gloo)
    online_run.py sketch CORPUS TOKENIZER OUT MODEL_DIR    # one reselection with a fixed model (torchrun or plain)

Each rank writes OUT/rank<r>.json; bad input exits 2 with one line.
"""
import gzip
import json
import os
import sys
from pathlib import Path

import torch


def tiny_llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True))


def main():
    from transformers import PreTrainedTokenizerFast

    from spokes_lightning.utils.errors import user_errors_exit

    action, corpus, tok_file, out = sys.argv[1:5]
    torch.set_num_threads(1)
    tok = PreTrainedTokenizerFast(tokenizer_file=tok_file, eos_token="[EOS]", pad_token="[PAD]")
    docs = [(d["id"], d["text"]) for d in map(json.loads, gzip.open(corpus, "rt"))]
    extra = json.loads(os.environ.get("ONLINE_SETTINGS", "{}"))
    settings = dict(total_steps=12, every_n_steps=3, window=24, global_batch=4, seq_length=16, seed=1,
                    sketch={"k": 64, "max_length": 16, "batch_size": 4})
    settings.update(extra)
    with user_errors_exit():
        if action == "fit":
            fit(docs, tok, Path(out), int(sys.argv[5]), sys.argv[6], settings)
        else:
            sketch(docs, tok, Path(out), sys.argv[5], settings)


def fit(docs, tok, out, devices, mode, settings):
    """Train; with ONLINE_CHECKPOINT=k also save a checkpoint at step k, then train a fresh
    Trainer + DataModule resumed from it (``ckpt_path``) and record both runs."""
    import lightning as L

    from spokes_lightning.models.lightning_lm import CausalLMModule
    from spokes_lightning.integrations.online_lightning import OnlineReselectionCallback, OnlineSelectionDataModule

    class Recording(CausalLMModule):
        def training_step(self, batch, batch_idx):
            self.seen.append(batch["input_ids"].tolist())
            return super().training_step(batch, batch_idx)

    every = int(os.environ.get("ONLINE_CHECKPOINT", "0"))

    def run(resume_from=None):
        dm = OnlineSelectionDataModule(docs, tok, mode=mode, **settings)
        model = tiny_llama(len(tok))
        callbacks = [OnlineReselectionCallback(dm)]
        if every:
            callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=str(out / "ckpt"), every_n_train_steps=every,
                                                                 save_top_k=-1, filename="{step}"))
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                            max_steps=settings["total_steps"], logger=False, enable_checkpointing=bool(every),
                            enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                            callbacks=callbacks)
        module = Recording(model, 1e-2, 0.0)
        module.seen = []
        trainer.fit(module, datamodule=dm, ckpt_path=resume_from)
        return dm, model, trainer, module.seen

    dm, model, trainer, seen = run()
    if every:
        resumed_dm, _, _, resumed_seen = run(str(out / "ckpt" / f"step={every}.ckpt"))
        resumed = {"segments": [[resumed_dm.plan.ids[d] for d in s] for s in resumed_dm.plan.segments],
                   "seen": resumed_seen}
    plan = dm.plan
    record = {"segments": [[plan.ids[d] for d in s] for s in plan.segments],
              "rules": [r["rule"] for r in dm.reselector.records],
              "trained_on": plan.trained_on(trainer.world_size),
              "requires_grad": all(p.requires_grad for p in model.parameters()),
              "training_mode": model.training,
              "param_sum": float(sum(p.double().sum() for p in model.parameters())),
              "world": trainer.world_size, "seen": seen}
    if every:
        record["resumed"] = resumed
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def sketch(docs, tok, out, model_dir, settings):
    import numpy as np
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from spokes_lightning.online import build_reselector

    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    model = LlamaForCausalLM.from_pretrained(model_dir)
    model.train()
    res = build_reselector(docs, tok, mode="online", **settings)
    res.plan_initial()
    res.reselect(model, tok, settings["every_n_steps"])
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        np.save(out / "gram.npy", res.trained.gram)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "segments": [[res.plan.ids[d] for d in s] for s in res.plan.segments],
        "requires_grad": all(p.requires_grad for p in model.parameters()), "training_mode": model.training}))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
