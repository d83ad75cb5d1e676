import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))  # shared helpers: tiny_run, tiny_text, word_docs, ...
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per xdist worker (and per process it starts): `make test` runs one worker per core,
    # and the test models are too small for threads to do more than wait on each other
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = "1"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id):
    """Every pipeline stage at test size, once per session: ``(run_dir, result, wall_seconds)``.

    Tests may change ``run_dir`` (re-runs with other settings); an untouched copy stays at
    ``run_dir.parent / "pristine"`` for readers that need the run as it was written. Under
    pytest-xdist the first worker to ask builds it (a file lock keeps the others waiting) and
    every worker gets its own copy, so one worker's re-runs never reach another's."""
    import json
    import shutil
    import subprocess
    import time

    from filelock import FileLock
    from tiny_run import build_tiny_run

    def build(base: Path):
        t = time.perf_counter()
        r = build_tiny_run(base / "run", base / "pristine")
        assert r.returncode == 0, r.stderr[-3000:]
        return r, time.perf_counter() - t

    if worker_id == "master":  # no xdist: build in place
        base = tmp_path_factory.mktemp("tiny_run")
        r, wall = build(base)
        return base / "run", r, wall
    shared = tmp_path_factory.getbasetemp().parent / "tiny_run_shared"  # the workers' common parent
    with FileLock(str(shared) + ".lock"):
        done = shared / "result.json"
        if not done.exists():
            shutil.rmtree(shared, ignore_errors=True)
            r, wall = build(shared)
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps({"args": r.args, "returncode": r.returncode, "stdout": r.stdout,
                                       "stderr": r.stderr, "wall": wall}))
            tmp.rename(done)
        saved = json.loads(done.read_text())
    assert saved["returncode"] == 0, saved["stderr"][-3000:]
    base = tmp_path_factory.mktemp("tiny_run")
    shutil.copytree(shared / "pristine", base / "pristine", symlinks=True)
    shutil.copytree(shared / "pristine", base / "run", symlinks=True)
    r = subprocess.CompletedProcess(saved["args"], saved["returncode"], saved["stdout"], saved["stderr"])
    return base / "run", r, saved["wall"]


# ----------------------------------------------------------------------------- tiers
#: whole-pipeline runs (launch/run.py, the wheel, the docs examples on a finished run)
E2E_MODULES = {"test_pipeline", "test_ranks_pipeline", "test_wheel", "test_docs_examples", "test_run_dir",
               "test_import_features", "test_recipes", "test_method_picks"}
#: modules that train or convert models, or run lm-eval: seconds to a minute a test
SLOW_MODULES = {"test_hf_trainer", "test_hf_trainer_user_script", "test_online_hf_trainer", "test_online_lightning",
                "test_online", "test_accelerate", "test_export_scale", "test_export", "test_megatron_convert",
                "test_megatron_train", "test_pretrain", "test_proxy", "test_embeddings_quality",
                "test_fewshot_and_checkpoint_eval", "test_calibration", "test_evaluation", "test_extract",
                "test_gradients", "test_quadmix", "test_quad", "test_report_sections", "test_report_paper_sections",
                "test_selection_callback", "test_cli_edges", "test_datamask"}
#: words in a test's name that mean it starts several processes (DDP over gloo, torchrun, accelerate launch)
DISTRIBUTED_WORDS = ("two_process", "two_gloo", "two_ranks", "two_torchrun", "one_and_two", "processes", "ddp",
                     "tp2", "torchrun", "failing_rank")


def pytest_collection_modifyitems(config, items):
    """Markers by tier: ``e2e``, ``slow``, ``distributed`` (``make test-fast`` leaves all three out)."""
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        if module in E2E_MODULES:
            item.add_marker(pytest.mark.e2e)
        if module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if any(word in item.name.lower() for word in DISTRIBUTED_WORDS):
            item.add_marker(pytest.mark.distributed)
