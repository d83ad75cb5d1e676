"""Generic chunked, resumable, multi-process feature extraction with ``Trainer.predict``.

Every feature stage (proxy gradients, embeddings, quality scores) is a *feature module*: a
LightningModule with

* ``predict_step(batch, batch_idx)`` where ``batch = {"chunk": int, "ids": [str], "texts": [str]}``
  (never crossing a chunk boundary), returning
  ``{"ids": [ids that got a row], "rows": Tensor[len(ids), d] or None, "skipped": {id: reason}}``;
  every input id must appear exactly once in ``ids`` or ``skipped``;
* ``feature_dim`` (int, the row width ``d``) and ``manifest()`` (a JSON dict of everything that
  determines the rows: model, layers, k, seed, ...); optionally ``feature_dtype`` ("float16"
  default, or "float32").

:func:`extract_features` cuts the corpus into fixed GLOBAL chunks of ``chunk_size`` documents in
corpus order (a pure function of the corpus and ``chunk_size``), gives chunk ``c`` to rank
``c % world_size``, skips chunks the store already has, and writes each chunk atomically
(:class:`~spokes_lightning.features.store.FeatureStoreWriter`) as soon as its last row arrives.
After predict all ranks meet at a barrier and rank 0 concatenates the chunks in corpus order
into ``features.npy`` + ``ids.npy`` (idempotent). A killed run resumes without recomputing
finished chunks, at any world size; a store made with other settings (or another corpus) is
refused with one :class:`UserError` line. Example::

    from spokes_lightning.features.extract import extract_features
    from spokes_lightning.features.gradients import ProxyGradientModule

    module = ProxyGradientModule("runs/proxy", n_layers=2, k=1024)
    store = extract_features(module, documents, "runs/features/grad", chunk_size=1024,
                             batch_size=8, devices=2, strategy="ddp")
    store.matrix  # N x 1024 float16 memmap, rows in corpus order; store.skipped: {id: reason}
"""
from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from torch.utils.data import DataLoader, Dataset

from spokes_lightning.data.document_store import DocumentStore
from spokes_lightning.utils.errors import UserError
from spokes_lightning.utils.progress import progress
from spokes_lightning.features.store import FINALIZE_KEYS, MANIFEST, FeatureStore, FeatureStoreWriter

QUIET_WARNINGS = (".*infer the batch indices.*", ".*Total length of `DataLoader` across ranks is zero.*")


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


def _as_is(batch):
    return batch


class _ChunkBatches(Dataset):
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


class ChunkedCorpusDataModule(L.LightningDataModule):
    """Global chunks of ``chunk_size`` documents; chunk c -> rank ``c % world_size``; done chunks skipped."""

    def __init__(self, documents: Iterable[Any], chunk_size: int = 1024, batch_size: int = 8,
                 done_chunks: Iterable[int] = ()):
        super().__init__()
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
        batches = _ChunkBatches(self.source, self.spans_for(rank, world_size))
        return (batches[i] for i in range(len(batches)))

    def batches_for(self, rank: int, world_size: int) -> list[dict[str, Any]]:
        return list(self.iter_batches(rank, world_size))

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(_ChunkBatches(self.source, self.spans_for(rank, world)), batch_size=None, shuffle=False,
                          collate_fn=_as_is)


class ChunkWriter(BasePredictionWriter):
    """Collects rows per chunk and writes a chunk atomically when all its documents are in."""

    def __init__(self, store: FeatureStoreWriter, dim: int, dtype: str = "float16"):
        super().__init__(write_interval="batch")
        self.store, self.dim, self.dtype = store, int(dim), np.dtype(dtype)
        self.pending: dict[int, dict[str, Any]] = {}
        self.chunks_written: list[int] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0):
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


class DocumentProgress(Callback):
    """A tqdm bar on stderr (rank 0) counting documents of this rank's pending chunks."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.bar = total, desc, None

    def on_predict_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.bar = progress(desc=self.desc, total=self.total, unit="doc")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.bar is not None:
            self.bar.update(len(batch["ids"]))

    def on_predict_end(self, trainer, pl_module):
        if self.bar is not None:
            self.bar.close()


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


def extract_features(module: L.LightningModule, documents: Iterable[Any], store_dir: str | Path, *,
                     chunk_size: int = 1024, batch_size: int = 8, devices: int | str = 1,
                     strategy: str = "auto", num_nodes: int = 1, progress: bool = True,
                     accelerator: str = "auto", callbacks: list[Callback] | None = None,
                     unchecked_keys: tuple[str, ...] = ()) -> FeatureStore:
    """Run ``module`` over ``documents`` into the chunked store at ``store_dir``; return the finished store.

    ``callbacks`` run after the chunk writer (a test uses one to slow a run down and kill it);
    ``unchecked_keys`` go to :class:`FeatureStoreWriter` (manifest keys the caller vouches for).
    """
    store_dir = Path(store_dir)
    pairs = as_source(documents)
    if not len(pairs):
        raise UserError("no documents to extract features from")
    dtype = str(getattr(module, "feature_dtype", "float16"))
    writer = FeatureStoreWriter(store_dir, store_manifest(module, pairs, chunk_size, dtype, store_dir), unchecked_keys)
    writer.write_manifest()
    dropped = writer.drop_damaged_chunks(module.feature_dim)
    if dropped:
        print(f"[spokes] features: {len(dropped)} damaged chunk(s) in {store_dir} will be computed again "
              f"({', '.join(map(str, dropped[:10]))})", file=sys.stderr, flush=True)
    data = ChunkedCorpusDataModule(pairs, chunk_size, batch_size, writer.done_chunks())
    chunk_writer = ChunkWriter(writer, module.feature_dim, dtype)
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, num_nodes=num_nodes,
        logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        inference_mode=False, use_distributed_sampler=False,
        callbacks=[chunk_writer, *(callbacks or [])],
    )
    pending = sum(data.chunk_length(c) for c in data.rank_chunks(0, max(1, trainer.world_size)))
    if progress:
        trainer.callbacks.append(DocumentProgress(pending, f"features ({type(module).__name__})"))
    # a rank may have no pending chunk (fewer chunks left than ranks, e.g. a resume): it idles
    module.allow_zero_length_dataloader_with_multiple_devices = True
    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        trainer.predict(module, datamodule=data, return_predictions=False)
    if chunk_writer.pending:
        raise RuntimeError(f"chunks left incomplete after predict: {sorted(chunk_writer.pending)}")
    trainer.strategy.barrier("features-written")
    if trainer.is_global_zero:
        writer.finalize(data.n_chunks, module.feature_dim, dtype)
    trainer.strategy.barrier("features-finalized")
    from spokes_lightning.features.store import open_feature_store

    return open_feature_store(store_dir)
