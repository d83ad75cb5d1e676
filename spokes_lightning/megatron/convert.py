"""Convert a Megatron-LM GPT checkpoint (LLaMA architecture) into a Hugging Face model directory.

    convert_megatron_checkpoint(CKPT_DIR, TOKENIZER_DIR, OUT_DIR) -> summary dict

``CKPT_DIR`` is Megatron-LM's ``--save`` directory (the iteration is read from
``latest_checkpointed_iteration.txt`` unless one is given) or one ``iter_XXXXXXX`` directory,
in either checkpoint format:

* ``torch_dist`` (``metadata.json`` + ``*.distcp``): read with megatron-core's own
  ``dist_checkpointing``; the stored tensors are global, whatever TP/PP saved them.
* legacy ``torch`` (``mp_rank_XX[_YYY]/model_optim_rng.pt``): the tensor-parallel shards of
  each pipeline stage are merged, and the stages' layers renumbered into one stack.

``OUT_DIR`` becomes a ``LlamaForCausalLM`` (safetensors) with the tokenizer beside it, so
``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` and ``AutoTokenizer.from_pretrained(OUT_DIR)``
load it as is. It is built in a temporary directory and renamed at the end: bad input raises
:class:`~spokes_lightning.utils.errors.UserError` (one line) and writes nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

from spokes_lightning.utils.errors import UserError
from spokes_lightning.megatron.checkpoint import (LEGACY_FILE, RANK_DIR, TRACKER_FILE, iteration_dir_name,
                                  read_legacy_checkpoint)

PROVENANCE_FILE = "megatron_source.json"
# The weights of one megatron-core transformer layer (local or Transformer Engine names).
_LAYER_PARTS = {
    "self_attention.linear_qkv.weight": "qkv",
    "self_attention.linear_proj.weight": "proj",
    "mlp.linear_fc1.weight": "fc1",
    "mlp.linear_fc2.weight": "fc2",
    "input_layernorm.weight": "input_norm",
    "self_attention.linear_qkv.layer_norm_weight": "input_norm",  # TE-fused norm
    "pre_mlp_layernorm.weight": "mlp_norm",
    "mlp.linear_fc1.layer_norm_weight": "mlp_norm",  # TE-fused norm
}
_TOP_LEVEL = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight")


# ---------------------------------------------------------------- finding the checkpoint

def _iteration_format(path: Path) -> str | None:
    """'torch_dist' or 'torch' when ``path`` is one iteration of a Megatron checkpoint."""
    if (path / "metadata.json").is_file():
        return "torch_dist"
    if any(RANK_DIR.fullmatch(d.name) and (d / LEGACY_FILE).is_file() for d in path.iterdir()):
        return "torch"
    return None


def _what_is_there(path: Path) -> str:
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return f"{path} is empty"
    if "config.json" in entries and any(e.endswith((".safetensors", ".bin")) for e in entries):
        return (f"{path} holds a Hugging Face model (config.json + weights), not a Megatron "
                "checkpoint: use it directly")
    iters = [e for e in entries if re.fullmatch(r"iter_\d{7}", e)]
    if iters:
        return (f"{path} has {', '.join(iters[-3:])} but no {TRACKER_FILE}: pass --iteration N")
    shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
    return f"no Megatron checkpoint in {path} (found: {shown})"


def locate_checkpoint(path: str | os.PathLike, iteration: int | None = None) -> tuple[Path, str]:
    """``(iteration directory, format)`` of a ``--save`` directory or an ``iter_XXXXXXX`` one."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"Megatron checkpoint directory not found: {path}")
    fmt = _iteration_format(path)
    if fmt is not None:
        if iteration is not None and path.name != iteration_dir_name(iteration):
            raise UserError(f"{path} is one iteration ({path.name}); --iteration {iteration} "
                            "needs the --save directory above it")
        return path, fmt
    tracker = path / TRACKER_FILE
    if iteration is not None:
        name = iteration_dir_name(iteration)
    elif tracker.is_file():
        text = tracker.read_text().strip()
        if text != "release" and not text.isdigit():
            raise UserError(f"{tracker} should hold an iteration number, found {text[:40]!r}")
        name = "release" if text == "release" else iteration_dir_name(int(text))
    else:
        raise UserError(_what_is_there(path))
    chosen = path / name
    if not chosen.is_dir():
        raise UserError(f"{chosen} not found: {_what_is_there(path)}")
    fmt = _iteration_format(chosen)
    if fmt is None:
        raise UserError(f"{chosen} holds no Megatron checkpoint (no metadata.json and no "
                        f"mp_rank_*/{LEGACY_FILE}): {_what_is_there(chosen)}")
    return chosen, fmt


def is_megatron_checkpoint(path: str | os.PathLike) -> bool:
    """True for a Megatron-LM ``--save`` directory or one of its ``iter_XXXXXXX`` directories."""
    try:
        locate_checkpoint(path)
    except (UserError, OSError):
        return False
    return True


# ---------------------------------------------------------------- reading it

def read_dist_checkpoint(iter_dir: Path):
    """``(args, iteration, load_tensors)`` of a torch_dist iteration, via megatron-core.

    ``load_tensors()`` reads the model's global tensors only (optimizer state stays on disk).
    """
    common = _with_megatron_dist(lambda dc: dc.load_common_state_dict(str(iter_dir)))
    if "args" not in common:
        raise UserError(f"{iter_dir} is a distributed checkpoint without Megatron-LM args")

    def load_tensors(dc):
        metadata = dc.load_tensors_metadata(str(iter_dir))
        wanted = {k: v for k, v in metadata.items()
                  if k.split(".", 1)[0] in ("embedding", "decoder", "output_layer")}
        loaded = dc.load(wanted, str(iter_dir), validate_access_integrity=False)
        return {k: loaded[k] for k in wanted}

    return common["args"], common.get("iteration"), lambda: _with_megatron_dist(load_tensors)


def _with_megatron_dist(read):
    """``read(megatron.core.dist_checkpointing)`` with a process group (the loader asks for ranks)."""
    from spokes_lightning.megatron.runtime import ensure_process_group

    # megatron-core warns on import that Transformer Engine / Apex are absent (irrelevant here),
    # and about its own use of a deprecated torch API: keep stderr to what the user must read.
    with warnings.catch_warnings(), ensure_process_group():
        warnings.simplefilter("ignore")
        from megatron.core import dist_checkpointing

        return read(dist_checkpointing)


def model_tensors_by_layer(tensors: dict, num_layers: int) -> list[dict]:
    """Per-layer ``{qkv, proj, fc1, fc2, input_norm, mlp_norm}`` from per-layer or stacked keys.

    torch_dist checkpoints stack a weight over layers (``decoder.layers.mlp.linear_fc2.weight``
    of shape [layers, ...]); legacy ones name each layer (``decoder.layers.3.mlp...``).
    """
    layers = [{} for _ in range(num_layers)]
    for key, value in tensors.items():
        if key.endswith("_extra_state") or key in _TOP_LEVEL:
            continue
        if key.startswith("language_model."):
            raise UserError(f"pre-megatron-core checkpoint layout ({key}) is not supported")
        if not key.startswith("decoder.layers."):
            raise UserError(f"unsupported tensor {key} (not part of a LLaMA-architecture model)")
        rest = key[len("decoder.layers."):]
        index, _, part = rest.partition(".")
        if index.isdigit():
            items = [(int(index), part, value)]
        elif value.shape[0] == num_layers:
            items = [(i, rest, value[i]) for i in range(num_layers)]
        else:
            raise UserError(f"{key} stacks {value.shape[0]} layers but args say {num_layers}")
        for i, part, tensor in items:
            if part not in _LAYER_PARTS:
                raise UserError(f"unsupported tensor {key} (a bias, MoE or qk-norm weight is not "
                                "part of a LLaMA layer)")
            if i >= num_layers:
                raise UserError(f"{key} is beyond the {num_layers} layers the args declare")
            layers[i][_LAYER_PARTS[part]] = tensor
    for i, layer in enumerate(layers):
        missing = sorted(set(_LAYER_PARTS.values()) - set(layer))
        if missing:
            raise UserError(f"layer {i} of {num_layers} lacks its {', '.join(missing)} weights")
    return layers


# ---------------------------------------------------------------- checking and mapping

def check_llama_architecture(args) -> None:
    """Refuse what a ``LlamaForCausalLM`` cannot represent, naming it."""
    def arg(name, default=None):
        return getattr(args, name, default)

    problems = []
    if arg("num_experts"):
        problems.append(f"mixture of experts (num_experts={arg('num_experts')})")
    if arg("position_embedding_type", "learned_absolute") != "rope":
        problems.append(f"position_embedding_type={arg('position_embedding_type', 'learned_absolute')} (needs rope)")
    if float(arg("rotary_percent", 1.0)) != 1.0:
        problems.append(f"rotary_percent={arg('rotary_percent')} (needs 1.0)")
    for flag in ("rotary_interleaved", "qk_layernorm", "apply_layernorm_1p", "use_rope_scaling",
                 "multi_latent_attention", "add_qkv_bias"):
        if arg(flag, False):
            problems.append(f"{flag}=True")
    if arg("normalization", "LayerNorm") != "RMSNorm":
        problems.append(f"normalization={arg('normalization', 'LayerNorm')} (needs RMSNorm)")
    if not arg("swiglu", False):
        problems.append("an MLP without SwiGLU")
    if arg("add_bias_linear", True):
        problems.append("linear biases (add_bias_linear=True)")
    if problems:
        raise UserError("unsupported Megatron architecture for LlamaForCausalLM: " + "; ".join(problems))


def _query_groups(args) -> int:
    if getattr(args, "group_query_attention", False):
        return int(args.num_query_groups)
    return int(args.num_attention_heads)


def hf_llama_state_dict(args, tensors: dict, vocab_size: int) -> dict:
    """Megatron tensor names (merged over ranks) -> ``LlamaForCausalLM`` state dict."""
    import torch

    heads, groups = int(args.num_attention_heads), _query_groups(args)
    hidden = int(args.hidden_size)
    head_dim = int(getattr(args, "kv_channels", None) or hidden // heads)
    layers = model_tensors_by_layer(tensors, int(args.num_layers))
    embed = tensors.get("embedding.word_embeddings.weight")
    if embed is None or tensors.get("decoder.final_layernorm.weight") is None:
        raise UserError("checkpoint lacks the word embeddings or the final layer norm")
    if vocab_size > embed.shape[0]:
        raise UserError(f"the tokenizer has {vocab_size} tokens but the model's (padded) vocabulary "
                        f"has {embed.shape[0]} rows: wrong tokenizer?")
    out = {"model.embed_tokens.weight": embed[:vocab_size],
           "model.norm.weight": tensors["decoder.final_layernorm.weight"]}
    if getattr(args, "untie_embeddings_and_output_weights", False):
        if "output_layer.weight" not in tensors:
            raise UserError("args say untied embeddings but the checkpoint has no output_layer.weight")
        out["lm_head.weight"] = tensors["output_layer.weight"][:vocab_size]
    per_group = heads // groups
    for i, layer in enumerate(layers):
        qkv = layer["qkv"]
        if tuple(qkv.shape) != (groups * (per_group + 2) * head_dim, hidden):
            raise UserError(f"layer {i} linear_qkv has shape {tuple(qkv.shape)}, args expect "
                            f"{(groups * (per_group + 2) * head_dim, hidden)}")
        # Megatron packs q/k/v per query group: [q heads of the group, k, v] x groups.
        qkv = qkv.reshape(groups, per_group + 2, head_dim, hidden)
        fc1 = layer["fc1"]
        ffn = fc1.shape[0] // 2
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": qkv[:, :per_group].reshape(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": qkv[:, per_group].reshape(groups * head_dim, hidden),
            p + "self_attn.v_proj.weight": qkv[:, per_group + 1].reshape(groups * head_dim, hidden),
            p + "self_attn.o_proj.weight": layer["proj"],
            p + "mlp.gate_proj.weight": fc1[:ffn],  # SwiGLU: fc1 = [gate; up]
            p + "mlp.up_proj.weight": fc1[ffn:],
            p + "mlp.down_proj.weight": layer["fc2"],
            p + "input_layernorm.weight": layer["input_norm"],
            p + "post_attention_layernorm.weight": layer["mlp_norm"],
        })
    # Own, contiguous storage per tensor (safetensors refuses views into a shared buffer).
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}


def hf_llama_config(args, tokenizer, dtype):
    from transformers import LlamaConfig

    heads = int(args.num_attention_heads)
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=int(args.hidden_size),
        intermediate_size=int(args.ffn_hidden_size), num_hidden_layers=int(args.num_layers),
        num_attention_heads=heads, num_key_value_heads=_query_groups(args),
        head_dim=int(getattr(args, "kv_channels", None) or int(args.hidden_size) // heads),
        max_position_embeddings=int(getattr(args, "max_position_embeddings", None) or args.seq_length),
        rms_norm_eps=float(args.norm_epsilon), hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": float(getattr(args, "rotary_base", 10000))},
        attention_bias=False, mlp_bias=False,
        tie_word_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype=dtype,
    )


# ---------------------------------------------------------------- the conversion

def _load_tokenizer(tokenizer_dir, args):
    from transformers import AutoTokenizer

    if tokenizer_dir is None:
        tokenizer_dir = getattr(args, "tokenizer_model", None)
        if not tokenizer_dir or not Path(tokenizer_dir).is_dir():
            raise UserError("pass --tokenizer: the checkpoint's tokenizer_model "
                            f"({tokenizer_dir}) is not a local directory")
    if not Path(tokenizer_dir).is_dir():
        raise UserError(f"tokenizer directory not found: {tokenizer_dir}")
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # transformers raises many kinds for a dir that is no tokenizer
        raise UserError(f"cannot load a tokenizer from {tokenizer_dir}: {type(exc).__name__}: {exc}") from None


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty directory")


def _write_hf_dir(state_dict: dict, config, tokenizer, out: Path, provenance: dict) -> None:
    """save_pretrained into a temporary sibling of ``out``, then rename it into place."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):  # no random init: the weights are assigned below
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise RuntimeError(f"LlamaForCausalLM state dict mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            if out.exists():
                out.rmdir()  # empty when checked before the work; not if another process won
            tmp.rename(out)
        except OSError:
            raise UserError(f"--out {out} already exists and is not an empty directory") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def convert_megatron_checkpoint(ckpt_dir, tokenizer_dir, out_dir, iteration: int | None = None) -> dict:
    """Write ``out_dir`` as a Hugging Face ``LlamaForCausalLM`` + tokenizer; returns a summary.

    ``tokenizer_dir`` None uses the checkpoint's ``--tokenizer-model`` directory. The embedding
    rows Megatron added as vocabulary padding are cut to the tokenizer's size.
    """
    out = Path(out_dir)
    _check_out_dir(out)
    iter_dir, fmt = locate_checkpoint(ckpt_dir, iteration)
    read = read_dist_checkpoint if fmt == "torch_dist" else read_legacy_checkpoint
    args, stored_iteration, load_tensors = read(iter_dir)
    check_llama_architecture(args)  # the cheap checks first: no tensor data read yet
    tokenizer = _load_tokenizer(tokenizer_dir, args)
    padded = getattr(args, "padded_vocab_size", None)
    if padded and len(tokenizer) > padded:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model's (padded) "
                        f"vocabulary has {padded}: wrong tokenizer?")
    state_dict = hf_llama_state_dict(args, load_tensors(), len(tokenizer))
    dtype = state_dict["model.embed_tokens.weight"].dtype
    config = hf_llama_config(args, tokenizer, dtype)
    summary = {
        "out": str(out), "iteration": stored_iteration, "format": fmt,
        "layers": int(args.num_layers), "vocab": len(tokenizer),
        "tp": int(getattr(args, "tensor_model_parallel_size", 1)),
        "pp": int(getattr(args, "pipeline_model_parallel_size", 1)),
        "tied": bool(config.tie_word_embeddings), "dtype": str(dtype).removeprefix("torch."),
    }
    _write_hf_dir(state_dict, config, tokenizer, out, {**summary, "source": str(iter_dir.resolve())})
    return summary


def resolve_model_dir(path, tokenizer_dir=None, cache_dir=None) -> Path:
    """A Hugging Face model directory for ``path``: itself if it is one, else a converted copy.

    A Megatron checkpoint is converted once into ``cache_dir/iter_XXXXXXX`` (default: an ``hf``
    directory beside the iteration directories) and reused from there afterwards.
    """
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if not is_megatron_checkpoint(path):
        raise UserError(f"{path} is neither a Hugging Face model directory (config.json) nor a "
                        f"Megatron checkpoint: {_what_is_there(path) if path.is_dir() else 'not found'}")
    iter_dir, _ = locate_checkpoint(path)
    out = Path(cache_dir or iter_dir.parent / "hf") / iter_dir.name
    if not (out / "config.json").is_file():
        try:
            convert_megatron_checkpoint(iter_dir, tokenizer_dir, out)
        except UserError:
            if not (out / "config.json").is_file():  # not another rank that finished first
                raise
    return out
