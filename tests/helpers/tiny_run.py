"""A finished pipeline run at test size: the settings, and the one place that launches it.

Used by the end-to-end tests (``tests/pipeline/test_pipeline.py``) and by the docs-example runner
(``tests/helpers/docs_examples.py``), whose examples read a run's files as a user reads ``runs/demo``.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: every stage at a size that runs in about a minute on 2 cores
TINY = [
    "data.limit=150", "data.validation_documents=20", "tokenizer.vocab_size=600",
    "proxy.train.n_layers=3", "proxy.train.hidden=32", "proxy.train.heads=2", "proxy.train.intermediate=64",
    "proxy.train.max_length=64", "proxy.train.batch_size=16",
    "embeddings.max_length=64", "features.chunk_size=64", "features.batch_size=16", "features.gradients.k=64", "features.gradients.max_length=64",
    "selection.budget=0.5", "selection.alpha_grid=[0.01,0.1]", "+selection.specs.semdedup.n_clusters=4",
    "pretrain.token_budget=8192", "pretrain.seq_length=64", "pretrain.n_layers=2", "pretrain.hidden=32",
    "pretrain.heads=2", "pretrain.batch_size=8",
    "evaluate.tasks=[arc_easy,winogrande]", "evaluate.limit=12", "evaluate.batch_size=8",
    "report.batch_gvendi.batch_size=16", "report.batch_gvendi.batches=3",
]
METHODS = ["random", "quality", "semdedup", "spokes", "spokes_quality", "quadmix", "quad", "datamask"]
#: the peer selectors at test size (method=peers: every selector, side by side)
PEERS = ["method=peers", "selection.specs.quadmix.proxy_runs=3", "selection.specs.quadmix.proxy_steps=5",
         "selection.specs.quad.kfac_documents=32", "+selection.specs.quad.reference_documents=40",
         "selection.specs.datamask.steps=20"]


def launch(run_dir, *extra, cwd=ROOT, timeout=900) -> subprocess.CompletedProcess:
    """``launch/run.py run_dir=RUN_DIR`` at test size with every method, then ``extra`` overrides."""
    return subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), f"run_dir={run_dir}", *TINY, *PEERS,
                           *extra], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def build_tiny_run(run_dir: Path, pristine: Path | None = None) -> subprocess.CompletedProcess:
    """Run every stage into ``run_dir``; with ``pristine``, keep an untouched copy there too."""
    r = launch(run_dir)
    if r.returncode == 0 and pristine is not None:
        shutil.copytree(run_dir, pristine, symlinks=True)
    return r


def build_shared(shared: Path) -> dict:
    """Build the run once into ``shared`` (``run`` and ``pristine``) for every process that asks.

    A file lock makes later callers wait for the first; ``result.json`` (written last, atomically)
    says how it went. Under pytest-xdist the controller starts this in the background as soon as
    the workers have collected (tests/conftest.py), so no worker sits idle while it is built."""
    import json

    from filelock import FileLock

    shared = Path(shared)
    shared.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(shared) + ".lock"):
        done = shared / "result.json"
        if not done.exists():
            import time

            shutil.rmtree(shared, ignore_errors=True)
            t = time.perf_counter()
            r = build_tiny_run(shared / "run", shared / "pristine")
            wall = time.perf_counter() - t
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps({"args": r.args, "returncode": r.returncode, "stdout": r.stdout,
                                       "stderr": r.stderr, "wall": wall}))
            tmp.rename(done)
        return json.loads(done.read_text())


if __name__ == "__main__":  # python tests/helpers/tiny_run.py SHARED_DIR: build_shared in the background
    build_shared(Path(sys.argv[1]))
