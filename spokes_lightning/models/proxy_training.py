"""Training the offline proxy LM whose per-document gradients SPOKES uses (paper, sections 2.1, 4.1).

A pretrained proxy (the paper uses Qwen3-0.6B-Base) is loaded with
:func:`spokes_lightning.models.llama.load_causal_lm`. Without one, :func:`train_proxy` trains a
small ``LlamaForCausalLM`` (6 layers, so the last-n-layer calibration of section 4.1 has depth)
on the corpus itself with a Lightning ``Trainer``: packed sequences, AdamW with linear warmup +
cosine decay, about one epoch, a CSV loss curve and a progress bar. It is saved with
``save_pretrained`` (plus the tokenizer) so it loads like any HF model, and a finished run
(``done.json`` with the same config and corpus hash) is reused instead of retrained.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import lightning.pytorch as pl
import torch

from spokes_lightning.utils.atomic import write_json_atomic
from spokes_lightning.utils.errors import UserError
from spokes_lightning.models.lightning_lm import CausalLMModule, StderrTrainingBar
from spokes_lightning.models.llama import build_llama, llama_config
from spokes_lightning.data.batches import full_blocks, tokenize_documents
from spokes_lightning.models.tokenizer import corpus_hash, load_tokenizer

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


def proxy_llama_config(config: ProxyConfig, tokenizer):
    """The proxy's ``LlamaConfig``: sized by ``config``, special token ids of ``tokenizer``."""
    return llama_config(
        len(tokenizer), hidden=config.hidden, intermediate=config.intermediate, n_layers=config.n_layers,
        heads=config.heads, kv_heads=config.heads, max_length=config.max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# --------------------------------------------------------------------------- data


def document_texts(documents: Iterable) -> list[str]:
    """Texts of ``Document`` objects (anything with ``.text``) or plain strings."""
    return [d if isinstance(d, str) else d.text for d in documents]


def pack_blocks(texts: Sequence[str], tokenizer, max_length: int) -> torch.Tensor:
    """Pack the corpus into ``[n_blocks, max_length]`` token blocks (section 4.3 truncation).

    Each non-empty document is truncated to ``max_length - 1`` tokens and followed by eos; the
    stream is cut into full blocks (:func:`spokes_lightning.data.batches.full_blocks`), dropping
    the final partial block.
    """
    tokens = tokenize_documents(tokenizer, list(texts), int(tokenizer.eos_token_id), max_tokens=max_length - 1,
                                label="tokenize proxy corpus")
    blocks = full_blocks([t for t in tokens if len(t) > 1], max_length)
    if len(blocks) == 0:
        n = sum(len(t) for t in tokens if len(t) > 1)
        raise UserError(f"corpus too small to train a proxy: {n} tokens < one block of {max_length}")
    return blocks


# --------------------------------------------------------------------------- training


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

    blocks = pack_blocks(texts, tokenizer, max_length)
    steps_per_epoch = math.ceil(len(blocks) / (batch_size * int(devices)))
    total_steps = min(max_steps or math.inf, steps_per_epoch * epochs)  # max_steps only caps
    pl.seed_everything(seed, workers=True, verbose=False)
    model = build_llama(proxy_llama_config(config, tokenizer), config.seed)
    module = CausalLMModule(model, config.lr, config.weight_decay, decay_all=False, total_steps=total_steps,
                            warmup_steps=max(1, int(config.warmup_frac * total_steps)))
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
        callbacks=[StderrTrainingBar(refresh_rate=1)], deterministic=True, gradient_clip_val=1.0,
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
