"""The `spokes` CLI's remaining edges: every bad input is one line on stderr, exit 2, nothing written."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from spokes_lightning import UserError
from spokes_lightning.selection.budget import parse_budget
from spokes_lightning.selectors import get_selector


def spokes(*args):
    return subprocess.run([sys.executable, "-m", "spokes_lightning", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def one_line_error(r, *needles, logs_before=False):
    """Exit 2 and one `error:` line (the pipeline may log `[spokes] ...` progress lines before it)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    if logs_before:
        lines = [line for line in lines if not line.startswith("[spokes] ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("edges")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((300, 16))
    np.save(d / "f64.npy", x)  # float64: read-only memmap, must not be divided in place
    np.save(d / "f32.npy", x.astype(np.float32))
    np.save(d / "q.npy", rng.random(300) + 0.1)
    return d


@pytest.mark.parametrize("method", ["spokes", "random"])
def test_float64_features_select_and_gvendi(files, method):
    r = spokes("select", "--method", method, "--features", files / "f64.npy", "--budget", "30",
               "--out", files / f"{method}64.npy")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["selected"] == 30
    g = spokes("gvendi", "--features", files / "f64.npy", "--indices", files / f"{method}64.npy")
    assert g.returncode == 0, g.stderr[-2000:]


def test_out_equal_to_features_or_a_directory_is_refused(files):
    before = (files / "f32.npy").read_bytes()
    one_line_error(spokes("select", "--method", "random", "--features", files / "f32.npy", "--budget", "10",
                          "--out", files / "f32.npy"), "input")
    assert (files / "f32.npy").read_bytes() == before
    one_line_error(spokes("select", "--method", "random", "--features", files / "f32.npy", "--budget", "10",
                          "--out", files), "directory")


def test_unwritable_out_fails_before_the_work(files, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    one_line_error(spokes("select", "--method", "spokes", "--features", files / "f32.npy", "--budget", "10",
                          "--out", blocker / "out.npy"))
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK) and os.geteuid() == 0:
            pytest.skip("root writes into a 0500 directory; the path-under-a-file case above covers it")
        one_line_error(spokes("select", "--method", "spokes", "--features", files / "f32.npy", "--budget", "10",
                              "--out", ro / "out.npy"), "cannot write")
    finally:
        os.chmod(ro, 0o700)


@pytest.mark.parametrize("method,param,needle", [
    ("spokes", "step=2", "unknown parameter(s) step; known:"),
    ("random", "seed_fraction=0.5", "unknown parameter(s) seed_fraction"),
    ("quality", "treshold=1", "unknown parameter(s) treshold"),
    ("spokes", "eta_scale=abc", "eta_scale must be a number"),
    ("spokes", "eta_scale=-1", "eta_scale must be > 0"),
    ("spokes", "rounding=best", "rounding must be one of"),
    ("spokes", "greedy_rounds=0", "greedy_rounds must be >= 1"),
    ("quality", "threshold=abc", "threshold must be a number"),
    ("semdedup", "n_clusters=1.5", "n_clusters must be an integer"),
    ("semdedup", "keep=soft", "keep must be one of"),
])
def test_method_parameters_are_declared_and_checked(files, tmp_path, method, param, needle):
    out = tmp_path / "o.npy"
    r = spokes("select", "--method", method, "--features", files / "f32.npy", "--quality", files / "q.npy",
               "--budget", "10", "--param", param, "--out", out)
    one_line_error(r, needle)
    assert not out.exists()


def test_pipeline_specs_get_the_same_checks():
    with pytest.raises(UserError, match="unknown parameter"):
        get_selector("spokes", step=3)
    with pytest.raises(UserError, match="parameter alpha is 'auto'"):
        get_selector("spokes", alpha="auto")  # resolved by the driver, never by the selector
    with pytest.raises(UserError, match="alpha must be a number"):
        get_selector("spokes", alpha="high")
    assert get_selector("spokes", steps=5).params["steps"] == 5
    assert get_selector("semdedup", n_clusters=2.0).params["n_clusters"] == 2


@pytest.mark.parametrize("lr", ["nan", "inf", "-1"])
def test_fixed_step_rule_with_a_bad_lr(files, tmp_path, lr):
    one_line_error(spokes("select", "--method", "spokes", "--features", files / "f32.npy", "--budget", "10",
                          "--step-rule", "fixed", "--lr", lr, "--out", tmp_path / "o.npy"), "lr")


def test_gvendi_indices_are_checked(files, tmp_path):
    np.save(tmp_path / "floats.npy", np.array([0.5, 1.5, 2.5]))
    np.save(tmp_path / "dups.npy", np.array([1, 1, 2]))
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "trunc.npy").write_bytes((files / "f32.npy").read_bytes()[:100])
    np.save(tmp_path / "big.npy", np.array([0, 300]))
    for name, needle in [("floats", "integers"), ("dups", "duplicates"), ("pickled", "not a .npy array"),
                         ("trunc", "cannot read"), ("big", "[0, 300)")]:
        one_line_error(spokes("gvendi", "--features", files / "f32.npy", "--indices", tmp_path / f"{name}.npy"), needle)


def test_text_file_as_features_says_what_it_is(tmp_path):
    (tmp_path / "f.npy").write_text("this is not an array\n")
    one_line_error(spokes("select", "--method", "random", "--features", tmp_path / "f.npy", "--budget", "1",
                          "--out", tmp_path / "o.npy"), "not a .npy array file")


def test_scientific_budget_is_a_count():
    assert parse_budget("1e3") == 1000 and isinstance(parse_budget("1e3"), int)
    assert parse_budget("0.1") == 0.1
    with pytest.raises(UserError, match="decimal point"):
        parse_budget("1e-1")


def test_all_zero_rows_and_one_document_messages(tmp_path):
    np.save(tmp_path / "zeros.npy", np.zeros((5, 4), dtype=np.float32))
    line = one_line_error(spokes("select", "--method", "spokes", "--features", tmp_path / "zeros.npy", "--budget", "2",
                                 "--drop-zero-rows", "--out", tmp_path / "o.npy"), "zero norm")
    assert "[1, 0]" not in line
    np.save(tmp_path / "one.npy", np.ones((1, 4), dtype=np.float32))
    r = spokes("select", "--method", "semdedup", "--features", tmp_path / "one.npy", "--budget", "1",
               "--out", tmp_path / "s.npy")
    assert r.returncode == 0, r.stderr[-2000:]  # one document, budget 1: keep it
    assert np.load(tmp_path / "s.npy").tolist() == [0]


def launch(*overrides):
    return subprocess.run([sys.executable, "launch/run.py", *overrides], capture_output=True, text=True, timeout=300)


def test_run_dir_that_is_a_file_or_under_one(tmp_path):
    f = tmp_path / "plain_file"
    f.write_text("x")
    one_line_error(launch(f"run_dir={f}"), "is a file")
    one_line_error(launch(f"run_dir={f}/sub/run"), "under")
    assert f.read_text() == "x"


def test_pipeline_method_spec_with_a_typo_fails_before_any_work(tmp_path):
    r = launch(f"run_dir={tmp_path / 'run'}", "selection.methods=[spokes]", "+selection.specs.spokes.step=3")
    one_line_error(r, "unknown parameter(s) step")
    assert not (tmp_path / "run" / "corpus").exists()


def test_empty_corpus_says_it_is_empty(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    r = launch(f"run_dir={tmp_path / 'run'}", f"data.paths=[{tmp_path / 'empty.jsonl'}]", "data.limit=null",
               "data.interleave_by=null", "data.validation_documents=0")
    line = one_line_error(r, "corpus is empty", logs_before=True)
    assert "only 0" not in line
