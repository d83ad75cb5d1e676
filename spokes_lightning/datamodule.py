"""SelectedDataModule: serve ONLY the selected documents, packed for causal-LM training.

Usage::

    from spokes_lightning.corpus import read_documents
    from spokes_lightning.datamodule import SelectedDataModule
    from transformers import AutoTokenizer

    docs = read_documents(["data/demo/web.jsonl.gz"])         # or [(id, text), ...]
    dm = SelectedDataModule(
        documents=docs,
        selection="runs/demo/selections/spokes",              # artifact dir, or a list of ids
        tokenizer=AutoTokenizer.from_pretrained("gpt2"),      # any fast tokenizer with an EOS
        seq_length=512, batch_size=8, seed=0,
    )
    trainer.fit(model, datamodule=dm)  # batch: input_ids, labels, attention_mask, doc_ids

``model`` can be the toolkit's :class:`~spokes_lightning.models.llama.CausalLMModule` wrapping any
Hugging Face causal LM (``CausalLMModule(hf_model, lr=3e-4, weight_decay=0.1)``): it trains on
these batches, predicting only where ``labels != -100`` and ``attention_mask == 1``.

How documents become batches (each epoch, identically computed on every rank):

1. Each selected document is tokenized once (no special tokens) and followed by one EOS; a
   document the selection takes ``c`` times (its multiplicity) enters the epoch ``c`` times.
2. The documents are shuffled with ``default_rng([seed, epoch])`` and dealt, in that order,
   to the rank holding the fewest tokens so far (ties -> lower rank): every document goes to
   exactly one rank, and ranks differ by at most about one document's tokens.
3. Each rank concatenates its documents and cuts the stream into ``seq_length`` sequences;
   a document longer than a sequence continues in the next one. Nothing is dropped: the last
   partial sequence is PADDED (pad id, ``labels = -100``, ``attention_mask = 0``).
4. All ranks get the same number of batches, ``max_r ceil(n_seq_r / batch_size)``; missing
   slots are whole padding sequences (labels all -100). Real sequences are dealt round-robin
   over the batches, so a batch is all padding only if a rank has fewer real sequences than
   batches. No document is ever duplicated to even out the ranks.

Resume: the plan of an epoch depends only on the selection, the tokenizer, ``seq_length``,
``batch_size``, ``seed``, the world size and the epoch, and the loader is resumable in
Lightning's sense (its ``state_dict`` goes into every checkpoint): a run resumed from any
checkpoint, mid-epoch included, continues with the next batch of the same plan.

``labels`` equal ``input_ids`` except at padding (-100); the model shifts them (HF style).
Each batch also carries ``doc_ids`` (per sequence, the ids it covers) and ``segments`` (per
sequence, ``(doc_id, start, stop)`` token ranges of each document, EOS included).
"""
from __future__ import annotations

import heapq
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import UserError
from .selection.artifact import read_selection

IGNORE_INDEX = -100
Segment = tuple[int, int, int]  # (selected-document index, token start, token stop)


# --------------------------------------------------------------------------- planning
def shard_documents(lengths: Sequence[int], world_size: int, seed: int,
                    epoch: int) -> list[list[int]]:
    """Seeded per-epoch shuffle, then each document to the rank with the fewest tokens."""
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(len(lengths))
    heap = [(0, r) for r in range(world_size)]
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for d in order:
        tokens, rank = heapq.heappop(heap)
        shards[rank].append(int(d))
        heapq.heappush(heap, (tokens + int(lengths[d]), rank))
    return shards


def pack_documents(doc_order: Sequence[int], lengths: Sequence[int],
                   seq_length: int) -> list[list[Segment]]:
    """Cut the concatenation of the documents into sequences of ``seq_length`` tokens."""
    sequences: list[list[Segment]] = []
    current: list[Segment] = []
    fill = 0
    for d in doc_order:
        pos, n = 0, int(lengths[d])
        while pos < n:
            take = min(n - pos, seq_length - fill)
            current.append((int(d), pos, pos + take))
            pos, fill = pos + take, fill + take
            if fill == seq_length:
                sequences.append(current)
                current, fill = [], 0
    if current:
        sequences.append(current)
    return sequences


def plan_epoch(lengths: Sequence[int], world_size: int, seed: int, epoch: int,
               seq_length: int, batch_size: int) -> list[list[list[list[Segment]]]]:
    """Per rank, per batch, per sequence: its segments (``[]`` = a padding sequence)."""
    shards = shard_documents(lengths, world_size, seed, epoch)
    packed = [pack_documents(shard, lengths, seq_length) for shard in shards]
    n_batches = max(-(-len(p) // batch_size) for p in packed)
    plan = []
    for sequences in packed:
        batches = [sequences[b::n_batches] if n_batches else [] for b in range(n_batches)]
        plan.append([batch + [[]] * (batch_size - len(batch)) for batch in batches])
    return plan


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
                          self.batch_size)
        return plan[self.rank]

    def collate(self, batch: list[list[Segment]]) -> dict[str, Any]:
        shape = (len(batch), self.seq_length)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        doc_ids, segments = [], []
        for row, sequence in enumerate(batch):
            col = 0
            for d, start, stop in sequence:
                piece = torch.from_numpy(self.tokens[d][start:stop].astype(np.int64))
                input_ids[row, col : col + len(piece)] = piece
                labels[row, col : col + len(piece)] = piece
                mask[row, col : col + len(piece)] = 1
                col += len(piece)
            doc_ids.append([self.ids[d] for d, _, _ in sequence])
            segments.append([(self.ids[d], start, stop) for d, start, stop in sequence])
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
                "doc_ids": doc_ids, "segments": segments}

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


# --------------------------------------------------------------------------- inputs
def _as_id_text_pairs(documents, text_field: str) -> list[tuple[str, str]]:
    if isinstance(documents, (str, os.PathLike)) or (
        isinstance(documents, (list, tuple)) and documents
        and all(isinstance(d, (str, os.PathLike)) for d in documents)
    ):
        from .corpus import read_documents

        documents = read_documents(documents, text_field=text_field)
    pairs = []
    for doc in documents:
        if hasattr(doc, "id") and hasattr(doc, "text"):
            pairs.append((str(doc.id), doc.text))
        elif isinstance(doc, dict):
            pairs.append((str(doc["id"]), doc[text_field]))
        else:
            doc_id, text = doc
            pairs.append((str(doc_id), text))
    seen: set[str] = set()
    for doc_id, _ in pairs:
        if doc_id in seen:
            raise UserError(f"duplicate document id {doc_id!r}; ids must be unique")
        seen.add(doc_id)
    return pairs


def selected_copies(selection, corpus_ids: list[str]) -> dict[str, int]:
    """``{id: copies}`` of a selection: an artifact dir (its multiplicities), ``{id: copies}``,
    or a list of ids (one copy each); every id must be in the corpus."""
    if isinstance(selection, (str, os.PathLike)):
        return read_selection(Path(selection), corpus_ids).id_counts()
    if isinstance(selection, dict):
        counts = {str(k): v for k, v in selection.items()}
        bad = [k for k, v in counts.items() if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1]
        if bad:
            raise UserError(f"selection copies must be integers >= 1, got {counts[bad[0]]!r} for {bad[0]!r}")
    else:
        chosen = [str(s) for s in selection]
        if len(set(chosen)) != len(chosen):
            raise UserError("the selection lists a document id more than once (give {id: copies} for copies)")
        counts = dict.fromkeys(chosen, 1)
    known = set(corpus_ids)
    missing = [s for s in counts if s not in known]
    if missing:
        raise UserError(f"selection names {len(missing)} id(s) not in the corpus, "
                        f"e.g. {missing[0]!r}")
    return {k: int(v) for k, v in counts.items()}


def _tokenize(tokenizer, texts: list[str], eos_id: int, chunk: int = 256) -> list[np.ndarray]:
    from .progress import progress

    out = []
    for start in progress(range(0, len(texts), chunk), "tokenize selection", disable=len(texts) <= chunk):
        encoded = tokenizer(texts[start : start + chunk], add_special_tokens=False)["input_ids"]
        out.extend(np.array(list(ids) + [eos_id], dtype=np.int64) for ids in encoded)
    return out


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
        pairs = _as_id_text_pairs(self.documents, self.text_field)
        copies = selected_copies(self.selection, [doc_id for doc_id, _ in pairs])
        if not copies:
            raise UserError("the selection is empty")
        kept = [(doc_id, text) for doc_id, text in pairs if doc_id in copies]  # corpus order
        eos = int(self.tokenizer.eos_token_id)
        tokens = _tokenize(self.tokenizer, [text for _, text in kept], eos)  # once per document
        # a document with c copies is c entries (the same token array): each is dealt and packed
        self.ids = [doc_id for doc_id, _ in kept for _ in range(copies[doc_id])]
        self.tokens = [t for (doc_id, _), t in zip(kept, tokens) for _ in range(copies[doc_id])]

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
        pad = self.tokenizer.pad_token_id
        dataset = PackedSelectionDataset(
            self.ids, self.tokens, self.seq_length, self.batch_size, rank, world_size, self.seed,
            self.tokenizer.eos_token_id if pad is None else pad,
        )
        return _EpochDataLoader(dataset, self._current_epoch, self._batches_done, num_workers=self.num_workers)
