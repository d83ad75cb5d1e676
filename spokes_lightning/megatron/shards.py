"""Sharded, parallel tokenization into one Megatron indexed dataset, in bounded memory.

The selected positions are cut into fixed contiguous shards of ``shard_docs`` documents
(:func:`shard_ranges`: a pure function of the selection, independent of the number of workers or
ranks). Shard ``s`` is tokenized into ``<shard_dir>/<name>.shard{s:05d}.bin/.idx``
(:class:`~spokes_lightning.megatron.index_format.IndexedDatasetWriter`: the bytes of
megatron-core's ``IndexedDatasetBuilder``, as a single-process export writes those documents), by
a spawned process pool (:func:`run_shard_jobs`) or, under ``torch.distributed``, by rank
``s % world`` (:func:`shards_for_rank`). :class:`ShardMerger` then concatenates the shards in order
into one ``.bin/.idx``.

Why not ``IndexedDatasetBuilder.add_index`` for the merge: it streams the ``.bin`` (``shutil.copyfileobj``)
but appends every sequence length and document index of the shard to Python lists of numpy scalars,
and ``finalize`` builds a Python list of every sequence pointer: about 90 bytes per document kept
and ~135 bytes per document at peak (measured with megatron-core 0.16.1), i.e. ~13 GB for 100M
documents. :class:`ShardMerger` writes the same bytes (the tests compare it with ``add_index``)
reading each shard index in chunks of :data:`MERGE_CHUNK` entries, so its memory does not grow with
the selection. It deletes each shard's ``.bin`` as soon as it is appended, so the disk holds about
one copy of the tokens, not two.
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from spokes_lightning.megatron.index_format import (
    COUNTS,
    HEADER_BYTES,
    IndexedDatasetWriter,
    index_counts,
    read_index_header,
    sequence_offsets,
)
from spokes_lightning.utils.errors import UserError
from spokes_lightning.utils.progress import progress

TOKENIZE_BATCH = 256  # texts per tokenizer call
SHARD_DOCS = 50_000  # selected documents per shard (before copies)
BLOCK_SIZE = 32768  # documents read from the store at a time (a scattered selection decodes each batch once a block)
MERGE_CHUNK = 1 << 20  # index entries read/written at a time when merging
COPY_BUFFER = 8 << 20  # bytes per read when appending a shard's .bin


# ----------------------------------------------------------------------------- reading documents


def field(doc, name: str, default=None):
    """``doc[name]`` for a mapping, ``doc.name`` otherwise."""
    if isinstance(doc, Mapping):
        return doc.get(name, default)
    return getattr(doc, name, default)


def read_block(documents, positions: np.ndarray) -> list:
    """The documents at ``positions`` (in that order): ``documents.take`` when it has one."""
    from spokes_lightning.data.document_store import DocumentStore

    if isinstance(documents, DocumentStore):
        docs = documents.take(positions, meta=False)  # the export reads id, text and source only
    else:
        take = getattr(documents, "take", None)
        docs = take(positions) if callable(take) else [documents[i] for i in positions.tolist()]
    if len(docs) != len(positions):
        raise UserError(f"document store returned {len(docs)} documents for {len(positions)} positions")
    return docs


def document_text(doc, pos: int) -> str:
    text = field(doc, "text")
    if not isinstance(text, str):
        raise UserError(f"document at position {pos} has no text")
    return text


def iter_blocks(documents, positions: np.ndarray, block_size: int) -> Iterator[tuple[int, list]]:
    """``(offset into positions, documents)`` for consecutive blocks of ``block_size`` positions."""
    for start in range(0, len(positions), block_size):
        yield start, read_block(documents, positions[start : start + block_size])


# ----------------------------------------------------------------------------- shard plan


def shard_ranges(n_selected: int, shard_docs: int) -> list[tuple[int, int]]:
    """``[start, stop)`` into the selection of each shard: fixed size, the last one shorter."""
    if int(shard_docs) < 1:
        raise UserError(f"shard_docs must be >= 1, got {shard_docs}")
    return [(a, min(a + int(shard_docs), n_selected)) for a in range(0, n_selected, int(shard_docs))]


def shards_for_rank(n_shards: int, rank: int, world: int) -> range:
    """The shards that rank ``rank`` of ``world`` tokenizes: those with ``s % world == rank``."""
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"rank {rank} is not in a world of {world}")
    return range(rank, n_shards, world)


def shard_prefix(shard_dir: Path, name: str, s: int) -> Path:
    return Path(shard_dir) / f"{name}.shard{s:05d}"


@dataclass
class ShardJob:
    """One shard: the positions it reads and the copies of each (None: once each)."""

    index: int
    positions: np.ndarray
    copies: np.ndarray | None
    prefix: str


def shard_jobs(positions: np.ndarray, copies: np.ndarray | None, shard_dir: Path, name: str,
               shard_docs: int, which: Sequence[int] | None = None) -> list[ShardJob]:
    """Jobs for the shards in ``which`` (default: all), slicing (not copying) the selection."""
    ranges = shard_ranges(len(positions), shard_docs)
    return [ShardJob(s, positions[a:b], None if copies is None else copies[a:b],
                     str(shard_prefix(shard_dir, name, s)))
            for s, (a, b) in enumerate(ranges) if which is None or s in which]


# ----------------------------------------------------------------------------- tokenizing a shard


def tokenize_shard(documents, job: ShardJob, tokenizer, *, eod_id: int, dtype,
                   block_size: int = BLOCK_SIZE) -> dict:
    """Write ``job.prefix.bin/.idx``: each document's tokens + EOD, ``copies`` times, in order.

    Files appear under their names only when complete. Returns docs, tokens and seconds.
    """
    t0 = time.perf_counter()
    part = job.prefix + ".part"
    n_docs = n_tokens = 0
    writer = IndexedDatasetWriter(part + ".bin", dtype)
    try:
        for start, docs in iter_blocks(documents, job.positions, block_size):
            texts = [document_text(doc, int(job.positions[start + k])) for k, doc in enumerate(docs)]
            for b in range(0, len(texts), TOKENIZE_BATCH):
                encoded = tokenizer(texts[b : b + TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]
                for k, ids in enumerate(encoded):
                    arr = np.empty(len(ids) + 1, dtype=dtype)
                    arr[:-1] = ids
                    arr[-1] = eod_id
                    times = 1 if job.copies is None else int(job.copies[start + b + k])
                    for _ in range(times):
                        writer.add_document(arr)
                    n_docs += times
                    n_tokens += times * arr.size
        writer.finish(part + ".idx")
        os.replace(part + ".bin", job.prefix + ".bin")
        os.replace(part + ".idx", job.prefix + ".idx")  # the index last: it marks the shard done
    except BaseException:
        writer.close()
        for suffix in (".bin", ".idx"):
            Path(part + suffix).unlink(missing_ok=True)
        raise
    return {"shard": job.index, "n_docs": n_docs, "n_tokens": n_tokens,
            "seconds": time.perf_counter() - t0}


_WORKER: dict = {}


def _init_worker(documents, tokenizer, eod_id, dtype, block_size):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
    _WORKER.update(documents=documents, tokenizer=tokenizer,
                   kw={"eod_id": eod_id, "dtype": dtype, "block_size": block_size})


def _run_in_worker(job: ShardJob) -> dict:
    return tokenize_shard(_WORKER["documents"], job, _WORKER["tokenizer"], **_WORKER["kw"])


def run_shard_jobs(documents, jobs: list[ShardJob], tokenizer, *, eod_id: int, dtype,
                   block_size: int = BLOCK_SIZE, workers: int = 1,
                   while_running: Callable[[], None] | None = None) -> Iterator[dict]:
    """Tokenize ``jobs`` and yield their stats in job order as each (and all before it) is done.

    ``workers > 1``: a 'spawn' process pool (``documents`` and ``tokenizer`` are pickled once per
    worker); shards are handed to whichever worker is free, which changes no byte of the output.
    ``while_running`` runs in this process right after the jobs are submitted (overlapping them).
    On an error the pending shards are cancelled and the pool shut down before it propagates.
    """
    kw = {"eod_id": eod_id, "dtype": dtype, "block_size": block_size}
    if int(workers) < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    if workers == 1 or len(jobs) <= 1:
        if while_running is not None:
            while_running()
        for job in jobs:
            yield tokenize_shard(documents, job, tokenizer, **kw)
        return
    import multiprocessing
    import pickle
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        pickle.dumps((documents, tokenizer))
    except Exception as exc:
        raise UserError(f"workers={workers} needs picklable documents and tokenizer: {exc}") from None
    pool = ProcessPoolExecutor(max_workers=min(int(workers), len(jobs)),
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker,
                               initargs=(documents, tokenizer, eod_id, dtype, block_size))
    try:
        futures = [pool.submit(_run_in_worker, job) for job in jobs]
        if while_running is not None:
            while_running()
        for fut in futures:
            try:
                stats = fut.result()
            except BrokenProcessPool:
                raise UserError("a tokenizing worker process died (out of memory? try fewer workers "
                                "or a smaller shard_docs)") from None
            yield stats
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- merging shards


def _chunks(path: str, offset: int, dtype, count: int) -> Iterator[np.ndarray]:
    """``count`` values of ``dtype`` from byte ``offset`` of ``path``, MERGE_CHUNK at a time."""
    item = np.dtype(dtype).itemsize
    with open(path, "rb") as fh:
        for start in range(0, count, MERGE_CHUNK):
            fh.seek(offset + start * item)
            n = min(MERGE_CHUNK, count - start)
            chunk = np.fromfile(fh, dtype=dtype, count=n)
            if chunk.size != n:
                raise UserError(f"{path} is truncated")
            yield chunk


@dataclass
class _Part:
    idx: str
    n_seq: int
    n_doc: int


class ShardMerger:
    """Concatenate shard datasets, in the order appended, into ``prefix.bin/.idx``.

    The output is byte-identical to megatron-core's ``IndexedDatasetBuilder.add_index`` over the
    same shards, in memory independent of their size. Use as a context manager: :meth:`finish`
    renames the finished pair onto ``prefix`` (the old ``.idx`` is removed first and the new one
    appears last); leaving the block without it removes everything written.
    """

    def __init__(self, prefix: str | os.PathLike, *, delete_shards: bool = True):
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        # A fixed name: a killed merge's leftovers (about one copy of the data) go on the next run.
        self.tmp_dir = self.prefix.parent / f".tmp-{self.prefix.name}-merge"
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir()
        self.bin_path = self.tmp_dir / "data.bin"
        self.bin = open(self.bin_path, "wb")
        self.delete_shards = delete_shards
        self.parts: list[_Part] = []
        self.head: bytes | None = None
        self.itemsize = 0
        self.n_tokens = 0
        self.seconds = 0.0

    def __enter__(self) -> "ShardMerger":
        return self

    def __exit__(self, *exc) -> None:
        self.bin.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def append(self, shard_prefix: str | os.PathLike) -> None:
        t0 = time.perf_counter()
        shard_prefix = str(shard_prefix)
        idx, bin_ = shard_prefix + ".idx", shard_prefix + ".bin"
        if not (os.path.exists(idx) and os.path.exists(bin_)):
            raise UserError(f"shard {shard_prefix} is missing (did every rank finish?)")
        head, n_seq, n_doc, item = read_index_header(idx)
        if self.head is None:
            self.head, self.itemsize = head, item
        elif head != self.head:
            raise UserError(f"shard {shard_prefix} has another token dtype than the first shard")
        _, tokens = index_counts(idx, MERGE_CHUNK)
        if os.path.getsize(bin_) != tokens * item:
            raise UserError(f"shard {shard_prefix}.bin does not match its index")
        with open(bin_, "rb") as src:
            shutil.copyfileobj(src, self.bin, COPY_BUFFER)
        if self.delete_shards:
            os.unlink(bin_)
        self.parts.append(_Part(idx, n_seq, n_doc))
        self.n_tokens += tokens
        self.seconds += time.perf_counter() - t0

    @property
    def n_docs(self) -> int:
        return sum(p.n_doc - 1 for p in self.parts)

    def _write_index(self, out) -> None:
        n_seq = sum(p.n_seq for p in self.parts)
        out.write(self.head + COUNTS.pack(n_seq, self.n_docs + 1))
        lengths = lambda p: _chunks(p.idx, HEADER_BYTES + COUNTS.size, np.int32, p.n_seq)  # noqa: E731
        for p in self.parts:  # tokens per sequence
            for c in lengths(p):
                out.write(c.tobytes())
        base = 0
        for p in self.parts:  # byte offset of each sequence in the merged .bin
            for c in lengths(p):
                offsets = sequence_offsets(c, self.itemsize, base)
                out.write(offsets.tobytes())
                base = int(offsets[-1]) + int(c[-1]) * self.itemsize
        out.write(np.zeros(1, dtype=np.int64).tobytes())  # document boundaries, as sequence indices
        seq_offset = 0
        for p in self.parts:
            doc_off = HEADER_BYTES + COUNTS.size + p.n_seq * (4 + 8)
            first = True
            for c in _chunks(p.idx, doc_off, np.int64, p.n_doc):
                c = c[1:] if first else c  # each shard's leading 0 is the previous shard's end
                first = False
                out.write((c + seq_offset).tobytes())
            seq_offset += p.n_seq

    def finish(self) -> tuple[int, int]:
        """Write the index, rename both files onto ``prefix``; returns (documents, tokens)."""
        if not self.parts:
            raise UserError("no shards to merge")
        t0 = time.perf_counter()
        self.bin.flush()
        os.fsync(self.bin.fileno())
        self.bin.close()
        idx_tmp = self.tmp_dir / "data.idx"
        with open(idx_tmp, "wb") as out:
            self._write_index(out)
            out.flush()
            os.fsync(out.fileno())
        # .idx disappears first and appears last: a reader never pairs an old index with new data.
        Path(str(self.prefix) + ".idx").unlink(missing_ok=True)
        os.replace(self.bin_path, str(self.prefix) + ".bin")
        os.replace(idx_tmp, str(self.prefix) + ".idx")
        if self.delete_shards:
            for p in self.parts:
                Path(p.idx).unlink(missing_ok=True)
        self.seconds += time.perf_counter() - t0
        return self.n_docs, self.n_tokens


# ----------------------------------------------------------------------------- the whole step


def tokenize_and_merge(documents, positions: np.ndarray, copies: np.ndarray | None, tokenizer,
                       prefix: str | os.PathLike, shard_dir: str | os.PathLike, *, eod_id: int, dtype,
                       which: Sequence[int] | None = None, merge: bool = True, workers: int = 1,
                       shard_docs: int = SHARD_DOCS, block_size: int = BLOCK_SIZE,
                       before: Callable[[], None] | None = None, desc: str = "tokenize",
                       timings: dict | None = None) -> tuple[int, int]:
    """Tokenize the shards in ``which`` (None: all) into ``shard_dir``.

    With ``merge``, append each shard as soon as it and all before it are done and write
    ``prefix.bin/.idx`` (returns its (documents, tokens); else (0, 0) and the shard files stay for
    a later :class:`ShardMerger`, e.g. on rank 0 once every rank is done). ``before`` runs first,
    or meanwhile when a pool works. ``timings`` gets ``tokenize_s``, ``shard_busy_s``, ``merge_s``.
    """
    prefix = Path(prefix)
    jobs = shard_jobs(positions, copies, Path(shard_dir), prefix.name, shard_docs, which)
    by_index = {job.index: job for job in jobs}
    overlap = workers > 1 and len(jobs) > 1
    if before is not None and not overlap:
        before()
    t0 = time.perf_counter()
    bar = progress(desc=desc, total=sum(len(j.positions) for j in jobs), unit="doc")
    busy = 0.0
    results = run_shard_jobs(documents, jobs, tokenizer, eod_id=eod_id, dtype=dtype, block_size=block_size,
                             workers=workers, while_running=before if overlap else None)
    with closing(bar), closing(results), ShardMerger(prefix) if merge else nullcontext() as merger:
        for stats in results:  # in shard order
            job = by_index[stats["shard"]]
            busy += stats["seconds"]
            if merger is not None:
                merger.append(job.prefix)
            bar.update(len(job.positions))
        tokenized = time.perf_counter()
        result = merger.finish() if merger is not None else (0, 0)
    merge_s = merger.seconds if merger is not None else 0.0
    if timings is not None:
        timings.update(tokenize_s=tokenized - t0 - (0.0 if overlap else merge_s), shard_busy_s=busy,
                       merge_s=merge_s)
    return result
