"""extract_with_accelerate: 2 processes under ``accelerate launch`` (CPU, gloo) vs 1 process vs the
Lightning path, SIGKILL + rerun, a store made with other settings, bad arguments."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from tiny_proxy import build_tiny_proxy, tiny_documents  # noqa: E402

from spokes_lightning.utils.errors import UserError  # noqa: E402
from spokes_lightning.features.extract import extract_features  # noqa: E402
from spokes_lightning.features.extract import ProxyGradientModule  # noqa: E402
from spokes_lightning.features.store import open_feature_store  # noqa: E402
from spokes_lightning.integrations.accelerate import extract_with_accelerate  # noqa: E402

torch.set_num_threads(1)
N_DOCS, CHUNK, BATCH = 40, 8, 4
N_CHUNKS = N_DOCS // CHUNK
ROOT = Path(__file__).resolve().parents[2]
from ports import free_port  # noqa: E402  (tests/helpers: a per-xdist-worker port block)
TOL = 1e-3  # per-row relative L2 error; float16 rounding alone is ~3e-4, another row is ~1



def command(proxy_dir, store, processes, *extra):
    """``accelerate launch`` for 2 processes, a plain ``python`` for 1 (an Accelerate script alone).

    ``accelerate launch --cpu --num_processes 2`` starts ONE process without MPI; torchrun (via
    ``--multi_gpu``) with ACCELERATE_USE_CPU makes Accelerate pick MULTI_CPU + gloo.
    """
    script = [str(SCRIPTS / "accelerate_extract.py"), str(proxy_dir), str(store), str(N_DOCS), str(CHUNK),
              str(BATCH), *map(str, extra)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    if processes == 1:
        return [sys.executable, *script], env
    launch = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
              "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    return launch + script, env


def run(proxy_dir, store, processes, *extra):
    cmd, env = command(proxy_dir, store, processes, *extra)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)


def rank_reports(store):
    return {int(p.name.split(".rank")[1].split(".")[0]): json.loads(p.read_text())
            for p in store.parent.glob(f"{store.name}.rank*.json")}


def rows(store):
    return np.load(Path(store) / "features.npy").astype(np.float32)


def relative_error(a, b):
    return (np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)).max()


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory):
    return build_tiny_proxy(tmp_path_factory.mktemp("proxy"), layers=4)


@pytest.fixture(scope="module")
def lightning(proxy_dir, tmp_path_factory):
    module = ProxyGradientModule(str(proxy_dir), n_layers=2, k=64, max_length=32)
    return extract_features(module, tiny_documents(N_DOCS), tmp_path_factory.mktemp("pl") / "store",
                            chunk_size=CHUNK, batch_size=BATCH, accelerator="cpu", progress=False)


@pytest.fixture(scope="module")
def two(proxy_dir, tmp_path_factory):
    """An uninterrupted 2-process run on a prepared (DDP-wrapped) model."""
    store = tmp_path_factory.mktemp("two") / "store"
    proc = run(proxy_dir, store, 2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return store


def test_two_processes_match_one_process_and_the_lightning_path(proxy_dir, lightning, two, tmp_path):
    reports = rank_reports(two)
    assert sorted(reports) == [0, 1] and all(r["type"] == "DistributedType.MULTI_CPU" for r in reports.values())
    assert reports[0]["chunks"] == [0, 2, 4] and reports[1]["chunks"] == [1, 3]  # chunk c -> rank c % 2
    assert all(r["requires_grad_kept"] for r in reports.values())  # the user's model is given back as it was
    one = tmp_path / "one"
    proc = run(proxy_dir, one, 1, 0, 2, "module")  # 1 process, a ProxyGradients module
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rank_reports(one)[0]["chunks"] == list(range(N_CHUNKS))
    for store in (two, one):
        opened = open_feature_store(store)
        assert opened.ids == lightning.ids and opened.skipped == lightning.skipped  # ids and order exactly
        assert opened.ids_array().dtype.kind == "S" and not (store / "ids.json").exists()
        manifest = json.loads((store / "manifest.json").read_text())
        assert manifest["complete"] and manifest["chunk_size"] == CHUNK and manifest["n_documents"] == N_DOCS - 2
    ref = np.asarray(lightning.matrix, dtype=np.float32)
    assert np.load(two / "features.npy").dtype == np.float16
    assert relative_error(ref, rows(two)) < TOL and relative_error(ref, rows(one)) < TOL
    assert relative_error(rows(one), rows(two)) < TOL
    assert relative_error(ref, np.roll(rows(two), 1, axis=0)) > 100 * TOL  # the tolerance sees a real difference
    assert relative_error(ref, ref * (1 + 10 * TOL)) > TOL


def test_sigkill_then_rerun_resumes_to_byte_identical_features(proxy_dir, two, tmp_path):
    store = tmp_path / "killed"
    cmd, env = command(proxy_dir, store, 2, 4.0)  # each process sleeps 4 s after each chunk it wrote
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        for line in proc.stdout:
            if line.startswith("chunk-written"):
                break
    finally:  # SIGKILL the launcher and every process under it (torchrun starts workers in new sessions)
        tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        for p in tree:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=30)
        proc.wait(timeout=30)
        proc.stdout.close()
    done = sorted(int(p.stem.split("_")[1]) for p in store.glob("chunk_*.json"))
    assert 1 <= len(done) < N_CHUNKS and not (store / "features.npy").exists()
    # a chunk's .npy may have been renamed into place just before the kill, without its .json: that
    # chunk is unfinished and gets recomputed; the finished ones must stay untouched
    mtimes = {p.name: p.stat().st_mtime_ns for c in done for p in store.glob(f"chunk_{c:06d}.*")}
    assert len(mtimes) == 2 * len(done)
    time.sleep(0.05)
    again = run(proxy_dir, store, 2)
    assert again.returncode == 0, again.stderr[-3000:]
    redone = sorted(c for r in rank_reports(store).values() for c in r["chunks"])
    assert redone == [c for c in range(N_CHUNKS) if c not in done]  # finished chunks were not recomputed
    assert {name: (store / name).stat().st_mtime_ns for name in mtimes} == mtimes
    assert (store / "features.npy").read_bytes() == (two / "features.npy").read_bytes()
    for name in ("ids.npy", "skipped.json"):
        assert (store / name).read_bytes() == (two / name).read_bytes()


def _store_bytes(store):
    return {p.name: p.read_bytes() for p in sorted(store.iterdir())}


@pytest.mark.parametrize("processes", [2, 1])
def test_store_made_with_other_settings_is_refused_in_one_line(proxy_dir, two, tmp_path, processes):
    store = tmp_path / "other"
    shutil.copytree(two, store)
    before = _store_bytes(store)
    proc = run(proxy_dir, store, processes, 0, 1)  # n_layers=1 instead of 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("different settings (" in line and "n_layers" in line for line in errors), proc.stderr[-3000:]
    # one line from each process that got to print it: torchrun may SIGTERM the second worker once the
    # first has exited 2, so with 2 processes one or two lines (never more, never a traceback)
    assert 1 <= len(errors) <= processes and (processes == 2 or len(errors) == 1)
    ours = proc.stderr.split("failed (exitcode")[0]  # what the workers printed, before torchrun's report
    assert "Traceback" not in ours
    if processes == 1:
        assert proc.returncode == 2 and proc.stderr.strip() == errors[0]
    else:  # each worker printed its line and exits 2; torchrun reports the first one (and may SIGTERM the
        # other while it shuts down), then the launcher itself exits 1
        assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr.split("Root Cause")[-1]
    assert _store_bytes(store) == before  # nothing written


def test_bad_arguments_raise_one_line_before_anything_is_written(tmp_path):
    store = tmp_path / "bad"
    with pytest.raises(UserError, match="chunk_size and batch_size must be positive"):
        extract_with_accelerate(object(), tiny_documents(4), store, chunk_size=0, batch_size=2)
    with pytest.raises(UserError, match="chunk_size and batch_size must be positive"):
        extract_with_accelerate(object(), tiny_documents(4), store, chunk_size=-3, batch_size=2)
    with pytest.raises(UserError, match="no documents"):
        extract_with_accelerate(object(), [], store, chunk_size=8, batch_size=2)
    with pytest.raises(UserError, match="unique"):
        extract_with_accelerate(object(), [("a", "x y"), ("a", "z")], store, chunk_size=8, batch_size=2)
    assert not store.exists()
