"""Global chunks of a corpus and the rows written per chunk: the part of feature extraction that
needs no training framework.

A corpus is cut into fixed GLOBAL chunks of ``chunk_size`` documents in corpus order (a pure
function of the corpus and ``chunk_size``); chunk ``c`` belongs to rank ``c % world_size`` and a
chunk the store already has is skipped (:class:`ChunkPlan`). A feature module's rows are collected
per chunk and a chunk is written atomically as soon as its last row arrives (:class:`ChunkRows`).
The Lightning path (:mod:`spokes_lightning.features.extract`) and the Accelerate path
(:mod:`spokes_lightning.integrations.accelerate`) both run on these two classes, so they cut,
order and write the same bytes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from torch.utils.data import Dataset

from spokes_lightning.data.document_store import DocumentStore
from spokes_lightning.features.store import FINALIZE_KEYS, MANIFEST, FeatureStoreWriter
from spokes_lightning.utils.errors import UserError


def as_pairs(documents: Iterable[Any]) -> list[tuple[str, str]]:
    """``(id, text)`` pairs from tuples or objects with ``.id`` / ``.text`` (``corpus.Document``)."""
    pairs = []
    for doc in documents:
        if isinstance(doc, (tuple, list)):
            doc_id, text = doc[0], doc[1]
        else:
            doc_id, text = doc.id, doc.text
        pairs.append((str(doc_id), "" if text is None else str(text)))
    ids = [i for i, _ in pairs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"document ids must be unique; '{dup}' appears more than once")
    return pairs


def as_source(documents: Iterable[Any]):
    """A document store as it is (read chunk by chunk later), anything else as ``(id, text)`` pairs."""
    return documents if isinstance(documents, DocumentStore) else as_pairs(documents)


def source_ids(source, block: int = 65536) -> Iterable[str]:
    """Every document id of a store or a pair list, in corpus order (a store is read block by block)."""
    if isinstance(source, DocumentStore):
        for start in range(0, len(source), block):
            yield from source.column_array("id", start, start + block)
    else:
        for doc_id, _ in source:
            yield doc_id


def source_pairs(source, start: int, stop: int) -> list[tuple[str, str]]:
    """``(id, text)`` of rows ``[start, stop)``."""
    if isinstance(source, DocumentStore):
        cols = source.columns(start, stop, ("id", "text"))
        return list(zip(cols["id"], cols["text"]))
    return source[start:stop]


def corpus_fingerprint(source) -> str:
    h = hashlib.sha256()
    for doc_id in source_ids(source):
        h.update(doc_id.encode())
        h.update(b"\0")
    return h.hexdigest()


class ChunkBatches(Dataset):
    """Batches cut inside chunks, read from the source when asked for (the DataLoader uses
    ``batch_size=None``): a rank holds one batch of texts at a time, never its whole share."""

    def __init__(self, source, spans: list[tuple[int, int, int, int]]):
        self.source, self.spans = source, spans  # (chunk, chunk_len, start row, stop row)

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> dict[str, Any]:
        c, chunk_len, start, stop = self.spans[i]
        part = source_pairs(self.source, start, stop)
        return {"chunk": c, "chunk_len": chunk_len, "ids": [d for d, _ in part], "texts": [t for _, t in part]}


class ChunkPlan:
    """Global chunks of ``chunk_size`` documents; chunk c -> rank ``c % world_size``; done chunks skipped."""

    def __init__(self, documents: Iterable[Any], chunk_size: int = 1024, batch_size: int = 8,
                 done_chunks: Iterable[int] = ()):
        if chunk_size <= 0 or batch_size <= 0:
            raise UserError(f"chunk_size and batch_size must be positive (got {chunk_size}, {batch_size})")
        self.source = as_source(documents)
        self.chunk_size, self.batch_size = int(chunk_size), int(batch_size)
        self.done_chunks = set(done_chunks)

    @property
    def n_chunks(self) -> int:
        return (len(self.source) + self.chunk_size - 1) // self.chunk_size

    def chunk_span(self, c: int) -> tuple[int, int]:
        return c * self.chunk_size, min((c + 1) * self.chunk_size, len(self.source))

    def chunk_length(self, c: int) -> int:
        first, last = self.chunk_span(c)
        return last - first

    def chunk_documents(self, c: int) -> list[tuple[str, str]]:
        return source_pairs(self.source, *self.chunk_span(c))

    def spans_for(self, rank: int, world_size: int) -> list[tuple[int, int, int, int]]:
        out = []
        for c in self.rank_chunks(rank, world_size):
            first, last = self.chunk_span(c)
            out += [(c, last - first, s, min(s + self.batch_size, last)) for s in range(first, last, self.batch_size)]
        return out

    def rank_chunks(self, rank: int, world_size: int) -> list[int]:
        return [c for c in range(rank, self.n_chunks, world_size) if c not in self.done_chunks]

    def iter_batches(self, rank: int, world_size: int):
        """This rank's batches, read one at a time."""
        batches = ChunkBatches(self.source, self.spans_for(rank, world_size))
        return (batches[i] for i in range(len(batches)))

    def batches_for(self, rank: int, world_size: int) -> list[dict[str, Any]]:
        return list(self.iter_batches(rank, world_size))


class ChunkRows:
    """Collects a feature module's rows per chunk and writes a chunk atomically when all its documents are in."""

    def __init__(self, store: FeatureStoreWriter, dim: int, dtype: str = "float16"):
        self.store, self.dim, self.dtype = store, int(dim), np.dtype(dtype)
        self.pending: dict[int, dict[str, Any]] = {}
        self.chunks_written: list[int] = []

    def add(self, prediction: dict[str, Any], batch: dict[str, Any]) -> None:
        """One batch's ``predict_step`` output; writes the batch's chunk once it is complete."""
        c = int(batch["chunk"])
        acc = self.pending.setdefault(c, {"ids": [], "rows": [], "skipped": {}, "seen": []})
        self._check(prediction, batch)
        acc["seen"].extend(batch["ids"])
        acc["skipped"].update(prediction.get("skipped") or {})
        if prediction["ids"]:
            rows = prediction["rows"].detach().float().cpu().numpy()
            acc["ids"].extend(prediction["ids"])
            acc["rows"].append(rows)
        if len(acc["seen"]) == int(batch["chunk_len"]):
            self._flush(c, self.pending.pop(c))

    def _check(self, prediction: dict[str, Any], batch: dict[str, Any]) -> None:
        got = list(prediction["ids"]) + list((prediction.get("skipped") or {}).keys())
        if sorted(got) != sorted(batch["ids"]):
            raise RuntimeError(f"feature module returned ids {got} for batch ids {batch['ids']}")
        rows = prediction.get("rows")
        n = 0 if rows is None else rows.shape[0]
        if n != len(prediction["ids"]) or (n and rows.shape[1] != self.dim):
            raise RuntimeError(f"feature module returned rows of shape {None if rows is None else tuple(rows.shape)} "
                               f"for {len(prediction['ids'])} ids and feature_dim {self.dim}")

    def _flush(self, c: int, acc: dict[str, Any]) -> None:
        rows = np.concatenate(acc["rows"]) if acc["rows"] else np.zeros((0, self.dim), np.float32)
        order = {doc_id: i for i, doc_id in enumerate(acc["seen"])}  # corpus order inside the chunk
        perm = sorted(range(len(acc["ids"])), key=lambda i: order[acc["ids"][i]])
        rows = rows[perm]
        if not np.isfinite(rows).all():
            raise RuntimeError(f"chunk {c}: non-finite feature values")
        self.store.write_chunk(c, [acc["ids"][i] for i in perm], rows.astype(self.dtype), acc["skipped"])
        self.chunks_written.append(c)


def store_manifest(module, source, chunk_size: int, dtype: str, store_dir: Path) -> dict[str, Any]:
    """The module's manifest + chunking + corpus identity (+ finalize keys of an existing store)."""
    manifest = dict(module.manifest())
    manifest.update({"chunk_size": int(chunk_size), "dim": int(module.feature_dim), "dtype": dtype,
                     "n_corpus_documents": len(source), "corpus_ids_sha256": corpus_fingerprint(source)})
    old_path = store_dir / MANIFEST
    if old_path.exists():  # finalize() adds these; they are results, not settings
        old = json.loads(old_path.read_text())
        manifest.update({k: old[k] for k in FINALIZE_KEYS if k in old})
    return manifest
