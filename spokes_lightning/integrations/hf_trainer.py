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
``default_rng([seed, epoch])``, dealt to ranks and packed into ``seq_length`` sequences by
:func:`spokes_lightning.data.batches.plan_epoch`, the plan
:class:`~spokes_lightning.integrations.lightning.SelectedDataModule` serves too. Each rank's sequences, in packing order, fill a FIXED number ``B`` of batches
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
...) raises :class:`~spokes_lightning.utils.errors.UserError`. In a script, one that nobody catches ends
the program with ONE line on stderr (``error: ...``) and exit code 2, no traceback: building a
``SelectionDataset`` or ``SelectionTrainerCallback`` installs that report
(:func:`~spokes_lightning.utils.errors.exit_on_uncaught_user_error`); ``with user_errors_exit():`` around
the script's body does the same explicitly. Code that catches ``UserError`` gets the exception.

Online reselection (the model being trained picks what comes next) under the same ``Trainer``:
:class:`~spokes_lightning.integrations.online_hf_trainer.OnlineTrainerSelection`, also importable from here.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from spokes_lightning.data.batches import (Segment, SelectedTokens, batch_bounds, every_rank_batch_has_targets,
                                           plan_epoch, sequence_item)
from spokes_lightning.utils.errors import UserError, exit_on_uncaught_user_error
from spokes_lightning.utils.settings_hash import settings_hash

__all__ = ["OnlineTrainerSelection", "SelectionDataset", "SelectionTrainerCallback", "find_selection_dataset"]


def __getattr__(name: str):
    if name == "OnlineTrainerSelection":  # online reselection: imported on first use
        from spokes_lightning.integrations.online_hf_trainer import OnlineTrainerSelection

        return OnlineTrainerSelection
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        selected = SelectedTokens.build(documents, selection, tokenizer, text_field)
        self.copies, self.ids, self.tokens = selected.copies, selected.ids, selected.tokens
        self.lengths = selected.lengths
        self.seq_length, self.batch_size, self.seed = int(seq_length), int(batch_size), int(seed)
        self.eos_id, self.pad_id = int(tokenizer.eos_token_id), selected.pad_id
        self._world_size = None if world_size is None else int(world_size)
        self.epoch = 0
        key = {"copies": sorted(self.copies.items()), "seed": self.seed,
               "seq_length": self.seq_length, "batch_size": self.batch_size}
        self.fingerprint = settings_hash(key, length=None)

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

    def batches_per_epoch(self, world: int | None = None) -> int:
        """``B``: the number of batches every rank gets in every epoch (= ``len(train_dataloader)``)."""
        return batch_bounds(self.lengths, world or self.world_size, self.seq_length, self.batch_size)[0]

    def every_rank_batch_has_targets(self, world: int | None = None) -> bool:
        """True when no rank can ever get a batch without a token to predict (any epoch)."""
        return every_rank_batch_has_targets(self.lengths, world or self.world_size, self.seq_length, self.batch_size)

    def __len__(self) -> int:
        world = self.world_size
        return self.batches_per_epoch(world) * world * self.batch_size

    # ------------------------------------------------------------------ plan
    def plan(self, epoch: int, world: int | None = None) -> list[list[list[list[Segment]]]]:
        """Per rank, per batch (``B`` of them), per sequence: its segments (``[]`` = padding)."""
        return plan_epoch(self.lengths, world or self.world_size, self.seed, epoch, self.seq_length, self.batch_size)

    def sequence(self, segments: list[Segment]) -> dict[str, torch.Tensor]:
        """One training item: the tokens of ``segments``, right-padded to ``seq_length``."""
        return sequence_item(self.tokens, segments, self.seq_length, self.pad_id)

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
