"""Hugging Face ``Trainer`` adapter of online reselection (the Lightning one is :mod:`.lightning`).

Usage (one process, or several under ``torchrun`` / ``accelerate launch``)::

    from transformers import Trainer, TrainingArguments
    from spokes_lightning.integrations.online_hf_trainer import OnlineTrainerSelection

    online = OnlineTrainerSelection(documents, tokenizer, total_steps=58, every_n_steps=8, window=64,
                                    global_batch=8, seq_length=256, seed=0, mode="online")
    args = TrainingArguments("runs/lm", **online.training_arguments(), learning_rate=3e-4, save_steps=16)
    trainer = Trainer(model=model, args=args, train_dataset=online.train_dataset, callbacks=[online.callback])
    trainer.train()                    # later: trainer.train(resume_from_checkpoint=True)
    online.reselector.records          # one record per planned segment (rule, picks, tokens, seconds)

:class:`OnlineTrainerSelection` tokenizes the candidate pool, builds the plan and its
:class:`~spokes_lightning.online.reselect.OnlineReselector` (``build_reselector``), plans the first
two segments, and holds the two pieces the ``Trainer`` takes: ``train_dataset``
(:class:`OnlineTrainerDataset`) and ``callback`` (:class:`OnlineReselectionTrainerCallback`).
``training_arguments()`` gives the ``TrainingArguments`` the plan fixes (``max_steps``,
``per_device_train_batch_size = global_batch / processes``, ``gradient_accumulation_steps=1``).
Bad input raises :class:`~spokes_lightning.utils.errors.UserError`; one that nobody catches ends a script
with one line on stderr and exit code 2 (:func:`~spokes_lightning.utils.errors.exit_on_uncaught_user_error`).

:class:`OnlineTrainerDataset` yields single sequences (``input_ids``, ``labels`` = -100 on padding,
``attention_mask``) in global interleaved order, step by step: rank 0's ``local_batch`` sequences of
the step, then rank 1's, ... Accelerate's prepared loader for an iterable dataset gives process ``r``
the ``r``-th batch of each group of ``world`` batches (dispatching from rank 0, or sharding with
``IterableDatasetShard``), so each process trains exactly its share of the plan.

The callback reselects at ``on_step_end`` (every rank, the unwrapped model Trainer passes to
callbacks). Its state goes with each checkpoint through transformers' ``ExportableState``: the plan
(ids per segment), the records and the d x d float64 Gram (base64, exact) in ``trainer_state.json``,
read back at ``on_train_begin`` when training resumes, whether or not
``restore_callback_states_from_checkpoint`` is set.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from spokes_lightning.core import distributed as D
from spokes_lightning.utils.errors import UserError, exit_on_uncaught_user_error
from spokes_lightning.online import build_reselector
from spokes_lightning.online.plan import OnlinePlan
from spokes_lightning.online.reselect import OnlineReselector, decode_state, encode_state
from spokes_lightning.utils.settings_hash import settings_hash

_LIVE: dict[str, "OnlineReselectionTrainerCallback"] = {}  # restore_key -> the callback built by the user


class OnlineTrainerDataset(torch.utils.data.IterableDataset):
    def __init__(self, plan: OnlinePlan):
        exit_on_uncaught_user_error()
        self.plan = plan

    def __iter__(self):
        _, world = D.world()
        plan = self.plan
        if plan.global_batch % world:
            raise UserError(f"the online plan's global batch {plan.global_batch} does not split over {world} processes")
        for step in range(plan.total_steps):
            for rank in range(world):
                for sequence in plan.step_sequences(step, rank, world):
                    yield plan.item(sequence)


def _plan_key(plan: OnlinePlan, mode: str) -> str:
    return settings_hash([plan.ids, plan.total_steps, plan.steps_per_segment, plan.global_batch, plan.seq_length,
                          plan.window, plan.seed, mode])


class OnlineReselectionTrainerCallback(TrainerCallback, ExportableState):
    """Every ``every_n_steps`` optimizer steps, plan the segment after the current one."""

    def __init__(self, reselector: OnlineReselector | None = None, tokenizer=None, restore_key: str | None = None):
        exit_on_uncaught_user_error()
        if restore_key is not None:  # transformers' _load_callback_state rebuilds callbacks from their args:
            if restore_key not in _LIVE:  # share the state of the one the user built in this process
                raise UserError("restoring OnlineReselectionTrainerCallback needs the callback built for this "
                                "run in this process (pass it in callbacks=[...])")
            self.__dict__ = _LIVE[restore_key].__dict__
            return
        if reselector is None:
            raise UserError("OnlineReselectionTrainerCallback needs the run's OnlineReselector")
        self.reselector, self.tokenizer = reselector, tokenizer
        self.restore_key = _plan_key(reselector.plan, reselector.mode)
        _LIVE[self.restore_key] = self

    def state(self) -> dict:
        return {"args": {"restore_key": self.restore_key},
                "attributes": {"saved": {"restore_key": self.restore_key,
                                         "reselector": encode_state(self.reselector.state())}}}

    def on_train_begin(self, args, state, control, **kwargs):
        plan = self.reselector.plan
        _, world = D.world()
        if args.max_steps != plan.total_steps:
            raise UserError(f"TrainingArguments(max_steps={args.max_steps}) but the online plan has {plan.total_steps} steps")
        if args.gradient_accumulation_steps != 1:
            raise UserError("online reselection counts optimizer steps as batches: use gradient_accumulation_steps=1")
        if args.per_device_train_batch_size * world != plan.global_batch:
            raise UserError(f"per_device_train_batch_size {args.per_device_train_batch_size} x {world} processes != "
                            f"the plan's global batch {plan.global_batch}")
        if state.global_step > 0:
            record = state.stateful_callbacks.get(type(self).__name__)
            record = record[0] if isinstance(record, list) else record
            saved = (record or {}).get("attributes", {}).get("saved")
            if saved is None:
                raise UserError(f"resuming at step {state.global_step} but the checkpoint has no online "
                                "reselection state (was it trained with OnlineReselectionTrainerCallback?)")
            if saved.get("restore_key") != self.restore_key:
                raise UserError("the checkpoint was written for another online plan (documents or settings differ)")
            self.reselector.load_state(decode_state(saved["reselector"]))
        elif not plan.segments:
            self.reselector.plan_initial()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.reselector.reselect(model, self.tokenizer, int(state.global_step))


class OnlineTrainerSelection:
    """Online reselection for a stock ``transformers.Trainer``, built in one call (see the module doc).

    Arguments are those of :func:`~spokes_lightning.online.reselect.build_reselector` (``documents``:
    paths, ``(id, text)`` pairs or dicts; ``mode``: online / random / static; ``**rule``: ``alpha``,
    ``quality``, ``static_ids``, ``fallback``, ``rounds``, ``sketch``). Attributes: ``reselector``,
    ``plan``, ``train_dataset`` and ``callback`` (pass both to the ``Trainer``), ``tokenizer``.
    """

    def __init__(self, documents, tokenizer, *, total_steps: int, every_n_steps: int, window: int,
                 global_batch: int, seq_length: int, seed: int = 0, mode: str = "online",
                 text_field: str = "text", **rule: Any):
        exit_on_uncaught_user_error()
        self.tokenizer = tokenizer
        self.reselector = build_reselector(documents, tokenizer, total_steps=total_steps,
                                           every_n_steps=every_n_steps, window=window, global_batch=global_batch,
                                           seq_length=seq_length, seed=seed, mode=mode, text_field=text_field,
                                           **rule)
        self.reselector.plan_initial()
        self.train_dataset = OnlineTrainerDataset(self.reselector.plan)
        self.callback = OnlineReselectionTrainerCallback(self.reselector, tokenizer)

    @property
    def plan(self) -> OnlinePlan:
        return self.reselector.plan

    def training_arguments(self, world_size: int | None = None) -> dict[str, int]:
        """``max_steps``, ``per_device_train_batch_size`` and ``gradient_accumulation_steps`` for
        ``TrainingArguments``. ``world_size`` defaults to the launcher's (``torch.distributed`` when
        initialised, else ``$WORLD_SIZE`` as set by torchrun / accelerate launch, else 1)."""
        world = world_size
        if world is None:
            _, live = D.world()
            world = live if live > 1 else os.environ.get("WORLD_SIZE", "1")
        world = int(world)
        plan = self.plan
        if world < 1 or plan.global_batch % world:
            raise UserError(f"the online plan's global batch {plan.global_batch} does not split over {world} processes")
        return {"max_steps": plan.total_steps, "per_device_train_batch_size": plan.global_batch // world,
                "gradient_accumulation_steps": 1}


__all__: Any = ("OnlineTrainerDataset", "OnlineReselectionTrainerCallback", "OnlineTrainerSelection",
                "build_reselector")
