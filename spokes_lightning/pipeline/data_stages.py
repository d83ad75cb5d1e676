"""Stages 0-2: corpus (read once, hold out validation, write the pool to disk), tokenizer, proxy LM."""
from __future__ import annotations

import json

import numpy as np

from spokes_lightning.utils.atomic import save_npy_atomic
from spokes_lightning.data.corpus import Document
from spokes_lightning.data.document_store import DocumentStore, open_document_store
from spokes_lightning.data.id_index import IdIndex
from spokes_lightning.data.ingest import IngestSettings, ingest
from spokes_lightning.utils.errors import UserError
from spokes_lightning.utils.progress import progress
from spokes_lightning.pipeline.preflight import check_pool_budget, document_limit, hub_resource
from spokes_lightning.pipeline.outputs import CorpusOutput, ProxyOutput, TokenizerOutput
from spokes_lightning.pipeline.stage import RunContext, Stage, log, to_plain


def pool_documents(ctx: RunContext) -> DocumentStore:
    """The pool as a lazy on-disk store (len, store[i], take(rows), batches(), iteration)."""
    if "pool" not in ctx.documents:
        ctx.documents["pool"] = open_document_store(ctx.run_dir / ctx.output(CorpusOutput).pool)
    return ctx.documents["pool"]


def pool_index(ctx: RunContext) -> IdIndex:
    """Pool ids -> pool rows (16 bytes per document), built once per process."""
    if "pool_index" not in ctx.documents:
        ctx.documents["pool_index"] = IdIndex.of_store(pool_documents(ctx))
    return ctx.documents["pool_index"]


def pool_rows(ctx: RunContext, ids) -> np.ndarray:
    """Pool rows of ``ids`` (every one must be in the pool: one line otherwise)."""
    rows = pool_index(ctx).rows(list(ids))
    if (rows < 0).any():
        missing = list(ids)[int(np.flatnonzero(rows < 0)[0])]
        raise UserError(f"document {missing!r} is not in the pool of {ctx.run_dir}; was the corpus stage made again?")
    return rows


def documents_by_ids(ctx: RunContext, ids) -> list[Document]:
    """The pool documents with ``ids``, in that order (each checked against its id)."""
    ids = list(ids)
    docs = pool_documents(ctx).take(pool_rows(ctx, ids))
    for want, doc in zip(ids, docs):
        if doc.id != want:
            raise UserError(f"document {want!r} is not in the pool of {ctx.run_dir}")
    return docs


def validation_documents(ctx: RunContext) -> DocumentStore:
    if "validation" not in ctx.documents:
        ctx.documents["validation"] = open_document_store(ctx.run_dir / ctx.output(CorpusOutput).validation)
    return ctx.documents["validation"]


def ingest_settings(cfg) -> IngestSettings:
    """The corpus stage's settings from ``data.*`` and ``seed`` (checked: one line if bad)."""
    data = cfg.data
    hub = to_plain(data.get("hub"))
    return IngestSettings(
        paths=tuple(str(p) for p in (data.paths or [])), hub=hub if hub and hub.get("name") else None,
        text_field=str(data.text_field), id_field=str(data.id_field),
        limit=document_limit(data.get("limit"), "data.limit"),
        interleave_by=str(data.interleave_by) if data.get("interleave_by") else None,
        validation_documents=int(data.validation_documents), seed=int(cfg.seed),
        on_error=str(data.get("on_error") or "raise"),
        shard_documents=int(data.get("shard_documents") or 1 << 20))


class CorpusStage(Stage):
    """Read the corpus once, streaming, hold out a validation set BEFORE any features are computed,
    and write the pool and the validation set as on-disk document stores (:mod:`..data.ingest`)."""

    name = "corpus"
    output_type = CorpusOutput
    all_ranks = True  # input files and pool shards are split over the ranks (data/ingest.py)

    def check(self, cfg):
        data = cfg.data
        document_limit(data.get("limit"), "data.limit")
        if data.paths:
            from spokes_lightning.data.corpus import read_documents, resolve_paths

            resolve_paths(list(data.paths))  # missing files: one line
            read_documents(list(data.paths), text_field=data.text_field, id_field=data.id_field, limit=1)
        elif data.get("hub") and data.hub.get("name"):
            from spokes_lightning.data.hub import hub_is_reachable

            if not hub_is_reachable():
                raise UserError(f"cannot stream hub dataset '{data.hub.name}': the Hugging Face Hub is unreachable "
                                "(offline); point data.paths=[...] at local .jsonl/.jsonl.gz/.parquet copies")
        else:
            raise UserError("no data: set data.paths=[...] (local jsonl/jsonl.gz/parquet) or data.hub.name")

    def settings(self, cfg):
        # data.workers changes who does the work, not what is written
        data = {k: v for k, v in to_plain(cfg.data).items() if k != "workers"}
        # "pool": what the pool holds beyond the settings; a change gives a new key, so every stage
        # after it, and every resumable store made from the old pool, starts afresh
        return {"data": data, "seed": cfg.seed, "pool": "documents with text"}

    def outdated(self, cfg, run_dir, outputs):
        if not (run_dir / outputs.pool / "index.json").exists():
            return "pool was written by an earlier version (one jsonl.gz file, not a document store)"
        return None

    def handed_on(self, outputs):
        return [outputs.pool, outputs.validation]

    def run(self, ctx):
        settings = ingest_settings(ctx.cfg)
        summary = ingest(settings, ctx.run_dir / "corpus", workers=int(ctx.cfg.data.get("workers") or 1))
        check_pool_budget(ctx.cfg, summary["n_pool"])
        ctx.documents.clear()  # later stages open the stores
        skipped, empty = summary["skipped_records"], summary["empty_texts"]
        log(f"corpus: {summary['n_read']} documents with text read, {summary['n_validation']} held out for validation, "
            f"{summary['n_pool']} in the pool" + (f"; {skipped} malformed record(s) skipped (data.on_error=skip), "
                                                   f"e.g. {summary['skipped_examples'][0]}" if skipped else "")
            + (f"; {empty} empty text(s) left out (nothing to select them by)" if empty else ""))
        return CorpusOutput(pool="corpus/pool", validation="corpus/validation", **summary)


def export_tokenizer(ctx: RunContext):
    """The tokenizer stage's tokenizer (export, pretraining), loaded from the run directory."""
    from spokes_lightning.models.tokenizer import load_tokenizer

    return load_tokenizer(ctx.run_dir / ctx.output(TokenizerOutput).dir)


def training_sample(pool: DocumentStore, count, seed: int, setting: str):
    """The pool (``count`` null) or a seeded sample of ``count`` pool documents in pool order, read
    with one ``take``: what a tokenizer or proxy trained here sees of a pool too large to hold."""
    count = document_limit(count, setting)
    if count is None or count >= len(pool):
        return pool
    rows = np.sort(np.random.default_rng(seed + 104729).choice(len(pool), size=count, replace=False))
    return pool.take(rows)


def token_lengths(tok, pool, block: int = 4096) -> np.ndarray:
    """Tokens per pool document (no special tokens), tokenized block by block."""
    lengths = np.zeros(len(pool), dtype=np.int64)
    bar = progress(desc="token lengths", total=len(pool), unit="doc")
    for first, docs in pool.batches(block):
        ids = tok([d.text for d in docs], add_special_tokens=False)["input_ids"]
        lengths[first : first + len(docs)] = [len(x) for x in ids]
        bar.update(len(docs))
    bar.close()
    return lengths


class TokenizerStage(Stage):
    """The export/target tokenizer: a given one (tokenizer.path) or a byte-level BPE trained here."""

    name = "tokenizer"
    output_type = TokenizerOutput
    needs = ("corpus",)

    def check(self, cfg):
        hub_resource(cfg.tokenizer.path, "tokenizer.path", "tokenizer")

    def settings(self, cfg):
        return cfg.tokenizer

    def handed_on(self, outputs):
        return [outputs.dir, outputs.lengths]

    def run(self, ctx):
        from spokes_lightning.models.tokenizer import load_tokenizer, train_tokenizer

        cfg = ctx.cfg.tokenizer
        out = ctx.path("tokenizer", "x").parent
        pool = pool_documents(ctx)
        if cfg.path:
            tok = load_tokenizer(cfg.path)
            tok.save_pretrained(str(out))
        else:
            sample = training_sample(pool, cfg.get("sample_documents"), int(ctx.cfg.seed), "tokenizer.sample_documents")
            tok = train_tokenizer((d.text for d in sample), vocab_size=int(cfg.vocab_size), out_dir=out)
        lengths = token_lengths(tok, pool)
        save_npy_atomic(ctx.path("corpus", "lengths.npy"), lengths)
        log(f"tokenizer: vocab {len(tok)}, pool has {int(lengths.sum())} tokens")
        return TokenizerOutput(dir=ctx.rel(out), vocab_size=len(tok), lengths="corpus/lengths.npy",
                               pool_tokens=int(lengths.sum()))


class ProxyStage(Stage):
    """The proxy LM whose gradients SPOKES uses: a given model (proxy.model) or one trained here."""

    name = "proxy"
    output_type = ProxyOutput
    volatile = ("done.json",)  # train_seconds
    needs = ("corpus", "tokenizer")

    def check(self, cfg):
        hub_resource(cfg.proxy.model, "proxy.model", "proxy model")

    def settings(self, cfg):
        settings = {"model": cfg.proxy.model, "train": cfg.proxy.train, "seed": cfg.seed}
        if cfg.proxy.get("sample_documents") is not None:
            settings["sample_documents"] = cfg.proxy.sample_documents
        return settings

    def handed_on(self, outputs):
        return [outputs.model] if outputs.trained else []

    def run(self, ctx):
        cfg = ctx.cfg.proxy
        if cfg.model:
            from spokes_lightning.models.llama import load_causal_lm

            load_causal_lm(cfg.model)  # fail now, clearly, rather than in the features stage
            return ProxyOutput(model=str(cfg.model), trained=False)
        from spokes_lightning.models.proxy_training import train_proxy

        out = ctx.path("proxy", "x").parent
        sample = training_sample(pool_documents(ctx), cfg.get("sample_documents"), int(ctx.cfg.seed),
                                 "proxy.sample_documents")
        train_proxy(sample, ctx.run_dir / ctx.output(TokenizerOutput).dir, out,
                    seed=int(ctx.cfg.seed), **to_plain(cfg.train))
        done = json.loads((out / "done.json").read_text())
        return ProxyOutput(model=ctx.rel(out), trained=True, loss=done.get("loss"))
