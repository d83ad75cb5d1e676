"""Megatron-LM pretraining settings for the paper's LLaMA-1B runs, and the launch script.

Paper, Section 5.2-5.3: every selected subset is used to pretrain a LLaMA-1B architecture
from scratch with Megatron-LM on 100B tokens, constant learning rate 3e-4, global batch 2048
sequences of length 4096.

One function, :func:`megatron_llama_args`, turns those settings into the Megatron-LM command
line flags (an ordered ``{flag: value}`` dict). The launch script is rendered from that dict,
and :func:`gpt_model_settings` reads the SAME dict back into megatron-core
``TransformerConfig`` / ``GPTModel`` arguments, so a test can build the identical architecture
at a smaller size (same flags, smaller numbers) and really train it.

Shape (Llama-3.2-1B, ``meta-llama/Llama-3.2-1B/config.json``): 16 layers, hidden 2048, FFN 8192,
32 query heads with 8 KV heads (grouped-query attention), RoPE theta 500000, RMSNorm (eps 1e-5),
SwiGLU MLP, no linear biases, and input/output embeddings TIED (``tie_word_embeddings: true``),
so ``--untie-embeddings-and-output-weights`` is deliberately NOT passed. Llama-3.2's long-context
RoPE scaling (factor 32) is for 128k contexts; pretraining here uses 4096 tokens, so it is off.
"""
from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from spokes_lightning.utils.errors import UserError

PAPER_SEQ_LENGTH = 4096
PAPER_GLOBAL_BATCH = 2048
PAPER_TRAIN_TOKENS = 100_000_000_000
PAPER_LR = 3e-4

# Megatron flags the script lets the environment override (cluster-dependent, not paper settings).
ENV_OVERRIDABLE = {
    "--micro-batch-size": "MICRO_BATCH_SIZE",
    "--tensor-model-parallel-size": "TP_SIZE",
    "--pipeline-model-parallel-size": "PP_SIZE",
}


@dataclass(frozen=True)
class LlamaShape:
    """Transformer shape of a LLaMA-family decoder (what Megatron calls the 'network size')."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    rotary_base: int = 500_000
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = True

    def scaled(self, **changes) -> "LlamaShape":
        """The same architecture with smaller numbers (for tests / local runs)."""
        return replace(self, **changes)


LLAMA_3_2_1B = LlamaShape(
    num_layers=16,
    hidden_size=2048,
    ffn_hidden_size=8192,
    num_attention_heads=32,
    num_query_groups=8,
)


def train_iters_for(train_tokens: float, global_batch_size: int, seq_length: int) -> int:
    """Optimizer steps needed to see ``train_tokens`` tokens (Section 5.3: 100B tokens)."""
    if train_tokens <= 0 or global_batch_size <= 0 or seq_length <= 0:
        raise UserError("train tokens, global batch size and sequence length must be positive")
    return math.ceil(train_tokens / (global_batch_size * seq_length))


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tp_size: int = 1) -> int:
    """Vocabulary rounded up the way Megatron does (``--make-vocab-size-divisible-by``)."""
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def megatron_llama_args(
    *,
    data_prefix: str | Path,
    tokenizer_dir: str | Path,
    run_dir: str | Path,
    method: str,
    shape: LlamaShape = LLAMA_3_2_1B,
    seq_length: int = PAPER_SEQ_LENGTH,
    global_batch_size: int = PAPER_GLOBAL_BATCH,
    train_tokens: float = PAPER_TRAIN_TOKENS,
    lr: float = PAPER_LR,
    micro_batch_size: int = 4,
    seed: int = 1234,
    save_interval: int = 1000,
) -> dict[str, object]:
    """Megatron-LM ``pretrain_gpt.py`` flags for the paper's runs (Section 5.3).

    Values of ``True`` are bare switches; everything else is ``--flag value``. Paths are made
    absolute so the script works from any directory.
    """
    if shape.hidden_size % shape.num_attention_heads:
        raise UserError("hidden size must be divisible by the number of attention heads")
    if shape.num_attention_heads % shape.num_query_groups:
        raise UserError("attention heads must be divisible by the number of KV groups")
    run_dir = Path(run_dir).resolve()
    args: dict[str, object] = {
        # network size: LLaMA-3.2-1B shape
        "--num-layers": shape.num_layers,
        "--hidden-size": shape.hidden_size,
        "--ffn-hidden-size": shape.ffn_hidden_size,
        "--num-attention-heads": shape.num_attention_heads,
        "--group-query-attention": True,
        "--num-query-groups": shape.num_query_groups,
        "--seq-length": seq_length,
        "--max-position-embeddings": seq_length,
        "--position-embedding-type": "rope",
        "--rotary-base": shape.rotary_base,
        "--rotary-percent": 1.0,
        "--normalization": "RMSNorm",
        "--norm-epsilon": shape.norm_epsilon,
        "--swiglu": True,
        "--disable-bias-linear": True,
        "--attention-dropout": 0.0,
        "--hidden-dropout": 0.0,
        "--init-method-std": 0.02,
        "--make-vocab-size-divisible-by": 128,
        # optimisation: constant LR 3e-4, global batch 2048 x 4096 tokens, 100B tokens
        "--micro-batch-size": micro_batch_size,
        "--global-batch-size": global_batch_size,
        "--train-iters": train_iters_for(train_tokens, global_batch_size, seq_length),
        "--lr": lr,
        "--min-lr": lr,
        "--lr-decay-style": "constant",
        "--lr-warmup-iters": 0,
        "--optimizer": "adam",
        "--adam-beta1": 0.9,
        "--adam-beta2": 0.95,
        "--weight-decay": 0.1,
        "--clip-grad": 1.0,
        "--bf16": True,
        "--seed": seed,
        # parallelism (data parallel across nodes by default)
        "--tensor-model-parallel-size": 1,
        "--pipeline-model-parallel-size": 1,
        "--use-distributed-optimizer": True,
        # data + tokenizer
        "--data-path": str(Path(data_prefix).resolve()),
        "--split": "100,0,0",
        "--data-cache-path": str(run_dir / "megatron" / "cache"),
        "--tokenizer-type": "HuggingFaceTokenizer",
        "--tokenizer-model": str(Path(tokenizer_dir).resolve()),
        # checkpoints + logs
        "--save": str(run_dir / "megatron" / "checkpoints" / method),
        "--load": str(run_dir / "megatron" / "checkpoints" / method),
        "--save-interval": save_interval,
        "--log-interval": 10,
        "--eval-iters": 0,
        "--tensorboard-dir": str(run_dir / "megatron" / "tensorboard" / method),
    }
    if not shape.tie_embeddings:
        args["--untie-embeddings-and-output-weights"] = True
    return args


def _flag_value(args: dict[str, object], flag: str, default=None):
    return args.get(flag, default)


def gpt_model_settings(args: dict[str, object], vocab_size: int) -> tuple[dict, dict]:
    """Read Megatron flags back into ``(TransformerConfig kwargs, GPTModel kwargs)``.

    Mirrors how Megatron-LM's ``pretrain_gpt.py`` maps these flags onto megatron-core, so a
    model built from the result has the architecture the launch script trains.
    """
    import torch.nn.functional as F

    if _flag_value(args, "--normalization") != "RMSNorm" or not args.get("--swiglu"):
        raise UserError("expected LLaMA flags (--normalization RMSNorm --swiglu)")
    groups = args["--num-query-groups"] if args.get("--group-query-attention") else None
    config = dict(
        num_layers=int(args["--num-layers"]),
        hidden_size=int(args["--hidden-size"]),
        ffn_hidden_size=int(args["--ffn-hidden-size"]),
        num_attention_heads=int(args["--num-attention-heads"]),
        num_query_groups=None if groups is None else int(groups),
        normalization="RMSNorm",
        layernorm_epsilon=float(args["--norm-epsilon"]),
        gated_linear_unit=True,  # --swiglu
        activation_func=F.silu,  # --swiglu
        add_bias_linear=not args.get("--disable-bias-linear", False),
        hidden_dropout=float(args["--hidden-dropout"]),
        attention_dropout=float(args["--attention-dropout"]),
        init_method_std=float(args["--init-method-std"]),
    )
    model = dict(
        vocab_size=padded_vocab_size(vocab_size, int(args["--make-vocab-size-divisible-by"])),
        max_sequence_length=int(args["--max-position-embeddings"]),
        position_embedding_type=str(args["--position-embedding-type"]),
        rotary_percent=float(args["--rotary-percent"]),
        rotary_base=int(args["--rotary-base"]),
        share_embeddings_and_output_weights=not args.get(
            "--untie-embeddings-and-output-weights", False
        ),
    )
    return config, model


def _render_value(flag: str, value: object) -> str:
    text = shlex.quote(str(value))
    env = ENV_OVERRIDABLE.get(flag)
    return f'"${{{env}:-{value}}}"' if env else text


def render_launch_script(args: dict[str, object], *, method: str, shape: LlamaShape) -> str:
    """A bash script running Megatron-LM ``pretrain_gpt.py`` under torchrun on N nodes.

    Cluster layout comes from the environment (defaults in brackets): ``NNODES`` [1],
    ``NODE_RANK`` [0], ``GPUS_PER_NODE`` [8], ``MASTER_ADDR`` [localhost], ``MASTER_PORT``
    [6000]; ``MEGATRON_LM_DIR`` must point at a Megatron-LM checkout.
    """
    lines = []
    for flag, value in args.items():
        if value is True:
            lines.append(f"  {flag}")
        elif value is not False and value is not None:
            lines.append(f"  {flag} {_render_value(flag, value)}")
    body = " \\\n".join(lines)
    shape_text = ", ".join(f"{k}={v}" for k, v in asdict(shape).items())
    return f"""#!/usr/bin/env bash
# Megatron-LM pretraining of a LLaMA-architecture model on the '{method}' selection.
# Generated by spokes_lightning.megatron.export (settings: spokes paper, Section 5.3):
#   constant LR {args['--lr']}, global batch {args['--global-batch-size']} x seq length \
{args['--seq-length']}, {args['--train-iters']} iterations.
#   shape: {shape_text}
# Multi-node: run this script once per node with NODE_RANK=0..NNODES-1 and the same MASTER_ADDR.
set -euo pipefail
: "${{MEGATRON_LM_DIR:?set MEGATRON_LM_DIR to a Megatron-LM checkout (contains pretrain_gpt.py)}}"
NNODES="${{NNODES:-1}}"
NODE_RANK="${{NODE_RANK:-0}}"
GPUS_PER_NODE="${{GPUS_PER_NODE:-8}}"
MASTER_ADDR="${{MASTER_ADDR:-localhost}}"
MASTER_PORT="${{MASTER_PORT:-6000}}"
export CUDA_DEVICE_MAX_CONNECTIONS=1

torchrun \\
  --nproc_per_node "$GPUS_PER_NODE" \\
  --nnodes "$NNODES" \\
  --node_rank "$NODE_RANK" \\
  --master_addr "$MASTER_ADDR" \\
  --master_port "$MASTER_PORT" \\
  "$MEGATRON_LM_DIR/pretrain_gpt.py" \\
{body} \\
  "$@"
"""


def parse_launch_script_flags(script: str) -> dict[str, object]:
    """Recover the ``pretrain_gpt.py`` flags from a rendered script (used to check round trips)."""
    command = script.split('"$MEGATRON_LM_DIR/pretrain_gpt.py"', 1)[1]
    tokens = shlex.split(command.replace("\\\n", " "), posix=True)
    flags: dict[str, object] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt is None or nxt.startswith("--") or nxt == "$@":
                flags[tok] = True
                i += 1
            else:
                flags[tok] = nxt
                i += 2
        else:
            i += 1
    return flags
