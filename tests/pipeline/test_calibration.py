"""Calibration studies (Table 1, appendix A, dense vs Kronecker) on a tiny trained proxy."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from spokes_lightning.pipeline.calibration import main, rowwise_spearman
from spokes_lightning.core.overlap import subset_overlap_pct
from spokes_lightning.data.corpus import demo_web_paths, read_documents
from spokes_lightning.models.proxy_training import train_proxy
from spokes_lightning.models.tokenizer import train_tokenizer

DOCS = str(demo_web_paths()[0])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.set_num_threads(1)
    docs = read_documents(demo_web_paths(), "text")[:60]
    root = tmp_path_factory.mktemp("calib")
    tok = train_tokenizer([d.text for d in docs], 400, root / "tok")
    return train_proxy(docs, tok, root / "proxy", n_layers=4, hidden=32, heads=2, intermediate=64,
                       max_length=64, batch_size=8, max_steps=8)


def common(model, run_dir):
    return ["--model", str(model), "--documents", DOCS, "--run-dir", str(run_dir), "--n-docs", "30",
            "--max-length", "48"]


def read_json(path):
    return json.loads(path.read_text())


def test_rowwise_spearman_and_overlap_math():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5))
    k = x @ x.T
    assert rowwise_spearman(k, k) == pytest.approx(1.0)
    assert rowwise_spearman(k, -k) == pytest.approx(-1.0)
    noisy = k + rng.normal(scale=5.0, size=k.shape)
    assert -1 <= rowwise_spearman(k, noisy) < 0.9
    assert subset_overlap_pct([1, 2, 3, 4], [3, 4, 5, 6]) == 50.0
    assert subset_overlap_pct([1, 2], [2, 3, 4, 5]) == 50.0  # in percent of the smaller subset


K_OPTIONS = ["--k-values", "16", "64", "256", "--k-ref", "256", "--fractions", "0.25", "0.5"]


@pytest.fixture(scope="module")
def alone(tiny_model, tmp_path_factory):
    """The three studies, one command each, into one run directory."""
    run_dir = tmp_path_factory.mktemp("alone")
    assert main(["layers", *common(tiny_model, run_dir), "--max-layers", "4"]) == 0
    assert main(["k", *common(tiny_model, run_dir), *K_OPTIONS]) == 0
    assert main(["projection", *common(tiny_model, run_dir), "--k", "64"]) == 0
    return run_dir


def test_layers_table(tiny_model, alone, tmp_path):
    for ext in ("md", "csv", "json", "png"):
        assert (alone / f"layers.{ext}").stat().st_size > 0
    rows = read_json(alone / "layers.json")["rows"]
    rhos = [r["spearman_vs_full"] for r in rows]
    assert [r["last_n_layers"] for r in rows] == [1, 2, 3, 4]
    assert all(-1 <= r <= 1 for r in rhos)
    assert rhos[-1] == pytest.approx(1.0) and rhos[-1] == max(rhos)  # n = all layers is the full kernel
    assert "| last_n_layers |" in (alone / "layers.md").read_text()
    with open(alone / "layers.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    blocks_only = tmp_path / "blocks"
    assert main(["layers", *common(tiny_model, blocks_only), "--max-layers", "4", "--exclude-head"]) == 0
    rows_blocks = read_json(blocks_only / "layers.json")["rows"]
    assert rows_blocks[-1]["spearman_vs_full"] == pytest.approx(1.0)
    assert rows_blocks[0]["spearman_vs_full"] < rhos[0]  # without the shared head term, 1 block agrees less


def test_k_overlap_table(alone):
    rows = read_json(alone / "k.json")["rows"]
    assert len(rows) == 6 and all(0 <= r["overlap_pct"] <= 100 for r in rows)
    assert (alone / "k.png").exists() and (alone / "k.md").exists()
    at_half = {r["k"]: r["overlap_pct"] for r in rows if r["fraction"] == 0.5}
    assert at_half[256] >= at_half[16]  # a larger sketch agrees at least as well with the reference


def test_projection_table(alone):
    rows = read_json(alone / "projection.json")["rows"]
    assert [r["comparison"].split()[0] for r in rows] == ["dense", "dense"]
    assert all(0 <= r["overlap_pct"] <= 100 and -1 <= r["kernel_spearman"] <= 1 for r in rows)
    assert (alone / "projection.png").exists()


def test_all_writes_what_each_study_writes_alone(tiny_model, alone, tmp_path, capsys):
    assert main(["all", *common(tiny_model, tmp_path / "all"), "--max-layers", "4", *K_OPTIONS, "--k", "64"]) == 0
    out = capsys.readouterr().out
    assert all(title in out for title in ("| last_n_layers |", "Subset overlap vs k", "Dense vs Kronecker"))
    for study in ("layers", "k", "projection"):
        ours, theirs = read_json(tmp_path / "all" / f"{study}.json"), read_json(alone / f"{study}.json")
        assert ours["rows"] == theirs["rows"]
        assert {**ours["settings"], "run_dir": None} == {**theirs["settings"], "run_dir": None}
    with pytest.raises(SystemExit) as stop:  # a study that cannot run stops all of them before the first
        main(["all", *common(tiny_model, tmp_path / "bad"), "--n-layers", "9", *K_OPTIONS])
    assert stop.value.code == 2 and "has 4 decoder layers" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("extra, message", [
    (["--max-layers", "9"], "has 4 decoder layers"),
    (["--k", "0"], "positive integer"),
])
def test_bad_layer_inputs_exit_2(tiny_model, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["layers", *common(tiny_model, tmp_path / "run"), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "layers.json").exists()


def test_cli_missing_model_dir_and_bad_k_exit_2(tmp_path):
    cmd = [sys.executable, "-m", "spokes_lightning.pipeline.calibration", "k", "--model", str(tmp_path / "missing"),
           "--documents", DOCS, "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run(cmd + ["--k-values", "-4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "positive integer" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_kernel_preserving_rows_keep_the_gram():
    from spokes_lightning.pipeline.calibration import kernel_preserving_rows

    x = np.random.default_rng(1).normal(size=(6, 40)).astype(np.float32)
    y = kernel_preserving_rows(x)
    assert y.shape == (6, 6)
    np.testing.assert_allclose(y @ y.T, x @ x.T, rtol=1e-4, atol=1e-4)
