"""SelectedDataModule: only selected documents, each token once per epoch, across DDP ranks."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from spokes_lightning.integrations.lightning import SelectedDataModule, plan_epoch
from spokes_lightning.utils.errors import UserError
from spokes_lightning.data.selection_artifact import write_selection
from spokes_lightning.selectors import SelectionResult
from word_docs import WORDS, make_docs, make_tokenizer  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
def check_epoch(segments, docs: dict[str, str], selected: set[str], tokenizer):
    """Each selected doc's tokens (plus EOS) are served exactly once; nothing else is served."""
    pieces = defaultdict(list)
    for doc_id, start, stop in segments:
        pieces[doc_id].append((start, stop))
    assert set(pieces) == selected
    for doc_id, spans in pieces.items():
        n = len(tokenizer(docs[doc_id], add_special_tokens=False)["input_ids"]) + 1
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == n, doc_id
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), doc_id  # no gap/overlap


@pytest.mark.parametrize("world", [1, 2, 3])
def test_plan_covers_every_token_once_with_equal_batches(world):
    lengths = np.random.default_rng(world).integers(1, 40, size=57)
    plan = plan_epoch(lengths, world, seed=4, epoch=1, seq_length=16, batch_size=3)
    assert len({len(rank) for rank in plan}) == 1  # same number of batches on every rank
    covered = defaultdict(int)
    ranks_of = defaultdict(set)
    for r, batches in enumerate(plan):
        for batch in batches:
            assert len(batch) == 3
            for seq in batch:
                assert sum(stop - start for _, start, stop in seq) <= 16
                for d, start, stop in seq:
                    covered[d] += stop - start
                    ranks_of[d].add(r)
    assert dict(covered) == {d: int(n) for d, n in enumerate(lengths)}
    assert all(len(r) == 1 for r in ranks_of.values())  # a document lives on one rank
    again = plan_epoch(lengths, world, seed=4, epoch=1, seq_length=16, batch_size=3)
    other = plan_epoch(lengths, world, seed=4, epoch=2, seq_length=16, batch_size=3)
    assert again == plan and other != plan


def test_single_process_serves_only_selected(tmp_path):
    docs = make_docs()
    tokenizer = make_tokenizer()
    chosen = [doc_id for doc_id, _ in docs[::3]]
    ids = [doc_id for doc_id, _ in docs]
    result = SelectionResult(indices=np.array([ids.index(c) for c in chosen]))
    artifact = write_selection(tmp_path, "random", result, ids, {}, 0, {})
    for selection in (chosen, artifact):
        dm = SelectedDataModule(docs, selection, tokenizer, seq_length=12, batch_size=2, seed=1)
        epochs = []
        for _ in range(2):
            segs = []
            for batch in dm.train_dataloader():
                assert batch["input_ids"].shape == (2, 12)
                real = batch["attention_mask"].bool()
                assert (batch["labels"][~real] == -100).all()
                assert (batch["labels"][real] == batch["input_ids"][real]).all()
                segs += [s for seq in batch["segments"] for s in seq]
            check_epoch(segs, dict(docs), set(chosen), tokenizer)
            epochs.append(segs)
        assert epochs[0] != epochs[1]  # reshuffled per epoch


@pytest.mark.parametrize("world", [1, 2])
def test_multiplicities_serve_each_copy_once_per_epoch(tmp_path, world):
    docs = make_docs(seed=world)
    tokenizer = make_tokenizer()
    ids = [doc_id for doc_id, _ in docs]
    rows = np.array([3, 7, 1, 20, 11])
    copies = np.array([3, 1, 2, 1, 4])
    result = SelectionResult(indices=rows, multiplicity=copies)
    artifact = write_selection(tmp_path, "copies", result, ids, {}, 0, {})
    expected = {ids[r]: int(c) for r, c in zip(rows, copies)}
    for selection in (artifact, expected):
        served = defaultdict(int)
        for rank in range(world):
            dm = SelectedDataModule(docs, selection, tokenizer, seq_length=8, batch_size=2, seed=0)
            dm._rank_world = lambda rank=rank: (rank, world)
            for batch in dm.train_dataloader():
                for seq in batch["segments"]:
                    for doc_id, start, stop in seq:
                        served[doc_id] += stop - start
        for doc_id, c in expected.items():
            n = len(tokenizer(dict(docs)[doc_id], add_special_tokens=False)["input_ids"]) + 1
            assert served[doc_id] == c * n, doc_id
        assert set(served) == set(expected)
    with pytest.raises(UserError, match="copies must be integers >= 1"):
        SelectedDataModule(docs, {ids[0]: 0}, tokenizer, seq_length=8, batch_size=2).setup()


def test_eos_separates_documents():
    docs = [("x", "cat dog"), ("y", "sun"), ("z", "web page")]
    tokenizer = make_tokenizer()
    dm = SelectedDataModule(docs, ["x", "y"], tokenizer, seq_length=8, batch_size=1)
    (batch,) = list(dm.train_dataloader())
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    row = batch["input_ids"][0].tolist()
    assert row.count(eos) == 2 and row[5:] == [pad] * 3
    assert sorted(batch["doc_ids"][0]) == ["x", "y"]


def test_bad_inputs():
    docs = make_docs(5)
    tokenizer = make_tokenizer()
    with pytest.raises(UserError, match="not in the corpus"):
        SelectedDataModule(docs, ["d000", "nope"], tokenizer, 8, 2).setup()
    with pytest.raises(UserError, match="more than once"):
        SelectedDataModule(docs, ["d000", "d000"], tokenizer, 8, 2).setup()
    with pytest.raises(UserError, match="duplicate document id"):
        SelectedDataModule(docs + docs[:1], ["d000"], tokenizer, 8, 2).setup()
    tokenizer.eos_token = None
    with pytest.raises(UserError, match="EOS"):
        SelectedDataModule(docs, ["d000"], tokenizer, 8, 2)


DDP_SCRIPT = r'''
import json, os, sys
import torch
import lightning as L
from transformers import PreTrainedTokenizerFast
from spokes_lightning.integrations.lightning import SelectedDataModule


class Recorder(L.LightningModule):
    """A tiny bigram LM that also records which document tokens each rank trained on."""

    def __init__(self, vocab, out):
        super().__init__()
        self.emb, self.head, self.out = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab), out
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen += [s for seq in batch["segments"] for s in seq]
        logits = self.head(self.emb(batch["input_ids"]))[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 labels.reshape(-1), ignore_index=-100,
                                                 reduction="sum")
        return loss / (labels != -100).sum().clamp(min=1)

    def on_train_epoch_end(self):
        path = os.path.join(self.out, f"seen_rank{self.global_rank}_epoch{self.current_epoch}.json")
        with open(path, "w") as fh:
            json.dump(self.seen, fh)
        self.seen = []

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    corpus, selection, tok_file, out = sys.argv[1:5]
    torch.set_num_threads(1)
    tok = PreTrainedTokenizerFast(tokenizer_file=tok_file, eos_token="[EOS]", pad_token="[PAD]")
    dm = SelectedDataModule([corpus], selection, tok, seq_length=16, batch_size=2, seed=7)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Recorder(len(tok), out), datamodule=dm)
'''


def test_two_process_ddp_fit_serves_each_selected_doc_once_per_epoch(tmp_path):
    docs = make_docs(60, seed=2)
    corpus = tmp_path / "corpus.jsonl.gz"
    with gzip.open(corpus, "wt") as fh:
        for doc_id, text in docs:
            fh.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    ids = [doc_id for doc_id, _ in docs]
    chosen = sorted(np.random.default_rng(0).choice(60, size=25, replace=False).tolist())
    artifact = write_selection(tmp_path / "sel", "random",
                               SelectionResult(indices=np.array(chosen)), ids, {}, 0, {})
    tokenizer = make_tokenizer(tmp_path / "tok.json")
    script = tmp_path / "fit_ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script), str(corpus), str(artifact),
                           str(tmp_path / "tok.json"), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    selected = {ids[i] for i in chosen}
    seen = [(tmp_path / f"seen_rank0_epoch{e}.json").read_text() for e in range(2)]
    assert seen[0] != seen[1]  # a new shuffle each epoch
    for epoch in range(2):
        per_rank = [json.loads((tmp_path / f"seen_rank{r}_epoch{epoch}.json").read_text())
                    for r in range(2)]
        assert all(per_rank), "both ranks trained"
        docs_on = [{s[0] for s in segs} for segs in per_rank]
        assert not docs_on[0] & docs_on[1]  # no document on both ranks
        check_epoch([tuple(s) for segs in per_rank for s in segs], dict(docs), selected, tokenizer)


def test_causal_lm_module_fits_on_selected_datamodule_batches(tmp_path):
    """The toolkit's CausalLMModule trains on SelectedDataModule batches (input_ids/labels/attention_mask):
    a real Lightning fit on a selection artifact, finite and falling loss; padding is never a target."""
    import lightning as L
    import torch

    from spokes_lightning.models.lightning_lm import CausalLMModule
    from spokes_lightning.models.llama import build_llama, causal_lm_loss, llama_config

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_text import tiny_corpus, tiny_tokenizer

    torch.set_num_threads(1)
    corpus = tiny_corpus(24)
    docs = [(d["id"], d["text"]) for d in corpus]
    ids = [doc_id for doc_id, _ in docs]
    tokenizer = tiny_tokenizer(d["text"] for d in corpus)
    artifact = write_selection(tmp_path / "sel", "random", SelectionResult(indices=np.arange(0, 24, 2)), ids,
                               {}, 0, {})
    dm = SelectedDataModule(docs, artifact, tokenizer, seq_length=32, batch_size=4, seed=0)
    config = llama_config(len(tokenizer), hidden=32, intermediate=64, n_layers=2, heads=2, kv_heads=2,
                          max_length=32)
    module = CausalLMModule(build_llama(config, seed=0), lr=1e-2, weight_decay=0.0)

    class Losses(L.Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(float(outputs["loss"]))

    losses = Losses()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=12, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[losses])
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 12 and len(losses.values) == 12
    assert all(np.isfinite(losses.values))
    assert np.mean(losses.values[-3:]) < losses.values[0] - 0.5  # it learns (templated text)

    # the loss is the mean over real targets only: padding rows / masked positions change nothing
    model = module.model.eval()
    batch = next(iter(dm.train_dataloader()))
    real = batch["attention_mask"].bool().all(dim=1)
    assert real.any()
    rows = {k: batch[k][real] for k in ("input_ids", "labels", "attention_mask")}
    with torch.no_grad():
        want = model(input_ids=rows["input_ids"], labels=rows["labels"]).loss
        got = causal_lm_loss(model, rows)
        pad = {"input_ids": torch.full_like(rows["input_ids"][:1], tokenizer.eos_token_id),
               "labels": torch.full_like(rows["labels"][:1], -100),
               "attention_mask": torch.zeros_like(rows["attention_mask"][:1])}
        padded = causal_lm_loss(model, {k: torch.cat([rows[k], pad[k]]) for k in rows})
        masked = dict(rows, attention_mask=rows["attention_mask"].clone())
        masked["attention_mask"][:, -4:] = 0  # right padding: these 4 positions are no longer targets
        cut = dict(rows, labels=rows["labels"].clone())
        cut["labels"][:, -4:] = -100
        assert causal_lm_loss(model, pad) == 0  # nothing to predict: 0, not NaN
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(padded, want, atol=1e-5)
    assert torch.allclose(causal_lm_loss(model, masked), causal_lm_loss(model, cut), atol=1e-6)
    assert not torch.allclose(causal_lm_loss(model, masked), want, atol=1e-4)


def test_mid_epoch_checkpoint_resumes_with_the_next_batch(tmp_path):
    """A Lightning checkpoint saved mid-epoch (ModelCheckpoint every_n_train_steps) resumes with the batch
    after the last one trained, in that epoch's plan and in the next epoch's: the resumed run sees
    exactly the uninterrupted run's remaining batches (the loader's state_dict is in the checkpoint)."""
    import lightning as L
    import torch

    torch.set_num_threads(1)
    docs = make_docs(40, seed=3)
    tokenizer = make_tokenizer()
    selection = [doc_id for doc_id, _ in docs[:24]]

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, batch["segments"]))
            return self.layer(batch["input_ids"][:, :1].float()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(ckpt_path=None):
        dm = SelectedDataModule(docs, selection, tokenizer, seq_length=8, batch_size=2, seed=5)
        module = Recorder()
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4,
                                                          save_top_k=-1, filename="{step}")
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, callbacks=[checkpoints],
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return dm, module.seen

    dm, full = fit()
    per_epoch = [len(plan_epoch(dm.train_dataloader().dataset.lengths, 1, 5, e, 8, 2)[0]) for e in range(2)]
    assert len(full) == sum(per_epoch) and [e for e, _ in full].count(0) == per_epoch[0]
    at = [s for s in range(4, len(full), 4) if s % per_epoch[0]]  # mid-epoch checkpoints
    assert any(s < per_epoch[0] for s in at) and any(s > per_epoch[0] for s in at)
    for step in at:
        _, resumed = fit(str(tmp_path / "ckpt" / f"step={step}.ckpt"))
        assert resumed == full[step:], step
