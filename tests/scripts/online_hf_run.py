"""Online reselection under a stock transformers Trainer (tests/integrations/test_online_hf_trainer.py).

    online_hf_run.py CORPUS TOKENIZER OUT [RESUME_CHECKPOINT]

Trains a tiny LLaMA for 12 steps (R = 3), checkpoints every 6; each process writes
OUT/rank<r>.json with the plan and the sequences its model saw. Bad input: one line, exit 2.
"""
import gzip
import json
import os
import sys
from pathlib import Path

import torch


def main():
    from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments

    from spokes_lightning.utils.errors import user_errors_exit
    from spokes_lightning.integrations.online_hf_trainer import OnlineReselectionTrainerCallback, OnlineTrainerDataset
    from spokes_lightning.online import build_reselector

    sys.path.insert(0, str(Path(__file__).parent))
    from online_run import tiny_llama

    corpus, tok_file, out = sys.argv[1:4]
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    tok = PreTrainedTokenizerFast(tokenizer_file=tok_file, eos_token="[EOS]", pad_token="[PAD]")
    docs = [(d["id"], d["text"]) for d in map(json.loads, gzip.open(corpus, "rt"))]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    settings = dict(total_steps=12, every_n_steps=3, window=24, global_batch=4, seq_length=16, seed=1,
                    sketch={"k": 64, "max_length": 16, "batch_size": 4})
    settings.update(json.loads(os.environ.get("ONLINE_SETTINGS", "{}")))
    with user_errors_exit():
        reselector = build_reselector(docs, tok, mode="online", **settings)
        model = tiny_llama(len(tok))
        seen = []
        model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].tolist()) if m.training else None,
                                       with_kwargs=True)  # training forwards only (not the sketches)
        args = TrainingArguments(output_dir=str(Path(out) / "trainer"), max_steps=settings["total_steps"],
                                 per_device_train_batch_size=int(os.environ.get("PER_DEVICE", 4 // world)),
                                 gradient_accumulation_steps=1, learning_rate=1e-2, save_steps=6, save_strategy="steps",
                                 logging_steps=100, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                                 disable_tqdm=True, save_only_model=False)
        callback = OnlineReselectionTrainerCallback(reselector, tok)
        trainer = Trainer(model=model, args=args, train_dataset=OnlineTrainerDataset(reselector.plan),
                          callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        rank = trainer.args.process_index
        plan = reselector.plan
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({
            "segments": [[plan.ids[d] for d in s] for s in plan.segments],
            "rules": [r["rule"] for r in reselector.records], "seen": seen,
            "requires_grad": all(p.requires_grad for p in model.parameters())}))
    import torch.distributed as dist

    if dist.is_initialized():
        # every rank has written its report (what the test reads). Leave without a gloo teardown:
        # barrier + destroy_process_group at exit hung now and then on a loaded 2-core machine (both
        # reports written, the processes never exiting), and a gloo thread alive at interpreter exit
        # can abort it; torchrun still collects each rank's exit code
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
