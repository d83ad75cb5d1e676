"""A run_dir you can trust (README "Reliability"): re-runs after changed settings, the quality column
across a resume, the run_dir lock, damaged cached files, byte-identical resumes, runs limited to
early stages, negative limits and the report's source mix.

One small pipeline (the overrides of test_pipeline.py, quality from a column, two methods, no
evaluation tasks) runs once; each test works on a copy of its run_dir.
"""
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from spokes_lightning.data.corpus import Document, interleave_by_field, read_documents
from spokes_lightning.utils.errors import UserError
from spokes_lightning.pipeline.outputs import ExportOutput, SelectOutput
from spokes_lightning.pipeline.stage import read_stage_output
from tiny_run import TINY

def merged(base, extra):
    """``base`` overrides with those of ``extra`` put in their place (a key given once)."""
    key = lambda o: o.split("=")[0].lstrip("+")  # noqa: E731
    keys = {key(e) for e in extra}
    return [o for o in base if key(o) not in keys] + list(extra)


BASE = merged(TINY, [
    "data.limit=120", "data.interleave_by=null", "quality.source=column", "quality.column=score",
    "selection.methods=[random,quality]", "selection.alpha=0.001", "selection.alpha_sweep=false",
    "evaluate.tasks=[]", "wandb.enabled=false",
])
EARLY = "stages=[corpus,tokenizer,proxy,features,select]"


def launch(run_dir, corpus, *extra):
    args = merged(BASE, [f"run_dir={run_dir}", f"data.paths=[{corpus}]", *extra])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: threads only wait on each other
    return subprocess.run([sys.executable, "launch/run.py", *args], capture_output=True, text=True, timeout=600,
                          env=env)


def one_error_line(r) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines and lines[-1].startswith("error: ") and len([x for x in lines if x.startswith("error")]) == 1
    return lines[-1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Shipped documents, each with its own source (a per-document 'source' field) and a 'score'."""
    from spokes_lightning.data.corpus import demo_web_paths

    docs = interleave_by_field(read_documents(demo_web_paths()), "source")[:120]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as fh:
        for i, d in enumerate(docs):
            fh.write(json.dumps({"id": d.id, "text": d.text, "source": f"site-{i:03d}",
                                 "score": 1.0 + len(d.text) % 7}) + "\n")
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("rundir") / "run"
    r = launch(run_dir, corpus)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def copy_of(run_dir, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(run_dir, target)
    return target


# ----------------------------------------------------------------------------- 1 + 6: changed selection


@pytest.fixture(scope="module")
def rebudgeted(finished, corpus, tmp_path_factory):
    """The finished run_dir, re-run with another budget: first up to select only, then to the end."""
    run_dir = copy_of(finished, tmp_path_factory.mktemp("rebudget"))
    for result in (run_dir / "pretrain").glob("*/result.json"):  # train here once, so that Megatron's
        result.unlink()                                          # sample index names this copy's data path
    (run_dir / "stages/pretrain.json").unlink()
    assert launch(run_dir, corpus).returncode == 0
    before = {f: (run_dir / f).read_bytes() for f in ("summary.json", "report.md")}
    early = launch(run_dir, corpus, "selection.budget=0.3", EARLY)
    after_early = {f: (run_dir / f).read_bytes() for f in before}
    full = launch(run_dir, corpus, "selection.budget=0.3")
    return run_dir, before, early, after_early, full


def test_partial_run_leaves_the_older_report_alone(rebudgeted):
    _, before, early, after_early, _ = rebudgeted
    assert early.returncode == 0, early.stderr[-2000:]
    assert "select: running" in early.stderr
    assert "Report:" not in early.stdout  # the report there belongs to budget 0.5
    assert "Stages run: select" in early.stdout and "left as it was" in early.stdout
    assert after_early == before  # neither the summary's timings nor the report were touched


def setting(key: str) -> str:
    return next(o.split("=", 1)[1] for o in BASE if o.split("=")[0] == key)


def test_changed_budget_trains_on_the_new_selection(rebudgeted, tmp_path):
    """After the budget changed, each method trains exactly as a fresh run on its new Megatron data."""
    from omegaconf import OmegaConf

    from spokes_lightning.models.tokenizer import load_tokenizer
    from spokes_lightning.data.document_store import DocumentStore
    from spokes_lightning.models.pretrain import pretrain_on_megatron_data
    from spokes_lightning.models.pretrain_record import read_curve

    run_dir, _, _, _, full = rebudgeted
    assert full.returncode == 0, full.stderr[-3000:]
    assert "pretrain: running" in full.stderr and "Report:" in full.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert all(s["n_selected"] == int(0.3 * summary["n_documents"]) for s in summary["methods"].values())
    torch.set_num_threads(1)  # as the pipeline's process (OMP_NUM_THREADS=1)
    p = {k: int(setting(f"pretrain.{k}")) for k in ("token_budget", "seq_length", "n_layers", "hidden", "heads",
                                                     "batch_size")}
    fresh = pretrain_on_megatron_data(
        run_dir / summary["methods"]["quality"]["megatron_prefix"], load_tokenizer(run_dir / "tokenizer"),
        tmp_path / "fresh", lr=float(OmegaConf.load("recipes/config.yaml").pretrain.lr), seed=0, progress=False,
        val_documents=[d.text for d in DocumentStore(run_dir / "corpus/validation")], **p)
    rerun = read_curve(run_dir / "pretrain/quality/seed_0/metrics.csv")
    assert [r["loss"] for r in rerun] == pytest.approx([r["loss"] for r in fresh.curve], rel=1e-5)
    assert summary["methods"]["quality"]["val_loss"] == pytest.approx(fresh.val_loss, rel=1e-5)


def test_megatron_sample_index_follows_the_data(tmp_path):
    """Re-exporting other documents under the same prefix trains exactly as a fresh run on them."""
    from spokes_lightning.megatron.export import export_selection
    from spokes_lightning.models.pretrain import pretrain_on_megatron_data
    from tiny_text import tiny_corpus, tiny_tokenizer

    torch.set_num_threads(1)
    docs = tiny_corpus(60)
    tok = tiny_tokenizer(d["text"] for d in docs)
    kw = dict(token_budget=12 * 4 * 32, seq_length=32, n_layers=1, hidden=32, heads=4, batch_size=4, seed=0,
              progress=False)
    big = export_selection(docs, list(range(50)), "m", tmp_path / "run", tok)
    pretrain_on_megatron_data(big.data_prefix, tok, tmp_path / "out", **kw)
    small = export_selection(docs, list(range(40, 60, 2)), "m", tmp_path / "run", tok)
    assert small.data_prefix == big.data_prefix
    again = pretrain_on_megatron_data(small.data_prefix, tok, tmp_path / "out", **kw)
    fresh = pretrain_on_megatron_data(small.data_prefix, tok, tmp_path / "fresh", **kw)
    assert not again.cached and again.dataset_tokens == small.n_tokens
    assert [r["loss"] for r in again.curve] == [r["loss"] for r in fresh.curve]


# ----------------------------------------------------------------------------- 2: quality column


def test_pool_file_keeps_the_fields_later_stages_read(tmp_path):
    from spokes_lightning.data.document_store import write_document_store
    from spokes_lightning.features.quality import quality_from_column

    docs = [Document(f"d{i}", f"text {i}", "web", {"score": 0.5 + i, "url": f"u{i}"}) for i in range(5)]
    back = list(write_document_store(tmp_path / "pool", docs))
    assert back == docs
    assert quality_from_column(back, "score").tolist() == quality_from_column(docs, "score").tolist()


def test_column_quality_survives_a_resume(finished, corpus, tmp_path):
    """A features stage run in a new process (as after a kill) reads the quality column from the pool file."""
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "stages/features.json").unlink()
    shutil.rmtree(run_dir / "features" / "families")  # no family record: each family runs (its chunks resume)
    r = launch(run_dir, corpus, "stages=[features]")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "features: running" in r.stderr and "cached (same settings" not in r.stderr
    for name in ("quality.npy", "quality_ids.npy", "gradients/features.npy", "embeddings/features.npy"):
        assert (run_dir / "features" / name).read_bytes() == (finished / "features" / name).read_bytes()
    assert json.loads((run_dir / "stages/features.json").read_text())["key"] == \
        json.loads((finished / "stages/features.json").read_text())["key"]


def test_pool_file_of_an_older_version_is_rewritten(finished, corpus, tmp_path):
    """A run_dir whose pool is one jsonl.gz file (older versions) gets the pool written again as a store."""
    run_dir = copy_of(finished, tmp_path)
    shutil.rmtree(run_dir / "corpus/pool")
    with gzip.open(run_dir / "corpus/pool.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"id": "x", "text": "old", "source": "web"}) + "\n")
    marker = json.loads((run_dir / "stages/corpus.json").read_text())
    del marker["files"]  # as older versions wrote it
    marker["outputs"]["pool"] = "corpus/pool.jsonl.gz"
    (run_dir / "stages/corpus.json").write_text(json.dumps(marker))
    r = launch(run_dir, corpus, "stages=[corpus]")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "corpus: pool was written by an earlier version" in r.stderr
    for name in ("index.json", "shard_00000.arrow"):
        assert (run_dir / "corpus/pool" / name).read_bytes() == (finished / "corpus/pool" / name).read_bytes()


# ----------------------------------------------------------------------------- 3: the run_dir lock


def test_second_run_on_a_held_run_dir_is_refused(finished, corpus, tmp_path):
    from spokes_lightning.pipeline.run_lock import LOCK_NAME, RunDirLock

    run_dir = copy_of(finished, tmp_path)
    markers = {p.name: p.read_bytes() for p in (run_dir / "stages").iterdir()}
    with RunDirLock(run_dir):
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            RunDirLock(run_dir).acquire()
        line = one_error_line(launch(run_dir, corpus, "selection.budget=0.3"))
    assert f"pid {os.getpid()}" in line and socket.gethostname() in line and "started" in line
    assert {p.name: p.read_bytes() for p in (run_dir / "stages").iterdir()} == markers
    assert not (run_dir / LOCK_NAME).exists()  # released



def test_lock_of_an_ended_run_is_taken_over(tmp_path, capfd):
    from spokes_lightning.pipeline.run_lock import LOCK_NAME, RunDirLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                  "started": "2026-01-01T00:00:00Z"}))
    with RunDirLock(tmp_path):
        held = json.loads((tmp_path / LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert f"taking over the lock left in {tmp_path / LOCK_NAME} by pid {dead.pid}" in capfd.readouterr().err
    assert not (tmp_path / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- 4: damaged cached files


def test_damaged_cached_outputs_are_made_again(finished, corpus, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    feats, indices = run_dir / "features/gradients/features.npy", run_dir / "selections/quality/indices.npy"
    good_feats, good_indices = feats.read_bytes(), indices.read_bytes()
    with open(feats, "r+b") as fh:
        fh.truncate(len(good_feats) // 2)
    flipped = bytearray(good_indices)
    flipped[-8:] = (len(flipped) + 7).to_bytes(8, "little")  # same size, another document
    indices.write_bytes(bytes(flipped))
    r = launch(run_dir, corpus, EARLY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f"features: cached output features/gradients/features.npy has {len(good_feats) // 2} bytes where "
            f"{len(good_feats)} were written; making it again") in r.stderr
    assert "select: cached output selections/quality/indices.npy has changed" in r.stderr
    assert "tokenizer: cached" in r.stderr and "proxy: cached" in r.stderr
    assert feats.read_bytes() == good_feats and indices.read_bytes() == good_indices

    # outside stages=[...] a damaged stage is not made again: the stage that needs it stops in one line
    pool = run_dir / "corpus/pool/shard_00000.arrow"
    raw = bytearray(pool.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    pool.write_bytes(bytes(raw))
    (run_dir / "stages/tokenizer.json").unlink()
    line = one_error_line(launch(run_dir, corpus, "stages=[tokenizer]"))
    assert "stage 'corpus'" in line and "corpus/pool/shard_00000.arrow" in line and "stages=[...]" in line


def test_damaged_feature_chunks_are_dropped(tmp_path):
    from spokes_lightning.features.store import FeatureStoreWriter

    writer = FeatureStoreWriter(tmp_path, {"kind": "test"})
    for c in range(3):
        writer.write_chunk(c, [f"{c}-{i}" for i in range(4)], np.full((4, 2), c, dtype=np.float16))
    raw = (tmp_path / "chunk_000001.npy").read_bytes()
    (tmp_path / "chunk_000001.npy").write_bytes(raw[:-2] + b"\x11\x22")  # same size
    with open(tmp_path / "chunk_000002.npy", "r+b") as fh:
        fh.truncate(len(raw) - 4)
    assert writer.drop_damaged_chunks(2) == [1, 2]
    assert writer.done_chunks() == {0}


# ----------------------------------------------------------------------------- 5: byte-identical resume


def test_report_made_from_cached_stages_is_byte_identical(finished, corpus, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "stages/report.json").unlink()
    (run_dir / "report.md").unlink()
    r = launch(run_dir, corpus, "stages=[report]")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "select: running" not in r.stderr and "report: running" in r.stderr  # select read from run_dir
    report = (run_dir / "report.md").read_text()
    assert report == (finished / "report.md").read_text()
    rows = [line.split(" | ")[0].lstrip("| ") for line in report.splitlines() if line.startswith("| ")
            and line.split(" | ")[0].lstrip("| ") in ("random", "quality")]
    assert rows[:2] == ["random", "quality"]  # selection.methods order, not alphabetical


def test_document_store_bytes_depend_on_the_documents_alone(tmp_path):
    from spokes_lightning.data.document_store import write_document_store

    docs = [Document("a", "one", "web", {"url": "u", "score": 1.5}), Document("b", "two", "web")]
    write_document_store(tmp_path / "x", docs)
    write_document_store(tmp_path / "y", iter(docs))
    for name in ("shard_00000.arrow", "index.json"):
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes()


# ----------------------------------------------------------------------------- 13: negative limits


def test_negative_limits_are_refused(corpus, tmp_path):
    line = one_error_line(launch(tmp_path / "run", corpus, "data.interleave_by=source", "data.limit=-5"))
    assert "data.limit must be >= 0" in line
    assert not (tmp_path / "run").exists()


def test_every_limit_setting_refuses_negatives(corpus):
    from omegaconf import OmegaConf

    from spokes_lightning.pipeline.data_stages import ingest_settings
    from spokes_lightning.pipeline.preflight import document_limit

    assert document_limit(None, "evaluate.limit") is None and document_limit(0, "evaluate.limit") == 0
    for bad in (-1, 2.5, "ten", True):
        with pytest.raises(UserError, match="evaluate.limit must be"):
            document_limit(bad, "evaluate.limit")

    cfg = OmegaConf.create({"seed": 0, "data": {"paths": [str(corpus)], "text_field": "text", "id_field": "id",
                                                "limit": -5, "interleave_by": "source", "validation_documents": 0}})
    with pytest.raises(UserError, match="data.limit must be >= 0"):
        ingest_settings(cfg)


# ----------------------------------------------------------------------------- 15: source mix


def test_source_mix_shows_the_top_sources_and_other(finished):
    from spokes_lightning.pipeline.report_stage import source_mix

    assert source_mix({"a": 5, "b": 3, "c": 1, "d": 1}) == "a 50%, b 30%, c 10%, other (1 source) 10%"
    assert source_mix({"b": 1, "a": 1}) == "a 50%, b 50%"
    report = (finished / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| random |") and "%" in line)
    mix = next(cell for cell in row.split(" | ") if "site-" in cell)
    assert mix.count("site-") == 3 and "other (" in mix and len(mix) < 100


# ----------------------------------------------------------------------------- a selector in one file


def test_a_family_added_to_a_run_is_computed_alone(finished, corpus, tmp_path):
    """A rerun whose methods need one more feature family (QuaDMix: the quality heuristics) computes
    that family only: the others come from their records without loading a model; dropping it again
    takes every family from the records, and a damaged store is computed again."""
    run_dir = copy_of(finished, tmp_path)
    stores = {name: (run_dir / "features" / name / "features.npy").read_bytes() for name in ("gradients", "embeddings")}
    added = launch(run_dir, corpus, "selection.methods=[random,quality,quadmix]", "stages=[corpus,tokenizer,proxy,features]")
    assert added.returncode == 0, added.stderr[-3000:]
    for family in ("gradients", "embeddings", "quality_column"):
        assert f"features: {family}: cached (same settings and inputs)" in added.stderr
    assert "features: quality_heuristics: cached" not in added.stderr
    assert (run_dir / "features" / "quality_heuristics" / "ids.npy").exists()
    assert {n: (run_dir / "features" / n / "features.npy").read_bytes() for n in stores} == stores
    (run_dir / "features" / "embeddings" / "features.npy").write_bytes(b"damaged")
    dropped = launch(run_dir, corpus, "stages=[corpus,tokenizer,proxy,features]")
    assert dropped.returncode == 0, dropped.stderr[-3000:]
    assert "features: gradients: cached" in dropped.stderr and "features: embeddings: cached" not in dropped.stderr
    assert (run_dir / "features" / "embeddings" / "features.npy").read_bytes() == stores["embeddings"]
    assert json.loads((run_dir / "stages/features.json").read_text())["key"] == \
        json.loads((finished / "stages/features.json").read_text())["key"]


def test_plugin_selector_runs_through_the_pipeline(finished, corpus, tmp_path):
    """tests/plugins/domain_quota.py (domains + multiplicities) through select and export, with
    domains as k-means clusters of the embeddings; no other module names it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from spokes_lightning.data.selection_artifact import read_selection

    plugin = os.path.join(os.path.dirname(os.path.dirname(__file__)), "plugins", "domain_quota.py")
    run_dir = copy_of(finished, tmp_path)
    r = launch(run_dir, corpus, f"selection.plugins=[{plugin}]", "selection.methods=[random,domain_quota]",
               "+selection.specs.domain_quota={selector: domain_quota}", "selection.domains.kmeans=3",
               "stages=[corpus,tokenizer,proxy,features,select,export]")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "features: cached" in r.stderr
    sel = read_selection(run_dir / "selections" / "domain_quota")
    marker = read_stage_output(run_dir, SelectOutput).methods["domain_quota"]
    assert sel.copies().tolist().count(2) == 3 and sel.manifest["n_copies"] == len(sel.ids) + 3
    assert marker.n_copies == len(sel.ids) + 3 and sel.manifest["stats"]["n_domains"] == 3
    export = read_stage_output(run_dir, ExportOutput).methods["domain_quota"]
    data = IndexedDataset(str(run_dir / export.megatron_prefix))
    assert len(data) == len(sel.ids) + 3  # each domain's best document twice in the Megatron data
    assert (data[0] == data[1]).all() and not (data[1].shape == data[2].shape and (data[1] == data[2]).all())
    # one more method: the others' selections are unchanged, so their exported files are kept as they are
    exported = {p: p.stat().st_mtime_ns for m in ("random", "domain_quota")
                for p in (run_dir / "megatron").glob(f"{m}_text_document.*")}
    more = launch(run_dir, corpus, f"selection.plugins=[{plugin}]", "selection.methods=[random,domain_quota,quality]",
                  "+selection.specs.domain_quota={selector: domain_quota}", "selection.domains.kmeans=3",
                  "stages=[corpus,tokenizer,proxy,features,select,export]")
    assert more.returncode == 0, more.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in exported} == exported and len(exported) == 4
    assert "export: random: the same documents and settings as its last export" in more.stderr
    assert (run_dir / "megatron" / "quality_text_document.idx").exists() and "export: quality: " in more.stderr
    assert read_stage_output(run_dir, ExportOutput).methods["domain_quota"] == export  # the same record
    bad = launch(copy_of(finished, tmp_path, "bad"), corpus, "selection.methods=[domain_quota]",
                 "+selection.specs.domain_quota={selector: domain_quota}", EARLY)
    assert "unknown method 'domain_quota'" in one_error_line(bad)  # without the plugin: one line, before work
