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


@pytest.fixture(scope="session", autouse=True)
def _session_machine_cache(tmp_path_factory, worker_id):
    """One machine cache (spokes_lightning/utils/machine_cache.py) per test session, shared by the
    xdist workers and every run they start, and never the user's ~/.cache."""
    base = tmp_path_factory.getbasetemp()
    os.environ["SPOKES_CACHE_DIR"] = str((base if worker_id == "master" else base.parent) / "spokes_cache")
    yield


@pytest.fixture(autouse=True)
def _own_rendezvous_port(monkeypatch):
    """Under pytest-xdist, each test gets MASTER_PORT from its worker's own port block
    (tests/helpers/ports.py), so DDP runs started side by side never meet at one store."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        from ports import free_port

        monkeypatch.setenv("MASTER_PORT", str(free_port()))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


TINY_RUN_SHARED = "tiny_run_shared"
#: seconds of other tests (both workers together) to run first while the tiny run is built
TINY_RUN_HEAD_START = 240.0
#: modules whose tests use ``tiny_run``
TINY_RUN_MODULES = ("test_pipeline.py", "test_run_dir.py", "test_import_features.py", "test_docs_examples.py")


def pytest_xdist_node_collection_finished(node, ids):
    """Controller side: as soon as a worker has collected tests that use ``tiny_run``, build it in a
    background process, so it is ready (or nearly) when a worker first asks, and no worker waits."""
    import subprocess

    config = node.config
    if getattr(config, "_tiny_run_build", None) is not None:
        return
    if not any(i.split("::")[0].endswith(TINY_RUN_MODULES) for i in ids):
        return
    base = config._tmp_path_factory.getbasetemp()
    env = dict(os.environ, SPOKES_CACHE_DIR=str(base / "spokes_cache"), OMP_NUM_THREADS="1")
    log = open(base / "tiny_run_build.log", "w")
    config._tiny_run_build = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "helpers" / "tiny_run.py"), str(base / TINY_RUN_SHARED)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def pytest_sessionfinish(session):
    build = getattr(session.config, "_tiny_run_build", None)
    if build is not None and build.poll() is None:  # nothing asked for it (e.g. -x stopped early)
        import signal

        os.killpg(build.pid, signal.SIGKILL)  # the builder and the pipeline run it started
        build.wait()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id):
    """Every pipeline stage at test size, once per session: ``(run_dir, result, wall_seconds)``.

    Tests may change ``run_dir`` (re-runs with other settings); an untouched copy stays at
    ``run_dir.parent / "pristine"`` for readers that need the run as it was written. Under
    pytest-xdist it is built once (in the background from the start: ``pytest_xdist_node_collection_finished``)
    and every worker gets its own copy, so one worker's re-runs never reach another's."""
    import shutil
    import subprocess
    import time

    from tiny_run import build_shared, build_tiny_run

    def build(base: Path):
        t = time.perf_counter()
        r = build_tiny_run(base / "run", base / "pristine")
        assert r.returncode == 0, r.stderr[-3000:]
        return r, time.perf_counter() - t

    if worker_id == "master":  # no xdist: build in place
        base = tmp_path_factory.mktemp("tiny_run")
        r, wall = build(base)
        return base / "run", r, wall
    shared = tmp_path_factory.getbasetemp().parent / TINY_RUN_SHARED  # the workers' common parent
    saved = build_shared(shared)  # built by the controller in the background (below), or here
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


def _shares_a_module_fixture(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    definitions = info.name2fixturedefs.values() if info is not None else ()
    return any(d.scope in ("module", "class", "package") for defs in definitions for d in defs)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks (--dist loadgroup)
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
        if _shares_a_module_fixture(item):
            # a module-scoped fixture (a trained proxy, a finished run) is built once: all of the
            # module's tests go to one xdist worker (--dist loadgroup); the other tests go anywhere
            item.add_marker(pytest.mark.xdist_group(Path(str(item.path)).relative_to(ROOT).as_posix()))
    # longest modules first (tests/durations.json), each module's tests in their own order, so
    # module-scoped fixtures are built once per worker and neither xdist worker ends alone on a long module
    from durations import load

    seconds = load()
    module = {item: Path(str(item.path)).relative_to(ROOT).as_posix() for item in items}
    items.sort(key=lambda item: -seconds.get(module[item], 0.0))
    # ... except the tiny-run modules wait behind TINY_RUN_HEAD_START seconds of other modules: the
    # controller builds the run in the background meanwhile, instead of both workers waiting for it
    done, order = 0.0, {}
    for m in dict.fromkeys(module[i] for i in items):
        if not m.endswith(TINY_RUN_MODULES):
            order[m] = len(order)
            done += seconds.get(m, 0.0)
            if done >= TINY_RUN_HEAD_START:
                break
    items.sort(key=lambda item: order.get(module[item], len(order)))


def pytest_configure(config):
    """``--dist loadgroup`` with pytest 9.2 and pytest-xdist <= 3.8: stop at once, in one line.

    pytest-xdist passes a group to its scheduler as an ``@group`` suffix on the test id, which pytest
    9.2 no longer lets it write (pytest-xdist issue 1386). The marks are then silently ignored and
    every module-scoped fixture (a trained proxy, a two-process run) is built on both workers."""
    if getattr(config.option, "dist", None) != "loadgroup":
        return
    import importlib.metadata as md

    from packaging.version import Version

    pytest_v, xdist_v = Version(md.version("pytest")), Version(md.version("pytest-xdist"))
    if pytest_v >= Version("9.2") and xdist_v <= Version("3.8.0"):
        raise pytest.UsageError(f"pytest {pytest_v} with pytest-xdist {xdist_v} ignores the xdist_group marks "
                                f"(pytest-xdist issue 1386): pip install 'pytest<9.2'")
