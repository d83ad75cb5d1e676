"""Hand a selected subset over to pretraining (paper, Section 5.3: Megatron-LM, LLaMA-1B).

For one selection method, :func:`export_selection` writes

* ``<run_dir>/export/<method>.jsonl.gz`` and ``<run_dir>/export/<method>.parquet``
  (``id, text, source`` in selection order, plus ``copies`` when a document is taken more than
  once; gzip header mtime 0 so re-exports are byte-identical),
* ``<run_dir>/megatron/<method>_text_document.bin/.idx``: a Megatron indexed dataset written with
  megatron-core's ``IndexedDatasetBuilder``, one document per selected text (``copies`` times
  for a document the selection takes several times: its multiplicity) followed by one EOD
  token, token dtype chosen from the vocabulary size as Megatron's ``preprocess_data.py`` does,
* ``<run_dir>/megatron/tokenizer/`` (the tokenizer, for ``--tokenizer-model``), and
* ``<run_dir>/megatron/pretrain_<method>.sh``: the multi-node Megatron-LM launch script
  (see :mod:`spokes_lightning.megatron_launch`).

Every file appears atomically: nothing half-written is left under its final name.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .atomic import atomic_path, write_json_atomic, write_text_atomic
from .errors import UserError, require_package
from .megatron_launch import LLAMA_3_2_1B, LlamaShape, megatron_llama_args, render_launch_script
from .progress import progress

TOKENIZE_BATCH = 256


@dataclass
class ExportResult:
    """Where one method's export went and how big it is."""

    method: str
    n_docs: int
    n_tokens: int  # including one EOD token per document
    n_tokens_without_eod: int
    eod_id: int
    vocab_size: int
    token_dtype: str
    jsonl_path: str
    parquet_path: str
    data_prefix: str
    tokenizer_dir: str
    script_path: str

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- selection


def _field(doc, name: str, default=None):
    if isinstance(doc, Mapping):
        return doc.get(name, default)
    return getattr(doc, name, default)


def resolve_selection(documents: Sequence, selected: Iterable) -> np.ndarray:
    """Positions of the selected documents, in selection order.

    ``selected`` holds integer positions into ``documents`` or document ``id`` strings.
    """
    selected = list(selected.tolist() if isinstance(selected, np.ndarray) else selected)
    if not selected:
        raise UserError("empty selection: nothing to export")
    n = len(documents)
    if all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in selected):
        positions = np.asarray(selected, dtype=np.int64)
        bad = positions[(positions < 0) | (positions >= n)]
        if bad.size:
            raise UserError(f"selected index {int(bad[0])} is outside the corpus (0..{n - 1})")
    else:
        where = {str(_field(doc, "id")): i for i, doc in enumerate(documents)}
        missing = [s for s in selected if str(s) not in where]
        if missing:
            raise UserError(
                f"{len(missing)} selected id(s) not in the corpus, e.g. {missing[0]!r}"
            )
        positions = np.asarray([where[str(s)] for s in selected], dtype=np.int64)
    if np.unique(positions).size != positions.size:
        raise UserError("selection lists the same document more than once")
    return positions


def check_copies(copies, n: int) -> list[int] | None:
    """Copies per selected document as ints >= 1; None when absent or all ones."""
    if copies is None:
        return None
    values = np.asarray(copies)
    if values.shape != (n,) or values.dtype.kind not in "iu" or (values < 1).any():
        raise UserError(f"copies must be {n} integers >= 1 (one per selected document)")
    return None if (values == 1).all() else [int(c) for c in values]


def _records(documents: Sequence, positions: np.ndarray) -> list[dict]:
    records = []
    for pos in positions.tolist():
        doc = documents[pos]
        text = _field(doc, "text")
        if not isinstance(text, str):
            raise UserError(f"document at position {pos} has no text")
        doc_id = _field(doc, "id")
        records.append(
            {
                "id": str(pos if doc_id is None else doc_id),
                "text": text,
                "source": str(_field(doc, "source", "") or ""),
            }
        )
    return records


# ----------------------------------------------------------------------------- text exports


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    """One JSON object per line, gzip with a zero timestamp (reproducible bytes)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            for rec in records:
                gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))


def write_parquet(path: Path, records: list[dict]) -> None:
    pa = require_package("pyarrow", "pyarrow")
    pq = require_package("pyarrow.parquet", "pyarrow")
    fields = ("id", "text", "source", "copies") if records and "copies" in records[0] else ("id", "text", "source")
    table = pa.table({k: [r[k] for r in records] for k in fields})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# ----------------------------------------------------------------------------- Megatron data


def token_dtype_for(vocab_size: int):
    """uint16 when every id fits (< 65500), else int32: Megatron's ``DType.optimal_dtype``."""
    require_package("megatron.core", "megatron-core")
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def _tokenize(tokenizer, texts: list[str], method: str) -> Iterable[list[int]]:
    bar = progress(desc=f"tokenize {method}", total=len(texts), unit="doc")
    for start in range(0, len(texts), TOKENIZE_BATCH):
        batch = texts[start : start + TOKENIZE_BATCH]
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        bar.update(len(batch))
        yield from encoded
    bar.close()


def write_indexed_dataset(prefix: Path, token_lists: Iterable[list[int]], eod_id: int, dtype):
    """Build ``prefix.bin/.idx`` with megatron-core, atomically; returns (docs, tokens)."""
    require_package("megatron.core", "megatron-core")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = Path(tempfile.mkdtemp(prefix=f".tmp-{prefix.name}-", dir=prefix.parent)) / "data"
    n_docs = n_tokens = 0
    try:
        builder = IndexedDatasetBuilder(str(tmp_prefix) + ".bin", dtype=dtype)
        for ids in token_lists:
            ids = list(ids) + [eod_id]
            builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
            n_docs += 1
            n_tokens += len(ids)
        builder.finalize(str(tmp_prefix) + ".idx")
        # .idx disappears first and appears last: a reader never pairs an old index with new data.
        Path(str(prefix) + ".idx").unlink(missing_ok=True)
        os.replace(str(tmp_prefix) + ".bin", str(prefix) + ".bin")
        os.replace(str(tmp_prefix) + ".idx", str(prefix) + ".idx")
    finally:
        shutil.rmtree(tmp_prefix.parent, ignore_errors=True)
    return n_docs, n_tokens


def save_tokenizer(tokenizer, target: Path) -> Path:
    """``save_pretrained`` into ``target`` through a temp directory (atomic replace)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        if target.exists():
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- entry point


def _check_method_name(method: str) -> str:
    if not method or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", method):
        raise UserError(f"method name {method!r} must be letters, digits, '_', '-', '.'")
    return method


def _resolve_eod(tokenizer, eod_id: int | None, vocab_size: int) -> int:
    if eod_id is None:
        eod_id = getattr(tokenizer, "eos_token_id", None)
    if eod_id is None:
        raise UserError("tokenizer has no EOS token: pass eod_id= to mark document ends")
    if not 0 <= int(eod_id) < vocab_size:
        raise UserError(f"eod_id {eod_id} is outside the vocabulary (size {vocab_size})")
    return int(eod_id)


def export_selection(
    documents: Sequence,
    selected_indices_or_ids: Iterable,
    method: str,
    run_dir: str | os.PathLike,
    tokenizer,
    *,
    copies: Sequence[int] | None = None,
    eod_id: int | None = None,
    shape: LlamaShape = LLAMA_3_2_1B,
    **launch_settings,
) -> ExportResult:
    """Export one method's selection as text files, Megatron data and a launch script.

    ``documents`` is a sequence of records with ``text`` (and ``id``, ``source``);
    ``tokenizer`` a HuggingFace fast tokenizer; ``copies`` (one per selected document, >= 1)
    repeats documents in the Megatron data (None or all ones: each once). ``launch_settings`` go to
    :func:`~spokes_lightning.megatron_launch.megatron_llama_args` (defaults: the paper's).
    """
    method = _check_method_name(method)
    if not hasattr(tokenizer, "save_pretrained") or not callable(tokenizer):
        raise UserError("tokenizer must be a HuggingFace tokenizer (PreTrainedTokenizerFast)")
    positions = resolve_selection(documents, selected_indices_or_ids)
    records = _records(documents, positions)
    copies = check_copies(copies, len(positions))
    if copies is not None:
        for record, c in zip(records, copies):
            record["copies"] = c
    run_dir = Path(run_dir).resolve()
    vocab_size = len(tokenizer)
    eod = _resolve_eod(tokenizer, eod_id, vocab_size)
    dtype = token_dtype_for(vocab_size)

    export_dir, megatron_dir = run_dir / "export", run_dir / "megatron"
    jsonl_path = export_dir / f"{method}.jsonl.gz"
    parquet_path = export_dir / f"{method}.parquet"
    write_jsonl_gz(jsonl_path, records)
    write_parquet(parquet_path, records)

    prefix = megatron_dir / f"{method}_text_document"
    token_lists = _tokenize(tokenizer, [r["text"] for r in records], method)
    if copies is not None:  # each document's tokens once per copy, in selection order
        token_lists = (ids for ids, c in zip(token_lists, copies) for _ in range(c))
    n_docs, n_tokens = write_indexed_dataset(prefix, token_lists, eod, dtype)
    tokenizer_dir = save_tokenizer(tokenizer, megatron_dir / "tokenizer")

    args = megatron_llama_args(
        data_prefix=prefix,
        tokenizer_dir=tokenizer_dir,
        run_dir=run_dir,
        method=method,
        shape=shape,
        **launch_settings,
    )
    script_path = megatron_dir / f"pretrain_{method}.sh"
    write_text_atomic(script_path, render_launch_script(args, method=method, shape=shape))
    script_path.chmod(0o755)

    result = ExportResult(
        method=method,
        n_docs=n_docs,
        n_tokens=n_tokens,
        n_tokens_without_eod=n_tokens - n_docs,
        eod_id=eod,
        vocab_size=vocab_size,
        token_dtype=np.dtype(dtype).name,
        jsonl_path=str(jsonl_path),
        parquet_path=str(parquet_path),
        data_prefix=str(prefix),
        tokenizer_dir=str(tokenizer_dir),
        script_path=str(script_path),
    )
    write_json_atomic(megatron_dir / f"{method}_export.json", result.to_dict())
    return result
