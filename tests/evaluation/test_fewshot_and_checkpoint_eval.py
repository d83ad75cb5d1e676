"""OLMES shots, `spokes evaluate` on Hugging Face and Megatron checkpoints, the one-epoch budget."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from spokes_lightning.evaluation.tasks import ALL_TASKS, load_cloze_items, shot_text, shots_for
from spokes_lightning.pipeline.train_stages import pretrain_token_budget


@pytest.mark.parametrize("task", ALL_TASKS)
def test_five_fixed_shots_precede_every_item(task):
    plain = load_cloze_items(task, "test", num_fewshot=0)
    shots = shots_for(task, 5)
    shot_items = load_cloze_items(task, "test", num_fewshot=5)
    assert len(shot_items) == len(plain)
    if task == "mmlu":  # 5 per subject, from dev
        assert all(s.split == "dev" for s in shots) and len(shots) % 5 == 0
    else:
        assert [s.split for s in shots] == ["val"] * 5
        prefix = "\n\n".join(shot_text(s) for s in shots) + "\n\n"
        for a, b in zip(plain, shot_items):
            assert a.id == b.id and a.continuations == b.continuations and a.gold == b.gold
            assert all(cb == prefix + ca for ca, cb in zip(a.contexts, b.contexts))
        # the shots are never evaluated themselves
        val = load_cloze_items(task, "val", num_fewshot=5)
        assert {s.id for s in shots}.isdisjoint(i.id for i in val)
        assert len(val) == len(load_cloze_items(task, "val", num_fewshot=0)) - 5
    assert shots_for(task, 5) == shots  # fixed, not drawn


def test_shot_text_is_the_solved_prompt():
    item = load_cloze_items("winogrande", "val", num_fewshot=0)[0]
    assert shot_text(item) == f"{item.contexts[item.gold]} {item.continuations[0]}"
    item = load_cloze_items("piqa", "val", num_fewshot=0)[0]
    assert shot_text(item).startswith("Question: ") and shot_text(item).endswith(item.continuations[item.gold])
    assert load_cloze_items("mmlu", "test") == load_cloze_items("mmlu", "test", num_fewshot=5)  # MMLU default


@pytest.mark.parametrize("sizes,epochs", [({"a": 1000, "b": 5000}, 1.0), ({"a": 777}, 2.5), ({"x": 64, "y": 65}, 1.0)])
def test_one_budget_gives_every_method_its_epochs(sizes, epochs):
    cfg = OmegaConf.create({"pretrain": {"token_budget": None, "epochs": epochs, "batch_size": 4, "seq_length": 16}})
    budget = pretrain_token_budget(cfg, sizes)
    assert budget % 64 == 0 and budget >= epochs * max(sizes.values()) > budget - 64
    assert all(budget / n >= epochs for n in sizes.values())
    cfg.pretrain.token_budget = 12345
    assert pretrain_token_budget(cfg, sizes) == 12345


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny local pretraining run: megatron-core GPTModel -> Megatron checkpoint -> converted HF model."""
    from spokes_lightning.megatron.export import export_selection
    from spokes_lightning.models.pretrain import pretrain_on_megatron_data
    from tiny_text import tiny_corpus, tiny_tokenizer

    torch.set_num_threads(1)
    corpus = tiny_corpus(40)
    tokenizer = tiny_tokenizer(d["text"] for d in corpus)
    run_dir = tmp_path_factory.mktemp("ckpt_eval")
    exp = export_selection(corpus, list(range(30)), "random", run_dir, tokenizer)
    res = pretrain_on_megatron_data(exp.data_prefix, tokenizer, run_dir / "pre", token_budget=8 * 4 * 64,
                                    seq_length=64, n_layers=2, hidden=64, heads=4, batch_size=4, seed=0,
                                    progress=False)
    return run_dir, res, exp


def spokes(*args):
    return subprocess.run([sys.executable, "-m", "spokes_lightning", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_local_pretraining_leaves_a_megatron_checkpoint_and_its_conversion(trained):
    run_dir, res, _ = trained
    ckpt = run_dir / "pre" / "megatron"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(res.steps)
    from megatron.core import dist_checkpointing

    args = dist_checkpointing.load_common_state_dict(str(ckpt / f"iter_{res.steps:07d}"))["args"]
    assert args.num_layers == 2 and args.hidden_size == 64 and args.swiglu and args.normalization == "RMSNorm"
    assert json.loads((run_dir / "pre" / "model" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_evaluate_command_megatron_equals_hf(trained, tmp_path):
    run_dir, res, exp = trained
    common = ["--tasks", "boolq,winogrande", "--limit", "6", "--num-fewshot", "2", "--batch-size", "8"]
    hf = spokes("evaluate", "--model", res.model_dir, *common, "--out", tmp_path / "hf.json")
    assert hf.returncode == 0, hf.stderr[-2000:]
    mg = spokes("evaluate", "--model", run_dir / "pre" / "megatron", "--tokenizer", exp.tokenizer_dir, *common,
                "--out", tmp_path / "mg.json")
    assert mg.returncode == 0, mg.stderr[-2000:]
    line = json.loads(mg.stdout)
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("hf.json", "mg.json"))
    assert a["items"] == b["items"] and line["avg"] == a["scores"]["avg"]
    assert len(a["items"]["boolq"]) == 6 and set(np.unique(a["items"]["winogrande"])) <= {0, 1}
    assert a["shots"]["boolq"] == [s.id for s in shots_for("boolq", 2)]
    assert b["num_fewshot"] == 2 and (tmp_path / "mg.converted").is_dir()


@pytest.mark.parametrize("case", ["not_a_checkpoint", "bad_task", "bad_out", "bad_limit"])
def test_evaluate_command_bad_input_exits_2(trained, tmp_path, case):
    run_dir, res, _ = trained
    model, tasks, out, extra = res.model_dir, "arc_easy", tmp_path / "r.json", []
    if case == "not_a_checkpoint":
        model = tmp_path
    elif case == "bad_task":
        tasks = "arc_easy,nope"
    elif case == "bad_out":
        out = tmp_path / "r.txt"
    else:
        extra = ["--limit", "0"]
    r = spokes("evaluate", "--model", model, "--tasks", tasks, "--out", out, *extra)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()
