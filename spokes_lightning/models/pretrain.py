"""Local, small-scale version of the paper's pretraining comparison (Section 5.2-5.3).

The paper pretrains LLaMA-1B from scratch on each method's selection with Megatron-LM
(constant LR, fixed token budget, about one epoch over each 50% subset). Here the same
protocol runs at a size a workstation can afford: for every method, the SAME small model is
trained from scratch with Lightning on that method's exported Megatron data, read through
megatron-core's ``GPTDataset`` (the same shuffling and sequence packing Megatron uses), for the
SAME number of tokens, at a constant learning rate. Only the data differs.

The model is megatron-core's ``GPTModel`` built from the launch script's own flags
(:func:`~spokes_lightning.megatron.launch_script.megatron_llama_args` at a smaller shape,
:class:`~spokes_lightning.models.megatron_gpt.MegatronGPTModule`). Training ends with a
Megatron-LM checkpoint (``megatron/``, torch_dist), which
:func:`~spokes_lightning.megatron.convert.convert_megatron_checkpoint` turns into the Hugging
Face ``model/`` that validation loss and evaluation read: every local run takes the way back a
paper-scale Megatron run takes.

Outputs in ``out_dir``: ``metrics.csv`` (the training curve), ``megatron/`` (the checkpoint),
``model/`` (``LlamaForCausalLM`` + tokenizer) and ``result.json`` (written last; its
``config_hash`` lets a re-run with the same settings and data skip training).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from spokes_lightning.utils.atomic import write_json_atomic
from spokes_lightning.utils.errors import UserError
from spokes_lightning.megatron.dataset import indexed_dataset_stats, require_megatron_prefix
from spokes_lightning.megatron.launch_script import LLAMA_3_2_1B, megatron_llama_args
from spokes_lightning.models.llama import llama_config
from spokes_lightning.models.pretrain_record import PretrainResult, load_cached, read_curve, run_hashes, sample_index_dir


# ----------------------------------------------------------------------------- entry point


def pretrain_llama_config(vocab_size: int, *, seq_length: int, n_layers: int, hidden: int, heads: int):
    """A small LLaMA (RMSNorm, SwiGLU, RoPE theta 5e5, GQA 4:1 when possible, tied embeddings).

    Proportions follow LLaMA-3.2-1B (FFN = 4 x hidden, 4 query heads per KV head).
    """
    return llama_config(
        vocab_size, hidden=hidden, intermediate=4 * hidden, n_layers=n_layers, heads=heads,
        kv_heads=heads // 4 if heads % 4 == 0 else heads, max_length=seq_length,
        hidden_act="silu", rope_theta=500000.0, attention_dropout=0.0, use_cache=False,
    )


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
    if tokenizer is None:
        raise UserError("local pretraining needs a tokenizer, not just a vocabulary size (its Megatron "
                        "checkpoint is converted to a Hugging Face model with it)")

    shape = LLAMA_3_2_1B.scaled(num_layers=n_layers, hidden_size=hidden, ffn_hidden_size=4 * hidden,
                                num_attention_heads=heads, num_query_groups=heads // 4 if heads % 4 == 0 else heads)
    flags = local_megatron_flags(shape, seq_length=seq_length, batch_size=batch_size, steps=steps, lr=lr, seed=seed)
    settings = dict(flags=flags, vocab=vocab, seed=seed, steps=steps, eod=eod, version=3)
    out_dir = Path(out_dir).resolve()
    wanted, data_hash = run_hashes(settings, prefix, val_documents)
    cached = load_cached(out_dir, wanted)
    if cached is not None:
        return cached

    # Lightning and megatron-core only now: a run whose methods are all trained does not load them
    import lightning as L
    import torch

    from spokes_lightning.models.lightning_lm import StderrTrainingBar
    from spokes_lightning.models.megatron_gpt import CurveRecorder, MegatronDataModule, MegatronGPTModule

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").unlink(missing_ok=True)
    metrics_path = out_dir / "metrics.csv"
    checkpoint_dir = out_dir / "megatron"
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    L.seed_everything(seed, workers=True, verbose=False)
    # the same seed gives every method identical initial weights
    module = MegatronGPTModule(flags, vocab, seed, save_dir=checkpoint_dir)
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
        gradient_clip_val=float(flags["--clip-grad"]),
        callbacks=[CurveRecorder(str(metrics_path), tokens_per_step)]
        + ([StderrTrainingBar()] if progress else []),
    )
    trainer.fit(module, datamodule=data)
    if not trainer.is_global_zero:
        return None  # rank > 0 of a launched DDP job: rank 0 owns the outputs

    model_dir = out_dir / "model"
    _convert_checkpoint(checkpoint_dir, tokenizer, vocab, model_dir)
    return _finish(out_dir, model_dir, metrics_path, wanted, steps, tokens_per_step,
                   prefix, tokenizer, val_documents, seq_length)


def local_megatron_flags(shape, *, seq_length: int, batch_size: int, steps: int, lr: float, seed: int) -> dict:
    """The launch script's Megatron-LM flags for a local run (paths left out: they are not architecture)."""
    flags = megatron_llama_args(data_prefix="data", tokenizer_dir="tokenizer", run_dir=".", method="local",
                                shape=shape, seq_length=seq_length, global_batch_size=batch_size,
                                train_tokens=steps * batch_size * seq_length, lr=lr, seed=seed)
    for path_flag in ("--data-path", "--data-cache-path", "--tokenizer-model", "--save", "--load", "--tensorboard-dir"):
        flags.pop(path_flag)
    flags["--bf16"] = False  # CPU training runs in float32
    return flags


def _convert_checkpoint(checkpoint_dir: Path, tokenizer, vocab: int, model_dir: Path) -> None:
    """Megatron checkpoint -> ``LlamaForCausalLM`` (+ tokenizer) in ``model_dir``, through a temp dir."""
    from spokes_lightning.megatron.convert import convert_megatron_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=model_dir.parent))
    try:
        if tokenizer is None:
            raise UserError("converting the local checkpoint needs a tokenizer, not just a vocabulary size")
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(model_dir, ignore_errors=True)
        convert_megatron_checkpoint(checkpoint_dir, tmp, model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(model, tokenizer, model_dir: Path) -> None:
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
    from spokes_lightning.models.val_loss import validation_loss

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
