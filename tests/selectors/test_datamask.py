"""DATAMASK (spokes_lightning/selectors/datamask/): the Plackett-Luce log-probability and its
gradient, the policy-gradient estimator (by enumeration), the objective's parts, the greedy
baseline, the learned mask against random masks, parameter errors, the CLI and the driver."""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from spokes_lightning.utils.errors import UserError
from spokes_lightning.data.selection_artifact import read_selection
from spokes_lightning.selection.driver import select_methods
from spokes_lightning.selection.pool import SelectionPool
from spokes_lightning.selectors import SelectionInputs, available_methods, get_selector
from spokes_lightning.selectors.datamask import (
    build_objective,
    combined_quality,
    greedy_objective_selection,
    gumbel_topk,
    normalise_scores,
    plackett_luce_logprob,
    policy_gradient,
)
from spokes_lightning.core.vendi import vendi_score

try:  # small BLAS calls are much slower multithreaded on a busy machine; results do not change
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    if threadpool_limits is None:
        yield
        return
    with threadpool_limits(1):
        yield


def naive_logprob(logits, order):
    """log P(order) with a loop over the picks: the definition."""
    remaining = list(range(len(logits)))
    total = 0.0
    for s in order:
        rest = np.asarray([logits[i] for i in remaining])
        m = rest.max()
        total += logits[s] - (m + math.log(np.exp(rest - m).sum()))
        remaining.remove(s)
    return total


def torch_logprob(logits: torch.Tensor, order) -> torch.Tensor:
    remaining = list(range(len(logits)))
    total = logits.new_zeros(())
    for s in order:
        total = total + logits[s] - torch.logsumexp(logits[remaining], 0)
        remaining.remove(s)
    return total


@pytest.mark.parametrize("scale", [1.0, 30.0, 400.0])
def test_logprob_and_gradient_equal_the_loop_and_autograd(scale):
    rng = np.random.default_rng(int(scale))
    for n, k in ((7, 3), (12, 12), (20, 6), (3, 1)):
        logits = scale * rng.standard_normal(n)
        order = rng.permutation(n)[:k]
        logp, grad = plackett_luce_logprob(logits, order, grad=True)
        assert logp == pytest.approx(naive_logprob(logits, order), rel=1e-10, abs=1e-9)
        t = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
        torch_logprob(t, order.tolist()).backward()
        np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-9, atol=1e-9)
        assert np.isfinite(grad).all()
    # finite differences on a moderate case
    logits, order = rng.standard_normal(9), rng.permutation(9)[:4]
    _, grad = plackett_luce_logprob(logits, order, grad=True)
    eps = 1e-6
    fd = [(plackett_luce_logprob(logits + eps * np.eye(9)[i], order)
           - plackett_luce_logprob(logits - eps * np.eye(9)[i], order)) / (2 * eps) for i in range(9)]
    np.testing.assert_allclose(grad, fd, atol=1e-7)


def test_gumbel_topk_draws_plackett_luce_orders():
    rng = np.random.default_rng(3)
    logits = np.array([0.5, -1.0, 1.2, 0.0])
    orders = gumbel_topk(logits, 2, 40_000, rng)
    assert orders.shape == (40_000, 2) and (orders[:, 0] != orders[:, 1]).all()
    for order in itertools.permutations(range(4), 2):
        freq = np.mean((orders[:, 0] == order[0]) & (orders[:, 1] == order[1]))
        assert freq == pytest.approx(math.exp(naive_logprob(logits, order)), abs=0.01)


def test_policy_gradient_is_unbiased_by_enumeration():
    """N = 5, k = 2: every ordered sample enumerated; E over every group of G masks computed exactly."""
    rng = np.random.default_rng(11)
    n, k = 5, 2
    logits = rng.standard_normal(n)
    set_value = {frozenset(s): rng.random() for s in itertools.combinations(range(n), k)}
    orders = list(itertools.permutations(range(n), k))
    probs = np.array([math.exp(plackett_luce_logprob(logits, o)) for o in orders])
    assert probs.sum() == pytest.approx(1.0)
    rewards = np.array([set_value[frozenset(o)] for o in orders])

    t = torch.tensor(logits, requires_grad=True)
    expected = sum(torch.exp(torch_logprob(t, list(o))) * r for o, r in zip(orders, rewards))
    expected.backward()
    true_grad = t.grad.numpy()

    for groups in (2, 3):
        mean_loo = np.zeros(n)
        mean_group = np.zeros(n)
        for combo in itertools.product(range(len(orders)), repeat=groups):
            p = float(np.prod(probs[list(combo)]))
            picked = np.array([orders[c] for c in combo])
            r = rewards[list(combo)]
            mean_loo += p * policy_gradient(logits, picked, r, "loo")
            mean_group += p * policy_gradient(logits, picked, r, "group")
        np.testing.assert_allclose(mean_loo, true_grad, atol=1e-12)  # leave-one-out: unbiased
        # the default (reward - group mean) / group std: an ascent direction, not unbiased
        cos = mean_group @ true_grad / np.linalg.norm(mean_group) / np.linalg.norm(true_grad)
        assert cos > 0.9
        assert not np.allclose(mean_group, true_grad, atol=1e-3)


def test_rank_and_minmax_normalisation_and_the_mean_of_named_scores():
    v = np.array([3.0, 1.0, 3.0, 10.0, 2.0])
    np.testing.assert_allclose(normalise_scores(v, "rank"), [2.5 / 4, 0, 2.5 / 4, 1, 0.25])
    np.testing.assert_allclose(normalise_scores(v, "minmax"), [2 / 9, 0, 2 / 9, 1, 1 / 9])
    for how in ("rank", "minmax"):
        np.testing.assert_allclose(normalise_scores(np.full(4, 7.0), how), 0.5)
    a, b = np.array([1.0, 2.0, 3.0]), np.array([30.0, 10.0, 20.0])
    inputs = SelectionInputs(quality=a, quality_scores={"a": a, "b": b})
    q, names = combined_quality(inputs, None, "rank")
    np.testing.assert_allclose(q, [0.5, 0.25, 0.75])
    assert names == ["a", "b"]
    q, names = combined_quality(inputs, "b", "rank")
    np.testing.assert_allclose(q, [1.0, 0.0, 0.5])
    with pytest.raises(UserError, match="quality score.s. c not found; available: a, b"):
        combined_quality(inputs, "a,c", "rank")


def planted(seed: int, n: int, d: int = 24, e: int = 12, clusters: int = 12):
    """Clustered features and embeddings, quality partly tied to a few clusters."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, clusters, n)
    x = rng.standard_normal((clusters, d))[labels] + 0.6 * rng.standard_normal((n, d))
    emb = rng.standard_normal((clusters, e))[labels] + 0.4 * rng.standard_normal((n, e))
    q = rng.random(n) + 0.5 * (labels < clusters // 4)
    return SelectionInputs(features=x.astype(np.float32), embeddings=emb.astype(np.float32), quality=q)


@pytest.mark.parametrize("k", [3, 30])  # kernel form (k < d) and Gram form (k >= d)
def test_objective_parts_match_their_definitions(k):
    inputs = planted(2, 60)
    rng = np.random.default_rng(0)
    idx = rng.choice(60, k, replace=False)
    obj, q, _ = build_objective(inputs, k, lam=0.3, diversity="gvendi")
    parts = obj.parts(idx)
    assert parts["diversity_term"] * min(k, 24) == pytest.approx(vendi_score(inputs.features[np.sort(idx)]), rel=1e-5)
    assert parts["quality_term"] == pytest.approx(q[idx].mean())
    assert parts["objective"] == pytest.approx(0.3 * parts["quality_term"] + 0.7 * parts["diversity_term"])
    u = inputs.embeddings / np.linalg.norm(inputs.embeddings, axis=1, keepdims=True)
    obj_cos = build_objective(inputs, k, diversity="cosine")[0]
    c = u[idx] @ u[idx].T
    want = 0.0 if k < 2 else 1 - (c.sum() - k) / (k * (k - 1))
    assert obj_cos.parts(idx)["diversity_term"] == pytest.approx(want, rel=1e-5)
    fac = build_objective(inputs, k, diversity="facility", reference_size=25, seed=4)[0]
    assert len(fac.reference) == 25
    sims = (1 + fac.reference @ u[idx].T) / 2
    assert fac.parts(idx)["diversity_term"] == pytest.approx(sims.max(axis=1).mean(), rel=1e-5)


@pytest.mark.parametrize("diversity,k", [("gvendi", 5), ("gvendi", 30), ("cosine", 6), ("facility", 6)])
def test_greedy_takes_the_best_exact_objective_at_every_step(diversity, k):
    inputs = planted(4, 40)
    obj = build_objective(inputs, k, diversity=diversity, reference_size=30)[0]
    picks = greedy_objective_selection(obj, k, show_progress=False)
    chosen: list[int] = []
    for _ in range(k):  # the definition: evaluate f(S + i) for every remaining i
        values = [(obj.value(chosen + [i]) if i not in chosen else -np.inf) for i in range(40)]
        chosen.append(int(np.argmax(values)))
    assert picks.tolist() == chosen


CASES = [(seed, int(n), diversity) for seed, (n, diversity) in enumerate(
    zip(np.random.default_rng(2026).integers(300, 900, 6), ["gvendi", "cosine", "facility"] * 2))]


@pytest.mark.parametrize("seed,n,diversity", CASES)
def test_learned_mask_beats_random_masks(seed, n, diversity):
    inputs = planted(100 + seed, n)
    k = max(5, n // 10)
    obj = build_objective(inputs, k, diversity=diversity)[0]
    rng = np.random.default_rng(seed)
    random_best = max(obj.value(rng.choice(n, k, replace=False)) for _ in range(30))
    res = get_selector("datamask", diversity=diversity, steps=150, progress=False).select(inputs, k, seed)
    assert len(res.indices) == k == len(set(res.indices.tolist()))
    assert res.stats["objective"] == pytest.approx(obj.value(res.indices))
    assert res.stats["diversity"] == diversity and 0 <= res.stats["diversity_term"] <= 1.0
    assert res.stats["objective"] > random_best
    # learning alone, from uniform logits (no quality head start), still beats random masks
    flat = get_selector("datamask", diversity=diversity, steps=150, init="uniform", progress=False)
    assert flat.select(inputs, k, seed).stats["objective"] > random_best


def test_learning_improves_on_its_start_and_blocks_and_pruning_work():
    inputs = planted(7, 600)
    k = 60
    res = get_selector("datamask", steps=200, progress=False).select(inputs, k, 0)
    assert res.stats["objective"] > res.stats["objective_init"]
    again = get_selector("datamask", steps=200, progress=False).select(inputs, k, 0)
    assert again.indices.tolist() == res.indices.tolist()  # seeded and deterministic
    blocked = get_selector("datamask", steps=200, block_size=200, prune=0.5, progress=False).select(inputs, k, 1)
    assert blocked.stats["candidates"] == 300 and blocked.stats["pruned"] == 300
    q = normalise_scores(inputs.quality)
    assert q[blocked.indices].min() >= np.sort(q)[300]  # only the top half is a candidate
    assert blocked.stats["objective"] > blocked.stats["objective_init"]
    ranking = np.argsort(-blocked.scores, kind="stable")  # candidates first, then the pruned by quality
    assert set(ranking[:300].tolist()) == set(np.flatnonzero(q >= np.sort(q)[300]).tolist())


@pytest.mark.parametrize("params,message", [
    ({"group_size": 1}, "method 'datamask': parameter group_size must be >= 2, got 1"),
    ({"lam": 1.5}, "parameter lam must be in [0, 1], got 1.5"),
    ({"diversity": "entropy"}, "parameter diversity must be one of gvendi, cosine, facility, got 'entropy'"),
    ({"prune": 1.0}, "parameter prune must be in [0, 1), got 1.0"),
    ({"block_size": 1}, "parameter block_size must be >= 2, got 1"),
    ({"lr": 0}, "parameter lr must be > 0, got 0"),
    ({"temperature": 1}, "unknown parameter(s) temperature"),
])
def test_bad_params_are_one_line_errors(params, message):
    with pytest.raises(UserError) as err:
        get_selector("datamask", **params)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_inputs_are_one_line_errors():
    inputs = planted(1, 50)
    with pytest.raises(UserError, match=r"budget k=51 must be in \[1, 50\]"):
        get_selector("datamask", progress=False).select(inputs, 51)
    no_emb = SelectionInputs(features=inputs.features, quality=inputs.quality)
    with pytest.raises(UserError, match="method 'datamask' needs embeddings"):
        get_selector("datamask", diversity="cosine").select(no_emb, 5)
    from spokes_lightning.selectors.datamask.objective import build_objective

    # called directly (not through the selector's input check): the same one line, not an ImportError
    with pytest.raises(UserError, match="with diversity=cosine needs embeddings"):
        build_objective(no_emb, 5, diversity="cosine")


def spokes(*args):
    return subprocess.run([sys.executable, "-m", "spokes_lightning", *map(str, args)], capture_output=True,
                          text=True, timeout=180, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})


def test_cli_runs_datamask_and_reports_bad_params_in_one_line(tmp_path):
    inputs = planted(9, 200)
    np.save(tmp_path / "f.npy", inputs.features)
    np.save(tmp_path / "e.npy", inputs.embeddings)
    np.save(tmp_path / "q.npy", inputs.quality)
    np.save(tmp_path / "q2.npy", -inputs.quality)
    out = tmp_path / "sel.npy"
    r = spokes("select", "--method", "datamask", "--features", tmp_path / "f.npy", "--quality", f"a={tmp_path / 'q.npy'}",
               "--quality", f"b={tmp_path / 'q2.npy'}", "--embeddings", tmp_path / "e.npy", "--budget", "0.1",
               "--param", "diversity=cosine", "--param", "steps=40", "--param", "scores=a", "--out", out)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["method"] == "datamask" and rec["selected"] == 20
    direct = get_selector("datamask", diversity="cosine", steps=40, scores="a", progress=False).select(
        SelectionInputs(features=inputs.features, embeddings=inputs.embeddings, quality=inputs.quality,
                        quality_scores={"a": inputs.quality, "b": -inputs.quality}), 20, 0)
    assert np.load(out).tolist() == direct.indices.tolist()
    bad = spokes("select", "--method", "datamask", "--features", tmp_path / "f.npy", "--quality", tmp_path / "q.npy",
                 "--budget", "10", "--param", "group_size=1", "--out", tmp_path / "o.npy")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: method 'datamask': parameter group_size must be >= 2, got 1")
    assert not (tmp_path / "o.npy").exists()


def test_driver_runs_datamask_with_documents_and_tokens(tmp_path):
    assert "datamask" in available_methods()
    inputs = planted(5, 240)
    ids = [f"d{i}" for i in range(240)]
    lengths = np.random.default_rng(0).integers(10, 100, 240)
    pool = SelectionPool.join({"features": (ids, inputs.features), "embeddings": (ids, inputs.embeddings),
                               "quality": (ids, inputs.quality), "lengths": (ids, lengths)})
    specs = {"dm": {"selector": "datamask", "steps": 30, "diversity": "facility", "progress": False}}
    info = select_methods(pool, specs, 24, "documents", 3, tmp_path / "docs")
    sel = read_selection(tmp_path / "docs" / "dm")
    direct = get_selector("datamask", steps=30, diversity="facility", progress=False).select(inputs, 24, 3)
    assert info["dm"]["n_selected"] == 24 and sel.indices.tolist() == direct.indices.tolist()
    tokens = select_methods(pool, specs, 0.2, "tokens", 3, tmp_path / "tok")
    assert tokens["dm"]["n_tokens"] <= 0.2 * lengths.sum() and tokens["dm"]["n_selected"] > 0
