"""Megatron-LM checkpoint -> Hugging Face LlamaForCausalLM: same logits, every format and layout.

A tiny LLaMA-shaped megatron-core GPTModel is built from the launch script's own flags, trained
a few steps on CPU, saved exactly as Megatron-LM saves it (torch_dist, and the legacy
mp_rank_XX files), converted, and loaded back with AutoModelForCausalLM / AutoTokenizer. A
second process pair (torchrun, 2 gloo ranks) writes TP=2 and PP=2 checkpoints.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spokes_lightning.cli import spokes as cli
from spokes_lightning.utils.errors import UserError
from spokes_lightning.megatron.checkpoint import (TRACKER_FILE, megatron_args_namespace,
                                                  save_legacy_checkpoint, save_megatron_checkpoint)
from spokes_lightning.megatron.convert import (convert_megatron_checkpoint, is_megatron_checkpoint,
                                               resolve_model_dir)
from spokes_lightning.megatron.launch_script import LLAMA_3_2_1B, megatron_llama_args
from spokes_lightning.megatron.runtime import build_cpu_gpt_model, megatron_on_cpu
from tiny_text import tiny_corpus, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SEQ = 16
ITERATION = 3
TINY = LLAMA_3_2_1B.scaled(num_layers=2, hidden_size=64, ffn_hidden_size=128,
                           num_attention_heads=4, num_query_groups=2)
TEXT = "the cat sees the ball. a dog finds some bread."


def causal_mask(seq: int) -> torch.Tensor:
    return torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]  # True = masked


def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    seq = ids.shape[1]
    return model(input_ids=ids, position_ids=torch.arange(seq).expand_as(ids),
                 attention_mask=causal_mask(seq))


def hf_max_abs_diff(out_dir: Path, reference: torch.Tensor, ids: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out_dir))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (*ids.shape, model.config.vocab_size)
    return (logits - reference[..., : logits.shape[-1]]).abs().max().item()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer(d["text"] for d in tiny_corpus(30)).save_pretrained(str(path))
    return path


def tiny_flags(tokenizer_dir: Path, run_dir: Path, tied: bool) -> dict:
    return megatron_llama_args(data_prefix=run_dir / "data", tokenizer_dir=tokenizer_dir, run_dir=run_dir,
                               method="random", shape=TINY.scaled(tie_embeddings=tied), seq_length=SEQ,
                               global_batch_size=4, train_tokens=40 * 4 * SEQ)


def train_and_save(root: Path, tokenizer_dir: Path, tied: bool, legacy_variants: dict) -> dict:
    """Train the tiny model 3 steps, save it (torch_dist + legacy [+ variants]); its logits on TEXT."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    flags = tiny_flags(tokenizer_dir, root, tied)
    ids = AutoTokenizer.from_pretrained(str(tokenizer_dir))(TEXT, return_tensors="pt").input_ids
    with megatron_on_cpu():
        torch.manual_seed(0)
        model = build_cpu_gpt_model(flags, vocab)
        assert model.share_embeddings_and_output_weights == tied
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        batches = torch.randint(0, vocab, (3, 4, SEQ + 1), generator=torch.Generator().manual_seed(0))
        for batch in batches:
            loss = model(input_ids=batch[:, :-1], position_ids=torch.arange(SEQ).expand(4, SEQ),
                         attention_mask=causal_mask(SEQ), labels=batch[:, 1:]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = megatron_logits(model, ids)
        args = megatron_args_namespace(flags, vocab)
        save_megatron_checkpoint(model, args, root / "dist", ITERATION)
        save_legacy_checkpoint(model, args, root / "legacy", ITERATION)
        for name, overrides in legacy_variants.items():
            save_legacy_checkpoint(model, megatron_args_namespace(flags, vocab, **overrides), root / name, ITERATION)
    return {"root": root, "ids": ids, "logits": logits, "args": args}


@pytest.fixture(scope="module")
def tied(tmp_path_factory, tokenizer_dir):
    variants = {"moe": {"num_experts": 8}, "learned": {"position_embedding_type": "learned_absolute"}}
    return train_and_save(tmp_path_factory.mktemp("tied"), tokenizer_dir, True, variants)


@pytest.fixture(scope="module")
def untied(tmp_path_factory, tokenizer_dir):
    return train_and_save(tmp_path_factory.mktemp("untied"), tokenizer_dir, False, {})


def test_checkpoint_layout_is_megatron_lms(tied):
    root, args = tied["root"], tied["args"]
    assert (root / "dist" / TRACKER_FILE).read_text() == str(ITERATION)
    dist_iter = root / "dist" / "iter_0000003"
    assert {"metadata.json", "common.pt", ".metadata"} <= {p.name for p in dist_iter.iterdir()}
    assert (root / "legacy" / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    assert not [p for p in (root / "dist").iterdir() if p.name.startswith(".tmp")]
    assert (args.num_layers, args.hidden_size, args.num_query_groups, args.kv_channels) == (2, 64, 2, 16)
    assert args.group_query_attention and args.swiglu and not args.add_bias_linear
    assert args.padded_vocab_size == 384 and args.position_embedding_type == "rope"
    assert args.num_experts is None and args.untie_embeddings_and_output_weights is False
    assert is_megatron_checkpoint(root / "dist") and is_megatron_checkpoint(dist_iter)
    assert not is_megatron_checkpoint(root)


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_torch_dist_converts_to_the_same_logits(which, request, tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    saved = request.getfixturevalue(which)
    out = tmp_path / "hf"
    res = convert_megatron_checkpoint(saved["root"] / "dist", tokenizer_dir, out)
    assert res["tied"] == (which == "tied") and res["iteration"] == ITERATION
    assert (res["layers"], res["vocab"], res["tp"], res["pp"], res["format"]) == (2, 300, 1, 1, "torch_dist")
    assert (out / "model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(str(out))(TEXT).input_ids == saved["ids"][0].tolist()
    diff = hf_max_abs_diff(out, saved["logits"], saved["ids"])
    print(f"torch_dist {which} max |logit diff| = {diff:.2e}")
    assert diff < 1e-4


def test_legacy_tp1_and_an_iteration_dir_convert(tied, tmp_path, tokenizer_dir):
    res = convert_megatron_checkpoint(tied["root"] / "legacy" / "iter_0000003", tokenizer_dir, tmp_path / "hf")
    assert res["format"] == "torch" and res["iteration"] == ITERATION
    diff = hf_max_abs_diff(tmp_path / "hf", tied["logits"], tied["ids"])
    print(f"legacy TP=1 max |logit diff| = {diff:.2e}")
    assert diff < 1e-4
    with pytest.raises(UserError, match="iter_0000009"):
        convert_megatron_checkpoint(tied["root"] / "legacy", tokenizer_dir, tmp_path / "x", iteration=9)
    assert not (tmp_path / "x").exists()


@pytest.mark.timeout(600)
def test_tp2_and_pp2_checkpoints_from_two_gloo_ranks(tmp_path, tokenizer_dir):
    from safetensors.torch import load_file

    (tmp_path / "flags.json").write_text(json.dumps(tiny_flags(tokenizer_dir, tmp_path, tied=True)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "tests/scripts/megatron_parallel_checkpoints.py", str(tmp_path / "flags.json"), "300",
                        str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=500,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ref = torch.load(tmp_path / "tp2_logits.pt")
    for fmt in ("dist", "legacy"):
        res = convert_megatron_checkpoint(tmp_path / f"tp2_{fmt}", tokenizer_dir, tmp_path / f"hf_tp2_{fmt}")
        assert (res["tp"], res["pp"], res["tied"]) == (2, 1, True)
        diff = hf_max_abs_diff(tmp_path / f"hf_tp2_{fmt}", ref["logits"], ref["tokens"])
        print(f"TP=2 {fmt} max |logit diff| = {diff:.2e}")
        assert diff < 1e-4
    # PP=2: the legacy stage merge gives exactly what megatron-core's global dist tensors hold.
    for fmt in ("dist", "legacy"):
        res = convert_megatron_checkpoint(tmp_path / f"pp2_{fmt}", tokenizer_dir, tmp_path / f"hf_pp2_{fmt}")
        assert (res["tp"], res["pp"], res["tied"]) == (1, 2, False)
    a = load_file(tmp_path / "hf_pp2_dist" / "model.safetensors")
    b = load_file(tmp_path / "hf_pp2_legacy" / "model.safetensors")
    assert sorted(a) == sorted(b) and "lm_head.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])


def test_resolve_model_dir_converts_once_into_a_cache(tied, tmp_path, tokenizer_dir):
    cache = tmp_path / "cache"
    hf = resolve_model_dir(tied["root"] / "legacy", tokenizer_dir, cache_dir=cache)
    assert hf == cache / "iter_0000003" and (hf / "config.json").is_file()
    stamp = (hf / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(tied["root"] / "legacy", tokenizer_dir, cache_dir=cache) == hf
    assert (hf / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_model_dir(hf) == hf  # a Hugging Face directory is used as is
    with pytest.raises(UserError, match="neither"):
        resolve_model_dir(tmp_path / "cache")


def spokes(*args):
    return subprocess.run([sys.executable, "-m", "spokes_lightning", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_prints_one_json_line_and_refuses_non_megatron_dirs(tied, tmp_path, tokenizer_dir):
    out = tmp_path / "hf"
    r = spokes("convert-megatron", tied["root"] / "dist", "--tokenizer", tokenizer_dir, "--out", out)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {"out": str(out), "iteration": ITERATION, "layers": 2, "vocab": 300,
                                    "tp": 1, "pp": 1, "tied": True}
    (tmp_path / "empty").mkdir()
    for given, needle in ((tmp_path / "empty", "is empty"), (out, "Hugging Face model")):
        r = spokes("convert-megatron", given, "--tokenizer", tokenizer_dir, "--out", tmp_path / "never")
        assert r.returncode == 2 and r.stdout == ""
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
        assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("case, needle", [("big_tokenizer", "wrong tokenizer"), ("moe", "mixture of experts"),
                                          ("learned", "position_embedding_type=learned_absolute")])
def test_cli_bad_checkpoints_exit_2_with_one_line(case, needle, tied, tmp_path, tokenizer_dir, capsys):
    tokenizer = tokenizer_dir
    ckpt = tied["root"] / ("dist" if case == "big_tokenizer" else case)
    if case == "big_tokenizer":  # 300 + 100 tokens > the 384 padded embedding rows
        from transformers import AutoTokenizer

        big = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        big.add_tokens([f"<extra_{i}>" for i in range(100)])
        tokenizer = tmp_path / "big_tok"
        big.save_pretrained(str(tokenizer))
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert-megatron", ckpt, "--tokenizer", tokenizer, "--out", out])
    captured = capsys.readouterr()
    assert exc.value.code == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and needle in captured.err, captured.err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
