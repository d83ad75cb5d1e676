"""Family ``gradients``: sketches of per-document proxy-LM gradients (paper eq. 3-4).

With ``report.gvendi_independent`` both projection seeds' sketches come from one backward
pass (store ``gradients_two_seeds``) and are split into ``gradients`` and
``gradients_independent`` (seed + :data:`INDEPENDENT_SEED_OFFSET`, for the report's G-Vendi).

With ``features.gradients.store`` set (a store made by ``spokes import-features``, or another
run's ``features/gradients``) nothing is computed and no proxy is needed: the store is validated
against the pool and handed on by its absolute path (outputs ``gradients`` and
``gradients_imported_from``); there is no ``gradients_independent`` then.
"""
from __future__ import annotations

import shutil

from spokes_lightning.pipeline.feature_registry import (LEGACY_STORE_FILES, STORE_FILES, FeatureFamily, drop_null_store, extract_kwargs, register,
                        store_for_inputs)

SETTING = "features.gradients.store"

#: the independent projection (report's G-Vendi under a seed SPOKES never saw) uses seed + this
INDEPENDENT_SEED_OFFSET = 1000


@register
class Gradients(FeatureFamily):
    name = "gradients"
    computes = "Rademacher sketches of per-document gradients of the proxy LM's last layers (+ head)"
    order = 100

    def settings(self, cfg) -> dict:
        return {"features": drop_null_store(cfg.features, "gradients"), "seed": cfg.seed,
                "independent": cfg.report.gvendi_independent}

    def check(self, cfg) -> None:
        from spokes_lightning.pipeline.import_store import check_configured_store, configured_store

        path = configured_store(cfg.features.gradients)
        if path is not None:
            check_configured_store(path, SETTING, "gradients")  # Quad's family refuses imported gradients

    def seeds(self, cfg) -> list[int]:
        seed = int(cfg.seed)
        return [seed, seed + INDEPENDENT_SEED_OFFSET] if cfg.report.gvendi_independent else [seed]

    def cache_key(self, ctx, seeds: list[int] | None = None) -> dict:
        from spokes_lightning.pipeline.stage import to_plain

        settings = {k: v for k, v in to_plain(ctx.cfg.features.gradients).items() if k != "store"}
        return {**{n: ctx.keys.get(n) for n in ("corpus", "tokenizer", "proxy")},
                "gradients": settings, "seeds": list(seeds or self.seeds(ctx.cfg)),
                "chunk_size": int(ctx.cfg.features.chunk_size)}

    def module(self, ctx, seeds: list[int] | None = None):
        from spokes_lightning.models.tokenizer import load_tokenizer
        from spokes_lightning.features.extract import ProxyGradientModule

        seeds = list(seeds or self.seeds(ctx.cfg))
        from spokes_lightning.pipeline.outputs import ProxyOutput

        proxy = ctx.output(ProxyOutput)
        model = ctx.run_dir / proxy.model if proxy.trained else proxy.model
        g = ctx.cfg.features.gradients
        return ProxyGradientModule(str(model), load_tokenizer(model, setting="proxy.model"), n_layers=int(g.n_layers),
                                   include_head=bool(g.include_head), projection=str(g.projection), k=int(g.k),
                                   seed=seeds[0], max_length=int(g.max_length), dtype=str(g.dtype),
                                   extra_seeds=seeds[1:])

    def store(self, ctx, seeds: list[int], name: str):
        """Sketches under each seed in ``seeds``, from ONE forward + backward per batch."""
        from spokes_lightning.pipeline.data_stages import pool_documents
        from spokes_lightning.features.extract import extract_features

        # the proxy's identity is in the key (its stage key); its path may change with a moved run_dir
        return extract_features(self.module(ctx, seeds), pool_documents(ctx),
                                store_for_inputs(ctx, name, self.cache_key(ctx, seeds)), unchecked_keys=("model",),
                                **extract_kwargs(ctx.cfg))

    def run(self, ctx) -> dict:
        from spokes_lightning.pipeline.stage import log
        from spokes_lightning.pipeline.import_store import configured_store, use_configured_store
        from spokes_lightning.features.store import open_feature_store, write_column_slice

        cfg = ctx.cfg
        imported = configured_store(cfg.features.gradients)
        if imported is not None:  # computed elsewhere: no proxy, no independent projection
            path = use_configured_store(ctx, imported, SETTING, "gradients")
            if cfg.report.gvendi_independent:
                log("features: gradients are imported, so there is no independent projection for the report")
            return {"gradients": path, "gradients_imported_from": path}
        seeds = self.seeds(cfg)
        k = int(cfg.features.gradients.k)
        out = {}
        if len(seeds) > 1:  # both seeds' sketches from one backward, then split (by rank 0)
            from spokes_lightning.data.ranks import barrier
            from spokes_lightning.core.distributed import world

            both = self.store(ctx, seeds, "gradients_two_seeds")
            if world()[0] == 0:
                for name in ("gradients", "gradients_independent"):  # written whole from the two-seed store
                    shutil.rmtree(ctx.run_dir / "features" / name, ignore_errors=True)
                write_column_slice(both, ctx.run_dir / "features" / "gradients", 0, k, {"extra_seeds": []})
                write_column_slice(both, ctx.run_dir / "features" / "gradients_independent", k, 2 * k,
                                   {"seed": seeds[1], "extra_seeds": []})
            barrier()
            grads = open_feature_store(ctx.run_dir / "features" / "gradients")
            out["gradients_independent"] = "features/gradients_independent"
        else:
            grads = self.store(ctx, seeds, "gradients")
        out["gradients"] = "features/gradients"
        log(f"features: gradients {grads.matrix.shape} ({len(grads.skipped)} documents skipped: "
            f"{sorted(set(grads.skipped.values()))})")
        return out

    def handed_on(self, outputs) -> list[str]:
        stores = [s for s in (outputs.gradients, outputs.gradients_independent) if s]
        files = sorted({*STORE_FILES, *LEGACY_STORE_FILES}) if outputs.gradients_imported_from else STORE_FILES
        return [f"{store}/{f}" for store in stores for f in files]
