"""TEST-ONLY: run megatron-core's GPT model on a CPU-only machine (one process, gloo).

Not part of the library. megatron-core is written for CUDA; building and training its
``GPTModel`` on CPU needs exactly three things, each explained below:

1. ``torch.distributed`` initialised (gloo backend, world size 1) and
   ``parallel_state.initialize_model_parallel()`` (TP = PP = 1): the layers query their
   tensor-parallel group even when it has one member.
2. ``torch.cuda.current_device`` returns ``"cpu"``: the RoPE module moves its frequency table
   to ``torch.cuda.current_device()`` before every forward pass; on a CPU-only torch build
   that call raises "Torch not compiled with CUDA enabled".
3. megatron's RNG tracker in its CUDA-free mode (``initialize_rng_tracker(
   inference_rng_tracker=True)``, a real megatron-core option): attention forks a CUDA RNG
   state for dropout. With dropout 0 (the LLaMA settings) that fork has no effect, and the
   CUDA-free tracker makes it a no-op instead of touching CUDA generator state.

Also, pass an explicit causal ``attention_mask`` (the GPTDataset builds one with
``create_attention_mask=True``): megatron's fallback mask is allocated with ``device="cuda"``.
"""
from __future__ import annotations

from contextlib import contextmanager

@contextmanager
def megatron_on_cpu():
    """Set up (and afterwards tear down) a single-process CPU megatron-core environment."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    original_current_device = torch.cuda.current_device
    started_here = not dist.is_initialized()
    if started_here:
        # An in-memory store: no ports, no environment variables left behind.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.cuda.current_device = lambda: "cpu"  # (2) see module docstring
    try:
        parallel_state.initialize_model_parallel()  # (1)
        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)  # (3)
        yield
    finally:
        torch.cuda.current_device = original_current_device
        parallel_state.destroy_model_parallel()
        initialize_rng_tracker(force_reset=True)
        if started_here:
            dist.destroy_process_group()
