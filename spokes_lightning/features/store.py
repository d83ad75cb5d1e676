"""On-disk feature store: fixed global chunks written atomically, read as one matrix.

Layout of a store directory::

    manifest.json            what was computed (model, layers, k, projection, seed, ...)
    chunk_000000.npy         float rows of the documents of chunk 0 that have features
    chunk_000000.json        {"chunk": 0, "ids": [...], "skipped": {"id": "reason", ...}, "sha256": "<of the .npy>"}
    features.npy, ids.json   written by :meth:`FeatureStoreWriter.finalize` (all chunks, corpus order)

A chunk is finished when its ``.json`` exists (it is renamed into place after the ``.npy``),
so a rerun at any world size skips finished chunks and a killed run resumes without
recomputation; a chunk whose ``.npy`` does not match its record (shape, sha256) is recomputed.
Chunks are a pure function of the corpus order and ``chunk_size``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path, save_npy_atomic, write_json_atomic
from ..errors import UserError

MANIFEST = "manifest.json"
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
        """Concatenate chunks 0..n_chunks-1 into features.npy + ids.json (atomic, streaming)."""
        missing = [i for i in range(n_chunks) if not self.is_done(i)]
        if missing:
            raise RuntimeError(f"cannot finalize {self.path}: chunks not done: {missing[:10]}")
        metas = [json.loads((self.path / f"{chunk_name(i)}.json").read_text()) for i in range(n_chunks)]
        n_rows = sum(len(m["ids"]) for m in metas)
        with atomic_path(self.path / "features.npy", suffix=".npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n_rows, dim))
            r = 0
            for i in range(n_chunks):
                block = np.load(self.path / f"{chunk_name(i)}.npy")
                if block.size:
                    out[r : r + len(block)] = block.reshape(len(block), dim)
                r += len(block)
            out.flush()
            del out
        ids = [x for m in metas for x in m["ids"]]
        skipped = {k: v for m in metas for k, v in m["skipped"].items()}
        write_json_atomic(self.path / "ids.json", {"ids": ids, "skipped": skipped})
        self.manifest.update(
            {"complete": True, "n_documents": n_rows, "n_skipped": len(skipped), "dim": dim}
        )
        self.write_manifest()
        return open_feature_store(self.path)


@dataclass
class FeatureStore:
    """A finished store: ``matrix`` is an N x d read-only memmap in corpus order."""

    path: Path
    ids: list[str]
    skipped: dict[str, str]
    manifest: dict[str, Any]

    @property
    def matrix(self) -> np.ndarray:
        return np.load(self.path / "features.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.ids)


def open_feature_store(path: str | Path) -> FeatureStore:
    path = Path(path)
    if not (path / "ids.json").exists() or not (path / "features.npy").exists():
        raise UserError(f"no finished feature store at {path} (run the features stage first)")
    meta = json.loads((path / "ids.json").read_text())
    manifest = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).exists() else {}
    return FeatureStore(path=path, ids=meta["ids"], skipped=meta["skipped"], manifest=manifest)


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
    with atomic_path(path / "features.npy", suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=matrix.dtype, shape=(matrix.shape[0], stop - start))
        for r in range(0, matrix.shape[0], rows_per_block):
            out[r : r + rows_per_block] = matrix[r : r + rows_per_block, start:stop]
        out.flush()
        del out
    write_json_atomic(path / "ids.json", {"ids": list(store.ids), "skipped": dict(store.skipped)})
    manifest = {**store.manifest, **manifest_updates, "dim": stop - start,
                "columns_of": os.path.relpath(store.path, path), "columns": [start, stop]}
    write_json_atomic(path / MANIFEST, manifest)
    return open_feature_store(path)
