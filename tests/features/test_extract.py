"""extract_features: 1 process vs 2-process DDP (gloo), kill + resume, resume at another world size."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from tiny_proxy import build_tiny_proxy, tiny_documents  # noqa: E402

from spokes_lightning.utils.errors import UserError  # noqa: E402
from spokes_lightning.features.extract import ChunkedCorpusDataModule, extract_features  # noqa: E402
from spokes_lightning.features.extract import ProxyGradientModule  # noqa: E402
from spokes_lightning.features.store import open_feature_store  # noqa: E402

torch.set_num_threads(1)
N_DOCS, CHUNK, BATCH = 50, 8, 4
N_CHUNKS = (N_DOCS + CHUNK - 1) // CHUNK


def module(proxy_dir):
    return ProxyGradientModule(str(proxy_dir), n_layers=2, k=64, max_length=32)  # as in extract_run.py


def script(proxy_dir, store, devices, strategy, sleep_s=0.0):
    cmd = [sys.executable, str(SCRIPTS / "extract_run.py"), str(proxy_dir), str(store), str(N_DOCS),
           str(CHUNK), str(BATCH), str(devices), strategy, str(sleep_s)]
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return cmd, env, root


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory):
    return build_tiny_proxy(tmp_path_factory.mktemp("proxy"), layers=4)


@pytest.fixture(scope="module")
def reference(proxy_dir, tmp_path_factory):
    """An uninterrupted single-process run."""
    store = tmp_path_factory.mktemp("ref") / "store"
    return extract_features(module(proxy_dir), tiny_documents(N_DOCS), store, chunk_size=CHUNK,
                            batch_size=BATCH, accelerator="cpu", progress=False)


def test_reference_store_layout(reference):
    assert len(reference) == N_DOCS - 2 and set(reference.skipped) == {"doc003", "doc007"}
    assert reference.ids == [i for i, _ in tiny_documents(N_DOCS) if i not in reference.skipped]
    x = reference.matrix
    assert x.shape == (N_DOCS - 2, 64) and x.dtype == np.float16 and np.isfinite(x).all()
    assert reference.manifest["complete"] and reference.manifest["chunk_size"] == CHUNK


def test_column_slice_is_a_finished_store_with_the_same_ids(reference, tmp_path):
    from spokes_lightning.features.store import open_feature_store, write_column_slice

    part = write_column_slice(reference, tmp_path / "part", 16, 48, {"seed": 5}, rows_per_block=7)
    assert part.ids == reference.ids and part.skipped == reference.skipped
    np.testing.assert_array_equal(part.matrix, reference.matrix[:, 16:48])
    again = open_feature_store(tmp_path / "part")
    assert again.manifest["dim"] == 32 and again.manifest["seed"] == 5 and again.manifest["columns"] == [16, 48]
    with pytest.raises(ValueError, match="outside"):
        write_column_slice(reference, tmp_path / "bad", 48, 80, {})


def test_chunks_go_to_ranks_round_robin():
    data = ChunkedCorpusDataModule(tiny_documents(20), chunk_size=4, batch_size=3, done_chunks={2})
    assert data.n_chunks == 5
    assert data.rank_chunks(0, 2) == [0, 4] and data.rank_chunks(1, 2) == [1, 3]
    batches = data.batches_for(1, 2)
    assert [b["chunk"] for b in batches] == [1, 1, 3, 3]
    assert batches[0]["ids"] == ["doc004", "doc005", "doc006"] and batches[1]["ids"] == ["doc007"]


def test_two_process_ddp_matches_one_process(proxy_dir, reference, tmp_path):
    cmd, env, root = script(proxy_dir, tmp_path / "ddp", 2, "ddp")
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = sorted(int(p.read_text()) for p in tmp_path.glob("ddp.rank*.seen"))
    assert len(seen) == 2 and sum(seen) == N_DOCS and min(seen) > 0  # both ranks did work
    ddp = open_feature_store(tmp_path / "ddp")
    assert ddp.ids == reference.ids and ddp.skipped == reference.skipped
    a = np.asarray(reference.matrix, dtype=np.float32)
    b = np.load(tmp_path / "ddp" / "features.npy").astype(np.float32)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    assert rel.max() < 1e-3


def test_kill_then_resume_is_byte_identical_and_skips_done_chunks(proxy_dir, reference, tmp_path):
    store = tmp_path / "killed"
    cmd, env, root = script(proxy_dir, store, 1, "auto", sleep_s=3.0)
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:  # the script sleeps 3 s after announcing each chunk
            if line.startswith("chunk-written"):
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done = sorted(store.glob("chunk_*.json"))
    assert 1 <= len(done) < N_CHUNKS and not (store / "features.npy").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in store.glob("chunk_*")}
    time.sleep(0.05)
    resumed = module(proxy_dir)
    out = extract_features(resumed, tiny_documents(N_DOCS), store, chunk_size=CHUNK, batch_size=BATCH,
                           accelerator="cpu", progress=False)
    assert resumed.documents_seen == N_DOCS - CHUNK * len(done)  # only unfinished chunks ran
    assert {p.name: p.stat().st_mtime_ns for p in store.glob("chunk_*") if p.name in mtimes} == mtimes
    assert (store / "features.npy").read_bytes() == (reference.path / "features.npy").read_bytes()
    assert out.ids == reference.ids


def test_rerun_at_another_world_size_only_fills_missing_chunks(proxy_dir, reference, tmp_path):
    store = tmp_path / "partial"
    shutil.copytree(reference.path, store)
    for c in (1, 4):
        (store / f"chunk_{c:06d}.json").unlink()
    (store / "features.npy").unlink()
    m = module(proxy_dir)
    out = extract_features(m, tiny_documents(N_DOCS), store, chunk_size=CHUNK, batch_size=BATCH,
                           accelerator="cpu", progress=False)
    assert m.documents_seen == 2 * CHUNK
    assert np.array_equal(np.asarray(out.matrix), np.asarray(reference.matrix))
    again = module(proxy_dir)
    extract_features(again, tiny_documents(N_DOCS), store, chunk_size=CHUNK, batch_size=BATCH,
                     accelerator="cpu", progress=False)
    assert again.documents_seen == 0  # finished store: nothing recomputed, finalize is idempotent


def test_store_with_other_settings_is_refused(proxy_dir, reference, tmp_path):
    store = tmp_path / "other"
    shutil.copytree(reference.path, store)
    other = ProxyGradientModule(str(proxy_dir), n_layers=1, k=64, max_length=32)
    with pytest.raises(UserError, match="different settings"):
        extract_features(other, tiny_documents(N_DOCS), store, chunk_size=CHUNK, accelerator="cpu", progress=False)
    with pytest.raises(UserError, match="different settings"):  # another chunking of the same corpus
        extract_features(module(proxy_dir), tiny_documents(N_DOCS), store, chunk_size=CHUNK * 2,
                         accelerator="cpu", progress=False)
    with pytest.raises(UserError, match="unique"):
        extract_features(module(proxy_dir), [("a", "x y"), ("a", "z w")], tmp_path / "dup", accelerator="cpu")


def test_two_process_resume_with_one_chunk_left_lets_the_idle_rank_wait(proxy_dir, reference, tmp_path):
    """Fewer pending chunks than ranks: rank 1 gets no batch and must not crash the run."""
    store = tmp_path / "one_left"
    shutil.copytree(reference.path, store)
    (store / "chunk_000002.json").unlink()
    (store / "features.npy").unlink()
    cmd, env, root = script(proxy_dir, store, 2, "ddp")
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = sorted(int(p.read_text()) for p in tmp_path.glob("one_left.rank*.seen"))
    assert seen == [0, CHUNK]  # one rank recomputed the missing chunk, the other idled
    b = np.load(store / "features.npy").astype(np.float32)
    a = np.asarray(reference.matrix, dtype=np.float32)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    assert rel.max() < 1e-3
