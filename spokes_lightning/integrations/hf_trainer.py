"""Train a stock Hugging Face ``transformers.Trainer`` on a data selection only.

Usage (one process, or several under ``accelerate launch`` / ``torchrun``)::

    from transformers import Trainer, TrainingArguments
    from spokes_lightning.integrations.hf_trainer import SelectionDataset, SelectionTrainerCallback

    train = SelectionDataset(documents="data/demo/web.jsonl.gz",         # paths, (id, text) pairs, dicts
                             selection="runs/demo/selections/spokes",    # artifact dir, {id: copies}, ids
                             tokenizer=tokenizer, seq_length=512, batch_size=8, seed=0)
    args = TrainingArguments("runs/lm", per_device_train_batch_size=8, num_train_epochs=2, save_steps=500)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[SelectionTrainerCallback()])
    trainer.train()                    # later: trainer.train(resume_from_checkpoint=True)

How it works. Documents are tokenized once, each followed by one EOS; a document the selection
takes ``c`` times enters every epoch ``c`` times. Each epoch the entries are shuffled with
``default_rng([seed, epoch])``, dealt to ranks and packed into ``seq_length`` sequences exactly as
:class:`~spokes_lightning.datamodule.SelectedDataModule` does (``shard_documents`` +
``pack_documents``). Each rank's sequences, in packing order, fill a FIXED number ``B`` of batches
of ``batch_size``: the same ``B`` every epoch, an upper bound of any shuffle's need from the token
counts (the greedy deal keeps ranks within one document's tokens, so ``B`` exceeds the need by at
most ``longest_document / (seq_length * batch_size) + 1``). A rank with fewer sequences than ``B``
fills a run of consecutive batches, such runs side by side, so every batch index has real tokens
on some rank; free slots hold padding sequences. Items come in global interleaved order: for each
batch ``b``, for each rank ``r``, the ``batch_size`` sequences of rank ``r``'s batch ``b``.
Accelerate's prepared loader gives process ``r`` exactly those: dispatching (its default for an
IterableDataset) concatenates ``num_processes`` batches on process 0 and sends slice ``r``;
sharding (``accelerator_config={"dispatch_batches": False}``) keeps items ``[r*bs, (r+1)*bs)`` of
every ``bs*num_processes`` (``IterableDatasetShard``). The total is a whole number of such chunks,
so Accelerate never pads or repeats; ``len()`` is ``B*world*bs``, so ``len(train_dataloader) == B``
in every epoch and the Trainer's epoch and resume arithmetic (``global_step % steps_in_epoch``,
``skip_first_batches``) is exact. Loader workers take whole batches in turn, keeping the order.

Guarantee: in every epoch each selected document is served exactly once per copy, on one rank, in
order; nothing is dropped and nothing repeated to even out ranks. Padding never adds a target:
with the Trainer's defaults (``average_tokens_across_devices=True``, a model taking
``num_items_in_batch`` such as LlamaForCausalLM) each rank's loss is a sum over real targets
divided by the step's global count, so a rank whose batch is all padding adds exactly zero. A
step with no target on any rank (tiny data only) and, for small selections on several ranks, a
per-rank token mean (0/0 on a padding batch) are refused with a :class:`UserError`.

:class:`SelectionTrainerCallback` checks the loader, the batch size and world size at train start,
records the selection fingerprint (sha256 of the sorted ``(id, copies)``, ``seed``,
``seq_length``, ``batch_size``) in ``trainer_state.json`` and refuses, in one line, a resume whose
selection or shape differs from the checkpoint's. Items need no collator beyond the Trainer's
default (with ``processing_class=tokenizer`` the tokenizer needs a pad token).

Bad input (an id not in the corpus, a batch size that differs, a resume with another selection,
...) raises :class:`~spokes_lightning.errors.UserError`. In a script, one that nobody catches ends
the program with ONE line on stderr (``error: ...``) and exit code 2, no traceback: building a
``SelectionDataset`` or ``SelectionTrainerCallback`` installs that report
(:func:`~spokes_lightning.errors.exit_on_uncaught_user_error`); ``with user_errors_exit():`` around
the script's body does the same explicitly. Code that catches ``UserError`` gets the exception.

Online reselection (the model being trained picks what comes next) under the same ``Trainer``:
:class:`~spokes_lightning.online.hf_trainer.OnlineTrainerSelection`, also importable from here.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..datamodule import (IGNORE_INDEX, Segment, _as_id_text_pairs, _tokenize, pack_documents,
                          selected_copies, shard_documents)
from ..errors import UserError, exit_on_uncaught_user_error

__all__ = ["OnlineTrainerSelection", "SelectionDataset", "SelectionTrainerCallback", "find_selection_dataset"]


def __getattr__(name: str):
    if name == "OnlineTrainerSelection":  # online reselection: imported on first use
        from ..online.hf_trainer import OnlineTrainerSelection

        return OnlineTrainerSelection
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ceil(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _n_tokens(segments: list[Segment]) -> int:
    return sum(stop - start for _, start, stop in segments)


def _distributed_world() -> int | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return None


class SelectionDataset(IterableDataset):
    """Packed sequences of the selected documents for ``transformers.Trainer``; see the module doc.

    Items are dicts of ``torch.long`` tensors ``input_ids``, ``labels`` (-100 on padding) and
    ``attention_mask``, each of ``seq_length``; ``batch_size`` must equal the Trainer's
    ``per_device_train_batch_size``. The world size is read from ``torch.distributed`` when it
    is initialised (else 1) unless ``world_size`` is given.
    """

    def __init__(self, documents, selection, tokenizer, seq_length: int, batch_size: int,
                 seed: int = 0, text_field: str = "text", world_size: int | None = None):
        exit_on_uncaught_user_error()
        if seq_length < 2 or batch_size < 1:
            raise UserError(f"seq_length must be >= 2 and batch_size >= 1, got {seq_length}, {batch_size}")
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise UserError("the tokenizer has no EOS token (set tokenizer.eos_token)")
        pairs = _as_id_text_pairs(documents, text_field)
        copies = selected_copies(selection, [doc_id for doc_id, _ in pairs])
        if not copies:
            raise UserError("the selection is empty")
        kept = [(doc_id, text) for doc_id, text in pairs if doc_id in copies]  # corpus order
        tokens = _tokenize(tokenizer, [text for _, text in kept], int(eos))
        self.copies = {doc_id: copies[doc_id] for doc_id, _ in kept}
        self.ids = [doc_id for doc_id, _ in kept for _ in range(copies[doc_id])]
        self.tokens = [t for (doc_id, _), t in zip(kept, tokens) for _ in range(copies[doc_id])]
        self.lengths = np.array([len(t) for t in self.tokens], dtype=np.int64)
        self.seq_length, self.batch_size, self.seed = int(seq_length), int(batch_size), int(seed)
        self.eos_id = int(eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = self.eos_id if pad is None else int(pad)
        self._world_size = None if world_size is None else int(world_size)
        self.epoch = 0
        key = {"copies": sorted(self.copies.items()), "seed": self.seed,
               "seq_length": self.seq_length, "batch_size": self.batch_size}
        self.fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------------ shape
    @property
    def world_size(self) -> int:
        live = _distributed_world()
        if self._world_size is not None and live is not None and live != self._world_size:
            raise UserError(f"SelectionDataset was built for world_size={self._world_size} "
                            f"but torch.distributed runs {live} processes")
        return self._world_size or live or 1

    def set_epoch(self, epoch: int) -> None:
        """Called by Accelerate's prepared loader (and so by the Trainer) before each epoch."""
        self.epoch = int(epoch)

    def _bounds(self, world: int) -> tuple[int, int]:
        """``(B, n_min)``: batches per rank per epoch, and a lower bound of any rank's sequences.

        Dealing each document to the least-loaded rank keeps max - min load <= the longest
        document L, so a rank holds at most ``(T + (W-1) L) / W`` tokens (and at least
        ``(T - (W-1) L) / W``) in every epoch, whatever the shuffle."""
        total, longest = int(self.lengths.sum()), int(self.lengths.max())
        most = min(total, (total + (world - 1) * longest) // world)
        least = max(0, _ceil(total - (world - 1) * longest, world))
        return _ceil(_ceil(most, self.seq_length), self.batch_size), _ceil(least, self.seq_length)

    def batches_per_epoch(self, world: int | None = None) -> int:
        """``B``: the number of batches every rank gets in every epoch (= ``len(train_dataloader)``)."""
        return self._bounds(world or self.world_size)[0]

    def every_rank_batch_has_targets(self, world: int | None = None) -> bool:
        """True when no rank can ever get a batch without a token to predict (any epoch)."""
        n_batches, n_min = self._bounds(world or self.world_size)
        return n_min >= n_batches + 1  # >= B+1 sequences: every batch real, the tail never alone

    def __len__(self) -> int:
        world = self.world_size
        return self.batches_per_epoch(world) * world * self.batch_size

    # ------------------------------------------------------------------ plan
    def plan(self, epoch: int, world: int | None = None) -> list[list[list[list[Segment]]]]:
        """Per rank, per batch (``B`` of them), per sequence: its segments (``[]`` = padding)."""
        world = world or self.world_size
        n_batches = self.batches_per_epoch(world)
        all_units = []
        for doc_order in shard_documents(self.lengths, world, self.seed, epoch):
            units = [[seq] for seq in pack_documents(doc_order, self.lengths, self.seq_length)]
            if self.batch_size > 1 and len(units) > 1 and _n_tokens(units[-1][0]) < 2:
                units[-2].append(units.pop()[0])  # a 1-token tail (nothing to predict) rides along
            all_units.append(units)
        # A rank with fewer units than batches fills a run of consecutive batches. The runs are laid
        # side by side after the batches the full ranks already cover (runs ending in a unit with
        # nothing to predict first; the next run starts on that unit's batch, a run never passes
        # the last batch), so that every batch index has a target on some rank whenever possible.
        good_end = [bool(units) and any(_n_tokens(q) >= 2 for q in units[-1]) for units in all_units]
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
            plan.append([batch + [[]] * (self.batch_size - len(batch)) for batch in batches])
        if not self.every_rank_batch_has_targets(world):
            for b in range(n_batches):
                if not any(_n_tokens(seq) >= 2 for rank in plan for seq in rank[b]):
                    raise UserError(
                        f"epoch {epoch}: batch {b} has no token to predict on any rank (the selection has "
                        f"{int(self.lengths.sum())} tokens for {world} rank(s) x batch_size {self.batch_size} "
                        f"x seq_length {self.seq_length}); use another seq_length"
                        + (" or a smaller batch_size" if self.batch_size > 1 else ""))
        return plan

    def sequence(self, segments: list[Segment]) -> dict[str, torch.Tensor]:
        """One training item: the tokens of ``segments``, right-padded to ``seq_length``."""
        input_ids = torch.full((self.seq_length,), self.pad_id, dtype=torch.long)
        labels = torch.full((self.seq_length,), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(self.seq_length, dtype=torch.long)
        col = 0
        for d, start, stop in segments:
            piece = torch.from_numpy(self.tokens[d][start:stop].astype(np.int64))
            input_ids[col : col + len(piece)] = piece
            labels[col : col + len(piece)] = piece
            mask[col : col + len(piece)] = 1
            col += len(piece)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        world = self.world_size
        plan = self.plan(self.epoch, world)
        worker = get_worker_info()  # loader workers take whole batches in turn: the order is kept
        step, first = (worker.num_workers, worker.id) if worker else (1, 0)
        for block in range(first, len(plan[0]) * world, step):
            b, r = divmod(block, world)
            for segments in plan[r][b]:
                yield self.sequence(segments)

    def record(self, world: int | None = None) -> dict[str, Any]:
        """What the callback stores in ``trainer_state.json`` (JSON-able)."""
        world = world or self.world_size
        return {"fingerprint": self.fingerprint, "n_documents": len(self.copies),
                "n_entries": len(self.ids), "n_tokens": int(self.lengths.sum()), "seed": self.seed,
                "seq_length": self.seq_length, "batch_size": self.batch_size, "world_size": world,
                "batches_per_epoch": self.batches_per_epoch(world)}


def find_selection_dataset(obj: Any, depth: int = 6) -> SelectionDataset | None:
    """The :class:`SelectionDataset` inside a (prepared) dataloader, or None."""
    if isinstance(obj, SelectionDataset) or obj is None or depth == 0:
        return obj if isinstance(obj, SelectionDataset) else None
    for name in ("dataset", "base_dataloader", "dataloader", "_loader"):  # IterableDatasetShard: .dataset
        found = find_selection_dataset(getattr(obj, name, None), depth - 1)
        if found is not None:
            return found
    return None


def _counts_tokens_globally(args, model) -> bool:
    """Whether the Trainer divides each rank's summed loss by the global target count."""
    model = getattr(model, "module", model)
    if hasattr(model, "accepts_loss_kwargs"):
        takes_count = bool(model.accepts_loss_kwargs)
    else:
        params = inspect.signature(model.forward).parameters.values()
        takes_count = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
    return takes_count and bool(getattr(args, "average_tokens_across_devices", False))


def _refuse_if_changed(want: dict, record: dict, source: str) -> None:
    if want.get("fingerprint") == record["fingerprint"]:
        return
    changed = [k for k in ("n_documents", "n_entries", "seed", "seq_length", "batch_size")
               if k in want and want[k] != record[k]]
    detail = ", ".join(f"{k} {want[k]} -> {record[k]}" for k in changed) or "other ids or copies"
    raise UserError(f"{source} is for a different selection ({detail}; fingerprint "
                    f"{str(want.get('fingerprint'))[:12]} vs {record['fingerprint'][:12]}); resume with the "
                    "same selection, seed, seq_length and batch_size, or start a new run")


class SelectionTrainerCallback(TrainerCallback, ExportableState):
    """Checks a Trainer's SelectionDataset at train start and pins it across checkpoints.

    ``expected_fingerprint``: refuse to train on any other selection (restored from the
    checkpoint when ``restore_callback_states_from_checkpoint`` is set). Independently of that
    flag, a resume (``global_step > 0``) is compared with the record in ``trainer_state.json``.
    """

    def __init__(self, expected_fingerprint: str | None = None):
        exit_on_uncaught_user_error()
        self.expected_fingerprint = expected_fingerprint
        self.record: dict[str, Any] | None = None

    def state(self) -> dict:
        fingerprint = self.record["fingerprint"] if self.record else self.expected_fingerprint
        return {"args": {"expected_fingerprint": fingerprint}, "attributes": {"record": self.record}}

    def _saved_record(self, state) -> dict | None:
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        saved = (saved or [None])[-1] if isinstance(saved, list) else saved
        return (saved.get("attributes") or {}).get("record") if isinstance(saved, dict) else None

    def on_train_begin(self, args, state, control, train_dataloader=None, model=None, **kwargs):
        dataset = find_selection_dataset(train_dataloader)
        if dataset is None:
            raise UserError("SelectionTrainerCallback: the Trainer's train_dataset is not a SelectionDataset")
        if args.per_device_train_batch_size != dataset.batch_size:
            raise UserError(f"per_device_train_batch_size={args.per_device_train_batch_size} but the "
                            f"SelectionDataset was built with batch_size={dataset.batch_size}; make them equal")
        if getattr(args.accelerator_config, "split_batches", False):
            raise UserError("accelerator_config split_batches=True would split each rank's batch; leave it False")
        world = dataset.world_size
        if world != args.world_size:
            raise UserError(f"the SelectionDataset sees world size {world} but the Trainer runs {args.world_size}")
        record = dataset.record(world)
        saved = self._saved_record(state) if state.global_step > 0 else None
        if saved:
            _refuse_if_changed(saved, record, f"the checkpoint at step {state.global_step}")
            for key in ("world_size", "n_tokens"):
                if key in saved and saved[key] != record[key]:
                    raise UserError(f"the checkpoint at step {state.global_step} was trained with {key}="
                                    f"{saved[key]}, now {record[key]}; the epoch plan would differ (resume "
                                    "with the same number of processes and the same tokenizer)")
        if self.expected_fingerprint:
            _refuse_if_changed({"fingerprint": self.expected_fingerprint}, record, "expected_fingerprint")
        if world > 1 and not dataset.every_rank_batch_has_targets(world) and not _counts_tokens_globally(args, model):
            raise UserError("a rank may get a batch that is all padding (small selection); keep "
                            "average_tokens_across_devices=True and a model whose loss takes num_items_in_batch")
        if not dataset.every_rank_batch_has_targets(world):  # small data: check the epochs now, on
            first = int(state.epoch or 0)  # every rank, not mid-run (1 rank: every epoch alike)
            last = first + 1 if world == 1 else max(1, int(getattr(state, "num_train_epochs", 1) or 1))
            for epoch in range(first, last):
                dataset.plan(epoch, world)
        self.record = record
        # resuming from a checkpoint saved without this callback: Trainer._save_checkpoint indexes
        # state.stateful_callbacks[name] and would raise KeyError
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
