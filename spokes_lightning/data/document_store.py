"""The pool on disk: Arrow IPC shards, memory-mapped, read by row ranges or row lists.

Layout of a store directory::

    index.json            {"format", "n_documents", "rows_per_shard", "batch_rows", "shards": [...]}
    shard_00000.arrow     rows [0, rows_per_shard): columns id, text, source, meta (JSON text)
    shard_00001.arrow     rows [rows_per_shard, 2 * rows_per_shard) ...

Why Arrow IPC files (pyarrow, already a dependency): the file footer lists every record batch,
so row ``i`` is found in O(1) (shard ``i // rows_per_shard``, batch ``i % rows_per_shard //
batch_rows``) and only that batch is decompressed; the columns are memory-mapped, so a reader
holds one batch at a time, never the corpus. The same bytes load in ``pyarrow`` and in
Hugging Face ``datasets`` (``Dataset.from_buffer``/``pa.ipc``), and a shard is a pure function of
its rows, so any number of ranks writes byte-identical shards.

Per document a run keeps only fixed-size arrays (row numbers, lengths, scores); the texts stay
here. ``meta`` holds every other field of the source record as JSON text (quality columns, ...).
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from spokes_lightning.utils.atomic import atomic_path, write_json_atomic
from spokes_lightning.utils.errors import UserError, require_package

FORMAT = "spokes-documents/1"
INDEX = "index.json"
BATCH_ROWS = 1024
COLUMNS = ("id", "text", "source", "meta")
_CACHED_BATCHES = 8


@dataclass
class Document:
    """One text record. ``meta`` holds every other field of the source record."""

    id: str
    text: str
    source: str
    meta: dict = field(default_factory=dict)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.arrow"


def _pa():
    return require_package("pyarrow", "pyarrow")


def schema():
    pa = _pa()
    return pa.schema([(name, pa.string()) for name in COLUMNS])


def write_shard(path: Path, columns: dict[str, list[str]] | Iterable[dict[str, list[str]]],
                batch_rows: int = BATCH_ROWS) -> int:
    """Write one shard atomically from column lists (or an iterable of such blocks); returns rows.

    Rows are re-cut into batches of exactly ``batch_rows`` (the last may be shorter), so the
    bytes depend on the rows alone, not on how the caller blocked them.
    """
    pa = _pa()
    blocks = [columns] if isinstance(columns, dict) else columns
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    n = 0
    with atomic_path(path, suffix=".arrow") as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema(), options=options) as writer:
            pending = {c: [] for c in COLUMNS}
            for block in blocks:
                for c in COLUMNS:
                    pending[c].extend(block[c])
                while len(pending["id"]) >= batch_rows:
                    writer.write_batch(_batch({c: v[:batch_rows] for c, v in pending.items()}))
                    pending = {c: v[batch_rows:] for c, v in pending.items()}
                    n += batch_rows
            if pending["id"]:
                writer.write_batch(_batch(pending))
                n += len(pending["id"])
    return n


def _batch(columns: dict[str, list[str]]):
    pa = _pa()
    return pa.record_batch([pa.array(columns[c], type=pa.string()) for c in COLUMNS], schema=schema())


def document_columns(docs: Sequence[Document]) -> dict[str, list[str]]:
    """Documents as the store's string columns (meta as sorted JSON, so bytes are reproducible)."""
    return {"id": [d.id for d in docs], "text": [d.text for d in docs], "source": [d.source for d in docs],
            "meta": [json.dumps(d.meta, sort_keys=True, default=str) for d in docs]}


def write_index(path: Path, shard_rows: list[int], rows_per_shard: int, extra: dict | None = None) -> None:
    """The store's index, written last: a store without it is unfinished."""
    write_json_atomic(Path(path) / INDEX, {
        "format": FORMAT, "n_documents": int(sum(shard_rows)), "rows_per_shard": int(rows_per_shard),
        "batch_rows": BATCH_ROWS, "shards": [{"file": shard_name(i), "rows": int(r)} for i, r in enumerate(shard_rows)],
        **(extra or {})})


class DocumentStore(Sequence):
    """A finished store, read lazily: ``len``, ``store[i]``, ``take(rows)``, ``batches()``, iteration.

    Picklable (only the path travels), so worker processes and ranks open it themselves.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_path = self.path / INDEX
        if not index_path.exists():
            raise UserError(f"no finished document store at {self.path} (no {INDEX}; run the corpus stage)")
        try:
            self.index = json.loads(index_path.read_text())
        except ValueError:
            raise UserError(f"{index_path}: unreadable document store index") from None
        if self.index.get("format") != FORMAT:
            raise UserError(f"{self.path}: not a document store of format {FORMAT}")
        self.n = int(self.index["n_documents"])
        self.rows_per_shard = int(self.index["rows_per_shard"])
        self.batch_rows = int(self.index["batch_rows"])
        self._readers: dict[int, object] = {}
        self._cache: OrderedDict = OrderedDict()

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    # ------------------------------------------------------------------ raw access
    def _reader(self, shard: int):
        if shard not in self._readers:
            pa = _pa()
            info = self.index["shards"][shard]
            try:
                self._readers[shard] = pa.ipc.open_file(pa.memory_map(str(self.path / info["file"]), "r"))
            except (OSError, pa.ArrowInvalid) as exc:
                raise UserError(f"{self.path / info['file']}: unreadable shard ({str(exc).splitlines()[0]})") from None
        return self._readers[shard]

    def _batch(self, shard: int, number: int):
        key = (shard, number)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        batch = self._reader(shard).get_batch(number)
        self._cache[key] = batch
        if len(self._cache) > _CACHED_BATCHES:
            self._cache.popitem(last=False)
        return batch

    def _locate(self, row: int) -> tuple[int, int, int]:
        shard, within = divmod(int(row), self.rows_per_shard)
        number, offset = divmod(within, self.batch_rows)
        return shard, number, offset

    def columns(self, start: int, stop: int, names: Sequence[str] = COLUMNS) -> dict[str, list]:
        """Columns ``names`` of rows ``[start, stop)`` as Python lists (read batch by batch)."""
        out: dict[str, list] = {c: [] for c in names}
        row = max(0, int(start))
        stop = min(int(stop), self.n)
        while row < stop:
            shard, number, offset = self._locate(row)
            batch = self._batch(shard, number)
            take = min(stop - row, batch.num_rows - offset)
            part = batch.slice(offset, take)
            for c in names:
                out[c].extend(part.column(c).to_pylist())
            row += take
        return out

    def documents(self, start: int, stop: int) -> list[Document]:
        cols = self.columns(start, stop)
        return [Document(i, t, s, json.loads(m) if m else {})
                for i, t, s, m in zip(cols["id"], cols["text"], cols["source"], cols["meta"])]

    # ------------------------------------------------------------------ Sequence
    def __len__(self) -> int:
        return self.n

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(self.n))]
        row = int(row)
        if row < 0:
            row += self.n
        if not 0 <= row < self.n:
            raise IndexError(f"row {row} outside a store of {self.n} documents")
        return self.documents(row, row + 1)[0]

    def __iter__(self) -> Iterator[Document]:
        for _, docs in self.batches():
            yield from docs

    def batches(self, size: int = BATCH_ROWS, start: int = 0, stop: int | None = None
                ) -> Iterator[tuple[int, list[Document]]]:
        """``(first row, documents)`` for consecutive blocks of ``size`` rows of ``[start, stop)``."""
        stop = self.n if stop is None else min(int(stop), self.n)
        for first in range(int(start), stop, int(size)):
            yield first, self.documents(first, min(first + int(size), stop))

    def take_columns(self, rows: Iterable[int], names: Sequence[str] = COLUMNS) -> dict[str, list]:
        """Columns ``names`` of the rows ``rows``, in that order.

        Rows are grouped by record batch: each batch touched is decompressed once per call and only
        the wanted rows become Python objects, so a caller reading a scattered selection should pass
        large blocks of rows (the export reads 32k at a time)."""
        pa = _pa()
        rows = np.asarray(rows if isinstance(rows, np.ndarray) else list(rows), dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"rows outside a store of {self.n} documents")
        out: dict[str, list] = {c: [None] * len(rows) for c in names}
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        batch_of = sorted_rows // self.batch_rows  # global batch number (shards hold whole batches)
        cuts = np.flatnonzero(np.diff(batch_of)) + 1
        for group in np.split(np.arange(len(order)), cuts):
            if not len(group):
                continue
            first_row = int(sorted_rows[group[0]])
            shard, number, _ = self._locate(first_row)
            first = shard * self.rows_per_shard + number * self.batch_rows
            batch = self._batch(shard, number)
            picked = batch.take(pa.array(sorted_rows[group] - first))
            for c in names:
                values = picked.column(c).to_pylist()
                target = out[c]
                for k, value in zip(order[group].tolist(), values):
                    target[k] = value
        return out

    def take(self, rows: Iterable[int], meta: bool = True) -> list[Document]:
        """The documents at ``rows``, in that order (``meta=False``: fields other than id, text and
        source are left out, which spares parsing their JSON)."""
        names = COLUMNS if meta else ("id", "text", "source")
        cols = self.take_columns(rows, names)
        metas = cols["meta"] if meta else [None] * len(cols["id"])
        return [Document(i, t, s, json.loads(m) if m else {})
                for i, t, s, m in zip(cols["id"], cols["text"], cols["source"], metas)]

    def column_array(self, name: str, start: int = 0, stop: int | None = None) -> list:
        """One column of rows ``[start, stop)`` (ids, sources), read batch by batch."""
        return self.columns(start, self.n if stop is None else stop, (name,))[name]

    def texts(self, rows: Iterable[int]) -> list[str]:
        return [d.text for d in self.take(rows)]


def open_document_store(path: str | Path) -> DocumentStore:
    return DocumentStore(path)


def write_document_store(path: str | Path, docs: Iterable[Document], rows_per_shard: int = 1 << 20) -> DocumentStore:
    """A store from an iterable of documents (one process; the corpus stage has the sharded writer)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / INDEX).unlink(missing_ok=True)
    shard_rows: list[int] = []
    pending: list[Document] = []

    def flush():
        shard_rows.append(write_shard(path / shard_name(len(shard_rows)), document_columns(pending)))
        pending.clear()

    for doc in docs:
        pending.append(doc)
        if len(pending) == rows_per_shard:
            flush()
    if pending or not shard_rows:
        flush()
    write_index(path, shard_rows, rows_per_shard)
    return DocumentStore(path)
