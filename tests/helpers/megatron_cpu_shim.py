"""Test helper kept for existing imports: the CPU shim now lives in the library.

See :mod:`spokes_lightning.megatron.runtime` for what running megatron-core on CPU needs.
"""
from __future__ import annotations

from spokes_lightning.megatron.runtime import megatron_on_cpu

__all__ = ["megatron_on_cpu"]
