"""Megatron-LM checkpoint layout: write megatron-core GPT checkpoints exactly as Megatron-LM's
``save_checkpoint`` lays them out, and read the legacy per-rank format back as one model.

    CKPT_DIR/latest_checkpointed_iteration.txt      the iteration number (written last)
    CKPT_DIR/iter_0000020/                          --ckpt-format torch_dist:
        metadata.json common.pt .metadata *.distcp      megatron.core.dist_checkpointing.save
    CKPT_DIR/iter_0000020/mp_rank_01[_002]/         --ckpt-format torch (legacy), per TP[/PP] rank:
        model_optim_rng.pt                              torch.save of the state dict

Both hold ``args`` (the Megatron-LM argparse Namespace), ``checkpoint_version`` 3.0,
``iteration`` and ``model`` (weights only: no optimizer or RNG state). Every rank of the
model-parallel world calls the writer (inside :func:`~spokes_lightning.megatron.runtime.
megatron_on_cpu`); the iteration is written into a temporary directory that rank 0 renames
into place before it updates the tracker file, so a reader never sees a partial checkpoint.
"""
from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from spokes_lightning.utils.atomic import write_text_atomic
from spokes_lightning.utils.errors import UserError
from spokes_lightning.megatron.launch_script import padded_vocab_size

CHECKPOINT_VERSION = 3.0
TRACKER_FILE = "latest_checkpointed_iteration.txt"
LEGACY_FILE = "model_optim_rng.pt"
RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?")  # legacy: mp_rank_TP[_PP]
_LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)")

# Megatron-LM ``store_false`` switches: the flag sets this destination to False.
_STORE_FALSE = {"--disable-bias-linear": "add_bias_linear", "--no-rope-fusion": "apply_rope_fusion"}

# What Megatron-LM's arguments.py sets when a flag is absent (for the fields a reader needs).
_DEFAULTS = dict(
    group_query_attention=False, num_query_groups=1, kv_channels=None, ffn_hidden_size=None,
    max_position_embeddings=None, position_embedding_type="learned_absolute", rotary_base=10000,
    rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=False,
    normalization="LayerNorm", norm_epsilon=1e-5, apply_layernorm_1p=False, qk_layernorm=False,
    swiglu=False, add_bias_linear=True, add_qkv_bias=False,
    untie_embeddings_and_output_weights=False, make_vocab_size_divisible_by=128,
    tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
    virtual_pipeline_model_parallel_size=None, num_experts=None, multi_latent_attention=False,
    ckpt_format="torch_dist", transformer_impl="local", bf16=False, fp16=False,
    tokenizer_type=None, tokenizer_model=None,
)


def iteration_dir_name(iteration: int) -> str:
    """Megatron-LM's per-iteration directory name (``iter_0000020``)."""
    return f"iter_{int(iteration):07d}"


def legacy_rank_dir_name(tp_rank: int, pp_rank: int, pipeline_parallel: int) -> str:
    """``mp_rank_01`` (no pipeline parallelism) or ``mp_rank_01_002``, as Megatron-LM names them."""
    return f"mp_rank_{tp_rank:02d}" if pipeline_parallel == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def _typed(value):
    """A flag value parsed from a launch script is a string: restore numbers."""
    if not isinstance(value, str):
        return value
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def megatron_args_namespace(flags: dict, vocab_size: int, **overrides) -> argparse.Namespace:
    """The ``args`` Namespace Megatron-LM's arguments.py builds for these launch flags.

    ``--num-layers 16`` becomes ``num_layers=16``, bare switches ``True``; absent fields take
    Megatron-LM's defaults, and the derived ones (``kv_channels``, ``padded_vocab_size``, ...)
    are filled in the way Megatron-LM fills them. ``overrides`` replace any field.
    """
    import torch

    values = dict(_DEFAULTS)
    for flag, value in flags.items():
        if flag in _STORE_FALSE:
            values[_STORE_FALSE[flag]] = not value
        else:
            values[flag.lstrip("-").replace("-", "_")] = _typed(value)
    values.update(overrides)
    if values["kv_channels"] is None:
        values["kv_channels"] = values["hidden_size"] // values["num_attention_heads"]
    if values["max_position_embeddings"] is None:
        values["max_position_embeddings"] = values.get("seq_length")
    if values["ffn_hidden_size"] is None:
        hidden = values["hidden_size"]
        values["ffn_hidden_size"] = int(4 * hidden * 2 / 3 / 64) * 64 if values["swiglu"] else 4 * hidden
    values.setdefault("padded_vocab_size", padded_vocab_size(
        vocab_size, int(values["make_vocab_size_divisible_by"]),
        int(values["tensor_model_parallel_size"])))
    values["params_dtype"] = (torch.bfloat16 if values["bf16"] else
                              torch.float16 if values["fp16"] else torch.float32)
    return argparse.Namespace(**values)


def _check_args_match_world(args: argparse.Namespace) -> None:
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) != (tp, pp):
        raise ValueError(f"args say TP={args.tensor_model_parallel_size} PP="
                         f"{args.pipeline_model_parallel_size} but the model runs with TP={tp} PP={pp}")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _write_iteration(ckpt_dir: str | Path, iteration: int, write_into) -> Path:
    """Run ``write_into(tmp_dir)`` on every rank, then publish ``iter_XXXXXXX`` and the tracker."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / iteration_dir_name(iteration)
    tmp = ckpt_dir / f".tmp-{final.name}"  # one name every rank agrees on
    if _is_rank_zero():
        shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a killed run
        tmp.mkdir(parents=True)
    _barrier()
    write_into(tmp)
    _barrier()
    if _is_rank_zero():
        if final.exists():  # Megatron-LM overwrites a checkpoint of the same iteration
            shutil.rmtree(final)
        tmp.rename(final)
        write_text_atomic(ckpt_dir / TRACKER_FILE, str(int(iteration)))
    _barrier()
    return final


def _fork_results_queue() -> None:
    """Let the torch_dist writer run from any script, with or without a ``__main__`` guard.

    megatron-core's writer collects its results through a queue served by a ``spawn``-context
    ``Manager`` process, which re-imports the caller's main module (a plain script without the
    guard then fails). It creates that queue only when its module-level ``_results_queue`` is
    unset; a ``fork``-context Manager queue put there serves the same purpose without re-import.
    """
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()


def save_megatron_checkpoint(model, args: argparse.Namespace, ckpt_dir: str | Path,
                             iteration: int) -> Path:
    """Save ``model`` (a megatron-core GPTModel) in the torch_dist format; returns the iter dir.

    Tensors are stored globally (one logical tensor per weight, layers stacked), so the
    checkpoint can be read back at any TP/PP. Call on every rank, inside megatron_on_cpu.
    """
    from megatron.core import dist_checkpointing

    _check_args_match_world(args)
    _fork_results_queue()
    args = argparse.Namespace(**{**vars(args), "ckpt_format": "torch_dist"})

    def write_into(tmp: Path) -> None:
        state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION,
                 "iteration": int(iteration), "model": model.sharded_state_dict()}
        dist_checkpointing.save(state, str(tmp))

    return _write_iteration(ckpt_dir, iteration, write_into)


def save_legacy_checkpoint(model, args: argparse.Namespace, ckpt_dir: str | Path,
                           iteration: int) -> Path:
    """Save ``model`` in the legacy ``torch`` format (one file per TP/PP rank); returns the iter dir.

    Each file holds that rank's shard (``state_dict_for_save_checkpoint``), with its layers
    numbered from 0 within its pipeline stage, as Megatron-LM writes them. Data-parallel
    replicas other than the first write nothing.
    """
    import torch
    from megatron.core import parallel_state

    _check_args_match_world(args)
    args = argparse.Namespace(**{**vars(args), "ckpt_format": "torch"})
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    writes = parallel_state.get_data_parallel_rank() == 0

    def write_into(tmp: Path) -> None:
        if not writes:
            return
        rank_dir = tmp / legacy_rank_dir_name(tp_rank, pp_rank, args.pipeline_model_parallel_size)
        rank_dir.mkdir()
        state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION,
                 "iteration": int(iteration), "model": model.state_dict_for_save_checkpoint()}
        torch.save(state, rank_dir / LEGACY_FILE)

    return _write_iteration(ckpt_dir, iteration, write_into)


# ---------------------------------------------------------------- reading the legacy layout

def read_legacy_checkpoint(iter_dir: Path):
    """``(args, iteration, load_tensors)`` of a legacy ``mp_rank_XX[_YYY]`` iteration.

    The rank files are memory-mapped; ``load_tensors()`` merges their shards into one model.
    """
    import torch

    files = {}
    for d in iter_dir.iterdir():
        match = RANK_DIR.fullmatch(d.name)
        if match and (d / LEGACY_FILE).is_file():
            files[(int(match.group(1)), int(match.group(2) or 0))] = d / LEGACY_FILE
    tp = 1 + max(t for t, _ in files)
    pp = 1 + max(p for _, p in files)
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in files]
    if missing:
        raise UserError(f"{iter_dir} lacks the files of TP/PP ranks {missing[:4]}")
    # weights_only=False: the files hold Megatron-LM's argparse.Namespace of arguments, which the
    # weights-only unpickler refuses. Only load checkpoints you trust.
    states = {rank: torch.load(f, map_location="cpu", weights_only=False, mmap=True)
              for rank, f in sorted(files.items())}
    first = states[(0, 0)]
    args = first.get("args")
    if args is None:
        raise UserError(f"{files[(0, 0)]} has no Megatron-LM args")
    saved = (getattr(args, "tensor_model_parallel_size", 1), getattr(args, "pipeline_model_parallel_size", 1))
    if saved != (tp, pp):
        raise UserError(f"{iter_dir} has files for TP={tp} PP={pp} but its args say TP={saved[0]} PP={saved[1]}")
    if "model" not in first:
        raise UserError(f"{files[(0, 0)]} has no 'model' (keys: {sorted(first)[:6]}); virtual "
                        "pipeline checkpoints (model0, model1, ...) are not supported")
    shards = {rank: state["model"] for rank, state in states.items()}
    return args, first.get("iteration"), lambda: merge_legacy_ranks(shards, tp, pp)


def _merge_tensor_parallel(key: str, shards: list):
    """One tensor from its TP shards (legacy files store each rank's slice)."""
    import torch

    if len(shards) == 1:
        return shards[0]
    if key.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight")):
        return torch.cat(shards, dim=0)  # column-parallel (vocab rows, whole query groups)
    if key.endswith("linear_fc1.weight"):  # each rank holds [gate shard; up shard]
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return torch.cat(shards, dim=1)  # row-parallel
    if "layernorm" in key or key.endswith("layer_norm_weight"):
        return shards[0]  # replicated
    raise UserError(f"unsupported tensor {key}: cannot merge its tensor-parallel shards")


def merge_legacy_ranks(shards: dict, tp: int, pp: int) -> dict:
    """``{(tp_rank, pp_rank): model state dict}`` -> one state dict, layers numbered globally."""
    import torch

    merged, offset = {}, 0
    for stage in range(pp):
        layers_here = 0
        for key, value in shards[(0, stage)].items():
            if not torch.is_tensor(value) or key.endswith("_extra_state"):
                continue
            tensor = _merge_tensor_parallel(key, [shards[(t, stage)][key] for t in range(tp)])
            match = _LAYER_KEY.fullmatch(key)
            if match:  # stage-local layer number -> global
                layers_here = max(layers_here, int(match.group(1)) + 1)
                key = f"decoder.layers.{offset + int(match.group(1))}.{match.group(2)}"
            merged.setdefault(key, tensor)  # embeddings from the first stage
        offset += layers_here
    return merged
