import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Every pipeline stage at test size, once per session: ``(run_dir, result, wall_seconds)``.

    Tests may change ``run_dir`` (re-runs with other settings); an untouched copy stays at
    ``run_dir.parent / "pristine"`` for readers that need the run as it was written."""
    import time

    from tiny_run import build_tiny_run

    base = tmp_path_factory.mktemp("tiny_run")
    t = time.perf_counter()
    r = build_tiny_run(base / "run", base / "pristine")
    assert r.returncode == 0, r.stderr[-3000:]
    return base / "run", r, time.perf_counter() - t
