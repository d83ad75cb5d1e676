"""The shipped demo corpus under data/demo: counts, fields, splits and a reproducible build."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
from collections import Counter

import pytest

from spokes_lightning.data.corpus import DEMO_DIR, load_quality_labels
from spokes_lightning.evaluation.tasks import load_eval_items
from spokes_lightning.evaluation.tasks import ALL_TASKS

SHARED_DATA = DEMO_DIR.parents[2] / "shared" / "data"
WEB_COUNTS = {"c4": 1000, "dolma_cc": 697, "dolma_cc_head": 20, "dolma_provided": 10,
              "olmo_c4": 30, "paloma_c4_100_domains": 10, "fineweb": 2800}
EVAL_FIELDS = {
    "hellaswag": {"ind", "activity_label", "ctx", "query", "endings", "label"},
    "mmlu": {"subject", "question", "choices", "answer"},
    "winogrande": {"context_options", "continuation", "gold"},
}
MAX_SHIPPED_BYTES = 15_000_000


def read_rows(rel: str) -> list[dict]:
    with gzip.open(DEMO_DIR / rel, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def web() -> list[dict]:
    return read_rows("web.jsonl.gz")


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((DEMO_DIR / "manifest.json").read_text())


def test_web_counts_fields_and_unique_ids(web):
    assert Counter(r["source"] for r in web) == WEB_COUNTS
    assert len({r["id"] for r in web}) == len(web) == 4567
    assert all(isinstance(r["text"], str) for r in web)
    assert sum(not r["text"] for r in web) == 27  # empty Dolma pages are kept on purpose
    scored = [r for r in web if "legal_score" in r]
    assert {r["source"] for r in scored} == {"fineweb"} and len(scored) == 2800
    assert set(Counter(r["legal_score"] for r in scored)) == {0, 1, 2, 3, 4, 5}
    assert web[0]["id"] == "c4-0"  # C4 rows have no source id


def test_quality_labels_are_out_of_the_pool(web):
    labels = load_quality_labels()
    assert len(labels) == 499 and sum(x.label for x in labels) == 272
    assert sum(x.agreement for x in labels) == 281 == len(load_quality_labels(agreement_only=True))
    assert len({x.id for x in labels}) == 499
    web_texts = {r["text"] for r in web}
    assert not any(x.text in web_texts for x in labels)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_eval_splits_disjoint_with_stated_sizes(task):
    test, val = load_eval_items(task, "test"), load_eval_items(task, "val")
    assert len(test) == 300 and len(val) == 100
    assert not {r["id"] for r in test} & {r["id"] for r in val}
    assert all(re.fullmatch(rf"{task}-\d+", r["id"]) for r in test + val)
    expected = EVAL_FIELDS.get(task, {"query", "choices", "gold"})
    assert all(expected <= set(r) for r in test + val)
    if task == "mmlu":
        dev = load_eval_items(task, "dev")
        assert len(dev) == 285 and len({r["subject"] for r in dev}) == 57


def test_choice_counts_match_readme_notes():
    assert {len(r["choices"]) for r in load_eval_items("siqa")} == {2}
    assert {len(r["choices"]) for r in load_eval_items("commonsense_qa")} == {4}


def test_manifest_matches_files_and_size_budget(manifest):
    total = 0
    for rel, entry in manifest["files"].items():
        data = (DEMO_DIR / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], rel
        assert len(read_rows(rel)) == entry["rows"], rel
        total += len(data)
    assert manifest["files"]["web.jsonl.gz"]["by_source"] == WEB_COUNTS
    assert total == manifest["total_bytes"] < MAX_SHIPPED_BYTES
    readme = (DEMO_DIR / "README.md").read_text()
    assert "4,567" in readme and "legal" in readme.lower()


@pytest.mark.skipif(not (SHARED_DATA / "README.md").is_file(),
                    reason="raw snapshots ../shared/data are absent (normal in a user's "
                           "clone); the rebuild check needs them")
def test_rebuild_is_byte_identical(tmp_path, manifest):
    spec = importlib.util.spec_from_file_location("demo_build", DEMO_DIR / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    rebuilt = build.build(SHARED_DATA, tmp_path)
    assert rebuilt["files"].keys() == manifest["files"].keys()
    for rel in [*manifest["files"], "manifest.json"]:
        assert (tmp_path / rel).read_bytes() == (DEMO_DIR / rel).read_bytes(), rel
    # eval rows keep their source fields unchanged
    source = (SHARED_DATA / "eval/llm_foundry/winogrande.jsonl").read_text().splitlines()
    for row in load_eval_items("winogrande", "val")[:20]:
        original = json.loads(source[int(row["id"].split("-")[1])])
        assert {k: v for k, v in row.items() if k not in ("id", "split")} == original


def test_build_without_raw_directory_is_one_line(capsys):
    spec = importlib.util.spec_from_file_location("demo_build", DEMO_DIR / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    with pytest.raises(SystemExit) as exit_info:
        build.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--raw DIR is required" in err[0]
