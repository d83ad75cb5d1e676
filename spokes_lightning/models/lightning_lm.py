"""The LightningModule that trains a causal LM: :func:`~.llama.causal_lm_loss` and :func:`~.llama.adamw`
in Lightning's hooks, and a training bar on stderr."""
from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from spokes_lightning.models.llama import adamw, batch_size_of, causal_lm_loss, warmup_cosine
from spokes_lightning.utils.progress import BAR_SETTINGS


class CausalLMModule(pl.LightningModule):
    """Next-token training of a HF causal LM with AdamW (betas 0.9, 0.95).

    Batches: any of :func:`causal_lm_loss` (packed ``(input_ids,)`` blocks, the
    ``input_ids``/``labels``/``attention_mask`` batches of
    :class:`~spokes_lightning.integrations.lightning.SelectedDataModule`, or Megatron samples)::

        trainer.fit(CausalLMModule(model, lr=3e-4, weight_decay=0.1), datamodule=SelectedDataModule(...))

    ``warmup_steps=None`` keeps the learning rate constant; otherwise it follows
    :func:`warmup_cosine` over ``total_steps``. ``decay_all=False`` exempts norm weights and
    biases from weight decay. Logs ``train_loss`` (averaged over ranks) and ``lr`` every step.
    """

    def __init__(self, model, lr: float, weight_decay: float, *, decay_all: bool = True,
                 warmup_steps: int | None = None, total_steps: int | None = None):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.decay_all = float(lr), float(weight_decay), bool(decay_all)
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def training_step(self, batch, batch_idx):
        loss = causal_lm_loss(self.model, batch)
        size = batch_size_of(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=True,
                 batch_size=size)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False,
                 batch_size=size)
        return loss

    def configure_optimizers(self):
        optimizer = adamw(self.model, self.lr, self.weight_decay, decay_all=self.decay_all)
        if self.warmup_steps is None:
            return optimizer
        total, warmup = int(self.total_steps), int(self.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class StderrTrainingBar(TQDMProgressBar):
    """Lightning's training bar on stderr, with the settings of :func:`spokes_lightning.utils.progress.progress`."""

    def init_train_tqdm(self):
        return Tqdm(desc=self.train_description, disable=self.is_disabled, leave=True,
                    file=sys.stderr, bar_format=self.BAR_FORMAT, **BAR_SETTINGS)
