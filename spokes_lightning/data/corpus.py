"""Reading text corpora: local ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` files and hub streams.

Every record becomes a :class:`Document` (id, text, source, meta). Readers keep file order,
so document ``i`` of a run is always the same document. Bad input raises
:class:`~spokes_lightning.utils.errors.UserError` with one line naming the file (and line):
missing or unreadable files, invalid JSON, an absent text field, duplicate ids. Bytes that
are not valid UTF-8 are replaced by U+FFFD and counted in :class:`ReadStats`.

The shipped demo corpus lives in :data:`DEMO_DIR` (see ``data/demo/README.md``).
"""
from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import sys
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from spokes_lightning.data.document_store import Document
from spokes_lightning.utils.errors import UserError, require_package
from spokes_lightning.data.hub import hub_offline_reason
from spokes_lightning.utils.resources import shipped_dir

DEMO_DIR = shipped_dir("demo_data")  # data/demo of a checkout, or the installed package's copy
SUPPORTED_SUFFIXES = (".jsonl.gz", ".jsonl", ".parquet")
_PARQUET_BATCH = 1024


@dataclass
class ReadStats:
    """What a read saw: files, records, derived ids and replaced non-UTF-8 bytes."""

    files: int = 0
    records: int = 0
    derived_ids: int = 0
    replaced_bytes: int = 0
    empty_texts: int = 0
    skipped: int = 0  # malformed records passed over (data.on_error: skip)
    skipped_examples: list = field(default_factory=list)  # "<file> line <n>: <why>", the first few

    def skip(self, where: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < 10:
            self.skipped_examples.append(where)


# --------------------------------------------------------------------------- decoding
_tally = threading.local()
_COUNTING_HANDLER = "spokes_lightning.count_and_replace"


def _count_and_replace(exc: UnicodeDecodeError):
    """Codec error handler: replace an invalid byte run by U+FFFD and count its bytes."""
    _tally.bytes = getattr(_tally, "bytes", 0) + (exc.end - exc.start)
    return "\ufffd", exc.end


codecs.register_error(_COUNTING_HANDLER, _count_and_replace)


def decode_utf8_counting(raw: bytes) -> tuple[str, int]:
    """Decode ``raw`` as UTF-8, replacing invalid bytes; return (text, n_replaced_bytes)."""
    _tally.bytes = 0
    text = raw.decode("utf-8", errors=_COUNTING_HANDLER)
    return text, _tally.bytes


# --------------------------------------------------------------------------- paths
def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUPPORTED_SUFFIXES if name.endswith(s)), None)


def file_stem(path: Path) -> str:
    """File name without its corpus suffix: ``web.jsonl.gz`` -> ``web``."""
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def resolve_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand globs and directories (sorted) and check every file exists and is supported."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    resolved: list[Path] = []
    for raw in paths:
        text = str(raw)
        if any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text))
            if not matches:
                raise UserError(f"no files match {text!r}")
            resolved.extend(Path(m) for m in matches)
        elif Path(text).is_dir():
            found = sorted(p for p in Path(text).iterdir() if p.is_file() and _suffix(p))
            if not found:
                raise UserError(f"directory {text} holds no .jsonl, .jsonl.gz or .parquet files")
            resolved.extend(found)
        else:
            resolved.append(Path(text))
    if not resolved:
        raise UserError("no input files given (set data.paths=[...])")
    for path in resolved:
        if not path.exists():
            raise UserError(f"file not found: {path}")
        if _suffix(path) is None:
            raise UserError(f"{path}: unsupported file type (expected .jsonl, .jsonl.gz "
                            "or .parquet)")
    return resolved


# --------------------------------------------------------------------------- raw records
ON_ERROR = ("raise", "skip")


def jsonl_records(path: Path, stats: ReadStats, on_error: str = "raise") -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a jsonl or jsonl.gz file.

    A malformed line raises one line naming the file and line, or (``on_error="skip"``) is
    passed over and counted in ``stats``."""
    gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            for number, raw in enumerate(fh, start=1):
                text, bad = decode_utf8_counting(raw)
                stats.replaced_bytes += bad
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    problem = f"{path} line {number}: invalid JSON ({exc.msg})"
                else:
                    if isinstance(record, dict):
                        yield number, record
                        continue
                    problem = f"{path} line {number}: expected a JSON object, got {type(record).__name__}"
                if on_error != "skip":
                    raise UserError(problem + " (data.on_error=skip passes over malformed lines)")
                stats.skip(problem)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: corrupt or truncated gzip file ({exc})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read file ({exc.strerror or exc})") from None


def _parquet_records(path: Path, stats: ReadStats) -> Iterator[tuple[int, dict]]:
    """(row number, record) for each row of a parquet file; binary cells are decoded."""
    pq = require_package("pyarrow.parquet", "pyarrow")
    try:
        reader = pq.ParquetFile(path)
        batches = reader.iter_batches(batch_size=_PARQUET_BATCH)
        number = 0
        for batch in batches:
            for record in batch.to_pylist():
                number += 1
                for key, value in record.items():
                    if isinstance(value, bytes):
                        record[key], bad = decode_utf8_counting(value)
                        stats.replaced_bytes += bad
                yield number, record
    except UserError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        raise UserError(f"{path}: unreadable parquet file ({str(exc).splitlines()[0]})") \
            from None


def _records(path: Path, stats: ReadStats, on_error: str = "raise") -> Iterator[tuple[int, dict]]:
    if _suffix(path) == ".parquet":
        return _parquet_records(path, stats)
    return jsonl_records(path, stats, on_error)


def file_records(path: Path, stats: ReadStats, text_field: str = "text", id_field: str = "id",
                 on_error: str = "raise", limit: int | None = None) -> Iterator[tuple[int, Document]]:
    """(line or row number, Document) for one local file, in file order (no duplicate check:
    the caller checks ids across files). A record without its text field is malformed too."""
    unit = "row" if _suffix(path) == ".parquet" else "line"
    n = 0
    for number, record in _records(path, stats, on_error):
        if limit is not None and n >= limit:
            return
        try:
            doc = _to_document(record, path, number, text_field, id_field, stats, unit)
        except UserError as exc:
            if on_error != "skip":
                raise
            stats.skip(str(exc))
            continue
        n += 1
        stats.records += 1
        yield number, doc


# --------------------------------------------------------------------------- documents
def _to_document(record: dict, path: Path, number: int, text_field: str, id_field: str,
                 stats: ReadStats, unit: str = "line") -> Document:
    """Turn one record into a Document (derived id ``<file stem>:<line>`` when absent)."""
    if text_field not in record:
        fields = ", ".join(sorted(map(str, record))) or "(none)"
        raise UserError(f"{path} {unit} {number}: no text field {text_field!r}; "
                        f"fields present: {fields} (set data.text_field=...)")
    text = record[text_field]
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise UserError(f"{path} {unit} {number}: field {text_field!r} is "
                        f"{type(text).__name__}, expected a string")
    stats.empty_texts += not text.strip()
    raw_id = record.get(id_field)
    if raw_id is None or raw_id == "":
        doc_id = f"{file_stem(path)}:{number}"
        stats.derived_ids += 1
    else:
        doc_id = str(raw_id)
    source = record.get("source")
    meta = {k: v for k, v in record.items() if k not in (text_field, id_field)}
    return Document(doc_id, text, source if isinstance(source, str) else file_stem(path), meta)


def iter_documents(paths, text_field: str = "text", id_field: str = "id",
                   limit: int | None = None, stats: ReadStats | None = None
                   ) -> Iterator[Document]:
    """Yield Documents from local files in file order; ids must be unique across files.

    ``stats`` (pass your own :class:`ReadStats`) is filled while iterating; one warning line
    goes to stderr at the end when non-UTF-8 bytes were replaced.
    """
    if limit is not None and limit < 0:
        raise UserError(f"limit must be >= 0, got {limit}")
    stats = stats if stats is not None else ReadStats()
    files = resolve_paths(paths)
    seen: dict[str, str] = {}
    try:
        for path in files:
            stats.files += 1
            unit = "row" if _suffix(path) == ".parquet" else "line"
            for number, record in _records(path, stats):
                if limit is not None and stats.records >= limit:
                    return
                doc = _to_document(record, path, number, text_field, id_field, stats, unit)
                where = f"{path} {unit} {number}"
                if doc.id in seen:
                    raise UserError(f"duplicate id {doc.id!r} at {where} (first at "
                                    f"{seen[doc.id]}); ids must be unique")
                seen[doc.id] = where
                stats.records += 1
                yield doc
    finally:
        if stats.replaced_bytes:
            print(f"warning: replaced {stats.replaced_bytes} non-UTF-8 byte(s) with U+FFFD "
                  f"while reading {stats.files} file(s)", file=sys.stderr, flush=True)


def read_documents(paths, text_field: str = "text", id_field: str = "id",
                   limit: int | None = None, stats: ReadStats | None = None
                   ) -> list[Document]:
    """All Documents of ``paths`` (see :func:`iter_documents`) as a list."""
    return list(iter_documents(paths, text_field, id_field, limit, stats))


def interleave_by_field(docs: Iterable[Document], field_name: str) -> list[Document]:
    """Round-robin over the values of ``meta[field_name]`` (first-appearance order of the values,
    file order within a value), so that the first N documents mix every source of a pool that
    is stored source by source. Documents without the field form one group of their own."""
    groups: dict[str, list[Document]] = {}
    for doc in docs:
        groups.setdefault(str(doc.meta.get(field_name, "")), []).append(doc)
    queues = list(groups.values())
    out: list[Document] = []
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


# --------------------------------------------------------------------------- hub streaming
def stream_hub_dataset(name: str, config: str | None = None, split: str = "train",
                       text_field: str = "text", limit: int | None = None,
                       id_field: str = "id", timeout: float = 5.0) -> Iterator[Document]:
    """Stream a Hugging Face hub dataset as Documents (``datasets`` streaming mode).

    Fails fast, with one line, when the hub is unreachable; the checks run at call time,
    before the first document is requested.
    """
    hint = (f"cannot stream hub dataset {name!r}: {{reason}}; download it and point "
            "data.paths=[...] at local .jsonl/.parquet copies")
    reason = hub_offline_reason(timeout, flags=("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if reason:
        raise UserError(hint.format(reason=reason))
    datasets = require_package("datasets")
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # network, auth and not-found errors all end here
        raise UserError(hint.format(reason=str(exc).splitlines()[0] if str(exc) else
                                    exc.__class__.__name__)) from None
    return _hub_documents(stream, name, text_field, id_field, limit)


def _hub_documents(stream, name: str, text_field: str, id_field: str,
                   limit: int | None) -> Iterator[Document]:
    stats = ReadStats()
    records = iter(stream)
    number = 0
    while limit is None or number < limit:
        try:
            record = dict(next(records))
        except StopIteration:
            return
        except Exception as exc:  # the connection can drop mid-stream
            raise UserError(f"hub dataset {name!r} stopped after {number} records: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                            ) from None
        number += 1
        record.setdefault(id_field, f"{name}:{number}")
        doc = _to_document(record, Path(name), number, text_field, id_field, stats, "record")
        doc.source = doc.source if "source" in record else name
        yield doc


# --------------------------------------------------------------------------- demo data
def demo_web_paths() -> list[Path]:
    """The shipped demo selection pool (``data/demo/web.jsonl.gz``)."""
    return [DEMO_DIR / "web.jsonl.gz"]


@dataclass
class LabeledDocument:
    """A DCLM human quality label: ``label`` 1 = high quality; ``agreement`` = unanimous."""

    id: str
    text: str
    label: int
    agreement: bool


def load_quality_labels(path: str | os.PathLike | None = None,
                        agreement_only: bool = False) -> list[LabeledDocument]:
    """The 499 DCLM human labels (or the 281 unanimous ones); kept out of the web pool."""
    path = Path(path) if path else DEMO_DIR / "quality" / "dclm_human_labels.jsonl.gz"
    labels = []
    for doc in read_documents([path]):
        if "label" not in doc.meta:
            raise UserError(f"{path}: record {doc.id!r} has no 'label' field")
        item = LabeledDocument(doc.id, doc.text, int(doc.meta["label"]),
                               bool(doc.meta.get("agreement", False)))
        if item.agreement or not agreement_only:
            labels.append(item)
    return labels
