"""Online reselection under a stock transformers Trainer: 1 process, 2 processes (torchrun, gloo) with
one plan on both ranks and each rank training its share, checkpoint resume continuing the same plan
and batches, and bad input (one line, exit 2)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
from ports import free_port, run_with_timeout  # noqa: E402  (tests/helpers: a per-xdist-worker port block)
from word_docs import script_env as env  # noqa: E402,F401


SCRIPT = ROOT / "tests" / "scripts" / "online_hf_run.py"



def run(corpus, out, processes=1, resume=None, extra_env=None, settings=None):
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                         "--nproc_per_node", str(processes),
                                                         "--master_port", str(free_port())]
    e = env(**(settings or {}))
    e.update(extra_env or {})
    args = [str(SCRIPT), str(corpus / "corpus.jsonl.gz"), str(corpus / "tok.json"), str(out)]
    return run_with_timeout([*launcher, *args, *([str(resume)] if resume else [])], 400, cwd=ROOT, env=e)


def test_trainer_one_and_two_processes_and_resume(corpus, tmp_path):
    long = {"total_steps": 15}  # reselections at steps 3, 6 and 9: the one at 9 comes after the resume
    one = run(corpus, tmp_path / "one", settings=long)
    assert one.returncode == 0, one.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert a["rules"] == ["random", "random", "online", "online", "online"] and a["requires_grad"]
    assert len(a["seen"]) == 15 and all(len(batch) == 4 for batch in a["seen"])
    state = json.loads((tmp_path / "one" / "trainer" / "checkpoint-6" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["OnlineReselectionTrainerCallback"]["attributes"]["saved"]
    assert len(saved["reselector"]["segments"]) == 4  # 0-1 at the start, 2 at step 3, 3 at step 6 (before the save)

    resumed = run(corpus, tmp_path / "resumed", resume=tmp_path / "one" / "trainer" / "checkpoint-6", settings=long)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    b = json.loads((tmp_path / "resumed" / "rank0.json").read_text())
    assert b["segments"] == a["segments"]  # the restored plan + Gram, then the same reselection at step 9
    assert b["seen"] == a["seen"][6:]  # steps 7..15 see the same sequences

    two = run(corpus, tmp_path / "two", processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["segments"] == r1["segments"] and r0["segments"][:2] == a["segments"][:2]
    assert all(len(batch) == 2 for batch in r0["seen"] + r1["seen"]) and len(r0["seen"]) == 12
    # each rank trained exactly its share of the plan: rank r's sequences of every step
    plan = rebuilt_plan(corpus, r0["segments"])
    for step in range(12):
        for rank, seen in enumerate((r0["seen"], r1["seen"])):
            want = [plan.item(q)["input_ids"].tolist() for q in plan.step_sequences(step, rank, 2)]
            assert seen[step] == want
        if step < 6:  # the fallback segments; later the 1-process run's weights (and picks) may differ
            assert a["seen"][step] == [plan.item(q)["input_ids"].tolist() for q in plan.step_sequences(step, 0, 1)]


def rebuilt_plan(corpus, segments):
    import gzip

    from transformers import PreTrainedTokenizerFast

    from spokes_lightning.online import build_reselector

    tok = PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tok.json"), eos_token="[EOS]", pad_token="[PAD]")
    docs = [(d["id"], d["text"]) for d in map(json.loads, gzip.open(corpus / "corpus.jsonl.gz", "rt"))]
    res = build_reselector(docs, tok, total_steps=12, every_n_steps=3, window=24, global_batch=4, seq_length=16,
                           seed=1, mode="random")
    index = {doc_id: i for i, doc_id in enumerate(res.plan.ids)}
    res.plan.segments = [[index[i] for i in s] for s in segments]
    return res.plan


@pytest.mark.parametrize("extra_env,settings,message", [
    ({"PER_DEVICE": "3"}, None, "per_device_train_batch_size 3"),
])
def test_trainer_bad_input_exits_2(corpus, tmp_path, extra_env, settings, message):
    proc = run(corpus, tmp_path / "bad", extra_env=extra_env, settings=settings)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_online_trainer_selection_is_all_a_stock_trainer_needs(corpus, tmp_path):
    """The public HF entry point: one object gives the Trainer its dataset, callback and step/batch
    arguments; a stock Trainer run trains on the plan and reselects with the live model."""
    import gzip

    import torch
    from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments

    from spokes_lightning.utils.errors import UserError
    from spokes_lightning.integrations.hf_trainer import OnlineTrainerSelection as FromIntegrations
    from spokes_lightning.integrations.online_hf_trainer import OnlineTrainerSelection

    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    from online_run import tiny_llama

    assert FromIntegrations is OnlineTrainerSelection
    torch.set_num_threads(1)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tok.json"), eos_token="[EOS]", pad_token="[PAD]")
    docs = [(d["id"], d["text"]) for d in map(json.loads, gzip.open(corpus / "corpus.jsonl.gz", "rt"))]
    online = OnlineTrainerSelection(docs, tok, total_steps=9, every_n_steps=3, window=24, global_batch=4,
                                    seq_length=16, seed=1, mode="online",
                                    sketch={"k": 64, "max_length": 16, "batch_size": 4})
    assert len(online.plan.segments) == 2  # planned before the first step
    arguments = online.training_arguments()
    assert arguments == {"max_steps": 9, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}
    assert online.training_arguments(world_size=2)["per_device_train_batch_size"] == 2
    with pytest.raises(UserError, match="does not split over 3 processes"):
        online.training_arguments(world_size=3)

    model = tiny_llama(len(tok))
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].tolist()) if m.training else None,
                                    with_kwargs=True)  # training forwards only (not the sketches)
    args = TrainingArguments(output_dir=str(tmp_path / "lm"), **arguments, learning_rate=1e-2, save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_steps=100)
    trainer = Trainer(model=model, args=args, train_dataset=online.train_dataset, callbacks=[online.callback])
    trainer.train()
    assert trainer.state.global_step == 9
    records = online.reselector.records
    assert [r["rule"] for r in records] == ["random", "random", "online"]  # segment 2 picked at step 3
    assert records[2]["planned_at_step"] == 3 and records[2]["n_picks"] > 0
    plan = online.plan
    assert len(plan.segments) == 3  # step 6 would plan segment 3: past the 9 steps
    want = [[plan.item(q)["input_ids"].tolist() for q in plan.step_sequences(step, 0, 1)] for step in range(9)]
    assert seen == want  # the Trainer trained exactly the plan, the reselected segment included
    assert all(p.requires_grad for p in model.parameters())
