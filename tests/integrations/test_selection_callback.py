"""SelectionCallback in a real Trainer.predict: 1 process, and 2-process DDP (gloo, CPU)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spokes_lightning.utils.errors import UserError
from spokes_lightning.data.selection_artifact import read_selection

# The predict run is a standalone script so Lightning's DDP launcher can re-run it per rank.
SCRIPT = r'''
import json, os, sys, zlib
import numpy as np
import torch
import lightning as L
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

import spokes_lightning.selection.driver as selection_module
from spokes_lightning.callbacks import SelectionCallback
from spokes_lightning.features.store import FeatureStoreWriter

N_CHUNKS, CHUNK = 6, 20
STORES = {"features": 8, "embeddings": 16, "quality": 1}


def doc_ids(chunk):
    return [f"doc{chunk * CHUNK + j:04d}" for j in range(CHUNK)]


def doc_rows(doc_id, store, dim):
    """Deterministic rows from the id; embeddings: 30 topics, every doc a near-copy of one."""
    number = int(doc_id[3:])
    rng = np.random.default_rng(zlib.crc32(f"{store}/{doc_id}".encode()))
    if store == "embeddings":
        base = np.random.default_rng(number % 30).normal(size=dim)
        return base + 0.02 * rng.normal(size=dim)
    if store == "quality":
        return np.array([float(number % 7)])
    return rng.normal(size=dim)


class Chunks(Dataset):
    def __len__(self):
        return N_CHUNKS

    def __getitem__(self, i):
        return i


class FeatureWriterModule(L.LightningModule):
    """predict_step writes one chunk of each store (a stand-in for real feature extraction)."""

    def __init__(self, root):
        super().__init__()
        self.root = root
        self.layer = torch.nn.Linear(1, 1)

    def writers(self):
        return {s: FeatureStoreWriter(os.path.join(self.root, s), {"store": s, "dim": d})
                for s, d in STORES.items()}

    def predict_step(self, batch, batch_idx):
        for s, w in self.writers().items():
            for chunk in batch.tolist():
                ids = doc_ids(chunk)
                rows = np.stack([doc_rows(i, s, STORES[s]) for i in ids]).astype(np.float32)
                w.write_chunk(chunk, ids, rows)
        return None


class FinalizeStores(Callback):
    def on_predict_end(self, trainer, pl_module):
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            for s, w in pl_module.writers().items():
                w.write_manifest()
                w.finalize(N_CHUNKS, STORES[s], dtype="float32")
        trainer.strategy.barrier()


def count_writes(log_path):
    real = selection_module.write_selection

    def spy(out_dir, method, *args, **kwargs):
        with open(log_path, "a") as fh:
            rank = int(os.environ.get("LOCAL_RANK", 0))
            fh.write(json.dumps({"method": method, "rank": rank}) + "\n")
        return real(out_dir, method, *args, **kwargs)

    selection_module.write_selection = spy
    return lambda: setattr(selection_module, "write_selection", real)


def main(root, devices, methods_json, budget="0.5"):
    torch.set_num_threads(1)
    restore = count_writes(os.path.join(root, "writes.log"))
    methods = json.loads(methods_json)
    stores = {s: os.path.join(root, s) for s in STORES}
    callback = SelectionCallback(os.path.join(root, "selection"), methods, budget, seed=3, **stores)
    trainer = L.Trainer(accelerator="cpu", devices=int(devices),
                        strategy="ddp" if int(devices) > 1 else "auto",
                        callbacks=[FinalizeStores(), callback], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    try:
        trainer.predict(FeatureWriterModule(root), DataLoader(Chunks(), batch_size=1),
                        return_predictions=False)
    finally:
        restore()
    return callback


if __name__ == "__main__":
    main(*sys.argv[1:])
'''

ROOT = Path(__file__).resolve().parents[2]


def methods() -> dict:
    return {"random": {}, "quality": {}, "semdedup": {"n_clusters": 4, "progress": False},
            "spokes": {"steps": 3, "log": None}}


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "predict_and_select.py"
    path.write_text(SCRIPT)
    return path


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location("predict_and_select", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_all(root: Path) -> dict:
    out = {}
    for method in methods():
        sel = read_selection(root / "selection" / method)
        manifest = {k: v for k, v in sel.manifest.items() if k != "created"}
        out[method] = (sel.indices.tolist(), sel.ids,
                       None if sel.scores is None else sel.scores.tolist(), manifest)
    return out


def writes(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "writes.log").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(script, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one")
    load_script(script).main(str(root), 1, json.dumps(methods()))
    return root


def test_one_process_writes_every_artifact(one_process):
    result = read_all(one_process)
    assert set(result) == set(methods())
    for method, (indices, ids, _, manifest) in result.items():
        assert manifest["n_pool"] == 120
        assert ids == [f"doc{i:04d}" for i in indices]
        assert set(manifest["input_hashes"]) == {"features", "embeddings", "quality"}
        if method != "semdedup" or manifest["stats"]["budget_mode"]:
            assert len(indices) == manifest["n_selected"] == 60
    # quality: documents with quality 6 (number % 7 == 6) first, ties by corpus order
    q_indices = result["quality"][0]
    assert [i % 7 for i in q_indices[:17]] == [6] * 17
    assert q_indices[:3] == [6, 13, 20]
    # semdedup: every doc is a near-copy of one of 30 topics, half the pool must go
    assert 0 < result["semdedup"][3]["stats"]["eps"] < 1
    assert sorted(w["method"] for w in writes(one_process)) == sorted(methods())


def test_two_process_ddp_matches_one_process(script, one_process, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "2", json.dumps(methods())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = writes(tmp_path)
    assert sorted(w["method"] for w in log) == sorted(methods())  # each artifact exactly once
    assert {w["rank"] for w in log} == {0}
    two, one = read_all(tmp_path), read_all(one_process)
    for method in methods():
        assert two[method][:2] == one[method][:2], method
        if one[method][2] is not None:
            np.testing.assert_allclose(two[method][2], one[method][2], rtol=1e-9, atol=1e-12)
        assert two[method][3]["input_hashes"] == one[method][3]["input_hashes"]
        assert two[method][3]["n_selected"] == one[method][3]["n_selected"]


def test_count_mismatch_is_a_user_error(script, one_process, tmp_path):
    from spokes_lightning.callbacks.selection import run_selections
    from spokes_lightning.features.store import FeatureStoreWriter

    short = FeatureStoreWriter(tmp_path / "emb_short", {"store": "short"})
    short.write_chunk(0, ["doc0000", "doc0001"], np.ones((2, 4), np.float32))
    short.finalize(1, 4, dtype="float32")
    with pytest.raises(UserError, match=r"embeddings store .*emb_short has 2 documents but "
                                        r"features store .*features has 120"):
        run_selections(tmp_path / "sel", {"random": {}}, 10,
                       features=one_process / "features", embeddings=tmp_path / "emb_short")
    assert not (tmp_path / "sel").exists()
    with pytest.raises(UserError, match="no finished feature store"):
        run_selections(tmp_path / "sel", {"random": {}}, 10, features=tmp_path / "nowhere")
