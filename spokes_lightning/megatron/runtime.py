"""Run megatron-core's GPT model (and its checkpointing) on CPU, in one process or under torchrun.

megatron-core is written for CUDA; building, running and checkpointing its ``GPTModel`` on a
CPU-only machine needs exactly these things, each set up by :func:`megatron_on_cpu`:

1. ``torch.distributed`` initialised: an existing process group (gloo ranks under torchrun,
   a Lightning DDP group) is used as is; otherwise a gloo world of 1 over an in-memory
   ``HashStore`` is created (no ports, no environment variables left behind).
2. ``parallel_state.initialize_model_parallel(TP, PP)``: the layers query their
   tensor-parallel group even when it has one member.
3. ``torch.cuda.current_device`` returns ``"cpu"`` inside the block: the RoPE module moves its
   frequency table there before every forward pass, and distributed checkpointing allocates
   small agreement tensors there; on a CPU-only torch build the real call raises "Torch not
   compiled with CUDA enabled" (and on a GPU machine it would move them off the CPU model).
   ``torch.cuda.synchronize`` (called around checkpoint writes) is a no-op there too.
4. megatron's RNG tracker in its CUDA-free mode (``initialize_rng_tracker(
   inference_rng_tracker=True)``, a real megatron-core option): attention forks a CUDA RNG
   state for dropout. With dropout 0 (the LLaMA settings) that fork has no effect.

Also pass an explicit causal ``attention_mask`` to the model (the GPTDataset builds one with
``create_attention_mask=True``): megatron's fallback mask is allocated with ``device="cuda"``.
"""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def megatron_on_cpu(tensor_parallel: int = 1, pipeline_parallel: int = 1):
    """Set up (and afterwards tear down) a CPU megatron-core environment with the given TP/PP.

    The world size must be a multiple of ``tensor_parallel * pipeline_parallel`` (the rest is
    data parallel). Only what this call set up is torn down: a process group that existed
    before is left running.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    with ensure_process_group():
        world = dist.get_world_size()
        if world % (tensor_parallel * pipeline_parallel):
            raise ValueError(f"world size {world} is not a multiple of TP {tensor_parallel} x PP "
                             f"{pipeline_parallel}")
        with _cuda_calls_on_cpu():
            try:
                parallel_state.initialize_model_parallel(  # (2)
                    tensor_model_parallel_size=tensor_parallel,
                    pipeline_model_parallel_size=pipeline_parallel,
                )
                initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)  # (4)
                yield
            finally:
                parallel_state.destroy_model_parallel()
                initialize_rng_tracker(force_reset=True)


@contextmanager
def ensure_process_group():
    """The existing ``torch.distributed`` group, or a gloo world of 1 for the block (1)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    # An in-memory store: no ports, no environment variables left behind.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextmanager
def _cuda_calls_on_cpu():
    """(3): ``torch.cuda.current_device()`` answers ``"cpu"``; ``synchronize`` does nothing."""
    import torch

    original_current_device = torch.cuda.current_device
    original_synchronize = torch.cuda.synchronize
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    try:
        yield
    finally:
        torch.cuda.current_device = original_current_device
        torch.cuda.synchronize = original_synchronize


def build_cpu_gpt_model(flags: dict, vocab_size: int, *, parallel_output: bool = True):
    """A float32 megatron-core ``GPTModel`` (local layer spec) for the flags, inside megatron_on_cpu.

    The architecture is :func:`~spokes_lightning.megatron.launch_script.gpt_model_settings` of the
    ``megatron_llama_args`` flags; the vocabulary is padded the way Megatron-LM pads it for the
    current tensor-parallel size. Each pipeline stage builds its own layers. Weights come from
    the global torch RNG (identical full weights on every rank for the same seed).
    """
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from spokes_lightning.megatron.launch_script import gpt_model_settings, padded_vocab_size

    config_kwargs, model_kwargs = gpt_model_settings(flags, vocab_size)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model_kwargs["vocab_size"] = padded_vocab_size(
        vocab_size, int(flags.get("--make-vocab-size-divisible-by", 128)), tp)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = TransformerConfig(**config_kwargs, tensor_model_parallel_size=tp,
                               pipeline_model_parallel_size=pp, use_cpu_initialization=True,
                               params_dtype=torch.float32, pipeline_dtype=torch.float32)
    spec = get_gpt_layer_local_spec(normalization=config_kwargs["normalization"])
    return GPTModel(config=config, transformer_layer_spec=spec, parallel_output=parallel_output,
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(), **model_kwargs)
