"""Family ``embeddings``: mean-pooled, L2-normalised sentence embeddings of every pool document."""
from __future__ import annotations

from ..registry import STORE_FILES, FeatureFamily, corpus_inputs, extract_kwargs, register, store_for_inputs


@register
class Embeddings(FeatureFamily):
    name = "embeddings"
    computes = "sentence-transformer embeddings (embedding Vendi, SemDeDup, the DCLM-label quality classifier)"
    order = 200

    def settings(self, cfg) -> dict:
        return {"embeddings": cfg.embeddings}

    def cache_key(self, ctx) -> dict:
        from ...pipeline.stage import to_plain

        return corpus_inputs(ctx, model=to_plain(ctx.cfg.embeddings))

    def module(self, ctx):
        from ..embeddings import EmbeddingModule

        return EmbeddingModule(ctx.cfg.embeddings.model)

    def run(self, ctx) -> dict:
        from ...pipeline.data_stages import pool_documents
        from ...pipeline.stage import log
        from ..extract import extract_features

        emb = extract_features(self.module(ctx), pool_documents(ctx), store_for_inputs(ctx, "embeddings", self.cache_key(ctx)),
                               **extract_kwargs(ctx.cfg))
        log(f"features: embeddings {emb.matrix.shape}")
        return {"embeddings": "features/embeddings"}

    def handed_on(self, outputs: dict) -> list[str]:
        return [f"{outputs['embeddings']}/{f}" for f in STORE_FILES] if outputs.get("embeddings") else []
