"""Local, small-scale version of the paper's pretraining comparison (Section 5.2-5.3).

The paper pretrains LLaMA-1B from scratch on each method's selection with Megatron-LM
(constant LR, fixed token budget). Here the same protocol runs at a size a workstation can
afford: for every method, the SAME small ``LlamaForCausalLM`` (same config, same seed) is
trained from scratch with Lightning on that method's exported Megatron data, read through
megatron-core's ``GPTDataset`` (the same shuffling and sequence packing Megatron uses), for the
SAME number of tokens, at a constant learning rate. Only the data differs.

Outputs in ``out_dir``: ``metrics.csv`` (the training curve), ``model/`` (``save_pretrained``,
with the tokenizer when given) and ``result.json`` (written last; its ``config_hash`` lets a
re-run with the same settings and data skip training).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from .atomic import write_json_atomic, write_text_atomic
from .errors import UserError
from .megatron_data import build_gpt_dataset, indexed_dataset_stats, require_megatron_prefix

CURVE_FIELDS = ("step", "tokens_seen", "loss", "lr")


@dataclass
class PretrainResult:
    """What one pretraining run produced."""

    out_dir: str
    model_dir: str
    metrics_path: str
    config_hash: str
    steps: int
    tokens_seen: int
    dataset_tokens: int
    epochs: float  # tokens seen / tokens in the dataset
    final_loss: float
    val_loss: float | None
    curve: list[dict] = field(default_factory=list)
    cached: bool = False


# ----------------------------------------------------------------------------- model + data


def llama_config(vocab_size: int, *, seq_length: int, n_layers: int, hidden: int, heads: int):
    """A small LLaMA (RMSNorm, SwiGLU, RoPE theta 5e5, GQA 4:1 when possible, tied embeddings).

    Proportions follow LLaMA-3.2-1B (FFN = 4 x hidden, 4 query heads per KV head).
    """
    from transformers import LlamaConfig

    if hidden % heads:
        raise UserError(f"hidden size {hidden} is not divisible by {heads} heads")
    return LlamaConfig(
        vocab_size=int(vocab_size),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 4 if heads % 4 == 0 else heads,
        hidden_act="silu",
        max_position_embeddings=seq_length,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        use_cache=False,
    )


def causal_lm_loss(model, tokens, labels, loss_mask):
    """Token-level mean cross-entropy over positions where ``loss_mask`` is 1."""
    import torch.nn.functional as F

    logits = model(input_ids=tokens).logits.float()
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="none"
    )
    mask = loss_mask.reshape(-1).to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


class LlamaPretrainModule(L.LightningModule):
    """Next-token training of a from-scratch LLaMA at a constant learning rate (Sec. 5.3)."""

    def __init__(self, config_dict: dict, lr: float, seed: int):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)  # identical initial weights for every method
        self.model = LlamaForCausalLM(LlamaConfig.from_dict(config_dict))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = causal_lm_loss(self.model, batch["tokens"], batch["labels"], batch["loss_mask"])
        self.log("loss", loss, prog_bar=True, on_step=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(
            self.model.parameters(), lr=self.lr, betas=(0.9, 0.95), weight_decay=0.1
        )


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
        loss = float(trainer.callback_metrics["loss"])
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.rows.append(
            {"step": step, "tokens_seen": step * self.tokens_per_step, "loss": loss, "lr": lr}
        )

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            write_text_atomic(self.metrics_path, curve_to_csv(self.rows))


class StderrProgressBar(TQDMProgressBar):
    """Lightning's training bar on stderr, so stdout stays free for machine-readable output."""

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc="pretrain", disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)


def curve_to_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def read_curve(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as fh:
        return [
            {"step": int(r["step"]), "tokens_seen": int(r["tokens_seen"]),
             "loss": float(r["loss"]), "lr": float(r["lr"])}
            for r in csv.DictReader(fh)
        ]


# ----------------------------------------------------------------------------- caching


def _file_digest(path: str, *digests) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            for digest in digests:
                digest.update(chunk)


def run_hashes(settings: dict, prefix: str, val_documents) -> tuple[str, str]:
    """(config hash: every setting + the training data + validation texts, data hash: the data alone).

    One pass over the ``.idx`` / ``.bin`` bytes gives both.
    """
    config = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    data = hashlib.sha256()
    for suffix in (".idx", ".bin"):
        _file_digest(prefix + suffix, config, data)
    for text in val_documents or []:
        config.update(hashlib.sha256(text.encode("utf-8")).digest())
    return config.hexdigest()[:16], data.hexdigest()[:16]


def config_hash(settings: dict, prefix: str, val_documents) -> str:
    """Hash of every setting plus the bytes of the training data and validation texts."""
    return run_hashes(settings, prefix, val_documents)[0]


def sample_index_dir(out_dir: Path, data_hash: str) -> Path:
    """Megatron's sample-index cache for this data: ``gpt_dataset_cache/<data hash>``.

    Megatron names its cached document / sample / shuffle indices after the dataset's path and
    settings, not its bytes: data re-exported under the same prefix (another selection) would
    reuse indices of the old data. Keyed by the data's hash, it cannot; caches of other data go.
    """
    root = out_dir / "gpt_dataset_cache"
    if root.is_dir():
        for child in root.iterdir():
            if child.name == data_hash:
                continue
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    return root / data_hash


def _load_cached(out_dir: Path, wanted_hash: str) -> PretrainResult | None:
    result_path = out_dir / "result.json"
    if not result_path.exists():
        return None
    try:
        saved = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if saved.get("config_hash") != wanted_hash:
        return None
    # the paths of this out_dir, even when the run_dir was copied or moved since
    saved.update(out_dir=str(out_dir), model_dir=str(out_dir / "model"), metrics_path=str(out_dir / "metrics.csv"))
    if not (out_dir / "model" / "config.json").exists():
        return None
    saved["cached"] = True
    saved["curve"] = read_curve(saved["metrics_path"])
    return PretrainResult(**saved)


# ----------------------------------------------------------------------------- entry point


def _tokenizer_facts(tokenizer_or_vocab_size, eod_id):
    if isinstance(tokenizer_or_vocab_size, int):
        vocab = tokenizer_or_vocab_size
        tokenizer = None
        # The EOD id only matters for Megatron's optional EOD masks, which stay off here.
        eod = vocab - 1 if eod_id is None else eod_id
    else:
        tokenizer = tokenizer_or_vocab_size
        vocab = len(tokenizer)
        eod = eod_id if eod_id is not None else tokenizer.eos_token_id
        if eod is None:
            raise UserError("tokenizer has no EOS token: pass eod_id=")
    if vocab < 2:
        raise UserError(f"vocabulary size must be at least 2, got {vocab}")
    return tokenizer, int(vocab), int(eod)


def pretrain_on_megatron_data(
    prefix: str | os.PathLike,
    tokenizer_or_vocab_size,
    out_dir: str | os.PathLike,
    *,
    token_budget: int,
    seq_length: int = 256,
    n_layers: int = 4,
    hidden: int = 256,
    heads: int = 4,
    batch_size: int = 8,
    lr: float = 3e-4,
    seed: int = 0,
    devices: int = 1,
    strategy: str = "auto",
    val_documents: Sequence[str] | None = None,
    eod_id: int | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Train a from-scratch small LLaMA on one method's Megatron data for ``token_budget`` tokens.

    ``batch_size`` is the global batch (split over ``devices``); steps =
    ``token_budget // (batch_size * seq_length)``, identical for every method. Multi-process:
    ``strategy="ddp_spawn"`` from Python, or ``"ddp"`` under a launcher (ranks > 0 return None).
    """
    prefix = require_megatron_prefix(prefix)
    tokenizer, vocab, eod = _tokenizer_facts(tokenizer_or_vocab_size, eod_id)
    tokens_per_step = batch_size * seq_length
    steps = int(token_budget) // tokens_per_step
    if steps < 1:
        raise UserError(
            f"token budget {token_budget} is below one step ({batch_size} x {seq_length} tokens)"
        )
    if devices < 1 or batch_size % devices:
        raise UserError(f"global batch {batch_size} must split evenly over {devices} device(s)")
    if val_documents is not None and tokenizer is None:
        raise UserError("validation documents need a tokenizer, not just a vocabulary size")

    model_config = llama_config(vocab, seq_length=seq_length, n_layers=n_layers,
                                hidden=hidden, heads=heads)
    config_dict = model_config.to_dict()
    settings = dict(model=config_dict, seq_length=seq_length, batch_size=batch_size, lr=lr,
                    seed=seed, steps=steps, eod=eod, version=2)
    out_dir = Path(out_dir).resolve()
    wanted, data_hash = run_hashes(settings, prefix, val_documents)
    cached = _load_cached(out_dir, wanted)
    if cached is not None:
        return cached

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").unlink(missing_ok=True)
    metrics_path = out_dir / "metrics.csv"
    L.seed_everything(seed, workers=True, verbose=False)
    module = LlamaPretrainModule(config_dict, lr, seed)
    data = MegatronDataModule(prefix, (vocab, eod), seq_length, steps * batch_size, seed,
                          str(sample_index_dir(out_dir, data_hash)), batch_size // devices)
    trainer = L.Trainer(
        accelerator="cpu" if not torch.cuda.is_available() else "auto",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        deterministic=True,
        use_distributed_sampler=False,
        callbacks=[CurveRecorder(str(metrics_path), tokens_per_step)]
        + ([StderrProgressBar()] if progress else []),
    )
    trainer.fit(module, datamodule=data)
    if not trainer.is_global_zero:
        return None  # rank > 0 of a launched DDP job: rank 0 owns the outputs

    model_dir = out_dir / "model"
    _save_model(module.model, tokenizer, model_dir)
    return _finish(out_dir, model_dir, metrics_path, wanted, steps, tokens_per_step,
                   prefix, tokenizer, val_documents, seq_length)


def _save_model(model, tokenizer, model_dir: Path) -> None:
    """``save_pretrained`` (+ tokenizer) through a temp directory, then swap it in."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-model-", dir=model_dir.parent))
    try:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _finish(out_dir, model_dir, metrics_path, wanted, steps, tokens_per_step, prefix,
            tokenizer, val_documents, seq_length) -> PretrainResult:
    from .evaluation.val_loss import validation_loss

    curve = read_curve(metrics_path)
    val = None
    if val_documents and tokenizer is None:
        raise UserError("validation documents need a tokenizer (pass one instead of a vocabulary size)")
    if val_documents:
        # the saved model (what downstream evaluation loads), windows as long as the training ones
        val = validation_loss(model_dir, val_documents, max_length=seq_length)
    _, dataset_tokens = indexed_dataset_stats(prefix)
    tokens_seen = steps * tokens_per_step
    result = PretrainResult(
        out_dir=str(out_dir), model_dir=str(model_dir), metrics_path=str(metrics_path),
        config_hash=wanted, steps=steps, tokens_seen=tokens_seen, dataset_tokens=dataset_tokens,
        epochs=tokens_seen / dataset_tokens, final_loss=curve[-1]["loss"] if curve else math.nan,
        val_loss=val, curve=curve,
    )
    saved = asdict(result)
    saved.pop("curve")
    write_json_atomic(out_dir / "result.json", saved)
    return result


def pretrain_methods(prefixes: dict[str, str], tokenizer_or_vocab_size, out_root, **kwargs):
    """Run :func:`pretrain_on_megatron_data` for every method with identical settings."""
    if not prefixes:
        raise UserError("no methods to pretrain")
    return {
        method: pretrain_on_megatron_data(prefix, tokenizer_or_vocab_size,
                                          Path(out_root) / method, **kwargs)
        for method, prefix in prefixes.items()
    }
