"""Test helpers for the export: a lazy, picklable document store and the legacy single-process
export, written straight with megatron-core's builder, gzip and ``pq.write_table`` (the expected bytes)."""
from __future__ import annotations

import errno
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiny_text import tiny_corpus


@dataclass
class Document:
    id: str
    text: str
    source: str


class LazyStore:
    """Documents in a JSON-lines file, read on first use; pickles as its path only.

    Counts, in the process that uses it, the rows asked through ``take`` and ``__getitem__``.
    """

    def __init__(self, path):
        self.path = str(path)
        self._docs = None
        self.take_sizes: list[int] = []
        self.getitem_calls = 0

    @classmethod
    def write(cls, path, docs) -> "LazyStore":
        Path(path).write_text("".join(json.dumps(d) + "\n" for d in docs))
        return cls(path)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def _rows(self) -> list[Document]:
        if self._docs is None:
            with open(self.path) as fh:
                self._docs = [Document(**json.loads(line)) for line in fh]
        return self._docs

    def __len__(self) -> int:
        return len(self._rows())

    def __getitem__(self, i):
        self.getitem_calls += 1
        return self._rows()[i]

    def take(self, rows: np.ndarray) -> list[Document]:
        rows = np.asarray(rows)
        self.take_sizes.append(len(rows))
        docs = self._rows()
        return [docs[i] for i in rows.tolist()]


class FailsInWorkers(LazyStore):
    """Reads fail with ENOSPC in any process but the one that made the store."""

    def __init__(self, path, owner: int | None = None):
        super().__init__(path)
        self.owner = os.getpid() if owner is None else owner

    def __getstate__(self):
        return {"path": self.path, "owner": self.owner}

    def __setstate__(self, state):
        self.__init__(state["path"], state["owner"])

    def take(self, rows):
        if os.getpid() != self.owner:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().take(rows)


def export_case(n: int = 60, k: int = 45, seed: int = 5):
    """A corpus, a selection (int64 positions, shuffled) and copies in 1..3."""
    corpus = tiny_corpus(n, seed=seed)
    rng = np.random.default_rng(seed)
    return corpus, rng.permutation(n)[:k].astype(np.int64), rng.integers(1, 4, size=k)


def legacy_export(corpus, selection, copies, tokenizer, out: Path) -> dict[str, bytes]:
    """The bytes of a one-process, all-in-memory export: ``{suffix: bytes}``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    out.mkdir(parents=True, exist_ok=True)
    records = []
    for j, pos in enumerate(selection.tolist()):
        d = corpus[pos]
        rec = {"id": str(d["id"]), "text": d["text"], "source": d["source"]}
        if copies is not None:
            rec["copies"] = int(copies[j])
        records.append(rec)
    with open(out / "m.jsonl.gz", "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        for rec in records:
            gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    pq.write_table(pa.table({k: [r[k] for r in records] for k in records[0]}), out / "m.parquet")
    eod = tokenizer.eos_token_id
    builder = IndexedDatasetBuilder(str(out / "m.bin"), dtype=DType.optimal_dtype(len(tokenizer)))
    for j, rec in enumerate(records):
        ids = tokenizer(rec["text"], add_special_tokens=False)["input_ids"] + [eod]
        for _ in range(1 if copies is None else int(copies[j])):
            builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
    builder.finalize(str(out / "m.idx"))
    return {s: (out / f"m{s}").read_bytes() for s in (".bin", ".idx", ".jsonl.gz", ".parquet")}


def exported_bytes(res) -> dict[str, bytes]:
    return {".bin": Path(res.data_prefix + ".bin").read_bytes(),
            ".idx": Path(res.data_prefix + ".idx").read_bytes(),
            ".jsonl.gz": Path(res.jsonl_path).read_bytes(),
            ".parquet": Path(res.parquet_path).read_bytes()}
