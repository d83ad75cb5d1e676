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

    from spokes_lightning.features.extract import ProxyGradientModule, extract_features

    module = ProxyGradientModule("runs/proxy", n_layers=2, k=1024)
    store = extract_features(module, documents, "runs/features/grad", chunk_size=1024,
                             batch_size=8, devices=2, strategy="ddp")
    store.matrix  # N x 1024 float16 memmap, rows in corpus order; store.skipped: {id: reason}
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Iterable

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from torch.utils.data import DataLoader

from spokes_lightning.features.chunks import ChunkBatches, ChunkPlan, ChunkRows, as_source, store_manifest
from spokes_lightning.features.gradients import ProxyGradients
from spokes_lightning.features.store import FeatureStore, FeatureStoreWriter
from spokes_lightning.utils.errors import UserError
from spokes_lightning.utils.progress import progress

QUIET_WARNINGS = (".*infer the batch indices.*", ".*Total length of `DataLoader` across ranks is zero.*")


def _as_is(batch):
    return batch


class ProxyGradientModule(ProxyGradients, L.LightningModule):
    """:class:`~spokes_lightning.features.gradients.ProxyGradients` as a LightningModule: the same
    arguments, rows and manifest, for :func:`extract_features` (``Trainer.predict``, one process or DDP)."""


class ChunkedCorpusDataModule(ChunkPlan, L.LightningDataModule):
    """:class:`ChunkPlan` as a LightningDataModule: each rank's batches from the trainer's rank."""

    def __init__(self, documents: Iterable[Any], chunk_size: int = 1024, batch_size: int = 8,
                 done_chunks: Iterable[int] = ()):
        L.LightningDataModule.__init__(self)
        ChunkPlan.__init__(self, documents, chunk_size, batch_size, done_chunks)

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(ChunkBatches(self.source, self.spans_for(rank, world)), batch_size=None, shuffle=False,
                          collate_fn=_as_is)


class ChunkWriter(BasePredictionWriter):
    """:class:`ChunkRows` as a prediction-writer callback: every batch's rows, chunk by chunk."""

    def __init__(self, store: FeatureStoreWriter, dim: int, dtype: str = "float16"):
        super().__init__(write_interval="batch")
        self.rows = ChunkRows(store, dim, dtype)

    @property
    def pending(self) -> dict[int, dict[str, Any]]:
        return self.rows.pending

    @property
    def chunks_written(self) -> list[int]:
        return self.rows.chunks_written

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0):
        self.rows.add(prediction, batch)


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
