"""megatron-core's ``GPTModel`` as a LightningModule: the local pretraining model.

The architecture comes from the SAME Megatron-LM flags the exported launch script passes
(:func:`spokes_lightning.megatron.launch_script.megatron_llama_args`, read back by
:func:`~spokes_lightning.megatron.launch_script.gpt_model_settings`), at a smaller size. The optimiser
follows those flags too: Adam(W) with ``--adam-beta1/2``, ``--weight-decay`` on matrices only
(Megatron exempts biases and norm weights), constant ``--lr``, ``--clip-grad``.

At the end of training every rank takes part in writing a Megatron-LM checkpoint
(torch_dist format, ``latest_checkpointed_iteration.txt``, saved ``args``), so what the local
comparison evaluates has come back through :mod:`spokes_lightning.megatron.convert`, the path a
paper-scale Megatron run takes.
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import lightning as L
import torch

from spokes_lightning.megatron.dataset import build_gpt_dataset
from spokes_lightning.models.pretrain_record import curve_to_csv
from spokes_lightning.utils.atomic import write_text_atomic


def causal_mask(seq_length: int) -> torch.Tensor:
    """``[1, 1, T, T]`` boolean mask, True above the diagonal (= not attended), as megatron-core expects."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool), diagonal=1)[None, None]


class MegatronGPTModule(L.LightningModule):
    """Trains a megatron-core ``GPTModel`` built from Megatron-LM flags on ``GPTDataset`` batches.

    ``flags`` is a :func:`megatron_llama_args` dict; ``vocab_size`` the tokenizer's (Megatron pads
    it). ``save_dir`` (the script's ``--save``): where the checkpoint is written after training.
    The model is built in :meth:`configure_model`, after Lightning has started any process group,
    with the same ``seed`` on every rank.
    """

    def __init__(self, flags: dict, vocab_size: int, seed: int, save_dir: str | Path | None = None,
                 tokenizer_dir: str | Path | None = None):
        super().__init__()
        self.flags, self.vocab_size, self.seed = dict(flags), int(vocab_size), int(seed)
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.tokenizer_dir = tokenizer_dir
        self.model = None
        self._megatron = None  # the megatron-core CPU runtime, entered in configure_model

    def configure_model(self):
        if self.model is not None:
            return
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.transformer_config import TransformerConfig

        from spokes_lightning.megatron.launch_script import gpt_model_settings
        from spokes_lightning.megatron.runtime import megatron_on_cpu

        self._megatron = ExitStack()
        self._megatron.enter_context(megatron_on_cpu())
        config_kwargs, model_kwargs = gpt_model_settings(self.flags, self.vocab_size)
        torch.manual_seed(self.seed)  # the same seed gives every method (and rank) the same weights
        config = TransformerConfig(**config_kwargs, use_cpu_initialization=True, params_dtype=torch.float32)
        spec = get_gpt_layer_local_spec(normalization=config_kwargs["normalization"])
        self.model = GPTModel(config=config, transformer_layer_spec=spec, **model_kwargs)
        self.register_buffer("mask", causal_mask(int(self.flags["--seq-length"])), persistent=False)

    def training_step(self, batch, batch_idx):
        per_token = self.model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                               attention_mask=self.mask, labels=batch["labels"])
        mask = batch["loss_mask"].to(per_token.dtype)
        loss = (per_token * mask).sum() / mask.sum().clamp_min(1.0)
        size = len(batch["tokens"])
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=True, batch_size=size)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=size)
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        for param in self.model.parameters():
            (no_decay if param.ndim < 2 else decay).append(param)
        wd = float(self.flags["--weight-decay"])
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
            lr=float(self.flags["--lr"]), betas=(float(self.flags["--adam-beta1"]), float(self.flags["--adam-beta2"])),
        )

    def on_train_end(self):
        if self.save_dir is not None:
            from spokes_lightning.megatron.checkpoint import megatron_args_namespace, save_megatron_checkpoint

            args = megatron_args_namespace(self.flags, self.vocab_size)
            save_megatron_checkpoint(self.model, args, self.save_dir, int(self.trainer.global_step))

    def teardown(self, stage):
        if self._megatron is not None:
            self._megatron.close()
            self._megatron = None


# ----------------------------------------------------------------------------- data and curve


class MegatronDataModule(L.LightningDataModule):
    """Serves one exported prefix through megatron-core's ``GPTDataset``.

    The dataset is built in ``setup`` on every process (Megatron builds its sample index on
    rank 0 first, then the other ranks read the cache). It is already shuffled the Megatron
    way, so the loader keeps its order; under DDP a non-shuffling DistributedSampler splits it.
    """

    def __init__(self, prefix, tokenizer_facts, seq_length, num_samples, seed, cache_dir, batch):
        super().__init__()
        self.kwargs = dict(tokenizer=tokenizer_facts, seq_length=seq_length,
                           num_samples=num_samples, seed=seed, cache_dir=cache_dir)
        self.prefix, self.batch, self.dataset = prefix, batch, None

    def setup(self, stage=None):
        if self.dataset is None:
            self.dataset = build_gpt_dataset(self.prefix, **self.kwargs)

    def train_dataloader(self):
        from torch.utils.data import DataLoader, DistributedSampler

        sampler = None
        world = self.trainer.world_size if self.trainer is not None else 1
        if world > 1:
            # Keep Megatron's sample order: global batch i is samples [i*B, (i+1)*B) on any
            # number of devices (Lightning's own sampler would re-shuffle).
            sampler = DistributedSampler(self.dataset, num_replicas=world,
                                         rank=self.trainer.global_rank, shuffle=False,
                                         drop_last=True)
        return DataLoader(self.dataset, batch_size=self.batch, sampler=sampler, shuffle=False,
                          drop_last=True)


class CurveRecorder(L.Callback):
    """Collects (step, tokens, loss, lr) every step; rank 0 writes ``metrics.csv``."""

    def __init__(self, metrics_path: str, tokens_per_step: int):
        self.metrics_path, self.tokens_per_step = metrics_path, tokens_per_step
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        loss = float(trainer.callback_metrics["train_loss"])
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.rows.append(
            {"step": step, "tokens_seen": step * self.tokens_per_step, "loss": loss, "lr": lr}
        )

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            write_text_atomic(self.metrics_path, curve_to_csv(self.rows))
