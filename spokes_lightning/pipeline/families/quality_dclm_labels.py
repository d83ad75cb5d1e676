"""Quality source ``dclm_labels`` (offline default): a classifier trained on the DCLM human labels.

It scores the ``embeddings`` store (so it runs after that family; an imported one when
``embeddings.store`` is set, whose rows must then come from ``embeddings.model``: a width that
differs from the classifier's is one line); the classifier and its cross-validation metrics are
kept in ``<run_dir>/quality_model``, and in the machine cache (``cache_dir``), so the next run on
the same labels copies it instead of embedding 499 labelled documents again.
"""
from __future__ import annotations

import numpy as np

from spokes_lightning.utils.errors import UserError
from spokes_lightning.pipeline.feature_registry import QualitySource, drop_null_store, register


@register
class DclmLabelQuality(QualitySource):
    name = "quality_dclm_labels"
    source = "dclm_labels"
    computes = "quality = P(high quality) of a classifier trained on the DCLM human labels over embeddings"
    order = 320
    reads = ("embeddings",)  # it scores the embeddings store

    def settings(self, cfg) -> dict:
        return {"quality": cfg.quality, "embeddings": drop_null_store(cfg.embeddings), "seed": cfg.seed}

    def scores(self, ctx, pool):
        from spokes_lightning.data.corpus import load_quality_labels
        from spokes_lightning.pipeline.stage import log
        from spokes_lightning.features.embeddings import EmbeddingModule, embed_texts
        from spokes_lightning.features.quality import train_quality_classifier
        from spokes_lightning.features.store import open_feature_store
        from spokes_lightning.pipeline.families.embeddings import embeddings_store_path
        from spokes_lightning.utils.machine_cache import machine_cache

        embedder = EmbeddingModule(ctx.cfg.embeddings.model, max_length=int(ctx.cfg.embeddings.get("max_length", 256)))
        classifier, metrics = train_quality_classifier(
            load_quality_labels(), lambda texts: embed_texts(texts, embedder), ctx.run_dir / "quality_model",
            seed=int(ctx.cfg.seed), embedding_model=embedder.model_name,  # both part of the classifier's identity
            embedding_max_length=embedder.max_length,
            shared_cache=machine_cache(ctx.cfg, "quality_classifier"))
        emb = open_feature_store(embeddings_store_path(ctx))
        width = getattr(classifier.estimator, "n_features_in_", None)
        if width is not None and width != emb.matrix.shape[1]:
            raise UserError(f"quality.source=dclm_labels: the classifier reads {width}-d embeddings of "
                            f"{ctx.cfg.embeddings.model or 'the default embedding model'}, but the embeddings store "
                            f"{emb.path} has {emb.matrix.shape[1]} columns; use quality.source=column or classifier")
        by_id = dict(zip(emb.ids, classifier.score(np.asarray(emb.matrix, dtype=np.float32))))
        info = {"quality_classifier": {k: metrics[k] for k in ("chosen", "heldout_accuracy",
                                                               "majority_baseline_accuracy", "n_labels")}}
        log(f"quality: {metrics['chosen']} on DCLM human labels, held-out accuracy {metrics['heldout_accuracy']:.3f} "
            f"(majority baseline {metrics['majority_baseline_accuracy']:.3f})")
        return np.array([by_id.get(d.id, np.nan) for d in pool]), info
