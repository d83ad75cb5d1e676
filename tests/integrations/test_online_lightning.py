"""Online reselection through Lightning on a tiny LLaMA: a 1-process fit, a 2-process DDP fit (gloo)
with the same plan on both ranks, one reselection with a fixed model on 1 vs 2 processes (the same
picks and Gram), resume from the callback's state, and bad input (exit 2, one line)."""
from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
from ports import free_port, run_with_timeout  # noqa: E402  (tests/helpers: a per-xdist-worker port block)
SCRIPT = ROOT / "tests" / "scripts" / "online_run.py"
from word_docs import make_docs, make_tokenizer, script_env as env  # noqa: E402,F401


def run(args, settings=None, launcher=()):
    return run_with_timeout([*launcher, str(SCRIPT), *map(str, args)], 400, cwd=ROOT, env=env(**(settings or {})))


def fit(corpus, out, devices, mode="online", settings=None, checkpoint=None):
    cmd = [sys.executable, str(SCRIPT), "fit", str(corpus / "corpus.jsonl.gz"), str(corpus / "tok.json"), str(out),
           str(devices), mode]
    e = env(**(settings or {}))
    if checkpoint:
        e["ONLINE_CHECKPOINT"] = str(checkpoint)
    proc = run_with_timeout(cmd, 400, cwd=ROOT, env=e)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


def test_one_process_fit_reselects_with_the_model_and_leaves_it_trainable(corpus, tmp_path):
    (rank0,) = fit(corpus, tmp_path / "one", 1, settings={"total_steps": 15}, checkpoint=6)
    assert rank0["rules"] == ["random", "random", "online", "online", "online"]  # 15 steps / R = 3: 5 segments
    # a Lightning checkpoint at step 6 (ckpt_path): the callback state restores the plan and Gram, the
    # DataModule serves from the restored step, and the reselection at step 9 picks the same documents
    assert rank0["resumed"]["segments"] == rank0["segments"]
    assert rank0["resumed"]["seen"] == rank0["seen"][6:] and len(rank0["seen"]) == 15
    assert rank0["requires_grad"] and rank0["training_mode"]
    planned = [i for s in rank0["segments"] for i in s]
    assert len(planned) == len(set(planned))  # no document planned twice
    assert set(rank0["trained_on"]) <= set(planned) and len(rank0["trained_on"]) >= len(planned) - 4
    from transformers import PreTrainedTokenizerFast

    from spokes_lightning.online import build_reselector

    tok = PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tok.json"), eos_token="[EOS]", pad_token="[PAD]")
    rand = build_reselector(make_docs(150, seed=4), tok, total_steps=15, every_n_steps=3, window=24, global_batch=4,
                            seq_length=16, seed=1, mode="random")
    rand.plan_initial()
    for step in range(1, 15):
        rand.reselect(None, None, step)
    ids = [[rand.plan.ids[d] for d in s] for s in rand.plan.segments]
    assert ids[:2] == rank0["segments"][:2]  # the fallback segments are the random rule's
    assert ids[2:] != rank0["segments"][2:]  # the later ones are chosen


def test_two_process_ddp_fit_holds_one_plan_on_both_ranks(corpus, tmp_path):
    ranks = fit(corpus, tmp_path / "two", 2)
    assert ranks[0]["world"] == 2 and ranks[0]["segments"] == ranks[1]["segments"]
    assert ranks[0]["rules"] == ["random", "random", "online", "online"]
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"]  # DDP kept the replicas equal
    assert ranks[0]["trained_on"] == ranks[1]["trained_on"]



def test_one_reselection_is_the_same_on_one_and_two_processes(corpus, tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    from online_run import tiny_llama
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tok.json"), eos_token="[EOS]", pad_token="[PAD]")
    tiny_llama(len(tok)).save_pretrained(tmp_path / "model")
    args = ["sketch", corpus / "corpus.jsonl.gz", corpus / "tok.json"]
    one = run([*args, tmp_path / "one", tmp_path / "model"], launcher=(sys.executable,))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run([*args, tmp_path / "two", tmp_path / "model"],
              launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port())))
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "rank0.json").read_text())
    b = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(a["segments"]) == 3 and a["segments"] == b[0]["segments"] == b[1]["segments"]
    assert a["requires_grad"] and a["training_mode"]
    assert np.array_equal(np.load(tmp_path / "one" / "gram.npy"), np.load(tmp_path / "two" / "gram.npy"))


def test_resume_from_the_callback_state_continues_the_same_plan(corpus):
    import torch
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    from online_run import tiny_llama

    from spokes_lightning.integrations.online_lightning import OnlineReselectionCallback, OnlineSelectionDataModule

    tok = PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tok.json"), eos_token="[EOS]", pad_token="[PAD]")
    docs = make_docs(150, seed=4)
    settings = dict(total_steps=15, every_n_steps=3, window=24, global_batch=4, seq_length=16, seed=1,
                    sketch={"k": 64, "max_length": 16, "batch_size": 4})
    torch.set_num_threads(1)
    model = tiny_llama(len(tok))
    first = OnlineSelectionDataModule(docs, tok, **settings)
    cb = OnlineReselectionCallback(first)
    first.reselector.reselect(model, tok, 3)
    saved = cb.state_dict()
    first.reselector.reselect(model, tok, 6)
    resumed = OnlineSelectionDataModule(docs, tok, **settings)
    OnlineReselectionCallback(resumed).load_state_dict(saved)
    assert np.array_equal(resumed.reselector.trained.gram, first.reselector.trained.gram) is False  # one step behind
    resumed.reselector.reselect(model, tok, 6)
    assert resumed.plan.segments == first.plan.segments
    assert np.array_equal(resumed.reselector.trained.gram, first.reselector.trained.gram)
    other = OnlineSelectionDataModule(docs, tok, **{**settings, "seed": 2})
    saved["segments"][0][0] = "not-a-document"
    with pytest.raises(Exception, match="not in this training set"):
        OnlineReselectionCallback(other).load_state_dict(saved)


@pytest.mark.parametrize("settings,message", [
    ({"window": 2}, "online.window = 2 is smaller than"),  # every_n_steps <= 0 etc.: tests/online/test_online.py
])
def test_bad_settings_exit_2_with_one_line(corpus, tmp_path, settings, message):
    proc = run(["fit", corpus / "corpus.jsonl.gz", corpus / "tok.json", tmp_path / "bad", 1, "online"], settings,
               launcher=(sys.executable,))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()
