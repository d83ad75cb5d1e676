"""The corpus stage's work, sharded: read every input once, hold out validation, write the pool.

Three steps, each a pure function of the inputs and settings, so one rank or N ranks
(``torchrun``, gloo or NCCL) and any number of local workers write the same bytes:

1. **stage**: input file ``f`` (a hub stream is one task) becomes ``staging/file_f`` (a one-shard
   document store) plus ``file_f.npz`` (per document: a 64-bit id hash, whether it has >= 20
   words, its line, its group code) and ``file_f.json`` (counts, group names, what was skipped;
   written last: the task's done mark). Task ``f`` runs on rank ``f % world``; a rerun skips
   tasks whose mark matches the input's size and mtime (a killed run resumes).
2. **plan**, on every rank from the small arrays alone: the document order (file order, or
   round-robin over ``data.interleave_by``), ``data.limit``, the duplicate-id check, and the
   validation hold-out (a seeded draw over documents of >= 20 words).
3. **write**: pool shard ``s`` (rows ``[s R, (s + 1) R)`` of the plan) on rank ``s % world``, the
   validation store on rank 0; rank 0 then writes both indexes and removes the staging area.

Per document the plan holds about 30 bytes (hash, flag, line, group code, position); texts
only ever pass through in blocks of :data:`GATHER_BLOCK` documents.
"""
from __future__ import annotations

import hashlib
from array import array
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from spokes_lightning.utils.atomic import atomic_path, write_json_atomic
from spokes_lightning.data.corpus import ReadStats, file_records, resolve_paths, stream_hub_dataset
from spokes_lightning.utils.errors import UserError
from spokes_lightning.data import document_store as ds
from spokes_lightning.data.ranks import barrier, my_tasks, run_tasks, world

GATHER_BLOCK = 8192
#: documents of fewer words are never held out for validation (too short to score a loss on)
MIN_VALIDATION_WORDS = 20
VALIDATION_SEED_OFFSET = 7919


@dataclass(frozen=True)
class IngestSettings:
    """What decides the pool's bytes (``workers`` and the rank count do not)."""

    paths: tuple[str, ...] = ()
    hub: dict | None = None
    text_field: str = "text"
    id_field: str = "id"
    limit: int | None = None
    interleave_by: str | None = None
    validation_documents: int = 100
    seed: int = 0
    on_error: str = "raise"
    shard_documents: int = 1 << 20


@dataclass(frozen=True)
class _Task:
    index: int
    source: str  # a file path, or "hub"
    staging: str
    settings: IngestSettings


def id_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")


# --------------------------------------------------------------------------- 1. stage


def _source_mark(source: str) -> dict:
    if source == "hub":
        return {"source": "hub"}
    st = os.stat(source)
    return {"source": source, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _documents(task: _Task, stats: ReadStats):
    """(line number, document) of one input, without the empty (whitespace-only) texts.

    An empty text has no tokens, so no gradient, embedding or length to select it by: it never
    enters the pool, and every per-document file of a run (lengths, quality, features) holds the
    same ids in the same order. They are counted (``stats.empty_texts``, the corpus summary)."""
    for number, doc in _all_documents(task, stats):
        if doc.text.strip():
            yield number, doc
        elif task.source == "hub":  # a file's reader counts them already
            stats.empty_texts += 1


def _all_documents(task: _Task, stats: ReadStats):
    s = task.settings
    per_file_limit = None if s.interleave_by else s.limit  # no file gives more than the limit
    if task.source == "hub":
        docs = stream_hub_dataset(s.hub["name"], s.hub.get("config"), s.hub.get("split", "train"),
                                  text_field=s.text_field, id_field=s.id_field, limit=per_file_limit)
        for number, doc in enumerate(docs, start=1):
            stats.records += 1
            yield number, doc
        return
    yield from file_records(Path(task.source), stats, s.text_field, s.id_field, s.on_error, per_file_limit)


def stage_task(task: _Task) -> dict:
    """Step 1 for one input: its documents into a staging store + small per-document arrays."""
    base = Path(task.staging) / f"file_{task.index:05d}"
    mark_path = base.with_suffix(".json")
    mark = _source_mark(task.source)
    if mark_path.exists():
        done = json.loads(mark_path.read_text())
        if done.get("input") == mark and done.get("settings") == _settings_key(task.settings):
            return done
    stats = ReadStats(files=1)
    # typed arrays: 21 bytes a document (a Python list would hold an int object per entry)
    hashes, long_flags, lines, groups = array("Q"), array("B"), array("q"), array("i")
    group_names: dict[str, int] = {}
    field_name = task.settings.interleave_by

    def blocks():
        block: list[ds.Document] = []
        for number, doc in _documents(task, stats):
            hashes.append(id_hash(doc.id))
            long_flags.append(len(doc.text.split()) >= MIN_VALIDATION_WORDS)
            lines.append(number)
            if field_name:
                groups.append(group_names.setdefault(str(doc.meta.get(field_name, "")), len(group_names)))
            block.append(doc)
            if len(block) == ds.BATCH_ROWS:
                yield ds.document_columns(block)
                block = []
        if block:
            yield ds.document_columns(block)

    store_dir = base
    store_dir.mkdir(parents=True, exist_ok=True)
    rows = ds.write_shard(store_dir / ds.shard_name(0), blocks())
    ds.write_index(store_dir, [rows], rows_per_shard=max(ds.BATCH_ROWS, -(-rows // ds.BATCH_ROWS) * ds.BATCH_ROWS))
    with atomic_path(base.with_suffix(".npz"), suffix=".npz") as tmp:
        np.savez(tmp, hash=np.frombuffer(hashes, dtype=np.uint64), long=np.frombuffer(long_flags, dtype=np.uint8) > 0,
                 line=np.frombuffer(lines, dtype=np.int64), group=np.frombuffer(groups, dtype=np.int32))
    done = {"input": mark, "settings": _settings_key(task.settings), "rows": rows, "groups": list(group_names),
            "stats": {k: v for k, v in asdict(stats).items()}}
    write_json_atomic(mark_path, done)
    return done


def _settings_key(s: IngestSettings) -> dict:
    return {"text_field": s.text_field, "id_field": s.id_field, "on_error": s.on_error,
            "limit": None if s.interleave_by else s.limit, "interleave_by": s.interleave_by}


# --------------------------------------------------------------------------- 2. plan


@dataclass
class Plan:
    order: np.ndarray       # staged positions of the documents read, in corpus order
    pool: np.ndarray        # staged positions of the pool, in corpus order
    validation: np.ndarray  # staged positions held out, in corpus order
    offsets: np.ndarray     # first staged position of each input (+ the total)


def make_plan(settings: IngestSettings, marks: list[dict], staging: Path, sources: list[str]) -> Plan:
    arrays = [np.load(Path(staging) / f"file_{i:05d}.npz") for i in range(len(marks))]
    offsets = np.concatenate([[0], np.cumsum([m["rows"] for m in marks])]).astype(np.int64)
    total = int(offsets[-1])
    limit = total if settings.limit is None else min(int(settings.limit), total)
    if settings.interleave_by:
        names: dict[str, int] = {}
        codes = [np.asarray([names.setdefault(g, len(names)) for g in m["groups"]], dtype=np.int64)
                 for m in marks]
        group = np.concatenate([c[a["group"]] if len(a["group"]) else np.zeros(0, np.int64)
                                for c, a in zip(codes, arrays)])
        # round-robin: the i-th document of every group (groups in first-appearance order), i = 0, 1, ...
        by_group = np.argsort(group, kind="stable")
        rank_in_group = np.empty(total, dtype=np.int64)
        sorted_group = group[by_group]
        rank_in_group[by_group] = np.arange(total) - np.searchsorted(sorted_group, sorted_group, side="left")
        order = np.lexsort((group, rank_in_group))[:limit]
    else:
        order = np.arange(limit, dtype=np.int64)
    hashes = np.concatenate([a["hash"] for a in arrays])[order]
    _check_unique(hashes, order, offsets, staging, sources, arrays)
    long_flags = np.concatenate([a["long"] for a in arrays])[order]
    n_val = int(settings.validation_documents)
    if not len(order):
        where = list(settings.paths) or settings.hub
        raise UserError(f"the corpus is empty: no documents with text in {where}")
    candidates = np.flatnonzero(long_flags)
    if n_val and n_val >= len(candidates):
        raise UserError(f"data.validation_documents={n_val} needs more documents of >= {MIN_VALIDATION_WORDS} words "
                        f"than the {len(candidates)} of {len(order)} in the corpus; lower it or add data")
    held = np.zeros(len(order), dtype=bool)
    if n_val:
        rng = np.random.default_rng(int(settings.seed) + VALIDATION_SEED_OFFSET)
        held[rng.choice(candidates, size=n_val, replace=False)] = True
    return Plan(order=order, pool=order[~held], validation=order[held], offsets=offsets)


def _check_unique(hashes, order, offsets, staging, sources, arrays) -> None:
    """Ids must be unique: equal 64-bit hashes are checked on the ids themselves (one line if equal)."""
    by_hash = np.argsort(hashes, kind="stable")
    same = np.flatnonzero(hashes[by_hash][1:] == hashes[by_hash][:-1])
    if not len(same):
        return
    first_dup = None
    for i in same:  # position in corpus order of each equal pair (later, earlier)
        a, b = sorted((int(by_hash[i]), int(by_hash[i + 1])))
        ids = [_read_ids(staging, offsets, [order[p]])[0] for p in (a, b)]
        if ids[0] == ids[1] and (first_dup is None or b < first_dup[1]):
            first_dup = (a, b, ids[0])
    if first_dup is None:
        return
    a, b, doc_id = first_dup
    where = [_where(order[p], offsets, sources, arrays) for p in (b, a)]
    raise UserError(f"duplicate id {doc_id!r} at {where[0]} (first at {where[1]}); ids must be unique")


def _where(position: int, offsets, sources, arrays) -> str:
    f = int(np.searchsorted(offsets, position, side="right") - 1)
    line = int(arrays[f]["line"][position - offsets[f]])
    unit = "row" if str(sources[f]).lower().endswith(".parquet") else "line"
    return f"{sources[f]} {unit} {line}"


def _read_ids(staging, offsets, positions) -> list[str]:
    out = []
    for p in positions:
        f = int(np.searchsorted(offsets, p, side="right") - 1)
        out.append(ds.DocumentStore(Path(staging) / f"file_{f:05d}")[int(p - offsets[f])].id)
    return out


# --------------------------------------------------------------------------- 3. write


def gather_columns(stores: list[ds.DocumentStore], offsets: np.ndarray, positions: np.ndarray):
    """Blocks of store columns for staged ``positions``, in that order."""
    for start in range(0, len(positions), GATHER_BLOCK):
        block = positions[start : start + GATHER_BLOCK]
        files = np.searchsorted(offsets, block, side="right") - 1
        out = {c: [None] * len(block) for c in ds.COLUMNS}
        for f in np.unique(files):
            where = np.flatnonzero(files == f)
            cols = stores[f].take_columns(block[where] - offsets[f])
            for c in ds.COLUMNS:
                for k, value in zip(where.tolist(), cols[c]):
                    out[c][k] = value
        yield out


@dataclass(frozen=True)
class _ShardJob:
    shard: int
    out_dir: str
    staging: str
    positions_file: str
    start: int
    stop: int
    n_inputs: int


def write_shard_job(job: _ShardJob) -> dict:
    """Step 3 for one output shard (skipped when its record exists with the same rows)."""
    out = Path(job.out_dir)
    record_path = out / f"{ds.shard_name(job.shard)}.json"
    positions = np.asarray(np.load(job.positions_file, mmap_mode="r")[job.start : job.stop])
    digest = hashlib.sha256(positions.tobytes()).hexdigest()
    if record_path.exists() and (out / ds.shard_name(job.shard)).exists():
        record = json.loads(record_path.read_text())
        if record.get("rows") == [job.start, job.stop] and record.get("positions_sha256") == digest:
            return record
    offsets = np.load(Path(job.staging) / "offsets.npy")
    stores = [ds.DocumentStore(Path(job.staging) / f"file_{i:05d}") for i in range(job.n_inputs)]
    sources: dict[str, int] = {}

    def blocks():
        for cols in gather_columns(stores, offsets, positions):
            for s in cols["source"]:
                sources[s] = sources.get(s, 0) + 1
            yield cols

    n = ds.write_shard(out / ds.shard_name(job.shard), blocks())
    record = {"rows": [job.start, job.stop], "n": n, "sources": sources, "positions_sha256": digest}
    write_json_atomic(record_path, record)
    return record


def ingest(settings: IngestSettings, out_dir: str | Path, workers: int = 1) -> dict:
    """Steps 1-3 on this rank's tasks (every rank of a process group calls it); returns the summary.

    Writes ``out_dir/pool`` and ``out_dir/validation`` (document stores). Rank 0's return value
    is the one to record; every rank returns the same counts.
    """
    if settings.on_error not in ("raise", "skip"):
        raise UserError(f"data.on_error must be raise or skip, got {settings.on_error!r}")
    per_shard = settings.shard_documents
    if isinstance(per_shard, bool) or not isinstance(per_shard, int) or per_shard <= 0 or per_shard % ds.BATCH_ROWS:
        raise UserError(f"data.shard_documents must be a positive multiple of {ds.BATCH_ROWS}, got {per_shard!r}")
    rank, world_size = world()
    out_dir = Path(out_dir)
    staging = out_dir / "staging"
    if rank == 0:  # an index marks a finished store: none until this run's shards are all written
        for name in ("pool", "validation"):
            (out_dir / name / ds.INDEX).unlink(missing_ok=True)
    if settings.paths:
        sources = [str(p) for p in resolve_paths(list(settings.paths))]
    elif settings.hub and settings.hub.get("name"):
        if settings.interleave_by:
            raise UserError("data.interleave_by works on local files (data.paths) only, not on a hub stream")
        sources = ["hub"]
    else:
        raise UserError("no data: set data.paths=[...] (local jsonl/jsonl.gz/parquet) or data.hub.name")
    staging.mkdir(parents=True, exist_ok=True)
    tasks = [_Task(i, s, str(staging), settings) for i, s in enumerate(sources)]
    run_tasks(stage_task, [tasks[t] for t in my_tasks(len(tasks), rank, world_size)], workers)
    barrier()
    marks = [json.loads((staging / f"file_{i:05d}.json").read_text()) for i in range(len(tasks))]
    plan = make_plan(settings, marks, staging, sources)
    if rank == 0:
        np.save(staging / "offsets.npy", plan.offsets)
        for name in ("pool", "validation"):
            with atomic_path(staging / f"{name}_positions.npy", suffix=".npy") as tmp:
                np.save(tmp, getattr(plan, name))
    barrier()
    jobs = []
    for name, positions, per_shard in (("pool", plan.pool, settings.shard_documents),
                                       ("validation", plan.validation, settings.shard_documents)):
        target = out_dir / name
        target.mkdir(parents=True, exist_ok=True)
        n_shards = max(1, -(-len(positions) // per_shard))
        jobs += [_ShardJob(s, str(target), str(staging), str(staging / f"{name}_positions.npy"),
                           s * per_shard, min((s + 1) * per_shard, len(positions)), len(sources))
                 for s in range(n_shards)]
    run_tasks(write_shard_job, [jobs[j] for j in my_tasks(len(jobs), rank, world_size)], workers)
    barrier()
    records = {name: [json.loads((out_dir / name / f"{ds.shard_name(s)}.json").read_text())
                      for s in range(max(1, -(-n // settings.shard_documents)))]
               for name, n in (("pool", len(plan.pool)), ("validation", len(plan.validation)))}
    barrier()  # every rank has read the shard records before rank 0 removes them
    stats = [m["stats"] for m in marks]
    summary = {
        "n_read": int(len(plan.order)), "n_pool": int(len(plan.pool)), "n_validation": int(len(plan.validation)),
        "sources": _sum_counts(r["sources"] for r in records["pool"]),
        "skipped_records": sum(s["skipped"] for s in stats),
        "skipped_examples": [e for s in stats for e in s["skipped_examples"]][:10],
        "replaced_bytes": sum(s["replaced_bytes"] for s in stats),
        "derived_ids": sum(s["derived_ids"] for s in stats), "inputs": len(sources),
        "empty_texts": sum(s.get("empty_texts", 0) for s in stats),
    }
    if rank == 0:
        for name in ("pool", "validation"):
            ds.write_index(out_dir / name, [r["n"] for r in records[name]], settings.shard_documents)
            for s in range(len(records[name])):
                (out_dir / name / f"{ds.shard_name(s)}.json").unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    return summary


def _sum_counts(dicts) -> dict:
    total: dict = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0])))
