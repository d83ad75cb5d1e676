"""One planner, one batch schema: the Lightning DataModule, the HF Trainer dataset, the online plan
and the proxy's blocks all come from spokes_lightning.data.batches, so the same selection, seed
and shape give the same batches in every loop (several seeds, sizes, world sizes and copies)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from word_docs import make_docs, make_tokenizer

from spokes_lightning.data.batches import (IGNORE_INDEX, SelectedTokens, collate, deal_to_ranks, full_blocks,
                                           pack_documents, plan_epoch, sequence_item)
from spokes_lightning.integrations.hf_trainer import SelectionDataset
from spokes_lightning.integrations.lightning import SelectedDataModule
from spokes_lightning.models.proxy_training import pack_blocks
from spokes_lightning.online.plan import OnlinePlan

CASES = [(seed, n, seq, bs) for seed, n, seq, bs in [(0, 30, 8, 2), (1, 60, 16, 3), (2, 45, 12, 1), (3, 80, 32, 4)]]


def selection_for(docs, seed, with_copies):
    rng = np.random.default_rng(seed + 100)
    chosen = [d for d, _ in docs if rng.random() < 0.6]
    return {d: int(rng.integers(1, 3)) for d in chosen} if with_copies else chosen


def lightning_batches(docs, selection, tok, seq, bs, seed, rank, world, epoch):
    dm = SelectedDataModule(docs, selection, tok, seq_length=seq, batch_size=bs, seed=seed)
    dm.setup()
    dm._rank_world = lambda: (rank, world)  # this rank's loader, without a process group
    loader = dm.train_dataloader()
    loader.dataset.epoch = epoch
    return list(loader.dataset)


def hf_batches(docs, selection, tok, seq, bs, seed, rank, world, epoch):
    ds = SelectionDataset(docs, selection, tok, seq_length=seq, batch_size=bs, seed=seed, world_size=world)
    ds.set_epoch(epoch)
    items = list(ds)  # global interleaved order: for each batch b, for each rank r, bs items
    mine = [items[i : i + bs] for i in range(rank * bs, len(items), world * bs)]
    return [{k: torch.stack([it[k] for it in batch]) for k in batch[0]} for batch in mine]


@pytest.mark.parametrize("seed,n,seq,bs", CASES)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_lightning_and_hf_trainer_serve_the_same_batches(seed, n, seq, bs, world):
    docs, tok = make_docs(n, seed=seed), make_tokenizer()
    selection = selection_for(docs, seed, with_copies=seed % 2 == 1)
    for epoch in (0, 1):
        for rank in range(world):
            a = lightning_batches(docs, selection, tok, seq, bs, seed, rank, world, epoch)
            b = hf_batches(docs, selection, tok, seq, bs, seed, rank, world, epoch)
            assert len(a) == len(b) > 0
            for x, y in zip(a, b):
                for key in ("input_ids", "labels", "attention_mask"):
                    assert torch.equal(x[key], y[key]), (epoch, rank, key)


@pytest.mark.parametrize("seed,n,seq,bs", CASES)
def test_every_selected_token_is_served_once_per_copy_per_epoch(seed, n, seq, bs):
    docs, tok = make_docs(n, seed=seed), make_tokenizer()
    selection = selection_for(docs, seed, with_copies=True)
    selected = SelectedTokens.build(docs, selection, tok)
    for world in (1, 2, 4):
        plan = plan_epoch(selected.lengths, world, seed, 0, seq, bs, require_targets=False)
        assert len({len(rank) for rank in plan}) == 1  # every rank the same number of batches
        served = [(d, t) for rank in plan for batch in rank for s in batch for d, a, b in s for t in range(a, b)]
        assert sorted(served) == [(d, t) for d, n_tok in enumerate(selected.lengths) for t in range(n_tok)]


def test_the_schema_marks_padding_as_no_target():
    tok = make_tokenizer()
    selected = SelectedTokens.build(make_docs(10, seed=3), [f"d{i:03d}" for i in range(10)], tok)
    seqs = pack_documents(range(len(selected.tokens)), selected.lengths, 16)
    batch = collate(selected.tokens, selected.ids, [seqs[-1], []], 16, selected.pad_id)
    real = batch["attention_mask"] == 1
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert bool((batch["labels"][~real] == IGNORE_INDEX).all()) and not bool(real[1].any())
    assert batch["doc_ids"][1] == [] and all(d in selected.ids for d in batch["doc_ids"][0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_online_plan_deals_and_packs_like_the_static_loaders(seed):
    docs, tok = make_docs(120, seed=seed), make_tokenizer()
    selected = SelectedTokens.build(docs, [d for d, _ in docs], tok)
    plan = OnlinePlan(selected.ids, selected.tokens, total_steps=4, steps_per_segment=2, global_batch=4,
                      seq_length=8, window=60, seed=seed, pad_id=selected.pad_id)
    picks = list(np.random.default_rng(seed).permutation(plan.window_indices(0))[:40])
    plan.add_segment(picks)
    for world in (1, 2):
        shards = deal_to_ranks(picks, plan.lengths, world)
        for rank in range(world):
            want = pack_documents(shards[rank], plan.lengths, 8)[: 2 * (4 // world)]
            got = [s for s in plan.rank_sequences(0, rank, world) if s]
            assert got == want[: len(got)]
            item = plan.item(got[0])
            assert torch.equal(item["input_ids"], sequence_item(selected.tokens, got[0], 8, selected.pad_id)["input_ids"])


@pytest.mark.parametrize("seed,max_length", [(0, 8), (1, 16), (2, 5)])
def test_the_proxy_blocks_are_the_full_packed_sequences(seed, max_length):
    docs, tok = make_docs(50, seed=seed), make_tokenizer()
    texts = [t for _, t in docs]
    blocks = pack_blocks(texts, tok, max_length)
    stream = []  # the rule written out: truncate to max_length - 1, EOS, skip empty, drop the tail
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"][: max_length - 1]
        if ids:
            stream += ids + [tok.eos_token_id]
    n = len(stream) // max_length
    assert torch.equal(blocks, torch.tensor(stream[: n * max_length]).view(n, max_length))
    assert full_blocks([], max_length).shape == (0, max_length)
