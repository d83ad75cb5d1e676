"""Feature stores from matrices computed elsewhere: `spokes import-features`, store validation (ids.npy),
and a pipeline run whose gradients and embeddings are imported stores (no proxy)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from spokes_lightning.data.selection_artifact import read_selection
from spokes_lightning.utils.errors import UserError
from spokes_lightning.data.id_arrays import encode_ids, first_duplicate
from spokes_lightning.features.store import FeatureStoreWriter, open_feature_store, write_column_slice
from tiny_run import TINY


def spokes(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "spokes_lightning", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def one_error_line(r) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert r.stdout == ""
    return lines[0]


def write_ids(path, ids, form):
    if form == "txt":
        path.write_text("".join(f"{i}\n" for i in ids))
    else:
        np.save(path, np.asarray(ids))
    return path


# --------------------------------------------------------------------------- the command


@pytest.mark.parametrize("dtype,form,ids", [
    (np.float16, "txt", [f"doc-{i:03d}" for i in range(37)]),
    (np.float32, "npy", [f"héllo/{i}" for i in range(37)]),  # numpy unicode strings, non-ASCII
    (np.float32, "npy", list(range(1000, 1037))),  # integer ids become their decimal strings
])
def test_import_copies_rows_and_ids_exactly(tmp_path, dtype, form, ids):
    x = np.random.default_rng(0).standard_normal((37, 12)).astype(dtype)
    np.save(tmp_path / "f.npy", x)
    ids_file = write_ids(tmp_path / f"ids.{form}", ids, form)
    out = tmp_path / "store"
    r = spokes("import-features", tmp_path / "f.npy", "--ids", ids_file, "--out", out, "--kind", "embeddings",
               "--k", 12, "--seed", 7, "--model", "m-1", "--projection", "rademacher", "--meta", "layers=2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"store": str(out), "kind": "embeddings", "n": 37, "dim": 12,
                                    "dtype": np.dtype(dtype).name}
    store = open_feature_store(out)
    assert store.matrix.dtype == dtype and store.matrix.shape == (37, 12)
    np.testing.assert_array_equal(store.matrix, x)
    assert store.ids == [str(i) for i in ids] and store.skipped == {}
    assert store.ids_array().dtype.kind == "S" and len(store) == 37
    m = store.manifest
    assert m["source"] == "imported" and m["kind"] == "embeddings" and m["independent_projection"] is False
    assert m["from"] == str((tmp_path / "f.npy").resolve()) and m["ids_from"] == str(ids_file.resolve())
    assert (m["k"], m["seed"], m["model"], m["projection"], m["layers"]) == (12, 7, "m-1", "rademacher", 2)
    assert sorted(p.name for p in out.iterdir()) == ["features.npy", "ids.npy", "manifest.json", "skipped.json"]


def test_import_again_from_the_same_inputs_replaces_the_store(tmp_path):
    x = np.ones((4, 3), dtype=np.float32)
    np.save(tmp_path / "f.npy", x)
    write_ids(tmp_path / "ids.txt", list("abcd"), "txt")
    args = ["import-features", tmp_path / "f.npy", "--ids", tmp_path / "ids.txt", "--out", tmp_path / "s"]
    assert spokes(*args).returncode == 0
    np.save(tmp_path / "f.npy", 2 * x)  # the same paths and settings: a re-import
    assert spokes(*args).returncode == 0, "re-import refused"
    np.testing.assert_array_equal(open_feature_store(tmp_path / "s").matrix, 2 * x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy", "ids.txt", "s"]  # no temp directory left


BAD = {
    "rows": (np.zeros((5, 3), np.float32), list("abcd"), "5 rows but ids"),
    "duplicate": (np.zeros((4, 3), np.float32), list("abcb"), "'b' more than once"),
    "not_float": (np.zeros((4, 3), np.int32), list("abcd"), "must be float16 or float32"),
    "one_d": (np.zeros(4, np.float32), list("abcd"), "must be a 2-d"),
    "nan": (np.array([[0, 1], [2, np.nan], [0, 0], [1, 1]], np.float32), list("abcd"), "NaN or Inf (first bad row: 1)"),
    "k": (np.zeros((4, 3), np.float32), list("abcd"), "--k 8 but"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, case):
    x, ids, needle = BAD[case]
    np.save(tmp_path / "f.npy", x)
    write_ids(tmp_path / "ids.txt", ids, "txt")
    before = sorted(p.name for p in tmp_path.iterdir())
    extra = ["--k", 8] if case == "k" else []
    r = spokes("import-features", tmp_path / "f.npy", "--ids", tmp_path / "ids.txt", "--out", tmp_path / "store",
               *extra)
    assert needle in one_error_line(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT, no temp directory


def test_out_made_from_something_else_is_refused(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((4, 3), np.float32))
    np.save(tmp_path / "g.npy", np.ones((4, 3), np.float32))
    write_ids(tmp_path / "ids.txt", list("abcd"), "txt")
    assert spokes("import-features", tmp_path / "f.npy", "--ids", tmp_path / "ids.txt", "--out",
                  tmp_path / "s").returncode == 0
    first = (tmp_path / "s" / "features.npy").read_bytes()
    r = spokes("import-features", tmp_path / "g.npy", "--ids", tmp_path / "ids.txt", "--out", tmp_path / "s")
    assert "made from something else (from differ)" in one_error_line(r)
    assert (tmp_path / "s" / "features.npy").read_bytes() == first
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    r = spokes("import-features", tmp_path / "g.npy", "--ids", tmp_path / "ids.txt", "--out", tmp_path / "junk")
    assert "not a feature store" in one_error_line(r)
    assert [p.name for p in (tmp_path / "junk").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    assert spokes("import-features", tmp_path / "g.npy", "--ids", tmp_path / "ids.txt", "--out",
                  tmp_path / "empty").returncode == 0


# --------------------------------------------------------------------------- the store


def small_store(path, ids=("a", "b", "c", "d")):
    writer = FeatureStoreWriter(path, {"feature": "test"})
    writer.write_chunk(0, list(ids[:2]), np.arange(6, dtype=np.float16).reshape(2, 3), {"e": "empty text"})
    writer.write_chunk(1, list(ids[2:]), np.arange(6, 12, dtype=np.float16).reshape(2, 3))
    return writer.finalize(2, 3)


def test_finalize_writes_ids_npy_in_chunk_order_and_a_slice_keeps_them(tmp_path):
    store = small_store(tmp_path / "s", ("d1", "ü2", "c", "a-long-id"))
    assert store.ids == ["d1", "ü2", "c", "a-long-id"] and store.skipped == {"e": "empty text"}
    assert np.load(tmp_path / "s" / "ids.npy").dtype == np.dtype("S9")  # the longest id's UTF-8 bytes
    assert not (tmp_path / "s" / "ids.json").exists()
    part = write_column_slice(store, tmp_path / "p", 1, 3, {})
    assert (tmp_path / "p" / "ids.npy").read_bytes() == (tmp_path / "s" / "ids.npy").read_bytes()
    assert part.ids == store.ids and part.skipped == store.skipped


def test_an_old_store_with_ids_json_still_opens(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    np.save(d / "features.npy", np.eye(3, dtype=np.float16))
    (d / "ids.json").write_text(json.dumps({"ids": ["x", "y", "z"], "skipped": {"w": "empty text"}}))
    (d / "manifest.json").write_text(json.dumps({"complete": True, "n_documents": 3}))
    store = open_feature_store(d)
    assert store.ids == ["x", "y", "z"] and store.skipped == {"w": "empty text"}
    assert store.ids_array().tolist() == [b"x", b"y", b"z"]
    (d / "ids.json").write_text(json.dumps({"ids": ["x", "y", "x"], "skipped": {}}))
    with pytest.raises(UserError, match="'x' appears more than once"):
        open_feature_store(d)


def damage(path, how):
    ids = np.load(path / "ids.npy")
    if how == "truncated":
        data = (path / "ids.npy").read_bytes()
        (path / "ids.npy").write_bytes(data[: len(data) - 5])
    elif how == "fewer_ids":
        np.save(path / "ids.npy", ids[:-1])
    elif how == "duplicate":
        np.save(path / "ids.npy", np.array([ids[0], ids[1], ids[2], ids[0]]))
    elif how == "manifest":
        manifest = json.loads((path / "manifest.json").read_text())
        (path / "manifest.json").write_text(json.dumps({**manifest, "n_documents": 9}))
    elif how == "one_d":
        np.save(path / "features.npy", np.zeros(4, np.float16))


@pytest.mark.parametrize("how,needle", [
    ("truncated", "ids.npy cannot be read"), ("fewer_ids", "has 4 rows but there are 3 ids"),
    ("duplicate", "'a' appears more than once"), ("manifest", "n_documents = 9"), ("one_d", "must be a 2-d"),
])
def test_open_refuses_a_damaged_store_in_one_line(tmp_path, how, needle):
    small_store(tmp_path / "s")
    open_feature_store(tmp_path / "s")
    damage(tmp_path / "s", how)
    with pytest.raises(UserError, match=needle) as err:
        open_feature_store(tmp_path / "s")
    assert "\n" not in str(err.value)


def test_duplicate_search_is_exact():
    ids = encode_ids(f"document-{i}" for i in range(300_000))
    assert first_duplicate(ids) is None
    with_dup = ids.copy()
    with_dup[123_456] = with_dup[7]
    assert first_duplicate(with_dup) == "document-7"
    assert first_duplicate(encode_ids(["ab", "ab\x01", "a"])) is None  # prefixes are not equal


# --------------------------------------------------------------------------- the pipeline


def merged(base, extra):
    key = lambda o: o.split("=")[0].lstrip("+")  # noqa: E731
    keys = {key(e) for e in extra}
    return [o for o in base if key(o) not in keys] + list(extra)


WORDS = ("river stone light paper window garden music number yellow market silver engine quiet forest "
         "bridge winter coffee letter planet button").split()
N_DOCS = 90


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as fh:
        for i in range(N_DOCS):
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(25, 60))))
            fh.write(json.dumps({"id": f"d{i:03d}", "text": text, "source": f"s{i % 3}",
                                 "score": float(rng.uniform(0.1, 1.0))}) + "\n")
    return path


def overrides(run_dir, corpus, *extra):
    return merged(TINY, [f"run_dir={run_dir}", f"data.paths=[{corpus}]", "data.limit=null", "data.interleave_by=null",
                         "data.validation_documents=10", "quality.source=column", "quality.column=score",
                         "selection.methods=[random,spokes]", "selection.alpha=0.001", "selection.alpha_sweep=false",
                         "wandb.enabled=false", *extra])


def launch(run_dir, corpus, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "launch/run.py", *overrides(run_dir, corpus, *extra)],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, corpus):
    """A run_dir with only the corpus stage, and its pool ids (read as the later stages read them)."""
    from spokes_lightning.pipeline.data_stages import pool_documents
    from spokes_lightning.pipeline.outputs import CorpusOutput
    from spokes_lightning.pipeline.stage import RunContext, read_stage_output

    run_dir = tmp_path_factory.mktemp("run") / "run"
    r = launch(run_dir, corpus, "stages=[corpus]")
    assert r.returncode == 0, r.stderr[-3000:]
    outputs = read_stage_output(run_dir, CorpusOutput)
    ids = [d.id for d in pool_documents(RunContext(cfg=None, run_dir=run_dir, results={"corpus": outputs}))]
    assert len(ids) == N_DOCS - 10
    return run_dir, outputs, ids


def import_store(tmp_path, name, ids, dim, dtype, kind):
    x = np.random.default_rng(len(name)).standard_normal((len(ids), dim)).astype(dtype)
    np.save(tmp_path / f"{name}.npy", x)
    np.save(tmp_path / f"{name}_ids.npy", np.asarray(ids))
    r = spokes("import-features", tmp_path / f"{name}.npy", "--ids", tmp_path / f"{name}_ids.npy",
               "--out", tmp_path / name, "--kind", kind)
    assert r.returncode == 0, r.stderr
    return tmp_path / name


def test_a_store_covering_none_of_the_pool_is_refused_by_the_family(corpus_run, corpus, tmp_path):
    from spokes_lightning.pipeline.families.embeddings import Embeddings
    from spokes_lightning.pipeline.families.gradients import Gradients
    from spokes_lightning.cli.run import compose
    from spokes_lightning.pipeline.stage import RunContext

    run_dir, outputs, pool_ids = corpus_run
    other = import_store(tmp_path, "other", [f"elsewhere-{i}" for i in range(20)], 8, np.float16, "gradients")
    cfg = compose(overrides(run_dir, corpus, f"features.gradients.store={other}", f"embeddings.store={other}"))
    ctx = RunContext(cfg=cfg, run_dir=run_dir, results={"corpus": outputs})
    with pytest.raises(UserError, match="none of its 20 ids is a pool document id") as err:
        Gradients().run(ctx)
    assert "\n" not in str(err.value) and "elsewhere-0" in str(err.value)
    with pytest.raises(UserError, match="holds gradients features, not embeddings"):
        Embeddings().run(ctx)
    partly = import_store(tmp_path, "partly", ["elsewhere", *pool_ids[:3]], 8, np.float16, "gradients")
    cfg = compose(overrides(run_dir, corpus, f"features.gradients.store={partly}"))
    out = Gradients().run(RunContext(cfg=cfg, run_dir=run_dir, results={"corpus": outputs}))
    assert out == {"gradients": str(partly.resolve()), "gradients_imported_from": str(partly.resolve())}


def test_preflight_takes_imported_stores_and_refuses_what_cannot_use_them(corpus_run, corpus, tmp_path):
    from spokes_lightning.cli.run import compose
    from spokes_lightning.pipeline.stages import check_config

    run_dir, _, pool_ids = corpus_run
    grads = import_store(tmp_path, "g", pool_ids, 8, np.float16, "gradients")
    check_config(compose(overrides(run_dir, corpus, f"features.gradients.store={grads}")))
    with pytest.raises(UserError, match="cannot be used with features.gradients.store"):
        check_config(compose(overrides(run_dir, corpus, f"features.gradients.store={grads}",
                                       "selection.methods=[random,quad]")))
    with pytest.raises(UserError, match="is not a finished feature store"):
        check_config(compose(overrides(run_dir, corpus, f"embeddings.store={tmp_path / 'nowhere'}")))


def test_pipeline_selects_from_imported_stores_without_a_proxy(corpus_run, corpus, tmp_path):
    run_dir, _, pool_ids = corpus_run
    rng = np.random.default_rng(5)
    missing_g, missing_e = set(pool_ids[:4]), set(pool_ids[2:7])
    g_ids = [i for i in pool_ids if i not in missing_g] + [f"extra-{i}" for i in range(6)]
    e_ids = [i for i in pool_ids if i not in missing_e] + ["extra-x"]
    grads = import_store(tmp_path, "grads", list(rng.permutation(g_ids)), 16, np.float16, "gradients")
    emb = import_store(tmp_path, "emb", list(rng.permutation(e_ids)), 8, np.float32, "embeddings")
    r = launch(run_dir, corpus, "stages=[corpus,tokenizer,features,select,report]",
               f"features.gradients.store={grads}", f"embeddings.store={emb}", "evaluate.tasks=[]")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (run_dir / "proxy").exists() and not (run_dir / "stages" / "proxy.json").exists()
    feats = json.loads((run_dir / "stages" / "features.json").read_text())["outputs"]
    assert feats["gradients"] == feats["gradients_imported_from"] == str(grads.resolve())
    assert feats["embeddings"] == str(emb.resolve()) and feats["gradients_independent"] is None
    select = json.loads((run_dir / "stages" / "select.json").read_text())["outputs"]
    missing = missing_g | missing_e
    assert select["n_unselectable"] == len(missing) == 7
    assert select["n_pool"] == len(pool_ids) - len(missing)
    assert sorted(select["methods"]) == ["random", "spokes"]
    for info in select["methods"].values():
        chosen = read_selection(run_dir / info["selection"]).ids
        assert len(chosen) == info["n_selected"] == int(0.5 * select["n_pool"])
        assert set(chosen) <= set(pool_ids) - missing  # neither extra ids nor documents without features
    report = (run_dir / "report.md").read_text()
    origin = f"Features: gradients imported from `{grads.resolve()}`; embeddings imported from `{emb.resolve()}`."
    assert origin in report
    assert "there is no independent projection" in report
    summary = json.loads((run_dir / "summary.json").read_text())
    assert all(m["gvendi_independent"] is None for m in summary["methods"].values())
