"""SPOKES optimizer (paper section 3.1, Algorithm 1): gradient, monotonicity, selection quality."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from spokes_lightning import UserError, run_spokes, vendi_score
from spokes_lightning.core.spokes import log_vendi_gradient, objective_gradient
from spokes_lightning.core.vendi import spectrum_entropy

from planted import planted_clusters

QUIET = {"log": lambda msg: None}


def _torch_objective(x_unit, q, alpha):
    def f(w):
        gram = (x_unit * w[:, None]).T @ x_unit
        sig = torch.linalg.eigvalsh(gram).clamp_min(1e-30)
        lam = sig / sig.sum()
        h = -(lam * lam.log()).sum()
        return alpha * torch.log(w @ q) + (1 - alpha) * h if alpha > 0 else h
    return f


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_closed_form_gradient_matches_autograd_and_finite_differences(alpha):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.random(30) + 0.1
    w = rng.random(30)
    w /= w.sum()
    xt, qt = torch.tensor(x), torch.tensor(q)
    wt = torch.tensor(w, requires_grad=True)
    obj = _torch_objective(xt, qt, alpha)
    obj(wt).backward()
    auto = wt.grad.numpy()
    # closed form at w: G, eigh, ln lambda
    sig, u = np.linalg.eigh((x * w[:, None]).T @ x)
    lam = np.clip(sig, 1e-30, None) / sig.sum()
    h = spectrum_entropy(sig)
    grad_l = objective_gradient(alpha, log_vendi_gradient(x, u, np.log(lam)), q, float(w @ q))
    # our gradient drops the constant (1 - alpha) * H (EG is shift invariant): add it back
    closed = -(grad_l + (1 - alpha) * h)
    np.testing.assert_allclose(closed, auto, rtol=1e-7, atol=1e-9)
    # central finite differences on the same objective
    eps = 1e-6
    for i in (0, 7, 29):
        e = np.zeros(30)
        e[i] = eps
        fd = (obj(torch.tensor(w + e)).item() - obj(torch.tensor(w - e)).item()) / (2 * eps)
        assert closed[i] == pytest.approx(fd, rel=1e-5, abs=1e-7)


@pytest.fixture(scope="module")
def planted():
    return planted_clusters(n_clusters=40, n=4016, d=128, noise=0.5, seed=0)


def test_objective_never_decreases_and_beats_random(planted):
    x, labels = planted
    k = len(x) // 10
    res = run_spokes(x, k=k, steps=20, tol=0.0, **QUIET)
    assert len(res.objective) == 21 and res.stats["steps_run"] == 20
    assert np.all(np.diff(res.objective) >= -1e-12), res.objective
    assert res.objective[-1] > res.objective[0] + 0.1
    # acceptance check from the foundation issue: >= 95% cluster coverage, >= 1.3x random G-Vendi
    covered = len(set(labels[res.indices])) / 40
    rng = np.random.default_rng(0)
    random_gv = np.mean([vendi_score(x[rng.choice(len(x), k, replace=False)]) for _ in range(5)])
    assert covered >= 0.95
    assert res.gvendi >= 1.3 * random_gv, (res.gvendi, random_gv)
    assert res.gvendi == pytest.approx(vendi_score(x[np.sort(res.indices)]))
    assert len(np.unique(res.indices)) == k
    assert np.isclose(res.weights.sum(), 1.0)
    # the paper's rule orders indices by weight, best first
    top = run_spokes(x, k=k, steps=20, tol=0.0, rounding="topk", **QUIET)
    assert np.all(np.diff(top.weights[top.indices]) <= 0)


def test_fixed_step_rule_is_the_plain_paper_update(planted):
    x, _ = planted
    res = run_spokes(x[:500], k=50, steps=3, step_rule="fixed", lr=0.05, **QUIET)
    assert res.step_sizes == [0.05] * 3 and res.backtracks == 0
    # with a tiny eta the weights barely move from uniform (math notes table)
    assert np.ptp(res.weights) < 0.5 / 500


def test_alpha_sweep_relaxed_quality_is_monotone(planted):
    x, labels = planted
    q = np.random.default_rng(5).gamma(2.0, 1.0, len(x))[:1500]
    x = x[:1500]
    qs = []
    for alpha in [0.0, 0.001, 0.01, 0.1, 0.5, 1.0]:
        res = run_spokes(x, q, alpha=alpha, k=150, steps=10, **QUIET)
        assert np.all(np.diff(res.objective) >= -1e-12)
        qs.append(res.stats["relaxed_quality"])
    assert all(b >= a - 1e-9 for a, b in zip(qs, qs[1:])), qs
    assert qs[-1] > qs[0]


def test_selection_independent_of_chunk_size(planted):
    x, _ = planted
    a = run_spokes(x[:1000], k=100, steps=5, chunk_rows=64, **QUIET)
    b = run_spokes(x[:1000], k=100, steps=5, chunk_rows=4096, **QUIET)
    assert np.array_equal(a.indices, b.indices)


@pytest.fixture(scope="module")
def sharded_runs(planted, tmp_path_factory):
    """SPOKES at both alphas below, on 1 and on 2 gloo ranks (one process group per world size)."""
    from sharded_spokes import run_on_one_and_two_ranks

    folder = tmp_path_factory.mktemp("sharded")
    x, _ = planted
    np.save(folder / "x.npy", x[:1201].astype(np.float16))
    np.save(folder / "q.npy", np.random.default_rng(1).random(1201) + 0.05)
    jobs = {f"alpha{alpha}": {"features": str(folder / "x.npy"), "quality": str(folder / "q.npy"), "k": 120,
                              "alpha": alpha, "chunk_rows": 256} for alpha in (0.0, 0.01)}
    return run_on_one_and_two_ranks(jobs, folder)


@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_two_ranks_equal_one_rank(sharded_runs, alpha):
    out = sharded_runs[f"alpha{alpha}"]
    assert np.array_equal(out[1]["indices"], out[2]["indices"])
    np.testing.assert_allclose(out[1]["weights"], out[2]["weights"], rtol=1e-9)
    np.testing.assert_allclose(out[1]["objective"], out[2]["objective"], rtol=1e-12)


def test_collectives_follow_the_process_group_backend():
    """An NCCL-only group (Lightning's and Accelerate's on GPUs) needs CUDA tensors; gloo and mixed groups CPU."""
    from spokes_lightning.core.distributed import collective_device

    assert collective_device("nccl") == "cuda"
    assert collective_device("gloo") == "cpu"
    assert collective_device("cpu:gloo,cuda:nccl") == "cpu"


NCCL_SCRIPT = r"""
import os, sys
import numpy as np
import torch
import torch.distributed as dist
from spokes_lightning import run_spokes

x = np.load(sys.argv[1])
alone = run_spokes(x, alpha=0.0, k=100, steps=3, log=lambda m: None)
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1)
grouped = run_spokes(x, alpha=0.0, k=100, steps=3, log=lambda m: None)
dist.destroy_process_group()
assert np.array_equal(alone.indices, grouped.indices) and np.array_equal(alone.weights, grouped.weights)
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (an NCCL process group)")
def test_run_spokes_under_an_nccl_process_group(tmp_path, planted):
    """SelectionCallback in a GPU DDP fit and run_selections under ``accelerate launch`` on GPUs run SPOKES in
    an NCCL-only group: its collectives move their tensors to the GPU and give the 1-process result."""
    x, _ = planted
    np.save(tmp_path / "x.npy", x[:1000].astype(np.float32))
    import os

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT="29571")
    proc = subprocess.run([sys.executable, "-c", NCCL_SCRIPT, str(tmp_path / "x.npy")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

def test_bad_inputs():
    x = np.random.default_rng(0).standard_normal((50, 4))
    with pytest.raises(UserError, match="alpha"):
        run_spokes(x, np.ones(50), alpha=1.5, k=5)
    with pytest.raises(UserError, match="needs quality"):
        run_spokes(x, None, alpha=0.5, k=5)
    with pytest.raises(UserError, match="non-negative"):
        run_spokes(x, -np.ones(50), alpha=0.5, k=5)
    with pytest.raises(UserError, match="mean quality is zero"):
        run_spokes(x, np.zeros(50), alpha=0.5, k=5)
    with pytest.raises(UserError, match="shape"):
        run_spokes(x, np.ones(49), alpha=0.5, k=5)
    with pytest.raises(UserError, match="budget"):
        run_spokes(x, k=51)
