"""Stage 3: features. Gradient sketches (and an independent-seed copy for honest scoring),
sentence embeddings, and quality scores, each a chunked, resumable feature store."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from ..atomic import write_json_atomic
from ..errors import UserError
from ..features.store import open_feature_store, write_column_slice
from .data_stages import pool_documents
from .stage import RunContext, Stage, log, to_plain

#: in each store directory: the key of what its chunks were computed from
INPUTS_FILE = "inputs.json"
#: the files of a finished store that later stages read
STORE_FILES = ("features.npy", "ids.json", "manifest.json")

#: the independent projection (report's G-Vendi under a seed SPOKES never saw) uses seed + this
INDEPENDENT_SEED_OFFSET = 1000


def _extract_kwargs(cfg):
    return {"chunk_size": int(cfg.features.chunk_size), "batch_size": int(cfg.features.batch_size),
            "devices": cfg.features.devices, "strategy": cfg.features.strategy}


def store_for_inputs(ctx: RunContext, name: str, derives_from: dict) -> Path:
    """``features/<name>``, emptied first when its chunks were computed from other inputs.

    Chunks resume a killed run only when ``derives_from`` (upstream stage keys and the settings
    that shape the rows) is unchanged: a retrained proxy or another corpus at the same path gives
    a fresh store, as in a new run_dir. Batch size, devices and strategy are not part of it.
    """
    path = ctx.run_dir / "features" / name
    key = hashlib.sha256(json.dumps(derives_from, sort_keys=True, default=str).encode()).hexdigest()[:16]
    record = path / INPUTS_FILE
    try:
        same = json.loads(record.read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        same = False
    if not same:
        if path.exists():
            log(f"features: {name}: the chunks there were computed from other inputs; computing them again")
            shutil.rmtree(path)
        write_json_atomic(record, {"key": key, "inputs": derives_from})
    return path


def gradient_store(ctx: RunContext, seeds: list[int], name: str):
    """Gradient sketches of the pool under each projection seed, from ONE forward + backward per batch."""
    from ..features.extract import extract_features
    from ..features.gradients import ProxyGradientModule
    from ..models.tokenizer import load_tokenizer

    cfg = ctx.cfg
    proxy = ctx.output("proxy")
    model = ctx.run_dir / proxy["model"] if proxy["trained"] else proxy["model"]
    tokenizer = load_tokenizer(model, setting="proxy.model")
    g = cfg.features.gradients
    module = ProxyGradientModule(str(model), tokenizer, n_layers=int(g.n_layers), include_head=bool(g.include_head),
                                 projection=str(g.projection), k=int(g.k), seed=seeds[0], max_length=int(g.max_length),
                                 dtype=str(g.dtype), extra_seeds=seeds[1:])
    inputs = {**{n: ctx.keys.get(n) for n in ("corpus", "tokenizer", "proxy")}, "gradients": to_plain(g),
              "seeds": list(seeds), "chunk_size": int(cfg.features.chunk_size)}
    # the proxy's identity is in ``inputs`` (its stage key); its path may change with a moved run_dir
    return extract_features(module, pool_documents(ctx), store_for_inputs(ctx, name, inputs), unchecked_keys=("model",),
                            **_extract_kwargs(cfg))


def corpus_inputs(ctx: RunContext, **settings) -> dict:
    """What a store over the pool alone (embeddings, classifier quality) derives from."""
    return {"corpus": ctx.keys.get("corpus"), "chunk_size": int(ctx.cfg.features.chunk_size), **settings}


class FeaturesStage(Stage):
    name = "features"
    volatile = ("manifest.json",)  # store manifests name the proxy's path, which moves with the run_dir
    needs = ("corpus", "tokenizer", "proxy")

    def settings(self, cfg):
        return {"features": cfg.features, "embeddings": cfg.embeddings, "quality": cfg.quality, "seed": cfg.seed,
                "independent": cfg.report.gvendi_independent}

    def handed_on(self, outputs):
        stores = [outputs[k] for k in ("gradients", "gradients_independent", "embeddings") if outputs.get(k)]
        return [f"{store}/{f}" for store in stores for f in STORE_FILES] + [outputs["quality"], outputs["quality_ids"]]

    def run(self, ctx):
        from ..features.embeddings import EmbeddingModule
        from ..features.extract import extract_features

        cfg = ctx.cfg
        seed = int(cfg.seed)
        out = {}
        k = int(cfg.features.gradients.k)
        if cfg.report.gvendi_independent:  # both seeds' sketches from one backward, then split
            both = gradient_store(ctx, [seed, seed + INDEPENDENT_SEED_OFFSET], "gradients_two_seeds")
            for name in ("gradients", "gradients_independent"):  # written whole from the two-seed store
                shutil.rmtree(ctx.run_dir / "features" / name, ignore_errors=True)
            grads = write_column_slice(both, ctx.run_dir / "features" / "gradients", 0, k, {"extra_seeds": []})
            write_column_slice(both, ctx.run_dir / "features" / "gradients_independent", k, 2 * k,
                               {"seed": seed + INDEPENDENT_SEED_OFFSET, "extra_seeds": []})
            out["gradients_independent"] = "features/gradients_independent"
        else:
            grads = gradient_store(ctx, [seed], "gradients")
        out["gradients"] = "features/gradients"
        log(f"features: gradients {grads.matrix.shape} ({len(grads.skipped)} documents skipped: "
            f"{sorted(set(grads.skipped.values()))})")
        emb = extract_features(EmbeddingModule(cfg.embeddings.model), pool_documents(ctx),
                               store_for_inputs(ctx, "embeddings", corpus_inputs(ctx, model=to_plain(cfg.embeddings))),
                               **_extract_kwargs(cfg))
        out["embeddings"] = "features/embeddings"
        log(f"features: embeddings {emb.matrix.shape}")
        out.update(quality_scores(ctx))
        return out


def quality_scores(ctx: RunContext) -> dict:
    """Quality per pool document -> features/quality.npy (+ ids), from the configured source."""
    from ..atomic import save_npy_atomic, write_json_atomic

    q = ctx.cfg.quality
    pool = pool_documents(ctx)
    info: dict = {"quality_source": str(q.source)}
    if q.source == "column":
        from ..features.quality import quality_from_column

        scores = np.asarray(quality_from_column(pool, q.column), dtype=np.float64)
    elif q.source == "classifier":  # an HF sequence-classification model (FineWeb-Edu classifier)
        from ..features.extract import extract_features
        from ..features.quality import ClassifierQualityModule

        store = extract_features(ClassifierQualityModule(q.model), pool,
                                 store_for_inputs(ctx, "quality_store", corpus_inputs(ctx, model=str(q.model))),
                                 **_extract_kwargs(ctx.cfg))
        by_id = dict(zip(store.ids, np.asarray(store.matrix[:, 0], dtype=np.float64)))
        scores = np.array([by_id.get(d.id, np.nan) for d in pool])
    elif q.source == "dclm_labels":  # offline default: a classifier trained on the DCLM human labels
        from ..corpus import load_quality_labels
        from ..features.embeddings import EmbeddingModule, embed_texts
        from ..features.quality import train_quality_classifier

        embedder = EmbeddingModule(ctx.cfg.embeddings.model)
        classifier, metrics = train_quality_classifier(
            load_quality_labels(), lambda texts: embed_texts(texts, embedder), ctx.run_dir / "quality_model",
            seed=int(ctx.cfg.seed))
        emb = open_feature_store(ctx.run_dir / "features" / "embeddings")
        by_id = dict(zip(emb.ids, classifier.score(np.asarray(emb.matrix, dtype=np.float32))))
        scores = np.array([by_id.get(d.id, np.nan) for d in pool])
        info["quality_classifier"] = {k: metrics[k] for k in ("chosen", "heldout_accuracy",
                                                              "majority_baseline_accuracy", "n_labels")}
        log(f"quality: {metrics['chosen']} on DCLM human labels, held-out accuracy {metrics['heldout_accuracy']:.3f} "
            f"(majority baseline {metrics['majority_baseline_accuracy']:.3f})")
    else:
        raise UserError(f"quality.source must be column, classifier or dclm_labels, got {q.source!r}")
    save_npy_atomic(ctx.path("features", "quality.npy"), np.asarray(scores, dtype=np.float64))
    write_json_atomic(ctx.path("features", "quality_ids.json"), [d.id for d in pool])
    info["quality"], info["quality_ids"] = "features/quality.npy", "features/quality_ids.json"
    return info
