"""The installed wheel works on its own: a non-editable install, run from a folder outside the checkout.

The wheel is built from a copy of the checkout (nothing is written into it), installed with
``pip install --no-deps --target`` into a folder that a throwaway venv puts first on its path. That
venv sees the project venv's site-packages for the dependencies as a plain path entry, so the
project venv's ``.pth`` files -- among them the editable install's finder, which would map
``spokes_lightning`` back to this checkout -- are not run, and the checkout is not on the path:
every ``spokes_lightning`` module has to come from the wheel (asserted). From a temporary working
folder it then runs the ``spokes`` CLI (random and spokes selection on a small .npy) and
``spokes-run`` on a tiny slice of the shipped demo corpus up to the select stage.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.wheel, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
#: what the wheel is built from (README.md: the package's long description)
SOURCES = ["pyproject.toml", "setup.py", "README.md", "spokes_lightning", "callbacks", "recipes", "data/demo"]
TINY = [
    "data.limit=null", "data.interleave_by=null", "data.validation_documents=10", "tokenizer.vocab_size=600",
    "proxy.train.n_layers=2", "proxy.train.hidden=32", "proxy.train.heads=2", "proxy.train.intermediate=64",
    "proxy.train.max_length=64", "proxy.train.batch_size=16",
    "features.chunk_size=64", "features.batch_size=16", "features.gradients.k=64", "features.gradients.max_length=64",
    "selection.budget=0.5", "selection.alpha=0.01", "selection.alpha_sweep=false",
    "quality.source=column", "quality.column=score", "stages=[corpus,tokenizer,proxy,features,select]",
]


class Installed:
    def __init__(self, root: Path, target: Path, python: Path, wheel: Path):
        self.root, self.target, self.python, self.wheel = root, target, python, wheel
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self.env.update(PATH=f"{target / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONNOUSERSITE="1",
                        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                        WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")

    def run(self, *cmd, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in cmd], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def script(self, name: str) -> Path:
        return self.target / "bin" / name


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for rel in SOURCES:
        source, dest = ROOT / rel, src / rel
        if source.is_dir():
            shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(root / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("spokes_lightning-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    target = root / "target"
    deps = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    # plain path lines: the wheel's folder first, then the project venv's packages (their .pth files are not run)
    (purelib / "spokes_wheel_test.pth").write_text("\n".join([str(target), *deps]) + "\n")
    env = Installed(root, target, python, wheel)
    inst = env.run(python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", target, wheel,
                   cwd=root)
    assert inst.returncode == 0, inst.stderr[-3000:]
    return env


def test_wheel_contents(installed):
    names = zipfile.ZipFile(installed.wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"spokes_lightning", f"{installed.wheel.name.split('-py3')[0]}.dist-info"}
    for rel in ["callbacks/selection.py", "recipes/config.yaml", "recipes/recipe/dclm_spokes.yaml",
                "recipes/dataset/fineweb.yaml", "recipes/method/spokes.yaml", "demo_data/web.jsonl.gz",
                "demo_data/manifest.json", "demo_data/eval/arc_easy.jsonl.gz",
                "demo_data/quality/dclm_human_labels.jsonl.gz", "pipeline/paper_table2.json"]:
        assert f"spokes_lightning/{rel}" in names, rel
    modules = [str(p.relative_to(ROOT)) for p in (ROOT / "spokes_lightning").rglob("*.py")]
    missing = [m for m in modules if m not in names]
    assert not missing, f"packages left out of the wheel: {missing}"
    entry_points = (installed.target / f"{installed.wheel.name.split('-py3')[0]}.dist-info" / "entry_points.txt")
    assert "spokes-run = spokes_lightning.cli.run:main" in entry_points.read_text()
    assert not (installed.target / "callbacks").exists()  # no global package named callbacks


def test_imports_come_from_the_wheel(installed, tmp_path):
    probe = """
import importlib.util, json, sys
import spokes_lightning, spokes_lightning.callbacks.selection as sel
from spokes_lightning.data.corpus import DEMO_DIR
from spokes_lightning.evaluation.tasks import default_eval_dir
from spokes_lightning.cli.run import compose
from spokes_lightning.utils.resources import shipped_dir
import spokes_lightning.pipeline.stages  # every stage module
cfg = compose(["recipe=demo"])
print(json.dumps({
    "modules": sorted(str(m.__file__) for n, m in list(sys.modules.items())
                      if n.startswith("spokes_lightning") and getattr(m, "__file__", None)),
    "callbacks": importlib.util.find_spec("callbacks") is not None,
    "editable_finder": [repr(f) for f in sys.meta_path if "editable" in repr(f).lower()],
    "dirs": [str(shipped_dir("recipes")), str(DEMO_DIR), str(default_eval_dir())],
    "data_paths": list(cfg.data.paths), "sel": sel.__file__, "pkg": spokes_lightning.__file__}))
"""
    r = installed.run(installed.python, "-c", probe, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    package = installed.target / "spokes_lightning"
    assert got["pkg"] == str(package / "__init__.py")
    assert got["sel"] == str(package / "callbacks" / "selection.py")
    assert len(got["modules"]) > 20 and all(m.startswith(str(package)) for m in got["modules"]), got["modules"]
    assert not got["callbacks"] and not got["editable_finder"]
    assert got["dirs"] == [str(package / "recipes"), str(package / "demo_data"), str(package / "demo_data" / "eval")]
    # the recipe's relative data/demo/ path names nothing here: it reads the installed copy
    assert got["data_paths"] == [str(package / "demo_data" / "web.jsonl.gz")]


def test_spokes_cli_from_the_wheel(installed, tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "f.npy", rng.standard_normal((60, 16)).astype(np.float32))
    for method in ("random", "spokes"):
        r = installed.run(installed.script("spokes"), "select", "--method", method, "--features", "f.npy",
                          "--budget", "12", "--out", f"{method}.npy", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        chosen = np.load(tmp_path / f"{method}.npy")
        assert chosen.shape == (12,) and len(set(chosen.tolist())) == 12 and chosen.max() < 60
    r = installed.run(installed.script("spokes"), "select", "--method", "spokes", "--features", "f.npy",
                      "--budget", "0", "--out", "x.npy", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_shipped_corpus_from_another_folder(installed, tmp_path):
    """The default recipe's data/demo/web.jsonl.gz is read from the installed package."""
    r = installed.run(installed.script("spokes-run"), "stages=[corpus]", "data.limit=30", "data.validation_documents=5",
                      cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "runs" / "demo" / "stages" / "corpus.json").is_file()
    assert "25 in the pool" in r.stderr
    bad = installed.run(installed.script("spokes-run"), "dataset=nope", cwd=tmp_path)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "dataset/nope" in errors[0] and "Traceback" not in bad.stderr


def test_tiny_pipeline_from_the_wheel(installed, tmp_path):
    """corpus .. select with random and spokes. Quality is a column of the corpus (FineWeb rows of the
    installed demo corpus, legal score + 1), which keeps the run short: no classifier is trained."""
    with gzip.open(installed.target / "spokes_lightning" / "demo_data" / "web.jsonl.gz", "rt") as fh:
        rows = [r for r in map(json.loads, fh) if "legal_score" in r][:70]
    with open(tmp_path / "corpus.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps({"id": r["id"], "text": r["text"], "score": r["legal_score"] + 1}) + "\n")
    r = installed.run(installed.script("spokes-run"), "selection.methods=[random,spokes]", *TINY,
                      "data.paths=[corpus.jsonl]", "run_dir=run", cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    select = json.loads((tmp_path / "run" / "stages" / "select.json").read_text())
    assert sorted(select["outputs"]["methods"]) == ["random", "spokes"], select
    for method, out in select["outputs"]["methods"].items():
        chosen = np.load(tmp_path / "run" / out["selection"] / "indices.npy")
        assert len(chosen) == out["n_selected"] == 30, method  # half of the 60 pool documents
    assert "No report for these settings yet" in r.stdout
