"""Stage 3: features. Every registered feature family (:mod:`spokes_lightning.pipeline.feature_registry`):
gradient sketches (and an independent-seed copy for honest scoring), sentence embeddings and
quality scores, each a chunked, resumable feature store or a score file."""
from __future__ import annotations

from spokes_lightning.pipeline.families import all_families as families
from spokes_lightning.pipeline.feature_registry import check_quality_source, family_key, run_family
from spokes_lightning.pipeline.preflight import hub_resource
from spokes_lightning.pipeline.outputs import FeaturesOutput
from spokes_lightning.pipeline.stage import Stage


class FeaturesStage(Stage):
    name = "features"
    output_type = FeaturesOutput
    all_ranks = True  # extraction is Lightning DDP over the torchrun ranks (registry.extract_kwargs)
    volatile = ("manifest.json",)  # store manifests name the proxy's path, which moves with the run_dir
    needs = ("corpus", "tokenizer", "proxy")

    def settings(self, cfg):
        settings: dict = {}
        for family in families():
            settings.update(family.settings(cfg))
        return settings

    def check(self, cfg):
        registered = families()
        check_quality_source(cfg, registered)
        for family in registered:
            if family.enabled(cfg):
                family.check(cfg)
        hub_resource(cfg.embeddings.model, "embeddings.model", "embedding model")
        if cfg.quality.source == "classifier":
            hub_resource(cfg.quality.model, "quality.model", "quality classifier")

    def handed_on(self, outputs):
        return [path for family in families() for path in family.handed_on(outputs)]

    def run(self, ctx):
        registered = families()
        check_quality_source(ctx.cfg, registered)
        out, keys = {}, {}
        for family in registered:  # each cached on its own: a family added to a run computes alone
            if family.enabled(ctx.cfg):
                keys[family.name] = family_key(ctx, family, self.needs, keys)
                out.update(run_family(ctx, family, keys[family.name]))
        return FeaturesOutput.from_json(out)
