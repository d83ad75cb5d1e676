"""SelectedDataModule: serve ONLY the selected documents, packed for causal-LM training.

Usage::

    from spokes_lightning.data.corpus import read_documents
    from spokes_lightning.integrations.lightning import SelectedDataModule
    from transformers import AutoTokenizer

    docs = read_documents(["data/demo/web.jsonl.gz"])         # or [(id, text), ...]
    dm = SelectedDataModule(
        documents=docs,
        selection="runs/demo/selections/spokes",              # artifact dir, or a list of ids
        tokenizer=AutoTokenizer.from_pretrained("gpt2"),      # any fast tokenizer with an EOS
        seq_length=512, batch_size=8, seed=0,
    )
    trainer.fit(model, datamodule=dm)  # batch: input_ids, labels, attention_mask, doc_ids

``model`` can be the toolkit's :class:`~spokes_lightning.models.lightning_lm.CausalLMModule` wrapping any
Hugging Face causal LM (``CausalLMModule(hf_model, lr=3e-4, weight_decay=0.1)``): it trains on
these batches, predicting only where ``labels != -100`` and ``attention_mask == 1``.

How documents become batches (each epoch, identically computed on every rank) is
:mod:`spokes_lightning.data.batches`: the same plan as the HF Trainer's ``SelectionDataset`` and
the online adapters, so the same selection, seed and shape give the same batches in every loop.
Every rank gets the same number of batches in every epoch; a document the selection takes ``c``
times enters each epoch ``c`` times; nothing is dropped or duplicated to even out ranks.

Resume: the plan of an epoch depends only on the selection, the tokenizer, ``seq_length``,
``batch_size``, ``seed``, the world size and the epoch, and the loader is resumable in
Lightning's sense (its ``state_dict`` goes into every checkpoint): a run resumed from any
checkpoint, mid-epoch included, continues with the next batch of the same plan.

``labels`` equal ``input_ids`` except at padding (-100); the model shifts them (HF style).
Each batch also carries ``doc_ids`` (per sequence, the ids it covers) and ``segments`` (per
sequence, ``(doc_id, start, stop)`` token ranges of each document, EOS included).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from spokes_lightning.utils.errors import UserError
from spokes_lightning.data.batches import (IGNORE_INDEX, Segment, SelectedTokens, collate, pad_id_of,  # noqa: F401
                                           plan_epoch)

# --------------------------------------------------------------------------- dataset
class PackedSelectionDataset(IterableDataset):
    """Yields this rank's collated batches for ``self.epoch`` (set before each iteration)."""

    def __init__(self, ids: list[str], tokens: list[np.ndarray], seq_length: int, batch_size: int,
                 rank: int, world_size: int, seed: int, pad_id: int):
        self.ids, self.tokens = ids, tokens
        self.lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        self.seq_length, self.batch_size = int(seq_length), int(batch_size)
        self.rank, self.world_size, self.seed, self.pad_id = rank, world_size, seed, int(pad_id)
        self.epoch = 0
        self.skip = 0  # batches of this epoch already trained on (a resumed run starts after them)

    def batches_for_epoch(self, epoch: int) -> list[list[list[Segment]]]:
        plan = plan_epoch(self.lengths, self.world_size, self.seed, epoch, self.seq_length,
                          self.batch_size, require_targets=False)  # an all-padding step has loss 0 here
        return plan[self.rank]

    def collate(self, batch: list[list[Segment]]) -> dict[str, Any]:
        return collate(self.tokens, self.ids, batch, self.seq_length, self.pad_id)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        step, offset = (worker.num_workers, worker.id) if worker else (1, 0)
        batches = self.batches_for_epoch(self.epoch)
        for b in range(self.skip + offset, len(batches), step):
            yield self.collate(batches[b])


class _EpochDataLoader(DataLoader):
    """A DataLoader that tells its dataset the current epoch each time it is iterated.

    It is resumable in Lightning's sense (``state_dict`` / ``load_state_dict``, saved in every
    checkpoint): the state is the epoch and the number of its batches already trained on
    (``done_fn``), so a run resumed from a mid-epoch checkpoint continues with the next batch of
    that epoch's plan instead of replaying the epoch from its first batch.
    """

    def __init__(self, dataset: PackedSelectionDataset, epoch_fn: Callable[[], int],
                 done_fn: Callable[[], int] = lambda: 0, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self.epoch_fn, self.done_fn = epoch_fn, done_fn
        self._resume: tuple[int, int] | None = None  # (epoch, batches done), from a checkpoint

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.dataset.epoch), "batches_done": int(self.done_fn())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches_done"]))

    def __iter__(self):
        self.dataset.epoch = int(self.epoch_fn())
        resume, self._resume = self._resume, None
        self.dataset.skip = resume[1] if resume is not None and resume[0] == self.dataset.epoch else 0
        return super().__iter__()


# --------------------------------------------------------------------------- datamodule
class SelectedDataModule(LightningDataModule):
    """Serves only the selected documents, EOS-separated and packed; see the module docstring."""

    def __init__(self, documents, selection, tokenizer, seq_length: int, batch_size: int,
                 seed: int = 0, text_field: str = "text", num_workers: int = 0):
        super().__init__()
        if seq_length < 1 or batch_size < 1:
            raise UserError(f"seq_length and batch_size must be >= 1, "
                            f"got {seq_length}, {batch_size}")
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise UserError("the tokenizer has no EOS token (set tokenizer.eos_token)")
        self.documents, self.selection, self.tokenizer = documents, selection, tokenizer
        self.seq_length, self.batch_size, self.seed = int(seq_length), int(batch_size), int(seed)
        self.text_field, self.num_workers = text_field, int(num_workers)
        self.ids: list[str] | None = None
        self.tokens: list[np.ndarray] | None = None
        self._manual_epoch = 0

    def setup(self, stage: str | None = None) -> None:
        if self.tokens is not None:
            return
        selected = SelectedTokens.build(self.documents, self.selection, self.tokenizer, self.text_field)
        self.ids, self.tokens = selected.ids, selected.tokens  # a document with c copies: c entries

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.current_epoch)
        epoch, self._manual_epoch = self._manual_epoch, self._manual_epoch + 1
        return epoch  # outside a Trainer every new iteration is the next epoch

    def _batches_done(self) -> int:
        """Batches of the current epoch the Trainer has trained on (what a checkpoint resumes after)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        rank, world_size = self._rank_world()
        dataset = PackedSelectionDataset(self.ids, self.tokens, self.seq_length, self.batch_size, rank,
                                         world_size, self.seed, pad_id_of(self.tokenizer))
        return _EpochDataLoader(dataset, self._current_epoch, self._batches_done, num_workers=self.num_workers)
