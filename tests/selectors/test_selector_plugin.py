"""A selector added in one file (tests/plugins/domain_quota.py: needs domain labels, returns
multiplicities) runs through the CLI and the Lightning callback with no other module touched;
the pipeline run is in test_run_dir.py (it reuses that file's finished run_dir)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from spokes_lightning.utils.errors import UserError
from spokes_lightning.features.store import FeatureStoreWriter
from spokes_lightning.data.selection_artifact import read_selection

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "tests" / "plugins" / "domain_quota.py"


def spokes(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "spokes_lightning", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def expected(domains: list[str], quality: np.ndarray, k: int, copies: int = 2) -> tuple[list[int], list[int]]:
    """The toy rule computed independently: round-robin over sorted domains, best quality first."""
    names = sorted(set(domains))
    queues = {d: sorted((i for i in range(len(domains)) if domains[i] == d), key=lambda i: (-quality[i], i))
              for d in names}
    chosen, mult, turn = [], [], 0
    while len(chosen) < k:
        queue = queues[names[turn % len(names)]]
        if queue:
            mult.append(copies if len(queue) == domains.count(domains[queue[0]]) else 1)
            chosen.append(queue.pop(0))
        turn += 1
    return chosen, mult


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("plugin")
    rng = np.random.default_rng(5)
    n = 90
    domains = [f"site{int(v)}" for v in rng.integers(0, 4, n)]
    np.save(d / "f.npy", rng.standard_normal((n, 12)).astype(np.float32))
    np.save(d / "q.npy", rng.random(n))
    (d / "domains.json").write_text(json.dumps(domains))
    return d, domains


def test_cli_runs_the_plugin_with_domains_and_copies(files):
    d, domains = files
    out = d / "sel.npy"
    r = spokes("select", "--plugin", PLUGIN, "--method", "domain_quota", "--features", d / "f.npy",
               "--quality", d / "q.npy", "--domains", d / "domains.json", "--budget", "13", "--out", out)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip())
    chosen, mult = expected(domains, np.load(d / "q.npy"), 13)
    assert np.load(out).tolist() == chosen
    assert np.load(rec["multiplicity"]).tolist() == mult and rec["copies"] == sum(mult) == 13 + 4
    help_text = spokes("select", "--help", "--plugin", PLUGIN).stdout
    assert "domain_quota" in help_text and "round-robin over domains" in help_text


def test_cli_missing_domains_names_the_method_and_the_input(files, tmp_path):
    d, _ = files
    r = spokes("select", "--plugin", PLUGIN, "--method", "domain_quota", "--features", d / "f.npy",
               "--quality", d / "q.npy", "--budget", "13", "--out", tmp_path / "o.npy")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: method 'domain_quota' needs domains")
    assert not (tmp_path / "o.npy").exists()


def test_a_plugin_that_fails_to_import_is_one_line(tmp_path, files):
    d, _ = files
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    r = spokes("select", "--plugin", broken, "--method", "random", "--features", d / "f.npy", "--budget", "3",
               "--out", tmp_path / "o.npy")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "selector plugin" in r.stderr and "broken.py" in r.stderr and "not_a_module_anywhere" in r.stderr


class _WriteStores(L.LightningModule):
    """predict writes the features and quality stores (one chunk) for the callback."""

    def __init__(self, root, features, quality):
        super().__init__()
        self.root, self.features, self.quality = root, features, quality
        self.layer = torch.nn.Linear(1, 1)

    def predict_step(self, batch, batch_idx):
        ids = [f"doc{i:03d}" for i in range(len(self.features))]
        for name, rows in (("features", self.features), ("quality", self.quality[:, None])):
            w = FeatureStoreWriter(self.root / name, {"store": name})
            w.write_chunk(0, ids, rows.astype(np.float32))
            w.finalize(1, rows.shape[1], dtype="float32")


def test_callback_runs_the_plugin(files, tmp_path):
    from spokes_lightning.callbacks.selection import SelectionCallback

    d, domains = files
    feats, q = np.load(d / "f.npy"), np.load(d / "q.npy")
    callback = SelectionCallback(tmp_path / "sel", {"domain_quota": {"copies": 3}}, 13, seed=0,
                                 features=tmp_path / "features", quality=tmp_path / "quality",
                                 domains=domains, plugins=[str(PLUGIN)])
    trainer = L.Trainer(accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(_WriteStores(tmp_path, feats, q), DataLoader([0], batch_size=1), return_predictions=False)
    sel = read_selection(tmp_path / "sel" / "domain_quota")
    chosen, mult = expected(domains, q.astype(np.float32).astype(np.float64), 13, copies=3)
    assert sel.indices.tolist() == chosen and sel.copies().tolist() == mult
    assert sel.manifest["n_copies"] == sum(mult) and "domains" in sel.manifest["input_hashes"]


def test_callback_without_domains_is_a_user_error(files, tmp_path):
    from spokes_lightning.callbacks.selection import run_selections

    d, _ = files
    w = FeatureStoreWriter(tmp_path / "features", {"store": "f"})
    w.write_chunk(0, [f"doc{i}" for i in range(5)], np.ones((5, 3), np.float32))
    w.finalize(1, 3, dtype="float32")
    with pytest.raises(UserError, match="method 'domain_quota' needs domains"):
        run_selections(tmp_path / "sel", {"domain_quota": {}}, 2, features=tmp_path / "features",
                       plugins=[str(PLUGIN)])
    assert not (tmp_path / "sel" / "domain_quota").exists()
