"""The quality scorers as feature modules for the extraction runner
(:func:`spokes_lightning.features.extract.extract_features`): one 1-d row per document.

* :class:`ClassifierQualityModule`: the regression logit of a Hugging Face sequence classifier
  (e.g. the FineWeb-Edu classifier, the paper's quality filter, section 5.2);
* :class:`EmbeddingQualityModule`: a classifier trained on the DCLM human labels
  (:func:`~spokes_lightning.features.quality.train_quality_classifier`) over sentence embeddings.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from spokes_lightning.features.quality import DEFAULT_CLASSIFIER, load_quality_classifier, load_sequence_classifier


class ClassifierQualityModule(pl.LightningModule):
    """Feature module: the regression logit of a HF classifier as a 1-d quality row.

    For the FineWeb-Edu classifier the logit is on its 0-5 educational-value scale; it is
    clipped at ``min_score`` (default 0) so that ln Q is defined.
    """

    feature_dtype = "float32"

    def __init__(self, model: str | os.PathLike = DEFAULT_CLASSIFIER, max_length: int = 512,
                 min_score: float = 0.0):
        super().__init__()
        self.model_name = str(model)
        self.classifier, self.tokenizer = load_sequence_classifier(model)
        self.max_length = int(max_length)
        self.min_score = float(min_score)

    @property
    def feature_dim(self) -> int:
        return 1

    def manifest(self) -> dict[str, Any]:
        return {"feature": "quality", "source": "hf_classifier", "model": self.model_name,
                "max_length": self.max_length, "min_score": self.min_score}

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        ids, texts = list(batch["ids"]), list(batch["texts"])
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
        logits = self.classifier(**encoded).logits.float()
        return {"ids": ids, "rows": logits[:, :1].clamp_min(self.min_score), "skipped": {}}


class EmbeddingQualityModule(pl.LightningModule):
    """Feature module: embed each document, then score it with a :class:`QualityClassifier`."""

    feature_dtype = "float32"

    def __init__(self, classifier_dir: str | os.PathLike, embedding_model: str | None = None,
                 max_length: int = 256):
        super().__init__()
        from spokes_lightning.features.embeddings import EmbeddingModule

        self.classifier_dir = Path(classifier_dir)
        self.classifier, self.metrics = load_quality_classifier(self.classifier_dir)
        self.embedder = EmbeddingModule(embedding_model, max_length=max_length)

    @property
    def feature_dim(self) -> int:
        return 1

    def manifest(self) -> dict[str, Any]:
        return {"feature": "quality", "source": "trained_classifier",
                "classifier": self.metrics.get("chosen"), "labels_sha256": self.metrics.get("labels_sha256"),
                "classifier_seed": self.metrics.get("seed"), "embedding": self.embedder.manifest()}

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        ids, texts = list(batch["ids"]), list(batch["texts"])
        embeddings = self.embedder.embed(texts).cpu().numpy()
        scores = self.classifier.score(embeddings)
        return {"ids": ids, "rows": torch.from_numpy(scores.astype(np.float32)).view(-1, 1), "skipped": {}}
