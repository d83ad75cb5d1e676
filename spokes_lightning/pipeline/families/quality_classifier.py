"""Quality source ``classifier``: a HF sequence classifier's logit (e.g. the FineWeb-Edu classifier)."""
from __future__ import annotations

import numpy as np

from spokes_lightning.pipeline.feature_registry import QualitySource, corpus_inputs, extract_kwargs, register, store_for_inputs


@register
class HFClassifierQuality(QualitySource):
    name = "quality_classifier"
    source = "classifier"
    computes = "quality = regression logit of a Hugging Face classifier, clipped at 0 (store quality_store)"
    order = 310

    def cache_key(self, ctx) -> dict:
        return corpus_inputs(ctx, model=str(ctx.cfg.quality.model))

    def module(self, ctx):
        from spokes_lightning.features.quality_modules import ClassifierQualityModule

        return ClassifierQualityModule(ctx.cfg.quality.model)

    def scores(self, ctx, pool):
        from spokes_lightning.features.extract import extract_features

        store = extract_features(self.module(ctx), pool, store_for_inputs(ctx, "quality_store", self.cache_key(ctx)),
                                 **extract_kwargs(ctx.cfg))
        by_id = dict(zip(store.ids, np.asarray(store.matrix[:, 0], dtype=np.float64)))
        return np.array([by_id.get(d.id, np.nan) for d in pool]), {}
