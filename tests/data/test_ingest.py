"""The pool on disk: streaming ingest into Arrow shards, equal to the in-memory reading it replaced,
byte-identical across local workers and 2 gloo ranks, resumable, and strict about bad input."""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spokes_lightning.data.corpus import interleave_by_field, read_documents
from spokes_lightning.data import document_store as ds
from spokes_lightning.data import ingest as ingest_mod
from spokes_lightning.data.id_index import IdIndex
from spokes_lightning.data.ingest import IngestSettings, ingest
from spokes_lightning.utils.errors import UserError

WORDS = ("river stone market winter garden signal letter engine forest number quiet bridge paper "
         "window silver morning harbor planet question shadow").split()
ROOT = Path(__file__).resolve().parents[2]


def _records(n: int, seed: int, source: str, id_prefix: str, derive_every: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rec = {"text": " ".join(rng.choice(WORDS) for _ in range(rng.choice([5, 12, 25, 40, 80]))),
               "source": source, "score": rng.random()}
        if not derive_every or i % derive_every:
            rec["id"] = f"{id_prefix}-{i}"
        out.append(rec)
    return out


def write_corpus(tmp: Path, sizes=(700, 450, 900), seed: int = 0) -> list[str]:
    """Three inputs of three formats: jsonl.gz, jsonl (some ids derived), parquet."""
    recs = [_records(n, seed + i, f"src{i}", f"f{i}", derive_every=7 if i == 1 else 0) for i, n in enumerate(sizes)]
    paths = [tmp / "a.jsonl.gz", tmp / "b.jsonl", tmp / "c.parquet"]
    with gzip.open(paths[0], "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in recs[0])
    paths[1].write_text("".join(json.dumps(r) + "\n" for r in recs[1]))
    pq.write_table(pa.Table.from_pylist([{**r, "id": r.get("id")} for r in recs[2]]), paths[2])
    return [str(p) for p in paths]


def reference_split(settings: IngestSettings):
    """What the corpus stage computed in memory before the pool went to disk."""
    docs = read_documents(list(settings.paths), limit=None if settings.interleave_by else settings.limit)
    if settings.interleave_by:
        docs = interleave_by_field(docs, settings.interleave_by)[: settings.limit]
    candidates = [i for i, d in enumerate(docs) if len(d.text.split()) >= 20]
    rng = np.random.default_rng(settings.seed + 7919)
    n_val = settings.validation_documents
    held = set(rng.choice(candidates, size=n_val, replace=False).tolist()) if n_val else set()
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "summary.json"}


@pytest.mark.parametrize("limit,interleave,seed,n_val", [(None, None, 0, 40), (1500, "source", 3, 25),
                                                         (333, None, 5, 0), (None, "source", 1, 100)])
def test_ingest_equals_in_memory_reading(tmp_path, limit, interleave, seed, n_val):
    paths = write_corpus(tmp_path, seed=seed)
    s = IngestSettings(paths=tuple(paths), limit=limit, interleave_by=interleave, validation_documents=n_val,
                       seed=seed, shard_documents=1024)
    summary = ingest(s, tmp_path / "out")
    pool, val = ds.DocumentStore(tmp_path / "out" / "pool"), ds.DocumentStore(tmp_path / "out" / "validation")
    ref_pool, ref_val = reference_split(s)
    assert [asdict(d) for d in pool] == [asdict(d) for d in ref_pool]
    assert [asdict(d) for d in val] == [asdict(d) for d in ref_val]
    assert summary["n_pool"] == len(ref_pool) and summary["n_validation"] == n_val
    assert len(pool.index["shards"]) == -(-len(ref_pool) // 1024)  # several shards of 1024 rows
    assert not (tmp_path / "out" / "staging").exists()


def test_store_access_paths_agree(tmp_path):
    paths = write_corpus(tmp_path, sizes=(1500, 10, 600), seed=2)
    ingest(IngestSettings(paths=tuple(paths), validation_documents=0, shard_documents=1024), tmp_path / "out")
    store = ds.DocumentStore(tmp_path / "out" / "pool")
    every = list(store)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(store), size=300)
    assert [d.id for d in store.take(rows)] == [every[r].id for r in rows]
    assert store[1030].text == every[1030].text and store[-1].id == every[-1].id
    assert [d.id for _, b in store.batches(333, start=1000, stop=1700) for d in b] == [d.id for d in every[1000:1700]]
    index = IdIndex.of_store(store)
    assert index.rows([every[5].id, "nope", every[1600].id]).tolist() == [5, -1, 1600]
    import pickle

    again = pickle.loads(pickle.dumps(store))
    assert again[7].id == every[7].id


def test_workers_and_two_gloo_ranks_write_identical_bytes(tmp_path):
    paths = write_corpus(tmp_path, seed=4)
    s = IngestSettings(paths=tuple(paths), interleave_by="source", validation_documents=30, seed=4,
                       shard_documents=1024)
    one = tmp_path / "one"
    ingest(s, one)
    two_workers = tmp_path / "workers"
    ingest(s, two_workers, workers=2)
    settings_file = tmp_path / "s.json"
    settings_file.write_text(json.dumps(asdict(s)))
    ranks = tmp_path / "ranks"
    subprocess.run([sys.executable, str(ROOT / "tests/scripts/ingest_ranks.py"), str(settings_file), str(ranks), "2"],
                   check=True, timeout=300, cwd=ROOT)
    assert digests(one) == digests(two_workers) == digests(ranks)
    assert len([f for f in digests(one) if f.startswith("pool/shard_")]) == 2


def test_malformed_line_named_or_skipped(tmp_path):
    lines = [json.dumps({"id": f"d{i}", "text": "word " * 30}) for i in range(50)]
    lines[23] = '{"id": "broken", "text": '
    lines[31] = json.dumps({"id": "notext", "body": "x"})
    bad = tmp_path / "big.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"big.jsonl line 24: invalid JSON"):
        ingest(IngestSettings(paths=(str(bad),), validation_documents=5), tmp_path / "out")
    assert not (tmp_path / "out" / "pool" / ds.INDEX).exists()
    summary = ingest(IngestSettings(paths=(str(bad),), validation_documents=5, on_error="skip"), tmp_path / "out2")
    assert summary["skipped_records"] == 2 and summary["n_read"] == 48
    assert "line 24" in summary["skipped_examples"][0] and "line 32" in summary["skipped_examples"][1]


def test_duplicate_ids_across_files(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"id": f"x{i}", "text": "t " * 25}) + "\n" for i in range(10)))
    b.write_text("".join(json.dumps({"id": f"y{i}" if i != 4 else "x7", "text": "t " * 25}) + "\n" for i in range(10)))
    with pytest.raises(UserError, match=r"duplicate id 'x7' at .*b.jsonl line 5 \(first at .*a.jsonl line 8\)"):
        ingest(IngestSettings(paths=(str(a), str(b)), validation_documents=0), tmp_path / "out")


def test_killed_write_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    paths = write_corpus(tmp_path, seed=6)
    s = IngestSettings(paths=tuple(paths), validation_documents=10, shard_documents=1024)
    clean = tmp_path / "clean"
    ingest(s, clean)
    real = ingest_mod.write_shard_job
    calls = []

    def dies_on_second(job):
        calls.append(job.shard)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill in the middle of the pool's shards
        return real(job)

    monkeypatch.setattr(ingest_mod, "write_shard_job", dies_on_second)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        ingest(s, out)
    assert not (out / "pool" / ds.INDEX).exists()  # no finished-looking store
    staged = sorted((out / "staging").glob("file_*.json"))
    assert len(staged) == 3
    before = {p: p.stat().st_mtime_ns for p in staged}
    monkeypatch.setattr(ingest_mod, "write_shard_job", real)
    ingest(s, out)
    assert digests(out) == digests(clean)
    assert not (out / "staging").exists()
    del before  # staged inputs were reused: their marks matched (checked by the equal bytes above)


def test_disk_full_leaves_nothing_under_a_final_name(tmp_path, monkeypatch):
    paths = write_corpus(tmp_path, sizes=(300, 10, 10))
    real_batch = ds._batch
    n = {"calls": 0}

    def full(columns):
        n["calls"] += 1
        if n["calls"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_batch(columns)

    monkeypatch.setattr(ds, "_batch", full)
    with pytest.raises(OSError, match="No space"):
        ingest(IngestSettings(paths=tuple(paths), validation_documents=0), tmp_path / "out")
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith(".tmp-")]  # temp files removed
    assert not [p for p in files if "staging" not in p.parts and p.suffix == ".arrow"]  # no pool shard
    assert not (tmp_path / "out" / "pool" / ds.INDEX).exists()


def test_bad_settings_are_one_line(tmp_path):
    paths = write_corpus(tmp_path, sizes=(30, 5, 5))
    with pytest.raises(UserError, match="on_error"):
        ingest(IngestSettings(paths=tuple(paths), on_error="ignore"), tmp_path / "o")
    with pytest.raises(UserError, match="multiple of 1024"):
        ingest(IngestSettings(paths=tuple(paths), shard_documents=1000), tmp_path / "o")
    with pytest.raises(UserError, match="validation_documents=100 needs more"):
        ingest(IngestSettings(paths=tuple(paths), validation_documents=100), tmp_path / "o")
    with pytest.raises(UserError, match="no finished document store"):
        ds.DocumentStore(tmp_path / "nowhere")


def test_report_counts_skipped_records(tmp_path):
    from spokes_lightning.pipeline.outputs import CorpusOutput
    from spokes_lightning.pipeline.report_stage import corpus_line

    bad = tmp_path / "x.jsonl"
    bad.write_text("\n".join([json.dumps({"id": f"d{i}", "text": "w " * 30}) for i in range(9)] + ["{oops"]) + "\n")
    summary = ingest(IngestSettings(paths=(str(bad),), validation_documents=2, on_error="skip"), tmp_path / "o")
    line = corpus_line(CorpusOutput(pool="o/pool", validation="o/validation", **summary))
    assert "9 documents read from 1 input(s), 2 held out" in line and "1 malformed record(s) skipped" in line
    assert "x.jsonl line 10: invalid JSON" in line


@pytest.mark.parametrize("seed", [0, 1])
def test_empty_texts_never_enter_the_pool_and_are_counted(tmp_path, seed):
    """Every per-document file of a run is aligned to the pool: an empty text, which no feature,
    length or embedding can describe, is left out at ingest (and counted), not skipped later."""
    from spokes_lightning.pipeline.outputs import CorpusOutput
    from spokes_lightning.pipeline.report_stage import corpus_line

    rng = random.Random(seed)
    recs = _records(300, seed, "s", "d")
    empty = sorted(rng.sample(range(300), 17))
    for i, j in enumerate(empty):
        recs[j]["text"] = ["", "   ", "\n\t", None][i % 4]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = ingest(IngestSettings(paths=(str(path),), validation_documents=10, seed=seed), tmp_path / "out")
    pool = ds.DocumentStore(tmp_path / "out" / "pool")
    assert summary["empty_texts"] == 17 and summary["n_read"] == 300 - 17
    assert summary["n_pool"] + summary["n_validation"] == 283 == len(pool) + 10
    assert all(d.text.strip() for d in pool)
    gone = {recs[j]["id"] for j in empty}
    assert not gone & {d.id for d in pool}
    assert "17 empty text(s) left out" in corpus_line(CorpusOutput(pool="o/pool", validation="o/validation", **summary))


def test_training_sample_is_a_seeded_subset_in_pool_order(tmp_path):
    from spokes_lightning.pipeline.data_stages import training_sample

    paths = write_corpus(tmp_path, sizes=(400, 30, 70), seed=8)
    ingest(IngestSettings(paths=tuple(paths), validation_documents=0), tmp_path / "o")
    pool = ds.DocumentStore(tmp_path / "o" / "pool")
    assert training_sample(pool, None, 0, "x") is pool and training_sample(pool, 10_000, 0, "x") is pool
    a, b, c = (training_sample(pool, 50, seed, "x") for seed in (0, 0, 1))
    order = {d.id: r for r, d in enumerate(pool)}
    assert [d.id for d in a] == [d.id for d in b] != [d.id for d in c]
    assert len(a) == 50 and [order[d.id] for d in a] == sorted(order[d.id] for d in a)
    with pytest.raises(UserError, match="x must be"):
        training_sample(pool, -3, 0, "x")
