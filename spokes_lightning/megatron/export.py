"""Hand a selected subset over to pretraining (paper, Section 5.3: Megatron-LM, LLaMA-1B).

For one selection method, :func:`export_selection` writes

* ``<run_dir>/export/<method>.jsonl.gz`` and ``<run_dir>/export/<method>.parquet``
  (``id, text, source`` in selection order, plus ``copies`` when a document is taken more than
  once; gzip header mtime 0 so re-exports are byte-identical; parquet row groups of
  ``parquet_row_group`` rows, see below),
* ``<run_dir>/megatron/<method>_text_document.bin/.idx``: a Megatron indexed dataset, one document
  per selected text (``copies`` times for a document the selection takes several times: its
  multiplicity) followed by one EOD token, token dtype chosen from the vocabulary size as
  Megatron's ``preprocess_data.py`` does,
* ``<run_dir>/megatron/tokenizer/`` (the tokenizer, for ``--tokenizer-model``), and
* ``<run_dir>/megatron/pretrain_<method>.sh``: the multi-node Megatron-LM launch script
  (see :mod:`spokes_lightning.megatron.launch_script`).

Scale: the selection is read in blocks of ``block_size`` positions (``documents.take(block)`` when
the store has ``take``), so neither the texts nor the tokens of the whole selection are ever in
memory. Tokenization is sharded (:mod:`spokes_lightning.megatron.shards`): fixed shards of
``shard_docs`` selected documents, tokenized by ``workers`` spawned processes or by the ranks of a
``torch.distributed`` group, then concatenated in order. The ``.bin/.idx`` bytes are those
megatron-core's ``IndexedDatasetBuilder`` writes when fed the documents one by one in a single
process, whatever ``workers``, ``shard_docs``, ``block_size`` or the number of ranks; they are
written without megatron-core (:mod:`spokes_lightning.megatron.index_format`), which only training
and reading need.

Parquet: written with one ``ParquetWriter.write_table`` per row group of exactly
``parquet_row_group`` rows (the last one shorter). With the default (65,536 rows) a selection of at
most that many documents gives the same bytes as ``pq.write_table`` of the whole table; a larger one
has more, smaller row groups than ``pq.write_table``'s 1,048,576 (pass ``parquet_row_group=1 << 20``
for its exact bytes, at the cost of holding that many texts). Either way the bytes depend only on
the selection and ``parquet_row_group``.

Every file appears atomically: nothing half-written is left under its final name. Temporary files
live in hidden ``.tmp-*`` entries next to their targets and are removed when the export fails.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field as dataclass_field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from spokes_lightning.utils.atomic import atomic_path, write_json_atomic, write_text_atomic
from spokes_lightning.utils.errors import UserError, require_package
from spokes_lightning.megatron.index_format import optimal_token_dtype
from spokes_lightning.megatron.launch_script import LLAMA_3_2_1B, LlamaShape, megatron_llama_args, render_launch_script
from spokes_lightning.megatron.shards import (
    BLOCK_SIZE,
    SHARD_DOCS,
    ShardMerger,
    document_text,
    field,
    iter_blocks,
    read_block,
    shard_jobs,
    shard_ranges,
    shards_for_rank,
    tokenize_and_merge,
)

PARQUET_ROW_GROUP = 1 << 16  # rows per parquet row group
ID_SELECTION_MAX = 1_000_000  # a selection by id strings scans the corpus: only for small ones


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
    #: wall-clock seconds and counts (not written to ``<method>_export.json``): ``total_s``,
    #: ``text_s`` (jsonl.gz + parquet), ``tokenize_s`` (from the first shard started to the last
    #: one done; with ``workers > 1`` the text export runs inside this window), ``shard_busy_s``
    #: (tokenizing seconds summed over shards and workers), ``merge_s`` (concatenating shards),
    #: ``workers``, ``world``, ``n_shards``.
    timings: dict = dataclass_field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("timings")
        return out


# ----------------------------------------------------------------------------- selection


def _duplicate(positions: np.ndarray, n: int) -> bool:
    """Whether ``positions`` (all in 0..n-1) repeats a value, in O(min(n, 8 * len)) bytes."""
    if n <= 8 * positions.size:
        seen = np.zeros(n, dtype=bool)
        seen[positions] = True
        return int(np.count_nonzero(seen)) != positions.size
    s = np.sort(positions)
    return bool((s[1:] == s[:-1]).any())


def _positions_by_id(documents: Sequence, ids: list, block_size: int) -> np.ndarray:
    """Positions of documents by ``id`` (the last document with that id), scanning in blocks."""
    if len(ids) > ID_SELECTION_MAX:
        raise UserError(f"a selection by document id is limited to {ID_SELECTION_MAX} ids: "
                        "pass integer positions instead")
    wanted: dict[str, int] = {}
    for j, s in enumerate(ids):
        wanted.setdefault(str(s), j)
    if len(wanted) != len(ids):
        raise UserError("selection lists the same document more than once")
    positions = np.full(len(ids), -1, dtype=np.int64)
    n = len(documents)
    for start in range(0, n, block_size):
        block = np.arange(start, min(start + block_size, n), dtype=np.int64)
        for pos, doc in zip(block.tolist(), read_block(documents, block)):
            j = wanted.get(str(field(doc, "id")))
            if j is not None:
                positions[j] = pos
    missing = np.flatnonzero(positions < 0)
    if missing.size:
        raise UserError(f"{missing.size} selected id(s) not in the corpus, e.g. {ids[missing[0]]!r}")
    return positions


def resolve_selection(documents: Sequence, selected: Iterable, *, block_size: int = BLOCK_SIZE) -> np.ndarray:
    """Positions (int64) of the selected documents, in selection order.

    ``selected`` is an integer numpy array or a list of integer positions into ``documents``
    (checked without a Python object per document), or, for small selections, a list of document
    ``id`` strings (found by one scan of ``documents``).
    """
    if isinstance(selected, np.ndarray) and selected.dtype.kind in "iu":
        if selected.ndim != 1:
            raise UserError(f"selected positions must be one-dimensional, got shape {selected.shape}")
        positions = selected.astype(np.int64, copy=False)
    else:
        items = selected.tolist() if isinstance(selected, np.ndarray) else list(selected)
        if items and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in items):
            positions = np.asarray(items, dtype=np.int64)
        elif items:
            return _positions_by_id(documents, items, block_size)
        else:
            positions = np.zeros(0, dtype=np.int64)
    if positions.size == 0:
        raise UserError("empty selection: nothing to export")
    n = len(documents)
    if positions.min() < 0 or positions.max() >= n:
        bad = positions[np.flatnonzero((positions < 0) | (positions >= n))[0]]
        raise UserError(f"selected index {int(bad)} is outside the corpus (0..{n - 1})")
    if _duplicate(positions, n):
        raise UserError("selection lists the same document more than once")
    return positions


def check_copies(copies, n: int) -> np.ndarray | None:
    """Copies per selected document as an int64 array (>= 1); None when absent or all ones."""
    if copies is None:
        return None
    values = np.asarray(copies)
    if values.shape != (n,) or values.dtype.kind not in "iu" or (values < 1).any():
        raise UserError(f"copies must be {n} integers >= 1 (one per selected document)")
    return None if (values == 1).all() else values.astype(np.int64, copy=False)


# ----------------------------------------------------------------------------- text exports


def write_text_exports(documents, positions: np.ndarray, copies: np.ndarray | None, jsonl_path: Path,
                       parquet_path: Path, *, block_size: int = BLOCK_SIZE,
                       parquet_row_group: int = PARQUET_ROW_GROUP) -> None:
    """Stream ``id, text, source`` (+ ``copies``) in selection order to jsonl.gz and parquet.

    One pass over the documents, ``block_size`` at a time; at most ``parquet_row_group`` rows are
    held for the parquet writer. Writes the given paths as they are: :func:`export_selection`
    passes temporary ones and renames them once the whole export has succeeded.
    """
    pa = require_package("pyarrow", "pyarrow")
    pq = require_package("pyarrow.parquet", "pyarrow")
    names = ("id", "text", "source") + (("copies",) if copies is not None else ())
    schema = pa.schema([(k, pa.int64() if k == "copies" else pa.string()) for k in names])
    rows = {k: [] for k in names}

    def flush(pw, count: int) -> None:
        table = pa.Table.from_pydict({k: v[:count] for k, v in rows.items()}, schema=schema)
        pw.write_table(table, row_group_size=count)
        for v in rows.values():
            del v[:count]

    with open(jsonl_path, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            pq.ParquetWriter(parquet_path, schema) as pw:
        for start, docs in iter_blocks(documents, positions, block_size):
            for k, doc in enumerate(docs):
                pos = int(positions[start + k])
                doc_id = field(doc, "id")
                rec = {"id": str(pos if doc_id is None else doc_id), "text": document_text(doc, pos),
                       "source": str(field(doc, "source", "") or "")}
                if copies is not None:
                    rec["copies"] = int(copies[start + k])
                gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
                for key, value in rec.items():
                    rows[key].append(value)
            while len(rows["id"]) >= parquet_row_group:
                flush(pw, parquet_row_group)
        if rows["id"]:
            flush(pw, len(rows["id"]))


# ----------------------------------------------------------------------------- Megatron data


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


def _process_group(distributed: bool | None) -> tuple[int, int]:
    """(rank, world) of the torch.distributed group to share the work with; (0, 1) for none."""
    from spokes_lightning.core.distributed import world

    if distributed is False:
        return 0, 1
    rank, size = world()
    if distributed and size == 1:
        raise UserError("distributed=True needs an initialized torch.distributed process group")
    return rank, size


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def export_selection(
    documents: Sequence,
    selected: Iterable,
    method: str,
    run_dir: str | os.PathLike,
    tokenizer,
    *,
    copies: Sequence[int] | np.ndarray | None = None,
    eod_id: int | None = None,
    shape: LlamaShape = LLAMA_3_2_1B,
    workers: int = 1,
    shard_docs: int = SHARD_DOCS,
    block_size: int = BLOCK_SIZE,
    parquet_row_group: int = PARQUET_ROW_GROUP,
    distributed: bool | None = None,
    **launch_settings,
) -> ExportResult:
    """Export one method's selection as text files, Megatron data and a launch script.

    ``documents``: a sequence of records with ``text`` (and ``id``, ``source``), as mappings or
    objects; a lazy store with ``take(positions)`` is read through it. ``selected``: integer
    positions (an int numpy array at scale) or, for small selections, document ids.
    ``tokenizer``: a HuggingFace fast tokenizer. ``copies`` (one per selected document, >= 1)
    repeats documents in the Megatron data (None or all ones: each once).
    ``workers``: tokenizing processes ('spawn'; ``documents`` and ``tokenizer`` are pickled into
    each: pass the lazy store, not a list, at scale). ``shard_docs``, ``block_size``,
    ``parquet_row_group``: see the module docstring; none of them but the last changes a byte.
    ``distributed``: None uses the initialized ``torch.distributed`` group if it has several ranks
    (then EVERY rank must call this with the same arguments: rank r tokenizes shards s with
    ``s % world == r``, rank 0 writes the text files and merges; all ranks return the result;
    ``run_dir`` must be on a filesystem they share); False ignores it.
    ``launch_settings`` go to :func:`~spokes_lightning.megatron.launch_script.megatron_llama_args`.
    """
    t_start = time.perf_counter()
    method = _check_method_name(method)
    if not hasattr(tokenizer, "save_pretrained") or not callable(tokenizer):
        raise UserError("tokenizer must be a HuggingFace tokenizer (PreTrainedTokenizerFast)")
    for name, value in (("workers", workers), ("shard_docs", shard_docs), ("block_size", block_size),
                        ("parquet_row_group", parquet_row_group)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    positions = resolve_selection(documents, selected, block_size=int(block_size))
    copies = check_copies(copies, len(positions))
    run_dir = Path(run_dir).resolve()
    vocab_size = len(tokenizer)
    eod = _resolve_eod(tokenizer, eod_id, vocab_size)
    dtype = optimal_token_dtype(vocab_size)

    export_dir, megatron_dir = run_dir / "export", run_dir / "megatron"
    jsonl_path = export_dir / f"{method}.jsonl.gz"
    parquet_path = export_dir / f"{method}.parquet"
    prefix = megatron_dir / f"{method}_text_document"
    tokenizer_dir = megatron_dir / "tokenizer"
    args = megatron_llama_args(data_prefix=prefix, tokenizer_dir=tokenizer_dir, run_dir=run_dir,
                               method=method, shape=shape, **launch_settings)  # checked before the work
    rank, world = _process_group(distributed)
    n_shards = len(shard_ranges(len(positions), int(shard_docs)))
    timings: dict = {"workers": int(workers), "world": world, "n_shards": n_shards, "text_s": 0.0}

    # The text files are written under temporary names (rank 0) and renamed only once the Megatron
    # data is in place: a failed re-export leaves the previous export's files as they were.
    texts = ExitStack()
    tmp_texts: list[Path] = []

    def write_texts() -> None:
        t0 = time.perf_counter()
        tmp_texts.extend([texts.enter_context(atomic_path(jsonl_path)),
                          texts.enter_context(atomic_path(parquet_path))])
        write_text_exports(documents, positions, copies, *tmp_texts,
                           block_size=int(block_size), parquet_row_group=int(parquet_row_group))
        timings["text_s"] = time.perf_counter() - t0

    shard_dir = megatron_dir / f".tmp-{prefix.name}-shards"  # the same name on every rank
    kw = dict(eod_id=eod, dtype=dtype, workers=int(workers), shard_docs=int(shard_docs),
              block_size=int(block_size), desc=f"tokenize {method}", timings=timings)

    def finish(n_docs: int, n_tokens: int) -> ExportResult:
        texts.close()  # rename the text files into place
        save_tokenizer(tokenizer, tokenizer_dir)
        script_path = megatron_dir / f"pretrain_{method}.sh"
        write_text_atomic(script_path, render_launch_script(args, method=method, shape=shape))
        script_path.chmod(0o755)
        result = ExportResult(
            method=method, n_docs=n_docs, n_tokens=n_tokens, n_tokens_without_eod=n_tokens - n_docs,
            eod_id=eod, vocab_size=vocab_size, token_dtype=np.dtype(dtype).name,
            jsonl_path=str(jsonl_path), parquet_path=str(parquet_path), data_prefix=str(prefix),
            tokenizer_dir=str(tokenizer_dir), script_path=str(script_path),
        )
        write_json_atomic(megatron_dir / f"{method}_export.json", result.to_dict())
        timings["total_s"] = time.perf_counter() - t_start
        result.timings = timings
        return result

    def fresh_shard_dir() -> None:
        shutil.rmtree(shard_dir, ignore_errors=True)
        shard_dir.mkdir(parents=True)

    if world == 1:
        with texts:
            try:
                fresh_shard_dir()
                counts = tokenize_and_merge(documents, positions, copies, tokenizer, prefix, shard_dir,
                                             which=None, merge=True, before=write_texts, **kw)
                return finish(*counts)
            finally:
                shutil.rmtree(shard_dir, ignore_errors=True)

    # Several ranks: the same three collectives on every rank, whatever fails where.
    def merge_and_finish() -> dict:
        t0 = time.perf_counter()
        with ShardMerger(prefix) as merger:
            for job in shard_jobs(positions, copies, shard_dir, prefix.name, int(shard_docs)):
                merger.append(job.prefix)
            counts = merger.finish()
        timings["merge_s"] = time.perf_counter() - t0
        result = finish(*counts)
        return result.to_dict() | {"timings": result.timings}

    with texts:
        try:
            _agree(fresh_shard_dir if rank == 0 else (lambda: None))
            _agree(lambda: tokenize_and_merge(
                documents, positions, copies, tokenizer, prefix, shard_dir,
                which=shards_for_rank(n_shards, rank, world), merge=False,
                before=write_texts if rank == 0 else None, **kw))
            shared = _agree(merge_and_finish if rank == 0 else (lambda: None))
        finally:
            if rank == 0:
                shutil.rmtree(shard_dir, ignore_errors=True)
    return ExportResult(**shared[0])


def _agree(step) -> list:
    """Run ``step`` on this rank, then gather every rank's outcome (the barrier): a failure on
    any rank raises on all of them (its own error on the failing rank). Returns the values."""
    from spokes_lightning.core.distributed import all_gather_objects

    try:
        value, error = step(), None
    except Exception as exc:
        value, error = None, exc
    shared = all_gather_objects((None, value) if error is None else (_one_line(error), None))
    if error is not None:
        raise error
    for r, (message, _) in enumerate(shared):
        if message is not None:
            raise UserError(f"export failed on rank {r}: {message}")
    return [v for _, v in shared]
