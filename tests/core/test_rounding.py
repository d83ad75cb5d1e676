"""SPOKES rounding rules (spokes_lightning/core/rounding.py): defaults against random on untuned data,
rank- and chunk-invariance, exact inclusion probabilities, the stopping rule, quality sweeps.

The planted data here is generated in the test with its own seeds, sizes, dimensions, spreads
and size profiles (Zipf and log-normal cluster sizes), none of which the defaults were chosen
on (bench/bench_rounding.py uses geometric / Dirichlet sizes and other seeds).
"""
import subprocess
import sys

import numpy as np
import pytest

from spokes_lightning import UserError, run_spokes, vendi_score
from spokes_lightning.core.rounding import ROUNDING_RULES, inclusion_probabilities, systematic_rounding
from spokes_lightning.selectors import get_selector, SelectionInputs

QUIET = {"log": lambda msg: None}


def clustered(n, d, clusters, spread, profile, seed):
    """Gaussian clusters around random centres; sizes Zipf (1/rank) or log-normal, >= 1 each."""
    rng = np.random.default_rng(seed)
    if profile == "zipf":
        p = 1.0 / np.arange(1, clusters + 1)
    else:
        p = rng.lognormal(0.0, 1.2, clusters)
    p /= p.sum()
    sizes = np.floor(p * (n - clusters)).astype(int) + 1
    sizes[np.argmax(sizes)] += n - sizes.sum()
    labels = np.repeat(np.arange(clusters), sizes)
    x = rng.standard_normal((clusters, d))[labels] + spread * rng.standard_normal((n, d))
    perm = rng.permutation(n)
    return x[perm].astype(np.float32), labels[perm]


def random_gvendi(x, k, seeds=5):
    rng = np.random.default_rng(12345)
    return np.mean([vendi_score(x[np.sort(rng.choice(len(x), k, replace=False))]) for _ in range(seeds)])


CASES = [  # n, d, clusters, spread, profile, seed
    (3000, 64, 30, 0.4, "zipf", 101),
    (2400, 96, 25, 0.8, "lognormal", 202),
    (2000, 48, 35, 1.0, "zipf", 303),
    (2600, 80, 30, 0.6, "lognormal", 404),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-spread{c[3]}-seed{c[5]}" for c in CASES])
def test_default_covers_clusters_and_beats_random(case):
    n, d, clusters, spread, profile, seed = case
    x, labels = clustered(n, d, clusters, spread, profile, seed)
    k = n // 10
    res = run_spokes(x, k=k, **QUIET)
    assert res.stats["rounding"] == "greedy"
    assert len(np.unique(res.indices)) == k
    covered = len(set(labels[res.indices])) / clusters
    ratio = res.gvendi / random_gvendi(x, k)
    assert covered >= 0.95, (covered, ratio)
    assert ratio >= 1.3, (covered, ratio)
    for budget in (0.01, 0.5):  # never below random at the extremes
        kb = max(1, int(budget * n))
        assert run_spokes(x, k=kb, **QUIET).gvendi >= random_gvendi(x, kb), budget


def test_topk_fails_where_mass_respecting_rules_do_not():
    """The failure the rounding rules exist for: tight uneven clusters at a small budget."""
    x, labels = clustered(3000, 64, 30, 0.3, "zipf", 505)
    k = 60
    covered = {r: len(set(labels[run_spokes(x, k=k, rounding=r, **QUIET).indices])) for r in ROUNDING_RULES}
    assert covered["greedy"] > covered["topk"], covered
    assert covered["systematic"] > covered["topk"], covered


@pytest.mark.parametrize("rule", ROUNDING_RULES)
def test_rounding_is_seeded_and_chunk_size_independent(rule):
    x, _ = clustered(1500, 32, 12, 0.7, "lognormal", 606)
    a = run_spokes(x, k=150, rounding=rule, seed=3, chunk_rows=128, **QUIET)
    b = run_spokes(x, k=150, rounding=rule, seed=3, chunk_rows=128, **QUIET)
    assert np.array_equal(a.indices, b.indices)
    assert a.stats["rounding"] == rule and a.stats["rounding_seed"] == 3
    c = run_spokes(x, k=150, rounding=rule, seed=3, chunk_rows=1024, **QUIET)
    # chunk products differ in float32 rounding only: the same subset (or, at worst, one swap)
    assert len(np.intersect1d(a.indices, c.indices)) >= 149


@pytest.fixture(scope="module")
def sharded_rules(tmp_path_factory):
    """Every rounding rule on the same clustered matrix, on 1 and on 2 gloo ranks (one process group each)."""
    from sharded_spokes import run_on_one_and_two_ranks

    folder = tmp_path_factory.mktemp("sharded")
    x, _ = clustered(1201, 40, 15, 0.6, "zipf", 707)
    np.save(folder / "x.npy", x.astype(np.float16))
    jobs = {rule: {"features": str(folder / "x.npy"), "quality": None, "k": 90, "alpha": 0.0, "chunk_rows": 256,
                   "rounding": rule, "seed": 5} for rule in ROUNDING_RULES}
    return run_on_one_and_two_ranks(jobs, folder)


@pytest.mark.parametrize("rule", ROUNDING_RULES)
def test_two_ranks_give_the_same_subset_for_every_rule(sharded_rules, rule):
    got = sharded_rules[rule]
    assert np.array_equal(got[1]["indices"], got[2]["indices"])
    assert np.array_equal(got[1]["weights"], got[2]["weights"])  # bit-identical: grid-aligned shards


def test_systematic_inclusion_probabilities_are_exact():
    rng = np.random.default_rng(9)
    w = rng.gamma(0.4, 1.0, 40)
    w /= w.sum()
    k = 9
    pi = inclusion_probabilities(w, k)
    assert pi.sum() == pytest.approx(k, abs=1e-9) and pi.max() <= 1.0
    assert np.allclose(pi[pi < 1], (pi[pi < 1] / w[pi < 1]).mean() * w[pi < 1])  # proportional below the cap
    trials = 3000
    counts = np.zeros(len(w))
    for s in range(trials):
        idx = systematic_rounding(np.log(w), k, 0, s)
        assert len(np.unique(idx)) == k
        counts[idx] += 1
    z = (counts / trials - pi) / np.sqrt(np.maximum(pi * (1 - pi), 1e-12) / trials)
    assert np.abs(z).max() < 4.5, np.abs(z).max()


def test_tolerance_stops_early_and_reports_the_steps():
    x, _ = clustered(1200, 32, 10, 0.8, "zipf", 808)
    loose = run_spokes(x, k=120, steps=50, tol=1e-2, **QUIET)
    full = run_spokes(x, k=120, steps=12, tol=0.0, **QUIET)
    assert loose.stats["converged"] and loose.stats["steps_run"] < 50
    assert len(loose.objective) == loose.stats["steps_run"] + 1
    assert full.stats["steps_run"] == 12 and not full.stats["converged"]
    with pytest.raises(UserError, match="tol"):
        run_spokes(x, k=10, tol=float("nan"))


@pytest.mark.parametrize("rule", ROUNDING_RULES)
def test_alpha_sweep_is_monotone_in_mean_quality_after_rounding(rule):
    x, labels = clustered(1500, 32, 12, 0.8, "lognormal", 909)
    q = np.random.default_rng(1).gamma(2.0, 1.0, len(x))
    means = [run_spokes(x, q, alpha=a, k=150, rounding=rule, **QUIET).mean_quality
             for a in (0.0, 0.01, 0.1, 0.5, 1.0)]
    assert all(b >= a - 1e-9 for a, b in zip(means, means[1:])), means
    assert means[-1] > means[0]


def test_alpha_one_greedy_is_the_quality_top_k():
    x, _ = clustered(1400, 24, 10, 0.7, "zipf", 1001)
    q = np.random.default_rng(2).random(len(x))
    res = run_spokes(x, q, alpha=1.0, k=140, **QUIET)
    assert set(res.indices.tolist()) == set(np.argsort(-q, kind="stable")[:140].tolist())


def test_selector_and_cli_take_the_rounding_parameter(tmp_path):
    x, _ = clustered(600, 16, 8, 0.5, "zipf", 111)
    sel = get_selector("spokes", rounding="systematic")
    result = sel.select(SelectionInputs(features=x), 60, seed=4)
    assert result.stats["rounding"] == "systematic" and result.stats["rounding_seed"] == 4
    with pytest.raises(UserError, match="rounding"):
        get_selector("spokes", rounding="bogus").select(SelectionInputs(features=x), 60)
    np.save(tmp_path / "f.npy", x)
    ok = subprocess.run([sys.executable, "-m", "spokes_lightning", "select", "--method", "spokes", "--features",
                         tmp_path / "f.npy", "--budget", "60", "--param", "rounding=topk", "--out", tmp_path / "o.npy"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "rounding topk" in ok.stderr
    top = run_spokes(x, k=60, rounding="topk", **QUIET).indices
    assert np.array_equal(np.load(tmp_path / "o.npy"), top)
    bad = subprocess.run([sys.executable, "-m", "spokes_lightning", "select", "--method", "spokes", "--features",
                          tmp_path / "f.npy", "--budget", "60", "--param", "rounding=bogus", "--out", tmp_path / "b.npy"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "rounding" in bad.stderr
    assert not (tmp_path / "b.npy").exists()
