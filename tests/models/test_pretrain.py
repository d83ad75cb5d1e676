"""Local pretraining comparison: small LLaMA trained on exported Megatron data with Lightning."""
from __future__ import annotations

import math
import os

import pytest
import torch

from spokes_lightning.utils.errors import UserError
from spokes_lightning.megatron.export import export_selection
from spokes_lightning.models.pretrain import pretrain_methods, pretrain_on_megatron_data
from spokes_lightning.models.pretrain_record import read_curve
from tiny_text import tiny_corpus, tiny_tokenizer

TINY = dict(seq_length=32, n_layers=2, hidden=64, heads=4, batch_size=4, lr=3e-3, seed=0,
            progress=False)
BUDGET = 20 * 4 * 32  # 20 steps


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    corpus = tiny_corpus(60)
    tokenizer = tiny_tokenizer(d["text"] for d in corpus)
    run_dir = tmp_path_factory.mktemp("prun")
    res = export_selection(corpus, list(range(50)), "quality", run_dir, tokenizer)
    val = [d["text"] for d in corpus[50:]]
    return run_dir, res, tokenizer, val


def test_pretrain_learns_is_deterministic_and_cached(setup):
    run_dir, res, tokenizer, val = setup
    first = pretrain_on_megatron_data(res.data_prefix, tokenizer, run_dir / "a",
                                      token_budget=BUDGET, val_documents=val, **TINY)
    assert first.steps == 20 and first.tokens_seen == 20 * 4 * 32
    assert first.dataset_tokens == res.n_tokens
    assert first.epochs == pytest.approx(first.tokens_seen / res.n_tokens)
    losses = [row["loss"] for row in first.curve]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert read_curve(first.metrics_path) == first.curve
    assert all(row["lr"] == TINY["lr"] for row in first.curve)  # constant LR (paper Sec. 5.3)
    assert first.val_loss is not None and math.isfinite(first.val_loss)
    assert first.val_loss < math.log(res.vocab_size)  # better than uniform guessing

    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(first.model_dir)
    assert model.config.num_hidden_layers == 2 and model.config.tie_word_embeddings
    assert AutoTokenizer.from_pretrained(first.model_dir).eos_token_id == res.eod_id

    second = pretrain_on_megatron_data(res.data_prefix, tokenizer, run_dir / "b",
                                       token_budget=BUDGET, val_documents=val, **TINY)
    assert not second.cached
    assert [r["loss"] for r in second.curve] == losses  # same seed, same curve
    assert second.val_loss == first.val_loss

    stamp = os.path.getmtime(first.metrics_path)
    again = pretrain_on_megatron_data(res.data_prefix, tokenizer, run_dir / "a",
                                      token_budget=BUDGET, val_documents=val, **TINY)
    assert again.cached and again.curve == first.curve
    assert os.path.getmtime(first.metrics_path) == stamp
    # The per-method driver uses the same settings, so it finds run "a" finished as well.
    by_method = pretrain_methods({"a": res.data_prefix}, tokenizer, run_dir,
                                 token_budget=BUDGET, val_documents=val, **TINY)
    assert by_method["a"].cached and by_method["a"].val_loss == first.val_loss
    # A different token budget is a different experiment: it must not reuse the cache.
    longer = pretrain_on_megatron_data(res.data_prefix, tokenizer, run_dir / "a",
                                       token_budget=BUDGET + 4 * 32, **TINY)
    assert not longer.cached and longer.steps == 21


def test_pretrain_rejects_bad_settings(setup, tmp_path):
    run_dir, res, tokenizer, val = setup
    with pytest.raises(UserError, match="below one step"):
        pretrain_on_megatron_data(res.data_prefix, tokenizer, tmp_path, token_budget=10, **TINY)
    with pytest.raises(UserError, match="missing"):
        pretrain_on_megatron_data(run_dir / "nothing", tokenizer, tmp_path, token_budget=BUDGET,
                                  **TINY)
    with pytest.raises(UserError, match="needs a tokenizer"):
        pretrain_on_megatron_data(res.data_prefix, res.vocab_size, tmp_path, token_budget=BUDGET,
                                  val_documents=val, **TINY)


def test_two_process_ddp_matches_single_device(setup, monkeypatch):
    """2 real processes (DDP over gloo): same global batches, so the same curve as 1 device."""
    from ports import free_port

    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # a port of this xdist worker's own block
    run_dir, res, tokenizer, val = setup
    single = pretrain_on_megatron_data(res.data_prefix, tokenizer, run_dir / "a",
                                       token_budget=BUDGET, val_documents=val, **TINY)
    ddp = pretrain_on_megatron_data(res.data_prefix, tokenizer, run_dir / "ddp",
                                    token_budget=BUDGET, val_documents=val, devices=2,
                                    strategy="ddp_spawn", **TINY)
    assert not ddp.cached and ddp.steps == single.steps and ddp.tokens_seen == single.tokens_seen
    assert [r["loss"] for r in ddp.curve] == pytest.approx([r["loss"] for r in single.curve],
                                                           rel=1e-4)
    assert ddp.val_loss == pytest.approx(single.val_loss, rel=1e-4)
