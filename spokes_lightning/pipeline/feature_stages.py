"""Stage 3: features. Every registered feature family (:mod:`spokes_lightning.features.registry`):
gradient sketches (and an independent-seed copy for honest scoring), sentence embeddings and
quality scores, each a chunked, resumable feature store or a score file."""
from __future__ import annotations

from ..features.registry import check_quality_source, families
from .stage import Stage


class FeaturesStage(Stage):
    name = "features"
    all_ranks = True  # extraction is Lightning DDP over the torchrun ranks (registry.extract_kwargs)
    volatile = ("manifest.json",)  # store manifests name the proxy's path, which moves with the run_dir
    needs = ("corpus", "tokenizer", "proxy")

    def settings(self, cfg):
        settings: dict = {}
        for family in families():
            settings.update(family.settings(cfg))
        return settings

    def handed_on(self, outputs):
        return [path for family in families() for path in family.handed_on(outputs)]

    def run(self, ctx):
        registered = families()
        check_quality_source(ctx.cfg, registered)
        out = {}
        for family in registered:
            if family.enabled(ctx.cfg):
                out.update(family.run(ctx))
        return out
