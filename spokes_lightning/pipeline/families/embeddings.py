"""Family ``embeddings``: mean-pooled, L2-normalised sentence embeddings of every pool document.

With ``embeddings.store`` set (a store made by ``spokes import-features --kind embeddings``, or
another run's ``features/embeddings``) nothing is computed: the store is validated against the pool
and handed on by its absolute path (outputs ``embeddings`` and ``embeddings_imported_from``).
"""
from __future__ import annotations

from pathlib import Path

from spokes_lightning.pipeline.feature_registry import (LEGACY_STORE_FILES, STORE_FILES, FeatureFamily, corpus_inputs, drop_null_store, extract_kwargs,
                        register, store_for_inputs)

SETTING = "embeddings.store"


def embeddings_store_path(ctx) -> Path:
    """Where this run's embeddings store is: the configured one, else ``features/embeddings``."""
    from spokes_lightning.pipeline.import_store import configured_store

    imported = configured_store(ctx.cfg.embeddings)
    return imported.resolve() if imported is not None else ctx.run_dir / "features" / "embeddings"


@register
class Embeddings(FeatureFamily):
    name = "embeddings"
    computes = "sentence-transformer embeddings (embedding Vendi, SemDeDup, the DCLM-label quality classifier)"
    order = 200

    def settings(self, cfg) -> dict:
        return {"embeddings": drop_null_store(cfg.embeddings)}

    def check(self, cfg) -> None:
        from spokes_lightning.pipeline.import_store import check_configured_store, configured_store

        from spokes_lightning.utils.errors import UserError

        length = cfg.embeddings.get("max_length", 256)
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise UserError(f"embeddings.max_length must be a positive number of tokens, got {length!r}")
        path = configured_store(cfg.embeddings)
        if path is not None:
            check_configured_store(path, SETTING, "embeddings")

    def cache_key(self, ctx) -> dict:
        from spokes_lightning.pipeline.stage import to_plain

        return corpus_inputs(ctx, model={k: v for k, v in to_plain(ctx.cfg.embeddings).items() if k != "store"})

    def module(self, ctx):
        from spokes_lightning.features.embeddings import EmbeddingModule

        return EmbeddingModule(ctx.cfg.embeddings.model, max_length=int(ctx.cfg.embeddings.get("max_length", 256)))

    def run(self, ctx) -> dict:
        from spokes_lightning.pipeline.import_store import configured_store, use_configured_store

        imported = configured_store(ctx.cfg.embeddings)
        if imported is not None:  # nothing to compute: no model, no Lightning
            path = use_configured_store(ctx, imported, SETTING, "embeddings")
            return {"embeddings": path, "embeddings_imported_from": path}
        from spokes_lightning.features.extract import extract_features
        from spokes_lightning.pipeline.data_stages import pool_documents
        from spokes_lightning.pipeline.stage import log

        emb = extract_features(self.module(ctx), pool_documents(ctx), store_for_inputs(ctx, "embeddings", self.cache_key(ctx)),
                               **extract_kwargs(ctx.cfg))
        log(f"features: embeddings {emb.matrix.shape}")
        return {"embeddings": "features/embeddings"}

    def handed_on(self, outputs) -> list[str]:
        if not outputs.embeddings:
            return []
        files = sorted({*STORE_FILES, *LEGACY_STORE_FILES}) if outputs.embeddings_imported_from else STORE_FILES
        return [f"{outputs.embeddings}/{f}" for f in files]
