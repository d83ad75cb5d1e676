"""Quality source ``dclm_labels`` (offline default): a classifier trained on the DCLM human labels.

It scores the ``embeddings`` store (so it runs after that family); the classifier and its
cross-validation metrics are kept in ``<run_dir>/quality_model``.
"""
from __future__ import annotations

import numpy as np

from ..registry import QualitySource, register


@register
class DclmLabelQuality(QualitySource):
    name = "quality_dclm_labels"
    source = "dclm_labels"
    computes = "quality = P(high quality) of a classifier trained on the DCLM human labels over embeddings"
    order = 320

    def settings(self, cfg) -> dict:
        return {"quality": cfg.quality, "embeddings": cfg.embeddings, "seed": cfg.seed}

    def scores(self, ctx, pool):
        from ...corpus import load_quality_labels
        from ...pipeline.stage import log
        from ..embeddings import EmbeddingModule, embed_texts
        from ..quality import train_quality_classifier
        from ..store import open_feature_store

        embedder = EmbeddingModule(ctx.cfg.embeddings.model)
        classifier, metrics = train_quality_classifier(
            load_quality_labels(), lambda texts: embed_texts(texts, embedder), ctx.run_dir / "quality_model",
            seed=int(ctx.cfg.seed))
        emb = open_feature_store(ctx.run_dir / "features" / "embeddings")
        by_id = dict(zip(emb.ids, classifier.score(np.asarray(emb.matrix, dtype=np.float32))))
        info = {"quality_classifier": {k: metrics[k] for k in ("chosen", "heldout_accuracy",
                                                               "majority_baseline_accuracy", "n_labels")}}
        log(f"quality: {metrics['chosen']} on DCLM human labels, held-out accuracy {metrics['heldout_accuracy']:.3f} "
            f"(majority baseline {metrics['majority_baseline_accuracy']:.3f})")
        return np.array([by_id.get(d.id, np.nan) for d in pool]), info
