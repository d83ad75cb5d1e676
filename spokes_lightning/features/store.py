"""On-disk feature store: fixed global chunks written atomically, read as one matrix.

Layout of a store directory::

    manifest.json            what was computed (model, layers, k, projection, seed, ...)
    chunk_000000.npy         float rows of the documents of chunk 0 that have features
    chunk_000000.json        {"chunk": 0, "ids": [...], "skipped": {"id": "reason", ...}, "sha256": "<of the .npy>"}
    features.npy             N x d, written by :meth:`FeatureStoreWriter.finalize` (all chunks, corpus order)
    ids.npy                  the N document ids of the rows, fixed-width UTF-8 bytes (``S<n>``, see id_arrays.py)
    skipped.json             {"id": "reason", ...}: documents without a row (e.g. empty ones)

Stores written by older versions hold ``ids.json`` (``{"ids": [...], "skipped": {...}}``) instead
of the last two; :func:`open_feature_store` reads them too. Every open validates the store (one
:class:`UserError` line for a matrix that is not 2-d, rows != ids, duplicate ids).

A chunk is finished when its ``.json`` exists (it is renamed into place after the ``.npy``),
so a rerun at any world size skips finished chunks and a killed run resumes without
recomputation; a chunk whose ``.npy`` does not match its record (shape, sha256) is recomputed.
Chunks are a pure function of the corpus order and ``chunk_size``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from spokes_lightning.utils.atomic import atomic_path, save_npy_atomic, write_json_atomic
from spokes_lightning.utils.errors import UserError
from spokes_lightning.data.id_arrays import decode_ids, encode_ids, first_duplicate, write_ids_npy

MANIFEST = "manifest.json"
FEATURES = "features.npy"
IDS = "ids.npy"
SKIPPED = "skipped.json"
#: the ids + skipped record of stores written before ids.npy
LEGACY_IDS = "ids.json"
#: keys that finalize() adds: results, not settings, so they never make a store "different"
FINALIZE_KEYS = ("complete", "n_documents", "n_skipped")


def chunk_name(index: int) -> str:
    return f"chunk_{index:06d}"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FeatureStoreWriter:
    """Writes chunks of one feature matrix; safe to use from several ranks (disjoint chunks)."""

    def __init__(self, path: str | Path, manifest: dict[str, Any], unchecked_keys: tuple[str, ...] = ()):
        """``unchecked_keys``: manifest keys whose change does not make the store different (the
        caller vouches for them, e.g. a model path that moved together with its run_dir)."""
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest = dict(manifest)
        existing = self.path / MANIFEST
        if existing.exists():
            old = json.loads(existing.read_text())
            keys = set(old) | set(self.manifest)
            ignored = set(FINALIZE_KEYS) | set(unchecked_keys)
            diff = sorted(k for k in keys if old.get(k) != self.manifest.get(k) and k not in ignored)
            if diff:
                raise UserError(
                    f"feature store {self.path} was made with different settings ({', '.join(diff)}); "
                    "use a new directory or delete it"
                )

    def write_manifest(self) -> None:
        write_json_atomic(self.path / MANIFEST, self.manifest)

    def is_done(self, index: int) -> bool:
        return (self.path / f"{chunk_name(index)}.json").exists()

    def done_chunks(self) -> set[int]:
        return {int(p.stem.split("_")[1]) for p in self.path.glob("chunk_*.json")}

    def drop_damaged_chunks(self, dim: int) -> list[int]:
        """Delete finished chunks whose files do not hold what their record says; they get recomputed."""
        dropped = [i for i in sorted(self.done_chunks()) if not self._chunk_is_sound(i, dim)]
        for i in dropped:
            for suffix in (".json", ".npy"):
                (self.path / f"{chunk_name(i)}{suffix}").unlink(missing_ok=True)
        return dropped

    def _chunk_is_sound(self, index: int, dim: int) -> bool:
        npy = self.path / f"{chunk_name(index)}.npy"
        try:
            meta = json.loads((self.path / f"{chunk_name(index)}.json").read_text())
            rows = np.load(npy, mmap_mode="r")
            shape_ok = rows.shape == (len(meta["ids"]), dim)
        except (OSError, ValueError, EOFError, KeyError, TypeError):
            return False
        return shape_ok and meta.get("sha256") in (None, _file_sha256(npy))

    def write_chunk(
        self, index: int, ids: list[str], rows: np.ndarray, skipped: dict[str, str] | None = None
    ) -> None:
        rows = np.ascontiguousarray(rows)
        if rows.shape[0] != len(ids):
            raise ValueError(f"chunk {index}: {rows.shape[0]} rows for {len(ids)} ids")
        npy = self.path / f"{chunk_name(index)}.npy"
        save_npy_atomic(npy, rows)
        write_json_atomic(
            self.path / f"{chunk_name(index)}.json",
            {"chunk": index, "ids": list(ids), "skipped": dict(skipped or {}), "sha256": _file_sha256(npy)},
        )

    def finalize(self, n_chunks: int, dim: int, dtype: str = "float16") -> "FeatureStore":
        """Concatenate chunks 0..n_chunks-1 into features.npy + ids.npy + skipped.json (atomic, streaming)."""
        missing = [i for i in range(n_chunks) if not self.is_done(i)]
        if missing:
            raise RuntimeError(f"cannot finalize {self.path}: chunks not done: {missing[:10]}")

        def record(i: int) -> dict:
            return json.loads((self.path / f"{chunk_name(i)}.json").read_text())

        n_rows, width, skipped = 0, 1, {}
        for i in range(n_chunks):  # one chunk record at a time: the id lists are never all in memory
            meta = record(i)
            n_rows += len(meta["ids"])
            width = max(width, encode_ids(meta["ids"]).dtype.itemsize)
            skipped.update(meta["skipped"])
        with atomic_path(self.path / FEATURES, suffix=".npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n_rows, dim))
            r = 0
            for i in range(n_chunks):
                block = np.load(self.path / f"{chunk_name(i)}.npy")
                if block.size:
                    out[r : r + len(block)] = block.reshape(len(block), dim)
                r += len(block)
            out.flush()
            del out
        write_ids_npy(self.path / IDS, lambda: (encode_ids(record(i)["ids"]) for i in range(n_chunks)), n_rows, width)
        write_json_atomic(self.path / SKIPPED, skipped)
        (self.path / LEGACY_IDS).unlink(missing_ok=True)  # a store finalized by an older version
        self.manifest.update(
            {"complete": True, "n_documents": n_rows, "n_skipped": len(skipped), "dim": dim}
        )
        self.write_manifest()
        return open_feature_store(self.path)


class FeatureStore:
    """A finished store: ``matrix`` is an N x d read-only memmap in corpus order, row r is ``ids[r]``.

    ``ids_array()`` is the memory-mapped ``ids.npy`` (``S<n>`` UTF-8 bytes): use it at corpus
    scale. ``ids`` is the same as a list of str, decoded on first use (small stores, old callers).
    """

    def __init__(self, path: Path, skipped: dict[str, str], manifest: dict[str, Any],
                 legacy_ids: list[str] | None = None):
        self.path = Path(path)
        self.skipped = skipped
        self.manifest = manifest
        self._ids: list[str] | None = legacy_ids
        self._legacy = legacy_ids is not None

    @property
    def matrix(self) -> np.ndarray:
        return np.load(self.path / FEATURES, mmap_mode="r")

    def ids_array(self) -> np.ndarray:
        if self._legacy:
            return encode_ids(self._ids or [])
        return np.load(self.path / IDS, mmap_mode="r")

    @property
    def ids(self) -> list[str]:
        if self._ids is None:
            self._ids = decode_ids(self.ids_array())
        return self._ids

    def rows_of(self, ids) -> np.ndarray:
        """float32 rows of ``ids`` (each a stored id), in store order."""
        pos = {i: r for r, i in enumerate(self.ids)}
        return np.asarray(self.matrix[np.sort([pos[i] for i in ids])], dtype=np.float32)

    def __len__(self) -> int:
        return len(self._ids) if self._ids is not None else len(self.ids_array())

    def validate(self) -> None:
        """One :class:`UserError` line unless features.npy is an N x d matrix with N unique ids
        (and N = the manifest's ``n_documents`` where it says)."""
        where = f"feature store {self.path}"
        matrix = _readable(lambda: self.matrix, f"{where}: {FEATURES}")
        if matrix.ndim != 2:
            raise UserError(f"{where}: {FEATURES} must be a 2-d N x d matrix, it has shape {matrix.shape}")
        ids = _readable(self.ids_array, f"{where}: {LEGACY_IDS if self._legacy else IDS}")
        if ids.ndim != 1 or ids.dtype.kind != "S":
            raise UserError(f"{where}: {IDS} must be a 1-d array of byte strings, it is {ids.dtype} {ids.shape}")
        if len(ids) != matrix.shape[0]:
            raise UserError(f"{where}: {FEATURES} has {matrix.shape[0]} rows but there are {len(ids)} ids "
                            "(a damaged or half-copied store)")
        n_documents = self.manifest.get("n_documents")
        if n_documents is not None and n_documents != len(ids):
            raise UserError(f"{where}: {len(ids)} ids but its manifest says n_documents = {n_documents}")
        duplicate = _first_duplicate_cached(self, ids)
        if duplicate is not None:
            raise UserError(f"{where}: document id {duplicate!r} appears more than once")


def _readable(load, what: str):
    try:
        return load()
    except (OSError, ValueError, EOFError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UserError(f"{what} cannot be read (truncated or not a .npy file: {first})") from None


#: (ids file, size, mtime, digest) -> the duplicate found (None): an unchanged store is checked once per process
_CHECKED: dict[tuple, str | None] = {}


def _first_duplicate_cached(store: FeatureStore, ids: np.ndarray) -> str | None:
    from spokes_lightning.utils.output_check import file_digest  # whole file, or 64 blocks of a big one (cheap)

    f = store.path / (LEGACY_IDS if store._legacy else IDS)
    st = f.stat()
    key = (str(f.resolve()), st.st_size, st.st_mtime_ns, file_digest(f))
    if key not in _CHECKED:
        _CHECKED[key] = first_duplicate(ids)
    return _CHECKED[key]


def open_feature_store(path: str | Path) -> FeatureStore:
    """The finished store at ``path`` (``ids.npy``, or ``ids.json`` of older stores), validated."""
    path = Path(path)
    has_ids = (path / IDS).exists() or (path / LEGACY_IDS).exists()
    if not has_ids or not (path / FEATURES).exists():
        raise UserError(f"no finished feature store at {path} (run the features stage first)")
    try:
        manifest = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).exists() else {}
        if (path / IDS).exists():
            skipped = json.loads((path / SKIPPED).read_text()) if (path / SKIPPED).exists() else {}
            store = FeatureStore(path, skipped, manifest)
        else:
            meta = json.loads((path / LEGACY_IDS).read_text())
            store = FeatureStore(path, meta["skipped"], manifest, legacy_ids=meta["ids"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"feature store {path}: unreadable record ({exc.__class__.__name__}: {exc})") from None
    store.validate()
    return store


def write_column_slice(store: FeatureStore, path: str | Path, start: int, stop: int,
                       manifest_updates: dict[str, Any], rows_per_block: int = 65536) -> FeatureStore:
    """A finished store at ``path`` holding columns ``[start, stop)`` of ``store`` (same ids and order).

    Used to split a store whose rows concatenate several sketches (e.g. two projection seeds from
    one backward pass). Streams ``rows_per_block`` rows at a time; every file is written atomically
    and the manifest last, so a killed split leaves no store that looks finished.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    matrix = store.matrix
    if not 0 <= start < stop <= matrix.shape[1]:
        raise ValueError(f"columns [{start}, {stop}) outside a store of width {matrix.shape[1]}")
    (path / MANIFEST).unlink(missing_ok=True)
    with atomic_path(path / FEATURES, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=matrix.dtype, shape=(matrix.shape[0], stop - start))
        for r in range(0, matrix.shape[0], rows_per_block):
            out[r : r + rows_per_block] = matrix[r : r + rows_per_block, start:stop]
        out.flush()
        del out
    if store._legacy:
        save_npy_atomic(path / IDS, store.ids_array())
    else:
        with atomic_path(path / IDS, suffix=".npy") as tmp:
            shutil.copyfile(store.path / IDS, tmp)
    write_json_atomic(path / SKIPPED, dict(store.skipped))
    (path / LEGACY_IDS).unlink(missing_ok=True)
    manifest = {**store.manifest, **manifest_updates, "dim": stop - start,
                "columns_of": os.path.relpath(store.path, path), "columns": [start, stop]}
    write_json_atomic(path / MANIFEST, manifest)
    return open_feature_store(path)
