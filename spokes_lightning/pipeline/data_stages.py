"""Stages 0-2: corpus (read + hold out validation), tokenizer, proxy LM."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, save_npy_atomic
from ..corpus import Document, interleave_by_field, read_documents, stream_hub_dataset
from ..errors import UserError
from .preflight import document_limit
from .stage import RunContext, Stage, log, to_plain


def write_documents(path: Path, docs: list[Document]) -> None:
    """jsonl.gz of id, text, source and every other field of the record (``meta``: quality columns, ...).

    The gzip header holds no file name and mtime 0, so the same documents give the same bytes.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fh:
            for d in docs:
                record = {"id": d.id, "text": d.text, "source": d.source, "meta": d.meta}
                fh.write((json.dumps(record, default=str) + "\n").encode())


def load_documents(path: Path) -> list[Document]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [Document(r["id"], r["text"], r["source"], r.get("meta") or {}) for r in map(json.loads, fh)]


def pool_documents(ctx: RunContext) -> list[Document]:
    if "pool" not in ctx.documents:
        ctx.documents["pool"] = load_documents(ctx.run_dir / ctx.output("corpus")["pool"])
    return ctx.documents["pool"]


def validation_documents(ctx: RunContext) -> list[Document]:
    if "validation" not in ctx.documents:
        ctx.documents["validation"] = load_documents(ctx.run_dir / ctx.output("corpus")["validation"])
    return ctx.documents["validation"]


def read_corpus(data) -> list[Document]:
    """Local files (data.paths) or a hub stream (data.hub.name), first data.limit documents.

    With ``data.interleave_by`` (a field name, local files only) the documents are first
    round-robined over that field's values, so the first N mix every source.
    """
    limit = document_limit(data.get("limit"), "data.limit")
    if data.paths:
        field_name = data.get("interleave_by")
        docs = read_documents(list(data.paths), text_field=data.text_field, id_field=data.id_field,
                              limit=None if field_name else limit)
        if field_name:
            docs = interleave_by_field(docs, str(field_name))[:limit]
        return docs
    if data.get("hub") and data.hub.get("name"):
        if data.get("interleave_by"):
            raise UserError("data.interleave_by works on local files (data.paths) only, not on a hub stream")
        docs = stream_hub_dataset(data.hub.name, data.hub.get("config"), data.hub.get("split", "train"),
                                  text_field=data.text_field, id_field=data.id_field, limit=limit)
        return list(docs)
    raise UserError("no data: set data.paths=[...] (local jsonl/jsonl.gz/parquet) or data.hub.name")


class CorpusStage(Stage):
    """Read the corpus and hold out a validation set BEFORE any features are computed."""

    name = "corpus"

    def settings(self, cfg):
        return {"data": cfg.data, "seed": cfg.seed}

    def outdated(self, cfg, run_dir, outputs):
        """Pool files written before records kept their fields cannot serve quality.source=column."""
        if cfg.quality.source != "column":
            return None
        with gzip.open(run_dir / outputs["pool"], "rt", encoding="utf-8") as fh:
            first = fh.readline()
        if first and "meta" not in json.loads(first):
            return "pool file was written without the record fields that quality.source=column reads"
        return None

    def handed_on(self, outputs):
        return [outputs["pool"], outputs["validation"]]

    def run(self, ctx):
        data = ctx.cfg.data
        docs = read_corpus(data)
        n_val = int(data.validation_documents)
        if not docs:
            raise UserError(f"the corpus is empty: no documents with text in {list(data.paths) or data.get('hub')}")
        candidates = [i for i, d in enumerate(docs) if len(d.text.split()) >= 20]
        if n_val and n_val >= len(candidates):
            raise UserError(f"data.validation_documents={n_val} needs more documents of >= 20 words than the "
                            f"{len(candidates)} of {len(docs)} in the corpus; lower it or add data")
        rng = np.random.default_rng(int(ctx.cfg.seed) + 7919)
        val_idx = set(rng.choice(candidates, size=n_val, replace=False).tolist()) if n_val else set()
        pool = [d for i, d in enumerate(docs) if i not in val_idx]
        val = [d for i, d in enumerate(docs) if i in val_idx]
        from .preflight import check_pool_budget

        check_pool_budget(ctx.cfg, len(pool))
        write_documents(ctx.path("corpus", "pool.jsonl.gz"), pool)
        write_documents(ctx.path("corpus", "validation.jsonl.gz"), val)
        # later stages read the files back, in this process as in a resumed one
        ctx.documents.clear()
        sources = {}
        for d in pool:
            sources[d.source] = sources.get(d.source, 0) + 1
        log(f"corpus: {len(docs)} documents read, {len(val)} held out for validation, {len(pool)} in the pool")
        return {"pool": "corpus/pool.jsonl.gz", "validation": "corpus/validation.jsonl.gz",
                "n_read": len(docs), "n_pool": len(pool), "n_validation": len(val), "sources": sources}


def export_tokenizer(ctx: RunContext):
    """The tokenizer stage's tokenizer (export, pretraining), loaded from the run directory."""
    from ..models.tokenizer import load_tokenizer

    return load_tokenizer(ctx.run_dir / ctx.output("tokenizer")["dir"])


class TokenizerStage(Stage):
    """The export/target tokenizer: a given one (tokenizer.path) or a byte-level BPE trained here."""

    name = "tokenizer"
    needs = ("corpus",)

    def settings(self, cfg):
        return cfg.tokenizer

    def handed_on(self, outputs):
        return [outputs["dir"], outputs["lengths"]]

    def run(self, ctx):
        from ..models.tokenizer import load_tokenizer, train_tokenizer

        cfg = ctx.cfg.tokenizer
        out = ctx.path("tokenizer", "x").parent
        pool = pool_documents(ctx)
        if cfg.path:
            tok = load_tokenizer(cfg.path)
            tok.save_pretrained(str(out))
        else:
            tok = train_tokenizer([d.text for d in pool], vocab_size=int(cfg.vocab_size), out_dir=out)
        lengths = np.array([len(ids) for ids in tok([d.text for d in pool], add_special_tokens=False)["input_ids"]],
                           dtype=np.int64)
        save_npy_atomic(ctx.path("corpus", "lengths.npy"), lengths)
        log(f"tokenizer: vocab {len(tok)}, pool has {int(lengths.sum())} tokens")
        return {"dir": ctx.rel(out), "vocab_size": len(tok), "lengths": "corpus/lengths.npy",
                "pool_tokens": int(lengths.sum())}


class ProxyStage(Stage):
    """The proxy LM whose gradients SPOKES uses: a given model (proxy.model) or one trained here."""

    name = "proxy"
    volatile = ("done.json",)  # train_seconds
    needs = ("corpus", "tokenizer")

    def settings(self, cfg):
        return {"model": cfg.proxy.model, "train": cfg.proxy.train, "seed": cfg.seed}

    def handed_on(self, outputs):
        return [outputs["model"]] if outputs["trained"] else []

    def run(self, ctx):
        cfg = ctx.cfg.proxy
        if cfg.model:
            from ..models.llama import load_causal_lm

            load_causal_lm(cfg.model)  # fail now, clearly, rather than in the features stage
            return {"model": str(cfg.model), "trained": False}
        from ..models.proxy_training import train_proxy

        out = ctx.path("proxy", "x").parent
        train_proxy(pool_documents(ctx), ctx.run_dir / ctx.output("tokenizer")["dir"], out,
                    seed=int(ctx.cfg.seed), **to_plain(cfg.train))
        done = json.loads((out / "done.json").read_text())
        return {"model": ctx.rel(out), "trained": True, "loss": done.get("loss")}
