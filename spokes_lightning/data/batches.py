"""From selected documents to training batches: the one planner and batch schema of every loop.

The Lightning :class:`~spokes_lightning.integrations.lightning.SelectedDataModule`, the HF
``SelectionDataset``, the online adapters (Lightning and HF Trainer) and the proxy's training
blocks all come through here, so the same selection, seed and shape give the same batches in
every loop (tests/data/test_batches.py checks it).

Documents become batches in four steps, identically on every rank:

1. **Tokens** (:func:`tokenize_documents`): each selected document is tokenized once (no special
   tokens) and followed by one EOS; a document the selection takes ``c`` times is ``c`` entries
   (:class:`SelectedTokens`).
2. **Deal** (:func:`deal_to_ranks`): the entries, in a given order (for an epoch, the
   ``default_rng([seed, epoch])`` permutation: :func:`shard_documents`), go one by one to the
   rank holding the fewest tokens so far (ties -> lower rank). Every entry goes to exactly one
   rank, and ranks differ by at most one entry's tokens.
3. **Pack** (:func:`pack_documents`): each rank concatenates its entries and cuts the stream into
   ``seq_length`` sequences; an entry longer than a sequence continues in the next one. Nothing
   is dropped: the last partial sequence is padded.
4. **Batch** (:func:`plan_epoch`): each rank's sequences, in packing order, fill a FIXED number
   ``B`` of batches of ``batch_size`` (:func:`batches_per_epoch`: the same ``B`` in every epoch,
   an upper bound of any shuffle's need from the token counts). A rank with fewer sequences than
   ``B`` fills a run of consecutive batches, such runs side by side, so every batch index has a
   token to predict on some rank; free slots are padding sequences.

The batch schema (:func:`sequence_item`, :func:`collate`) is Hugging Face's: ``input_ids``,
``labels`` (equal to ``input_ids``, ``-100`` on padding; the model shifts them) and
``attention_mask`` (0 on padding), all ``torch.long`` of ``seq_length``. Collated batches also
carry ``doc_ids`` and ``segments`` (per sequence, ``(doc_id, start, stop)`` token ranges).
"""
from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from spokes_lightning.data.selection_artifact import read_selection
from spokes_lightning.utils.errors import UserError

IGNORE_INDEX = -100
Segment = tuple[int, int, int]  # (entry index, token start, token stop)


# --------------------------------------------------------------------------- 1. tokens
def id_text_pairs(documents, text_field: str = "text") -> list[tuple[str, str]]:
    """``(id, text)`` of corpus paths, ``Document`` objects, dicts or pairs; ids must be unique."""
    if isinstance(documents, (str, os.PathLike)) or (
        isinstance(documents, (list, tuple)) and documents
        and all(isinstance(d, (str, os.PathLike)) for d in documents)
    ):
        from spokes_lightning.data.corpus import read_documents

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
        raise UserError(f"selection names {len(missing)} id(s) not in the corpus, e.g. {missing[0]!r}")
    return {k: int(v) for k, v in counts.items()}


def tokenize_documents(tokenizer, texts: Sequence[str], eos_id: int, *, max_tokens: int | None = None,
                       chunk: int = 256, label: str = "tokenize selection") -> list[np.ndarray]:
    """Per text: its tokens (no special tokens; the first ``max_tokens`` when given) + one EOS."""
    from spokes_lightning.utils.progress import progress

    options = {} if max_tokens is None else {"truncation": True, "max_length": int(max_tokens)}
    out = []
    for start in progress(range(0, len(texts), chunk), label, disable=len(texts) <= chunk):
        encoded = tokenizer(list(texts[start : start + chunk]), add_special_tokens=False, **options)["input_ids"]
        out.extend(np.array(list(ids) + [eos_id], dtype=np.int64) for ids in encoded)
    return out


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS (padding never carries a target either way)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(tokenizer.eos_token_id if pad is None else pad)


@dataclass
class SelectedTokens:
    """The selected documents, tokenized once; a document with ``c`` copies is ``c`` entries."""

    ids: list[str]  # per entry
    tokens: list[np.ndarray]  # per entry: tokens + EOS (copies share one array)
    copies: dict[str, int]  # per document, corpus order
    pad_id: int

    @classmethod
    def build(cls, documents, selection, tokenizer, text_field: str = "text") -> "SelectedTokens":
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise UserError("the tokenizer has no EOS token (set tokenizer.eos_token)")
        pairs = id_text_pairs(documents, text_field)
        copies = selected_copies(selection, [doc_id for doc_id, _ in pairs])
        if not copies:
            raise UserError("the selection is empty")
        kept = [(doc_id, text) for doc_id, text in pairs if doc_id in copies]  # corpus order
        tokens = tokenize_documents(tokenizer, [text for _, text in kept], int(eos))
        return cls(ids=[doc_id for doc_id, _ in kept for _ in range(copies[doc_id])],
                   tokens=[t for (doc_id, _), t in zip(kept, tokens) for _ in range(copies[doc_id])],
                   copies={doc_id: copies[doc_id] for doc_id, _ in kept}, pad_id=pad_id_of(tokenizer))

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], dtype=np.int64)


# --------------------------------------------------------------------------- 2. deal
def deal_to_ranks(order: Iterable[int], lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Each entry of ``order``, in turn, to the rank with the fewest tokens (ties -> lower rank)."""
    heap = [(0, r) for r in range(world_size)]
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for d in order:
        tokens, rank = heapq.heappop(heap)
        shards[rank].append(int(d))
        heapq.heappush(heap, (tokens + int(lengths[d]), rank))
    return shards


def shard_documents(lengths: Sequence[int], world_size: int, seed: int, epoch: int) -> list[list[int]]:
    """An epoch's deal: the ``default_rng([seed, epoch])`` permutation, dealt by :func:`deal_to_ranks`."""
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(len(lengths))
    return deal_to_ranks(order, lengths, world_size)


# --------------------------------------------------------------------------- 3. pack
def pack_documents(doc_order: Sequence[int], lengths: Sequence[int], seq_length: int) -> list[list[Segment]]:
    """Cut the concatenation of the entries into sequences of ``seq_length`` tokens (the last may be short)."""
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


def n_tokens(segments: Sequence[Segment]) -> int:
    return sum(stop - start for _, start, stop in segments)


# --------------------------------------------------------------------------- 4. batch
def _ceil(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def batch_bounds(lengths: Sequence[int], world: int, seq_length: int, batch_size: int) -> tuple[int, int]:
    """``(B, n_min)``: batches per rank per epoch, and a lower bound of any rank's sequences.

    Dealing each entry to the least-loaded rank keeps max - min load <= the longest entry L, so
    a rank holds at most ``(T + (W-1) L) / W`` tokens (and at least ``(T - (W-1) L) / W``) in
    every epoch, whatever the shuffle."""
    lengths = np.asarray(lengths)
    total, longest = int(lengths.sum()), int(lengths.max())
    most = min(total, (total + (world - 1) * longest) // world)
    least = max(0, _ceil(total - (world - 1) * longest, world))
    return _ceil(_ceil(most, seq_length), batch_size), _ceil(least, seq_length)


def batches_per_epoch(lengths: Sequence[int], world: int, seq_length: int, batch_size: int) -> int:
    """``B``: the number of batches every rank gets in every epoch."""
    return batch_bounds(lengths, world, seq_length, batch_size)[0]


def every_rank_batch_has_targets(lengths: Sequence[int], world: int, seq_length: int, batch_size: int) -> bool:
    """True when no rank can ever get a batch without a token to predict (any epoch)."""
    n_batches, n_min = batch_bounds(lengths, world, seq_length, batch_size)
    return n_min >= n_batches + 1  # >= B+1 sequences: every batch real, the tail never alone


def plan_epoch(lengths: Sequence[int], world_size: int, seed: int, epoch: int, seq_length: int,
               batch_size: int, require_targets: bool = True) -> list[list[list[list[Segment]]]]:
    """Per rank, per batch (``B`` of them), per sequence: its segments (``[]`` = padding).

    With ``require_targets`` a batch index with no token to predict on any rank (tiny selections
    only) is refused in one line: a per-token mean over the step would be 0/0. A loop whose loss
    is 0 on such a step (the Lightning DataModule's ``CausalLMModule``) passes False."""
    lengths = np.asarray(lengths)
    world = int(world_size)
    n_batches = batches_per_epoch(lengths, world, seq_length, batch_size)
    all_units = []
    for doc_order in shard_documents(lengths, world, seed, epoch):
        units = [[seq] for seq in pack_documents(doc_order, lengths, seq_length)]
        if batch_size > 1 and len(units) > 1 and n_tokens(units[-1][0]) < 2:
            units[-2].append(units.pop()[0])  # a 1-token tail (nothing to predict) rides along
        all_units.append(units)
    # A rank with fewer units than batches fills a run of consecutive batches. The runs are laid
    # side by side after the batches the full ranks already cover (runs ending in a unit with
    # nothing to predict first; the next run starts on that unit's batch, a run never passes
    # the last batch), so that every batch index has a target on some rank whenever possible.
    good_end = [bool(units) and any(n_tokens(q) >= 2 for q in units[-1]) for units in all_units]
    full = [r for r, units in enumerate(all_units) if len(units) >= n_batches]
    covered = n_batches if any(good_end[r] for r in full) else n_batches - 1 if full else 0
    first = {}
    for r in sorted(set(range(world)) - set(full), key=lambda r: (good_end[r], r)):
        n = len(all_units[r])
        first[r] = min(covered, n_batches - n)
        covered = max(covered, first[r] + n - (0 if good_end[r] or not n else 1))
    plan = []
    for r, units in enumerate(all_units):
        n = len(units)
        if r in first:
            slots, sizes = range(first[r], first[r] + n), [1] * n
        else:  # contiguous groups; the smaller ones last, so a merged tail still fits
            small, extra = divmod(n, n_batches)
            slots, sizes = range(n_batches), [small + 1] * extra + [small] * (n_batches - extra)
        batches: list[list[list[Segment]]] = [[] for _ in range(n_batches)]
        start = 0
        for b, k in zip(slots, sizes):
            batches[b], start = [seq for unit in units[start : start + k] for seq in unit], start + k
        plan.append([batch + [[]] * (batch_size - len(batch)) for batch in batches])
    if require_targets and not every_rank_batch_has_targets(lengths, world, seq_length, batch_size):
        for b in range(n_batches):
            if not any(n_tokens(seq) >= 2 for rank in plan for seq in rank[b]):
                raise UserError(
                    f"epoch {epoch}: batch {b} has no token to predict on any rank (the selection has "
                    f"{int(lengths.sum())} tokens for {world} rank(s) x batch_size {batch_size} "
                    f"x seq_length {seq_length}); use another seq_length"
                    + (" or a smaller batch_size" if batch_size > 1 else ""))
    return plan


# --------------------------------------------------------------------------- schema
def sequence_item(tokens: Sequence[np.ndarray], segments: Sequence[Segment], seq_length: int,
                  pad_id: int) -> dict[str, torch.Tensor]:
    """One sequence: the tokens of ``segments``, right-padded to ``seq_length`` (the batch schema)."""
    input_ids = torch.full((seq_length,), int(pad_id), dtype=torch.long)
    labels = torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(seq_length, dtype=torch.long)
    col = 0
    for d, start, stop in segments:
        piece = torch.from_numpy(np.asarray(tokens[d][start:stop], dtype=np.int64))
        input_ids[col : col + len(piece)] = piece
        labels[col : col + len(piece)] = piece
        mask[col : col + len(piece)] = 1
        col += len(piece)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def collate(tokens: Sequence[np.ndarray], ids: Sequence[str], batch: Sequence[Sequence[Segment]],
            seq_length: int, pad_id: int) -> dict[str, Any]:
    """A batch of sequences (stacked :func:`sequence_item` tensors) plus ``doc_ids`` and ``segments``."""
    items = [sequence_item(tokens, seq, seq_length, pad_id) for seq in batch]
    out: dict[str, Any] = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    out["doc_ids"] = [[ids[d] for d, _, _ in seq] for seq in batch]
    out["segments"] = [[(ids[d], start, stop) for d, start, stop in seq] for seq in batch]
    return out


def full_blocks(tokens: Sequence[np.ndarray], seq_length: int) -> torch.Tensor:
    """``[n_blocks, seq_length]``: the entries packed in order, the last partial block dropped."""
    lengths = [len(t) for t in tokens]
    sequences = [s for s in pack_documents(range(len(tokens)), lengths, seq_length) if n_tokens(s) == seq_length]
    if not sequences:
        return torch.empty((0, seq_length), dtype=torch.long)
    return torch.stack([sequence_item(tokens, s, seq_length, 0)["input_ids"] for s in sequences])
