"""spokes_lightning.data.corpus: local readers, their one-line errors, and the hub fail-fast path."""
from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest

from spokes_lightning.evaluation.tasks import load_eval_items
from spokes_lightning.data.corpus import (
    DEMO_DIR,
    Document,
    ReadStats,
    demo_web_paths,
    interleave_by_field,
    iter_documents,
    read_documents,
    stream_hub_dataset,
)
from spokes_lightning.utils.errors import UserError


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_reads_jsonl_and_gz_in_file_order_with_meta(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": "one", "lang": "en"},
                                                {"id": "y", "text": "two"}])
    second = tmp_path / "b.jsonl.gz"
    with gzip.open(second, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "z", "text": "three", "source": "web"}) + "\n\n")
    docs = read_documents([first, second])
    assert [d.id for d in docs] == ["x", "y", "z"]
    assert docs[0] == Document("x", "one", "a", {"lang": "en"})
    assert docs[2].source == "web" and docs[2].meta == {"source": "web"}
    assert [d.id for d in read_documents([first, second], limit=2)] == ["x", "y"]


def test_interleave_by_field_round_robins_sources_and_keeps_every_document():
    docs = [Document(f"{src}{i}", "t", "f", {"source": src}) for src, n in (("a", 3), ("b", 1), ("c", 2))
            for i in range(n)]
    docs.append(Document("none", "t", "f", {}))
    mixed = interleave_by_field(docs, "source")
    assert [d.id for d in mixed] == ["a0", "b0", "c0", "none", "a1", "c1", "a2"]
    assert sorted(d.id for d in mixed) == sorted(d.id for d in docs)


def test_demo_pool_first_n_mixes_every_large_source(tmp_path):
    from spokes_lightning.data.document_store import DocumentStore
    from spokes_lightning.data.ingest import IngestSettings, ingest

    paths = tuple(str(p) for p in demo_web_paths())
    ingest(IngestSettings(paths=paths, limit=300, interleave_by="source", validation_documents=0), tmp_path / "mixed")
    docs = list(DocumentStore(tmp_path / "mixed" / "pool"))
    sources = {d.meta["source"] for d in docs}
    assert len(docs) == 300 and {"c4", "dolma_cc", "fineweb"} <= sources
    ingest(IngestSettings(paths=paths, limit=300, validation_documents=0), tmp_path / "ordered")
    assert {d.meta["source"] for d in DocumentStore(tmp_path / "ordered" / "pool")} == {"c4"}  # file order: C4 first


def test_custom_fields_and_derived_ids(tmp_path):
    path = write_jsonl(tmp_path / "shard-0.jsonl", [{"body": "a"}, {"body": "b", "doc": 7},
                                                     {"body": None}])
    stats = ReadStats()
    docs = read_documents(path, text_field="body", id_field="doc", stats=stats)
    assert [d.id for d in docs] == ["shard-0:1", "7", "shard-0:3"]
    assert docs[2].text == "" and stats.empty_texts == 1 and stats.derived_ids == 2


def test_missing_file(tmp_path):
    with pytest.raises(UserError) as exc:
        read_documents([tmp_path / "nope.jsonl"])
    assert one_line(exc) == f"file not found: {tmp_path / 'nope.jsonl'}"


def test_unsupported_extension(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    with pytest.raises(UserError) as exc:
        read_documents([path])
    assert "unsupported file type" in one_line(exc) and "notes.txt" in str(exc.value)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(b"this is not gzip at all\n")
    with pytest.raises(UserError) as exc:
        read_documents([path])
    assert "bad.jsonl.gz" in one_line(exc) and "gzip" in str(exc.value)


def test_truncated_gzip(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress(b"".join(json.dumps({"text": "w" * 50 + str(i)}).encode() + b"\n"
                                   for i in range(200)))
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError) as exc:
        read_documents([path])
    assert "cut.jsonl.gz" in one_line(exc) and "truncated" in str(exc.value)


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserError) as exc:
        read_documents([path])
    assert one_line(exc).startswith(f"{path} line 2: invalid JSON")


def test_non_object_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('["text"]\n')
    with pytest.raises(UserError, match=r"line 1: expected a JSON object, got list"):
        read_documents([path])


def test_missing_text_field_lists_fields(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "content": "a", "url": "u"}])
    with pytest.raises(UserError) as exc:
        read_documents([path])
    message = one_line(exc)
    assert "no text field 'text'" in message and "fields present: content, id, url" in message


def test_duplicate_ids_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "d1", "text": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "d2", "text": "y"}, {"id": "d1", "text": "z"}])
    with pytest.raises(UserError) as exc:
        read_documents([a, b])
    assert one_line(exc) == (f"duplicate id 'd1' at {b} line 2 (first at {a} line 1); "
                             "ids must be unique")


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, capsys):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"id": "a", "text": "caf\xe9 na\xefve"}\n{"id": "b", "text": "ok \xff\xfe"}\n')
    stats = ReadStats()
    docs = read_documents([path], stats=stats)
    assert docs[0].text == "caf\ufffd na\ufffdve" and docs[1].text == "ok \ufffd\ufffd"
    assert stats.replaced_bytes == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: replaced 4 non-UTF-8 byte(s) with U+FFFD while reading 1 file(s)"]


def test_clean_input_prints_no_warning(tmp_path, capsys):
    read_documents([write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}])])
    assert capsys.readouterr().err == ""


def test_parquet_reading(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"text": ["alpha", "beta", "gamma"], "score": [0.5, 1.0, 2.0],
                      "raw": pa.array([b"x", b"\xffy", b"z"], type=pa.binary())})
    path = tmp_path / "part.parquet"
    pq.write_table(table, path, row_group_size=2)
    stats = ReadStats()
    docs = read_documents([path], stats=stats)
    assert [d.id for d in docs] == ["part:1", "part:2", "part:3"]
    assert [d.text for d in docs] == ["alpha", "beta", "gamma"]
    assert docs[1].meta == {"score": 1.0, "raw": "\ufffdy"} and stats.replaced_bytes == 1
    with pytest.raises(UserError, match=r"part.parquet row 1: no text field 'body'; "
                                        r"fields present: raw, score, text"):
        read_documents([path], text_field="body")


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"PAR1 definitely not a parquet footer")
    with pytest.raises(UserError) as exc:
        read_documents([path])
    assert "junk.parquet: unreadable parquet file" in one_line(exc)


def test_globs_and_directories(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    (tmp_path / "skip.txt").write_text("ignored")
    assert [d.text for d in read_documents([tmp_path])] == ["a", "b"]
    assert [d.text for d in read_documents(str(tmp_path / "*.jsonl"))] == ["a", "b"]
    with pytest.raises(UserError, match="no files match"):
        read_documents(str(tmp_path / "*.parquet"))


def test_iterator_is_lazy(tmp_path):
    path = tmp_path / "late.jsonl"
    path.write_text('{"text": "good"}\nnot json\n')
    docs = iter_documents([path])
    assert next(docs).text == "good"
    with pytest.raises(UserError, match="line 2"):
        next(docs)


def test_demo_paths_point_at_shipped_files():
    assert demo_web_paths() == [DEMO_DIR / "web.jsonl.gz"] and demo_web_paths()[0].is_file()


def test_eval_loader_rejects_unknown_task_and_split():
    with pytest.raises(UserError, match="unknown eval task 'lambada'"):
        load_eval_items("lambada")
    with pytest.raises(UserError, match="has no split 'dev'"):
        load_eval_items("piqa", "dev")


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"},
                                 {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_hub_stream_fails_fast_offline(monkeypatch, env):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    start = time.monotonic()
    with pytest.raises(UserError) as exc:
        stream_hub_dataset("HuggingFaceFW/fineweb-edu", config="sample-10BT", timeout=2.0)
    assert time.monotonic() - start < 5.0
    message = one_line(exc)
    assert "'HuggingFaceFW/fineweb-edu'" in message and "data.paths=[...]" in message
