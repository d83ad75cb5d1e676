"""The `spokes` command-line contract: one JSON line on stdout; bad input -> one line, exit 2."""
import json
import subprocess
import sys

import numpy as np
import pytest

from planted import planted_clusters


def spokes(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "spokes_lightning", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    x, _ = planted_clusters(n_clusters=10, n=400, d=32, seed=1, dtype=np.float16)
    q = np.random.default_rng(0).random(400) + 0.1
    np.save(d / "f.npy", x)
    np.save(d / "q.npy", q)
    return d


@pytest.mark.parametrize("method", ["spokes", "random", "quality"])
def test_select_prints_one_json_line_and_writes_indices(files, method):
    out = files / f"{method}.npy"
    r = spokes("select", "--method", method, "--features", files / "f.npy", "--quality", files / "q.npy",
               "--budget", "0.1", "--alpha", "0.01", "--out", out)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert set(rec) == {"method", "n", "selected", "gvendi", "mean_quality"}
    assert rec["n"] == 400 and rec["selected"] == 40 and rec["method"] == method
    idx = np.load(out)
    assert idx.dtype == np.int64 and len(np.unique(idx)) == 40
    q = np.load(files / "q.npy")
    assert rec["mean_quality"] == pytest.approx(q[idx].mean())
    if method == "quality":
        assert list(idx) == list(np.argsort(-q, kind="stable")[:40])


def test_budget_count_vs_fraction_and_no_quality(files):
    r = spokes("select", "--method", "spokes", "--features", files / "f.npy", "--budget", "7",
               "--out", files / "c.npy")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["selected"] == 7 and rec["mean_quality"] is None
    r = spokes("select", "--method", "random", "--features", files / "f.npy", "--budget", "1.0",
               "--out", files / "all.npy")
    assert json.loads(r.stdout)["selected"] == 400


def test_help_lists_every_method(files):
    r = spokes("select", "--help")
    assert r.returncode == 0
    from spokes_lightning.selectors import available_methods
    for m in available_methods():
        assert m in r.stdout


def test_gvendi_command(files):
    from spokes_lightning import vendi_score
    x = np.load(files / "f.npy")
    np.save(files / "i.npy", np.arange(0, 400, 3))
    r = spokes("gvendi", "--features", files / "f.npy")
    assert json.loads(r.stdout) == {"gvendi": pytest.approx(vendi_score(x)), "batch_gvendi": None}
    r = spokes("gvendi", "--features", files / "f.npy", "--indices", files / "i.npy",
               "--batch-size", "20", "--batches", "3", "--seed", "1")
    rec = json.loads(r.stdout)
    assert rec["gvendi"] == pytest.approx(vendi_score(x[::3]))
    assert 1 < rec["batch_gvendi"] < rec["gvendi"]


def _bad_files(d):
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    bad = x.copy()
    bad[13, 2] = np.inf
    np.save(d / "nan.npy", bad)
    np.save(d / "good.npy", x)
    np.save(d / "vec.npy", x[:, 0])
    np.save(d / "q49.npy", np.ones(49))
    np.save(d / "qneg.npy", -np.ones(50))
    np.save(d / "qzero.npy", np.zeros(50))
    (d / "junk.npy").write_bytes(b"not an npy file")


BAD = [
    (["--features", "nan.npy", "--budget", "5"], "first bad row: 13"),
    (["--features", "vec.npy", "--budget", "5"], "2-d"),
    (["--features", "junk.npy", "--budget", "5"], "cannot read"),
    (["--features", "missing.npy", "--budget", "5"], "not found"),
    (["--features", "good.npy", "--quality", "q49.npy", "--budget", "5"], "N = 50"),
    (["--features", "good.npy", "--quality", "good.npy", "--alpha", "0.5", "--budget", "5"], "shape"),
    (["--features", "good.npy", "--alpha", "1.5", "--budget", "5"], "alpha"),
    (["--features", "good.npy", "--alpha", "-0.1", "--budget", "5"], "alpha"),
    (["--features", "good.npy", "--budget", "0"], "budget"),
    (["--features", "good.npy", "--budget", "51"], "budget"),
    (["--features", "good.npy", "--budget", "1.5"], "budget"),
    (["--features", "good.npy", "--budget", "abc"], "budget"),
    (["--features", "good.npy", "--quality", "qneg.npy", "--alpha", "0.5", "--budget", "5"], "non-negative"),
    (["--features", "good.npy", "--quality", "qzero.npy", "--alpha", "0.5", "--budget", "5"], "zero"),
    (["--features", "good.npy", "--alpha", "0.5", "--budget", "5"], "quality"),
    (["--features", "good.npy", "--budget", "5", "--step-rule", "fixed"], "lr"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_one_line_exit_2_no_output(tmp_path, args, message):
    _bad_files(tmp_path)
    r = spokes("select", "--method", "spokes", *args, "--out", "out.npy", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in err[0], err[0]
    assert not (tmp_path / "out.npy").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_unknown_method_is_one_line(tmp_path):
    _bad_files(tmp_path)
    r = spokes("select", "--method", "nope", "--features", "good.npy", "--budget", "5", "--out", "o.npy", cwd=tmp_path)
    assert r.returncode == 2 and "unknown method" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("param,message", [("n_clusters=999", "n_clusters"), ("eps=1.5", "eps"), ("eps=0", "eps")])
def test_semdedup_bad_params_exit_2(tmp_path, param, message):
    _bad_files(tmp_path)
    r = spokes("select", "--method", "semdedup", "--features", "good.npy", "--budget", "5", "--param", param,
               "--out", "o.npy", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.npy").exists()


def test_semdedup_cli_selects_exact_budget(files):
    r = spokes("select", "--method", "semdedup", "--features", files / "f.npy", "--budget", "0.5",
               "--param", "n_clusters=5", "--out", files / "sd.npy")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["selected"] == 200 and len(np.unique(np.load(files / "sd.npy"))) == 200
