"""The proxy language model whose per-document gradients SPOKES uses (paper, sections 2.1, 4.1).

Two ways to get one:

* :func:`load_causal_lm` loads any Hugging Face causal LM (the paper uses Qwen3-0.6B-Base)
  from a local directory or, when reachable, the hub; offline it fails fast with one line.
* :func:`train_proxy` trains a small ``LlamaForCausalLM`` (6 layers, so the last-n-layer
  calibration of section 4.1 has depth) on the corpus itself with a Lightning ``Trainer``:
  packed sequences, AdamW with linear warmup + cosine decay, about one epoch, a CSV loss
  curve and a progress bar. It is saved with ``save_pretrained`` (plus the tokenizer) so it
  loads like any HF model, and a finished run (``done.json`` with the same config and corpus
  hash) is reused instead of retrained.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from ..atomic import write_json_atomic
from ..errors import UserError
from .hub import load_pretrained
from .tokenizer import corpus_hash, load_tokenizer

DONE_FILE = "done.json"
PROXY_FORMAT = 1


@dataclass(frozen=True)
class ProxyConfig:
    """Architecture and optimisation settings of the trained proxy (all recorded in done.json)."""

    n_layers: int = 6
    hidden: int = 256
    heads: int = 4
    intermediate: int = 688
    max_length: int = 256
    epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    seed: int = 0
    max_steps: int | None = None

    def validate(self) -> None:
        for name in ("n_layers", "hidden", "heads", "intermediate", "max_length", "epochs", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"proxy {name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise UserError(f"proxy hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if (self.hidden // self.heads) % 2:
            raise UserError("proxy hidden/heads must be even (rotary position embeddings)")
        if not self.lr > 0:
            raise UserError(f"proxy lr must be > 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"proxy max_steps must be positive, got {self.max_steps}")


# --------------------------------------------------------------------------- loading


def load_causal_lm(path_or_hub_id: str | os.PathLike, dtype: torch.dtype | str | None = None):
    """``AutoModelForCausalLM.from_pretrained`` that fails fast and clearly offline.

    A missing local directory raises ``UserError("model directory X does not exist")``; a hub
    id that is neither cached nor reachable raises one line saying how to point at a local
    copy (``proxy.model=/path/to/Qwen3-0.6B-Base``). The model is returned in eval mode.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}.get(dtype)
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


def build_llama(config: ProxyConfig, tokenizer):
    """A freshly initialised small ``LlamaForCausalLM`` sized by ``config``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(llama_config)


# --------------------------------------------------------------------------- data


def document_texts(documents: Iterable) -> list[str]:
    """Texts of ``Document`` objects (anything with ``.text``) or plain strings."""
    return [d if isinstance(d, str) else d.text for d in documents]


def pack_documents(texts: Sequence[str], tokenizer, max_length: int) -> torch.Tensor:
    """Pack the corpus into ``[n_blocks, max_length]`` token blocks (section 4.3 truncation).

    Each document is truncated to ``max_length - 1`` tokens and followed by eos; the stream
    is cut into full blocks, dropping the final partial block.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=True,
                        max_length=max_length - 1)["input_ids"]
    for ids in encoded:
        if ids:
            stream.extend(ids)
            stream.append(eos)
    n_blocks = len(stream) // max_length
    if n_blocks == 0:
        raise UserError(
            f"corpus too small to train a proxy: {len(stream)} tokens < one block of {max_length}"
        )
    return torch.tensor(stream[: n_blocks * max_length], dtype=torch.long).view(n_blocks, max_length)


# --------------------------------------------------------------------------- training


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warmup to 1, cosine decay to 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalLMModule(pl.LightningModule):
    """Next-token training of a HF causal LM on packed blocks (labels = inputs, shifted inside)."""

    def __init__(self, model, config: ProxyConfig, total_steps: int):
        super().__init__()
        self.model = model
        self.config = config
        self.total_steps = int(total_steps)

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=input_ids.shape[0])
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False,
                 batch_size=input_ids.shape[0])
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.config.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.config.lr, betas=(0.9, 0.95),
        )
        warmup = max(1, int(self.config.warmup_frac * self.total_steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.total_steps, warmup)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class StderrTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm training bar, drawn on stderr (stdout stays clean for results)."""

    def init_train_tqdm(self):
        return Tqdm(desc=self.train_description, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)


def _resolve_tokenizer(tokenizer):
    return load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer


def _is_relaunched_rank() -> bool:
    """True in a process Lightning's DDP launcher started for a rank other than global 0."""
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0


def _read_done(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / DONE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _loss_summary(log_dir: Path) -> dict:
    """First and last logged training losses from the CSV logger's metrics file."""
    import csv

    metrics = sorted(log_dir.rglob("metrics.csv"))
    if not metrics:
        return {}
    with open(metrics[-1]) as fh:
        losses = [float(r["train_loss"]) for r in csv.DictReader(fh) if r.get("train_loss")]
    if not losses:
        return {}
    window = max(1, min(5, len(losses) // 4))
    return {
        "n_logged_steps": len(losses),
        "initial_loss": sum(losses[:window]) / window,
        "final_loss": sum(losses[-window:]) / window,
        "loss": losses[-1],
        "metrics_csv": str(metrics[-1].relative_to(log_dir.parent)),
    }


def train_proxy(
    documents, tokenizer, out_dir: str | os.PathLike, *, n_layers: int = 6, hidden: int = 256,
    heads: int = 4, intermediate: int = 688, max_length: int = 256, epochs: int = 1,
    batch_size: int = 16, lr: float = 2e-3, seed: int = 0, max_steps: int | None = None,
    devices: int = 1, accelerator: str = "auto", strategy: str = "auto",
) -> Path:
    """Train (or reuse) a small Llama proxy on ``documents``; return the model directory.

    ``tokenizer`` is a tokenizer object or a directory. The directory gets the HF model and
    tokenizer files, ``logs/`` (CSV loss curve) and ``done.json`` (config, corpus hash, loss
    summary, wall time), written last: a directory with a matching ``done.json`` is reused.
    ``devices > 1`` trains with DDP (``strategy="ddp"``: Lightning re-launches the calling
    script once per extra rank; only rank 0 writes the model).
    """
    from lightning.pytorch.loggers import CSVLogger

    config = ProxyConfig(n_layers=n_layers, hidden=hidden, heads=heads, intermediate=intermediate,
                         max_length=max_length, epochs=epochs, batch_size=batch_size, lr=lr,
                         seed=seed, max_steps=max_steps)
    config.validate()
    if int(devices) <= 0:
        raise UserError(f"devices must be a positive integer, got {devices}")
    tokenizer = _resolve_tokenizer(tokenizer)
    texts = [t for t in document_texts(documents) if t]
    out_dir = Path(out_dir)
    identity = {"format": PROXY_FORMAT, "config": asdict(config), "corpus_hash": corpus_hash(texts),
                "vocab_size": len(tokenizer), "devices": int(devices)}
    done = _read_done(out_dir)
    if done is not None and {k: done.get(k) for k in identity} == identity:
        return out_dir

    blocks = pack_documents(texts, tokenizer, max_length)
    steps_per_epoch = math.ceil(len(blocks) / (batch_size * int(devices)))
    total_steps = min(max_steps or math.inf, steps_per_epoch * epochs)  # max_steps only caps
    pl.seed_everything(seed, workers=True, verbose=False)
    module = CausalLMModule(build_llama(config, tokenizer), config, total_steps)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(blocks), batch_size=batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(seed), drop_last=False,
    )
    if not _is_relaunched_rank():  # rank 0 cleans up before the other DDP ranks start
        (out_dir / DONE_FILE).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "logs", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=int(devices),
        strategy="ddp" if int(devices) > 1 and strategy == "auto" else strategy,
        max_epochs=epochs, max_steps=total_steps, logger=CSVLogger(str(out_dir), name="logs"),
        log_every_n_steps=1, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[StderrTQDMProgressBar(refresh_rate=1)], deterministic=True, gradient_clip_val=1.0,
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    elapsed = time.perf_counter() - start
    if trainer.global_rank != 0:
        return out_dir
    model = module.model.eval()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    summary = {**identity, **_loss_summary(out_dir / "logs"), "train_seconds": round(elapsed, 2),
               "n_blocks": len(blocks), "n_tokens": int(blocks.numel()), "steps": int(trainer.global_step),
               "n_parameters": int(sum(p.numel() for p in model.parameters()))}
    write_json_atomic(out_dir / DONE_FILE, summary)
    return out_dir
