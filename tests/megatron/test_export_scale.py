"""The export at scale: streaming reads, sharded/parallel tokenization, the bounded merge, gloo
ranks, and a full disk. Expected bytes come from a one-process export written straight with
megatron-core's builder, gzip and ``pq.write_table`` (tests/helpers/export_store.py)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from export_store import FailsInWorkers, LazyStore, export_case, exported_bytes, legacy_export
from spokes_lightning.megatron import shards as megatron_shards
from spokes_lightning.utils.errors import UserError, user_errors_exit
from spokes_lightning.megatron.export import export_selection, resolve_selection
from spokes_lightning.megatron.shards import ShardMerger, shard_ranges, shards_for_rank
from tiny_text import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
FINAL = ("export/m.jsonl.gz", "export/m.parquet", "megatron/m_text_document.bin",
         "megatron/m_text_document.idx", "megatron/m_export.json", "megatron/pretrain_m.sh")


@pytest.fixture(scope="module")
def case():
    return export_case()


@pytest.fixture(scope="module")
def tokenizer(case):
    return tiny_tokenizer(d["text"] for d in case[0])


@pytest.fixture(scope="module")
def expected(case, tokenizer, tmp_path_factory):
    corpus, selection, copies = case
    return legacy_export(corpus, selection, copies, tokenizer, tmp_path_factory.mktemp("legacy"))


def hidden(run_dir: Path) -> list[str]:
    return sorted(p.name for d in ("export", "megatron") if (run_dir / d).exists()
                  for p in (run_dir / d).iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- shard plan


def test_shard_plan_is_fixed_by_the_selection_and_split_by_rank():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(8, 4) == [(0, 4), (4, 8)] and shard_ranges(3, 100) == [(0, 3)]
    assert list(shards_for_rank(7, 1, 3)) == [1, 4]
    owners = [r for s in range(11) for r in range(4) if s in shards_for_rank(11, r, 4)]
    assert owners == [s % 4 for s in range(11)]  # every shard exactly once, on rank s % world
    with pytest.raises(UserError, match="rank 2"):
        shards_for_rank(5, 2, 2)
    with pytest.raises(UserError, match="shard_docs"):
        shard_ranges(5, 0)


# ----------------------------------------------------------------------------- merge


def _shards(tmp_path, dtype, sizes, seed=0):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    prefixes = []
    for s, n_docs in enumerate(sizes):
        prefix = str(tmp_path / f"x.shard{s:05d}")
        b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
        for _ in range(n_docs):
            toks = rng.integers(0, 60000, size=rng.integers(1, 9))
            b.add_document(toks, [toks.size])
        b.finalize(prefix + ".idx")
        prefixes.append(prefix)
    return prefixes


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_merge_is_byte_identical_to_megatron_add_index(tmp_path, monkeypatch, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    prefixes = _shards(tmp_path, dtype, [5, 1, 12, 3])
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
    for p in prefixes:
        ref.add_index(p)
    ref.finalize(str(tmp_path / "ref.idx"))

    monkeypatch.setattr(megatron_shards, "MERGE_CHUNK", 4)  # several chunks per shard
    with ShardMerger(tmp_path / "out" / "merged") as merger:
        for p in prefixes:
            merger.append(p)
        n_docs, n_tokens = merger.finish()
    for suffix in (".bin", ".idx"):
        assert (tmp_path / "out" / f"merged{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()
    ds = IndexedDataset(str(tmp_path / "out" / "merged"))
    assert n_docs == len(ds) == 21 and n_tokens == int(ds.sequence_lengths.sum())
    assert not any(Path(p + suffix).exists() for p in prefixes for suffix in (".bin", ".idx"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["merged.bin", "merged.idx"]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("n_docs", [0, 1, 37])
def test_shard_writer_is_byte_identical_to_megatron_builder(tmp_path, dtype, n_docs):
    """The export writes shards without megatron-core: the bytes are its builder's, and it reads them."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

    from spokes_lightning.megatron.index_format import (IndexedDatasetWriter, index_counts, optimal_token_dtype,
                                                        read_index_header)

    rng = np.random.default_rng(n_docs)
    docs = [rng.integers(0, 60000, size=rng.integers(1, 40)) for _ in range(n_docs)]
    ref, ours = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype), IndexedDatasetWriter(tmp_path / "o.bin", dtype)
    for toks in docs:
        ref.add_document(np.asarray(toks, dtype=dtype), [toks.size])
        ours.add_document(toks)
    ref.finalize(str(tmp_path / "ref.idx"))
    ours.finish(tmp_path / "o.idx")
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"o{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()
    if n_docs:  # (megatron-core cannot mmap an empty .bin)
        ds = IndexedDataset(str(tmp_path / "o"))
        assert len(ds) == n_docs and all(np.array_equal(ds[i], docs[i]) for i in range(n_docs))
    assert read_index_header(tmp_path / "o.idx")[1:] == (n_docs, n_docs + 1, np.dtype(dtype).itemsize)
    assert index_counts(tmp_path / "o.idx", chunk=5) == (n_docs, sum(d.size for d in docs))
    if n_docs:
        (tmp_path / "cut.idx").write_bytes((tmp_path / "o.idx").read_bytes()[:36])  # half a length
        with pytest.raises(UserError, match="truncated"):
            index_counts(tmp_path / "cut.idx")
    for vocab in (600, 65499, 65500, 128256):
        assert optimal_token_dtype(vocab) is DType.optimal_dtype(vocab)
    (tmp_path / "bad.idx").write_bytes((tmp_path / "o.idx").read_bytes()[:17] + b"\x63")  # an unknown dtype code
    with pytest.raises(UserError, match="not a Megatron index"):
        read_index_header(tmp_path / "bad.idx")


def test_merge_memory_does_not_grow_with_the_shards(tmp_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    monkeypatch.setattr(megatron_shards, "MERGE_CHUNK", 1 << 12)
    peaks = {}
    for n in (20_000, 200_000):
        prefix = str(tmp_path / f"big{n}")
        b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        b.data_file.write(np.ones(n, dtype=np.uint16).tobytes())  # n one-token documents
        b.sequence_lengths, b.document_indices = [1] * n, list(range(n + 1))
        b.finalize(prefix + ".idx")
        tracemalloc.start()
        with ShardMerger(tmp_path / f"m{n}" / "merged") as merger:
            merger.append(prefix)
            assert merger.finish() == (n, n)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # 10x the documents, the same peak: the copy buffer and a few chunks of 4096 entries.
    assert peaks[200_000] < 1.05 * peaks[20_000] + 64 * 1024, peaks
    assert peaks[200_000] < megatron_shards.COPY_BUFFER + (1 << 20), peaks


def test_merge_refuses_missing_or_mismatched_shards(tmp_path):
    prefixes = _shards(tmp_path, np.uint16, [2])
    with ShardMerger(tmp_path / "o" / "m") as merger:
        with pytest.raises(UserError, match="missing"):
            merger.append(str(tmp_path / "nope"))
        Path(prefixes[0] + ".bin").write_bytes(b"\x00")
        with pytest.raises(UserError, match="does not match its index"):
            merger.append(prefixes[0])
    assert list((tmp_path / "o").iterdir()) == []  # its temp directory is gone


# ----------------------------------------------------------------------------- whole export


def test_workers_and_shard_sizes_give_the_one_process_bytes(case, tokenizer, expected, tmp_path):
    corpus, selection, copies = case
    store = LazyStore.write(tmp_path / "docs.jsonl", corpus)
    stale = tmp_path / "c" / "megatron" / ".tmp-m_text_document-shards"
    stale.mkdir(parents=True)
    (stale / "m_text_document.shard00000.bin").write_bytes(b"junk from a killed run")
    (stale.parent / ".tmp-m_text_document-merge").mkdir()
    (stale.parent / ".tmp-m_text_document-merge" / "data.bin").write_bytes(b"a killed merge")
    runs = {
        "default": export_selection(corpus, selection, "m", tmp_path / "a", tokenizer, copies=copies),
        "small shards": export_selection(corpus, selection.tolist(), "m", tmp_path / "b", tokenizer,
                                         copies=copies.tolist(), shard_docs=7, block_size=3),
        "2 workers": export_selection(store, selection, "m", tmp_path / "c", tokenizer, copies=copies,
                                      workers=2, shard_docs=7, block_size=5),
    }
    n_docs = int(copies.sum())
    for name, res in runs.items():
        got = exported_bytes(res)
        for suffix in expected:
            assert got[suffix] == expected[suffix], (name, suffix)
        assert res.n_docs == n_docs and res.n_tokens == len(expected[".bin"]) // 2
        run_dir = Path(res.data_prefix).parents[1]
        assert hidden(run_dir) == [], name
        saved = json.loads((run_dir / "megatron" / "m_export.json").read_text())
        assert "timings" not in saved and saved["n_docs"] == n_docs
    assert runs["default"].timings["n_shards"] == 1 and runs["small shards"].timings["n_shards"] == 7
    t = runs["2 workers"].timings
    assert t["workers"] == 2 and t["n_shards"] == 7 and t["world"] == 1
    assert all(t[k] >= 0 for k in ("text_s", "tokenize_s", "shard_busy_s", "merge_s", "total_s"))
    assert t["total_s"] >= t["tokenize_s"] and t["shard_busy_s"] > 0


def test_a_lazy_store_is_read_through_take_in_blocks(case, tokenizer, expected, tmp_path):
    corpus, selection, copies = case
    store = LazyStore.write(tmp_path / "docs.jsonl", corpus)
    res = export_selection(store, selection, "m", tmp_path / "run", tokenizer, copies=copies,
                           block_size=4, shard_docs=10)
    assert exported_bytes(res) == expected
    assert store.getitem_calls == 0 and max(store.take_sizes) <= 4
    assert sum(store.take_sizes) == 2 * len(selection)  # one pass for the text files, one to tokenize


def test_parquet_row_groups_have_a_fixed_size(case, tokenizer, tmp_path):
    import pyarrow.parquet as pq

    corpus, selection, _ = case
    out = {}
    for block in (3, 64):
        res = export_selection(corpus, selection, "m", tmp_path / f"b{block}", tokenizer,
                               block_size=block, parquet_row_group=8)
        out[block] = Path(res.parquet_path).read_bytes()
        meta = pq.ParquetFile(res.parquet_path).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [8] * 5 + [5]
        rows = pq.read_table(res.parquet_path).to_pylist()
        assert [r["id"] for r in rows] == [corpus[i]["id"] for i in selection]
        assert "copies" not in rows[0]
    assert out[3] == out[64]


def test_selection_by_positions_or_ids(case, monkeypatch):
    corpus = case[0]
    want = np.array([5, 0, 9], dtype=np.int64)
    for sel in (want.astype(np.int32), want.astype(np.uint64), [5, 0, 9], (np.int64(5), 0, 9),
                [corpus[i]["id"] for i in want]):
        got = resolve_selection(corpus, sel, block_size=4)
        assert got.dtype == np.int64 and got.tolist() == want.tolist()
    for sel, message in ((np.array([[1, 2]]), "one-dimensional"), (np.array([], dtype=np.int64), "empty"),
                         ([3, -1], "index -1 is outside"), (np.array([2, 60]), "index 60 is outside"),
                         (np.array([4, 1, 4]), "more than once"), (["doc-001", "doc-001"], "more than once"),
                         ([True, False], "not in the corpus"), (["doc-002", "zzz"], "'zzz'")):
        with pytest.raises(UserError, match=message):
            resolve_selection(corpus, sel)
    # Duplicates are found with a mask over the corpus (many picks) or a sort (few picks).
    with pytest.raises(UserError, match="more than once"):
        resolve_selection(corpus, list(range(10)) + [3])
    with pytest.raises(UserError, match="more than once"):
        resolve_selection([{"text": "x"}] * 1000, [7, 500, 7])
    assert resolve_selection(corpus, list(range(10))).tolist() == list(range(10))
    assert resolve_selection([{"text": "x"}] * 1000, [7, 500, 999]).tolist() == [7, 500, 999]
    import spokes_lightning.megatron.export as export_mod

    monkeypatch.setattr(export_mod, "ID_SELECTION_MAX", 2)
    with pytest.raises(UserError, match="limited to 2 ids"):
        resolve_selection(corpus, ["doc-001", "doc-002", "doc-003"])


@pytest.mark.parametrize("bad", [{"workers": 0}, {"shard_docs": 0}, {"block_size": -1},
                                 {"parquet_row_group": 0}, {"workers": 1.5}, {"workers": True}])
def test_bad_settings_fail_before_anything_is_written(case, tokenizer, tmp_path, bad):
    with pytest.raises(UserError, match=next(iter(bad))):
        export_selection(case[0], [1, 2], "m", tmp_path, tokenizer, **bad)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fill_then_fail(src, dst, length=0):
    dst.write(src.read(3))  # something half-written first
    _enospc()


@pytest.mark.parametrize("where", ["text", "shard", "merge", "index"])
def test_disk_full_leaves_no_final_file(case, tokenizer, tmp_path, monkeypatch, capsys, where):
    import gzip

    from spokes_lightning.megatron.index_format import IndexedDatasetWriter

    corpus, selection, copies = case
    if where == "text":
        monkeypatch.setattr(gzip.GzipFile, "write", _enospc)
    elif where == "shard":
        monkeypatch.setattr(IndexedDatasetWriter, "finish", _enospc)
    elif where == "merge":
        monkeypatch.setattr(megatron_shards.shutil, "copyfileobj", _fill_then_fail)
    else:
        monkeypatch.setattr(ShardMerger, "_write_index", _enospc)
    run = lambda: export_selection(corpus, selection, "m", tmp_path, tokenizer,  # noqa: E731
                                   copies=copies, shard_docs=9)
    with pytest.raises(OSError) as info:
        run()
    assert info.value.errno == errno.ENOSPC and "\n" not in str(info.value)
    assert [f for f in FINAL if (tmp_path / f).exists()] == []
    assert hidden(tmp_path) == []
    with pytest.raises(SystemExit) as stop, user_errors_exit():  # what the CLI prints
        run()
    assert stop.value.code == 2
    err = capsys.readouterr().err.replace("\r", "\n")  # (progress bars also go to stderr)
    assert [line for line in err.splitlines() if "rror" in line or "Trace" in line] == \
        ["error: cannot write or read: No space left on device"]


def test_disk_full_in_a_worker_keeps_the_previous_export(case, tokenizer, tmp_path):
    corpus, selection, copies = case
    good = export_selection(corpus, selection, "m", tmp_path, tokenizer, copies=copies)
    before = exported_bytes(good)
    store = FailsInWorkers.write(tmp_path / "docs.jsonl", corpus)
    with pytest.raises(OSError) as info:
        export_selection(store, selection[:30], "m", tmp_path, tokenizer, workers=2, shard_docs=10)
    assert info.value.errno == errno.ENOSPC
    assert exported_bytes(good) == before  # still the complete previous files, nothing half-new
    assert hidden(tmp_path) == []


# ----------------------------------------------------------------------------- gloo ranks


def _run_ranks(tmp_path, tokenizer, fail_rank=None):
    tok_dir, out = tmp_path / "tok", tmp_path / "reports"
    tokenizer.save_pretrained(str(tok_dir))
    out.mkdir()
    cmd = [sys.executable, str(ROOT / "tests" / "scripts" / "export_ranks.py"), str(tok_dir),
           str(tmp_path / "dist"), str(out), "2", "6"] + ([str(fail_rank)] if fail_rank is not None else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tok_dir, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_gloo_ranks_give_the_one_process_bytes(case, tmp_path):
    from transformers import PreTrainedTokenizerFast

    corpus, selection, copies = case
    tok = tiny_tokenizer(d["text"] for d in corpus)
    tok_dir, reports = _run_ranks(tmp_path, tok)
    assert [r.get("error") for r in reports] == [None, None]
    n_shards = len(shard_ranges(len(selection), 6))
    assert reports[0]["shards"] == list(range(0, n_shards, 2))
    assert reports[1]["shards"] == list(range(1, n_shards, 2))
    assert reports[0]["result"] == reports[1]["result"] and reports[0]["timings"]["world"] == 2
    one = export_selection(corpus, selection, "m", tmp_path / "one", PreTrainedTokenizerFast.from_pretrained(tok_dir),
                           copies=copies)
    assert exported_bytes(one) == exported_bytes(type(one)(**reports[0]["result"]))
    assert hidden(tmp_path / "dist") == []


def test_a_failing_rank_fails_every_rank_without_hanging(case, tmp_path):
    tok = tiny_tokenizer(d["text"] for d in case[0])
    _, reports = _run_ranks(tmp_path, tok, fail_rank=1)
    assert reports[1]["error"] == "UserError: planted failure"
    assert reports[0]["error"] == "UserError: export failed on rank 1: UserError: planted failure"
    assert [f for f in FINAL if (tmp_path / "dist" / f).exists()
            and not f.startswith("export/")] == []
    assert hidden(tmp_path / "dist") == []
    shutil.rmtree(tmp_path / "dist")
