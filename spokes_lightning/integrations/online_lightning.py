"""Lightning adapter of online reselection: a DataModule that serves the plan, a callback that reselects.

Usage::

    dm = OnlineSelectionDataModule(documents, tokenizer, total_steps=58, every_n_steps=8, window=64,
                                   global_batch=8, seq_length=256, seed=0, mode="online")
    trainer = L.Trainer(max_steps=58, callbacks=[OnlineReselectionCallback(dm)], use_distributed_sampler=False)
    trainer.fit(CausalLMModule(model, lr=1e-3, weight_decay=0.1), datamodule=dm)
    dm.reselector.records   # one record per planned segment (rule, picks, tokens, seconds)

The LightningModule must keep the Hugging Face model in ``.model`` (as
:class:`spokes_lightning.models.lightning_lm.CausalLMModule` does): that unwrapped model is sketched.
The callback's ``state_dict`` is the reselector's state, so a Lightning checkpoint resumes the
same plan, and the DataModule starts serving at the restored ``global_step``.
"""
from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from spokes_lightning.core import distributed as D
from spokes_lightning.utils.errors import UserError
from spokes_lightning.online.plan import OnlinePlan, OnlineStreamDataset
from spokes_lightning.online.reselect import build_reselector, decode_state, encode_state


class OnlineSelectionDataModule(L.LightningDataModule):
    """Serves this rank's batches of the online plan (the batch schema of :mod:`spokes_lightning.data.batches`)."""

    def __init__(self, documents, tokenizer, *, total_steps: int, every_n_steps: int, window: int,
                 global_batch: int, seq_length: int, seed: int = 0, mode: str = "online", **rule: Any):
        super().__init__()
        self.tokenizer = tokenizer
        self.reselector = build_reselector(documents, tokenizer, total_steps=total_steps,
                                           every_n_steps=every_n_steps, window=window, global_batch=global_batch,
                                           seq_length=seq_length, seed=seed, mode=mode, **rule)
        self.reselector.plan_initial()

    @property
    def plan(self) -> OnlinePlan:
        return self.reselector.plan

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else D.world()
        start = int(trainer.global_step) if trainer is not None else 0
        return DataLoader(OnlineStreamDataset(self.plan, rank, world, start), batch_size=None)


class OnlineReselectionCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps, plan the segment after the current one."""

    def __init__(self, datamodule: OnlineSelectionDataModule):
        self.datamodule = datamodule
        self.train_seconds = 0.0
        self._t0: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.max_steps != self.datamodule.plan.total_steps:
            raise UserError(f"Trainer(max_steps={trainer.max_steps}) but the online plan has "
                            f"{self.datamodule.plan.total_steps} steps")
        if trainer.accumulate_grad_batches != 1:
            raise UserError("online reselection counts optimizer steps as batches: use accumulate_grad_batches=1")
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        model = getattr(pl_module, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise UserError("online reselection needs the LightningModule's Hugging Face model in .model")
        self.datamodule.reselector.reselect(model, self.datamodule.tokenizer, int(trainer.global_step))

    def on_train_end(self, trainer, pl_module) -> None:
        if self._t0 is not None:
            self.train_seconds = time.perf_counter() - self._t0

    def state_dict(self) -> dict[str, Any]:
        return encode_state(self.datamodule.reselector.state())  # plain types: weights_only checkpoints load it

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.reselector.load_state(decode_state(state_dict))
