"""Gradient sketches of candidate documents under the model being trained (it is its own proxy).

:class:`LiveGradientSketcher` runs the toolkit's per-document gradient sketch
(:class:`spokes_lightning.features.gradients.ProxyGradients`: last ``n_layers`` blocks + head,
Kronecker + Rademacher projection to ``k``, paper sections 3.1 eq. 3-4 and 4.1-4.2) on the live,
UNWRAPPED model. It takes gradients of activations only (``torch.autograd.grad``), so parameters'
``.grad``, the optimizer and DDP's reducer are never touched; the model's ``requires_grad`` flags
and train/eval mode are put back after every call.

Ranks split a window into fixed chunks of ``batch_size`` documents, chunk ``c`` on rank
``c % world``, and gather the rows in chunk order: a document's row is computed in the same batch
at any world size, so the window's rows are the same bits on 1 or N ranks (given the same weights).
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from spokes_lightning.core import distributed as D


@contextmanager
def training_state_kept(model: nn.Module):
    """Restore every parameter's ``requires_grad`` and the model's train/eval mode on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.train(mode)


class LiveGradientSketcher:
    """``sketch(ids, texts)`` -> (ids kept, float32 rows [n, k]) under the model's current weights."""

    def __init__(self, model: nn.Module, tokenizer, *, n_layers: int = 2, k: int = 512, seed: int = 0,
                 max_length: int = 128, batch_size: int = 16):
        from spokes_lightning.features.gradients import ProxyGradients

        self.model, self.batch_size = model, int(batch_size)
        with training_state_kept(model):
            self.module = ProxyGradients(model, tokenizer, n_layers=n_layers, k=k, seed=seed,
                                              max_length=max_length, dtype="float32")
        self.settings = {"n_layers": int(n_layers), "k": int(k), "seed": int(seed), "max_length": int(max_length),
                         "batch_size": self.batch_size}

    def sketch(self, ids: list[str], texts: list[str]) -> tuple[list[str], np.ndarray]:
        rank, world = D.world()
        mine = []
        device = next(self.model.parameters()).device
        with training_state_kept(self.model):
            self.module._select_parameters()
            self.model.eval()
            self.module.to(device)
            for c, start in enumerate(range(0, len(ids), self.batch_size)):
                if c % world == rank:
                    out = self.module.rows_for(ids[start : start + self.batch_size],
                                               texts[start : start + self.batch_size])
                    rows = np.zeros((0, self.module.feature_dim), np.float32) if out["rows"] is None \
                        else out["rows"].cpu().numpy().astype(np.float32)
                    mine.append((c, out["ids"], rows))
        parts = sorted((p for rank_parts in D.all_gather_objects(mine) for p in rank_parts), key=lambda p: p[0])
        kept = [i for _, chunk_ids, _ in parts for i in chunk_ids]
        rows = np.concatenate([r for _, _, r in parts]) if parts else np.zeros((0, self.module.feature_dim), np.float32)
        return kept, rows
