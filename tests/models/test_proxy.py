"""Offline proxy LM: corpus tokenizer, Lightning training, caching, fail-fast loading."""
from __future__ import annotations

import json
import time

import pytest
import torch

from spokes_lightning.data.corpus import demo_web_paths, read_documents
from spokes_lightning.utils.errors import UserError
from spokes_lightning.models.llama import load_causal_lm, warmup_cosine
from spokes_lightning.models.proxy_training import pack_blocks, train_proxy
from spokes_lightning.models.tokenizer import (
    EOS_TOKEN, load_tokenizer, train_tokenizer,
)

TINY = dict(n_layers=3, hidden=32, heads=2, intermediate=64, max_length=64, batch_size=8, lr=3e-3)


@pytest.fixture(scope="module")
def docs():
    torch.set_num_threads(1)
    return read_documents(demo_web_paths(), "text")[:80]


@pytest.fixture(scope="module")
def tokenizer(docs, tmp_path_factory):
    return train_tokenizer([d.text for d in docs], 512, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def trained(docs, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("proxy")
    path = train_proxy(docs, tokenizer, out, seed=0, epochs=2, **TINY)
    return path, json.loads((path / "done.json").read_text())


def test_tokenizer_roundtrip_special_tokens_and_cache(docs, tokenizer, tmp_path):
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.bos_token is not None and tokenizer.bos_token != tokenizer.eos_token
    text = "Héllo wörld — byte-level BPE 123"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    out = tmp_path / "tok"
    train_tokenizer([d.text for d in docs[:20]], 400, out)
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    again = train_tokenizer([d.text for d in docs[:20]], 400, out)
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp  # reused, not retrained
    assert len(again) == 400
    train_tokenizer([d.text for d in docs[:21]], 400, out)  # other corpus -> retrained
    assert json.loads((out / "spokes_tokenizer.json").read_text())["corpus_hash"] != ""
    assert (out / "tokenizer.json").stat().st_mtime_ns != stamp


def test_packing_blocks_end_documents_with_eos(docs, tokenizer):
    blocks = pack_blocks([d.text for d in docs[:10]], tokenizer, 32)
    assert blocks.ndim == 2 and blocks.shape[1] == 32
    assert (blocks == tokenizer.eos_token_id).sum() >= 5
    with pytest.raises(UserError, match="too small"):
        pack_blocks(["hi"], tokenizer, 64)


def test_warmup_cosine_schedule_shape():
    values = [warmup_cosine(s, 100, 10) for s in range(100)]
    assert values[0] < values[9] == pytest.approx(1.0)
    assert values[-1] < 0.15 and all(a >= b for a, b in zip(values[10:], values[11:]))


def test_training_lowers_loss_and_saves_loadable_model(trained, tokenizer):
    path, done = trained
    assert done["final_loss"] < done["initial_loss"] - 0.3
    assert (path / done["metrics_csv"]).exists()
    model = load_causal_lm(path)
    assert model.config.num_hidden_layers == 3 and model.config.vocab_size == len(tokenizer)
    tok = load_tokenizer(path)
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_finished_proxy_is_reused(trained, docs, tokenizer):
    path, done = trained
    stamp = (path / "done.json").stat().st_mtime_ns
    start = time.perf_counter()
    assert train_proxy(docs, tokenizer, path, seed=0, epochs=2, **TINY) == path
    assert time.perf_counter() - start < 5
    assert (path / "done.json").stat().st_mtime_ns == stamp


def test_bad_config_and_missing_model_fail_with_one_line(docs, tokenizer, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="divisible"):
        train_proxy(docs, tokenizer, tmp_path / "x", hidden=30, heads=4)
    with pytest.raises(UserError, match="does not exist"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))


def test_hub_id_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_causal_lm("Qwen/Qwen3-0.6B-Base")
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "\n" not in message and "unreachable" in message and "proxy.model=" in message


DDP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from spokes_lightning.data.corpus import demo_web_paths, read_documents
from spokes_lightning.models.proxy_training import train_proxy
from spokes_lightning.models.tokenizer import train_tokenizer
docs = read_documents(demo_web_paths(), "text")[:60]
tok = train_tokenizer([d.text for d in docs], 400, sys.argv[1] + "/tok")
train_proxy(docs, tok, sys.argv[1] + "/proxy", n_layers=2, hidden=32, heads=2, intermediate=64,
            max_length=64, batch_size=4, epochs=2, lr=3e-3, devices=2)
"""


def test_two_process_ddp_training(tmp_path):
    import math
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads((tmp_path / "proxy" / "done.json").read_text())
    assert done["devices"] == 2
    assert done["steps"] == 2 * math.ceil(done["n_blocks"] / (4 * 2))  # each rank takes half a step's data
    assert done["final_loss"] < done["initial_loss"]
    assert load_causal_lm(tmp_path / "proxy").config.num_hidden_layers == 2
