"""Causal LMs: load a pretrained one, build a small LLaMA, and the training step every loop shares.

Every loop that trains a causal LM uses :func:`causal_lm_loss` and :func:`adamw`: the offline
proxy (:mod:`.proxy_training`, packed blocks, warmup + cosine LR), the local pretraining
comparison (:mod:`.pretrain`, Megatron samples, constant LR), the online arms and QuaDMix's
proxy runs. No training framework here: :mod:`.lightning_lm` is the LightningModule around them.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch

from spokes_lightning.utils.errors import UserError
from spokes_lightning.data.hub import load_pretrained

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def load_causal_lm(path_or_hub_id: str | os.PathLike, dtype: torch.dtype | str | None = None):
    """``AutoModelForCausalLM.from_pretrained`` that fails fast and clearly offline.

    A missing local directory raises ``UserError("model directory X does not exist")``; a hub
    id that is neither cached nor reachable raises one line saying how to point at a local
    copy (``proxy.model=/path/to/Qwen3-0.6B-Base``). The model is returned in eval mode.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
        if dtype is None:
            raise UserError("dtype must be one of float32, bfloat16, float16")

    def loader(name: str, local_files_only: bool):
        kwargs = {"local_files_only": local_files_only}
        if dtype is not None:
            kwargs["dtype"] = dtype
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)

    model = load_pretrained(
        path_or_hub_id, loader, what="model", setting="proxy.model", example="Qwen3-0.6B-Base"
    )
    return model.eval()


def llama_config(vocab_size: int, *, hidden: int, intermediate: int, n_layers: int, heads: int,
                 kv_heads: int, max_length: int, **fields):
    """A ``LlamaConfig`` (RMSNorm eps 1e-5, tied embeddings); ``fields`` sets further keys."""
    from transformers import LlamaConfig

    if hidden % heads:
        raise UserError(f"hidden size {hidden} is not divisible by {heads} heads")
    return LlamaConfig(
        vocab_size=int(vocab_size), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_length, rms_norm_eps=1e-5, tie_word_embeddings=True, **fields,
    )


def build_llama(config, seed: int):
    """A freshly initialised ``LlamaForCausalLM``; the same ``seed`` gives the same weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


IGNORE_INDEX = -100


def causal_lm_loss(model, batch) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch, over the positions that have a target.

    A batch is one of:

    * ``(input_ids,)`` packed blocks (labels = inputs, shifted by the model);
    * a Hugging Face dict ``{"input_ids", "labels", "attention_mask"}`` as served by
      :class:`~spokes_lightning.integrations.lightning.SelectedDataModule` and the HF ``SelectionDataset``:
      ``labels`` are NOT shifted (token ``t + 1`` is the target at ``t``), ``-100`` marks no target,
      and a position with ``attention_mask == 0`` is never a target. ``labels`` default to
      ``input_ids``; other keys (``doc_ids``, ``segments``) are ignored;
    * a Megatron sample dict ``{"tokens", "labels", "loss_mask"}`` (labels already shifted; mean
      over positions with mask 1).

    A dict batch without any target (all padding) gives a loss of 0 with zero gradients, not NaN.
    """
    if not isinstance(batch, Mapping):
        (input_ids,) = batch
        return model(input_ids=input_ids, labels=input_ids).loss
    import torch.nn.functional as F

    if "tokens" not in batch and "input_ids" in batch:
        input_ids = batch["input_ids"]
        labels = batch.get("labels")
        labels = input_ids if labels is None else labels
        mask = batch.get("attention_mask")
        kwargs = {}
        if mask is not None:
            labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
            # right padding (each row: real tokens, then padding) needs no mask: causal attention
            # already keeps real positions from seeing later padding, and it keeps the fast kernels
            if bool((mask[:, 1:] > mask[:, :-1]).any()):
                kwargs["attention_mask"] = mask
        logits = model(input_ids=input_ids, **kwargs).logits[:, :-1].float()
        targets = labels[:, 1:]
        total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (targets != IGNORE_INDEX).sum().clamp_min(1)

    logits = model(input_ids=batch["tokens"]).logits.float()
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), batch["labels"].reshape(-1), reduction="none"
    )
    mask = batch["loss_mask"].reshape(-1).to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def batch_size_of(batch) -> int:
    """Sequences in a batch of any :func:`causal_lm_loss` format."""
    if not isinstance(batch, Mapping):
        return len(batch[0])
    return len(batch["tokens"] if "tokens" in batch else batch["input_ids"])


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warmup to 1, cosine decay to 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, *, decay_all: bool = True) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95); ``decay_all=False`` exempts norm weights and biases from weight decay."""
    if decay_all:
        groups = model.parameters()
    else:
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
