"""SemDeDup: blocked implementation == brute-force full-matrix reference; budgets; bad input."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from spokes_lightning.utils.errors import UserError
from spokes_lightning.selectors import SelectionInputs, get_selector
from spokes_lightning.selectors.semdedup import (
    max_earlier_similarity,
    normalize_embeddings,
    spherical_kmeans,
)


def planted_embeddings(seed=0, n_bases=60, n_random=300, dim=32, noise=0.01):
    """Random unit vectors plus groups of 1-4 near-copies of the first n_bases of them."""
    rng = np.random.default_rng(seed)
    bases = rng.normal(size=(n_bases, dim))
    rows, groups = [rng.normal(size=(n_random, dim))], []
    start = n_random
    for b in range(n_bases):
        size = 1 + b % 4
        rows.append(bases[b] + noise * rng.normal(size=(size, dim)))
        groups.append(list(range(start, start + size)))
        start += size
    return np.concatenate(rows).astype(np.float32), groups


def brute_force_m(emb, n_clusters, seed, keep="hard"):
    """Reference semantics with a full similarity matrix per cluster (triu column max)."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    labels, centroids = spherical_kmeans(x.astype(np.float32), n_clusters, seed)
    m = np.zeros(len(x))
    for c in range(n_clusters):
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            continue
        dist = 1 - x[members] @ centroids[c]
        order = np.argsort(-dist if keep == "hard" else dist, kind="stable")
        members = members[order]
        sims = x[members] @ x[members].T
        m[members] = np.triu(sims, 1).max(axis=0)
    return m


def select(emb, k=0, seed=0, **params):
    selector = get_selector("semdedup", progress=False, **params)
    return selector.select(SelectionInputs(embeddings=emb), k, seed)


@pytest.mark.parametrize("keep", ["hard", "easy"])
def test_removes_exactly_what_brute_force_removes(keep):
    emb, groups = planted_embeddings()
    eps = 0.02
    result = select(emb, eps=eps, n_clusters=8, keep=keep, block=7)
    m_ref = brute_force_m(emb, 8, 0, keep)
    expected_kept = set(np.flatnonzero(m_ref <= 1 - eps).tolist())
    assert set(result.indices.tolist()) == expected_kept
    np.testing.assert_allclose(-result.scores, m_ref, atol=1e-5)
    planted_extra = sum(len(g) - 1 for g in groups)
    assert result.stats["n_removed"] == len(emb) - len(expected_kept) == planted_extra
    # exactly one survivor per planted group (the near-copies share a cluster)
    kept = set(result.indices.tolist())
    assert all(sum(i in kept for i in g) == 1 for g in groups)
    # best first: ascending M, ties by index
    m_kept = -result.scores[result.indices]
    assert np.all(np.diff(m_kept) >= 0)


def test_keep_rule_decides_which_copy_survives():
    emb, groups = planted_embeddings(seed=3)
    hard = set(select(emb, eps=0.02, n_clusters=8, keep="hard").indices.tolist())
    easy = set(select(emb, eps=0.02, n_clusters=8, keep="easy").indices.tolist())
    big = [g for g in groups if len(g) > 1]
    assert len(hard) == len(easy)
    assert any(set(g) & hard != set(g) & easy for g in big)


def test_budget_keeps_exactly_k_with_reported_eps():
    emb, _ = planted_embeddings(seed=1)
    k = 280
    result = select(emb, k=k, seed=5, n_clusters=6)
    assert len(result.indices) == k == result.stats["n_kept"]
    eps = result.stats["eps"]
    assert 0 < eps < 1
    m = -result.scores
    kept = np.zeros(len(emb), bool)
    kept[result.indices] = True
    assert np.all(m[kept] <= 1 - eps + 1e-12)
    assert np.all(m[~kept] >= 1 - eps - 1e-12)
    # same M as the reference, and the eps equals the k-th smallest M
    m_ref = brute_force_m(emb, 6, 5)
    np.testing.assert_allclose(m, m_ref, atol=1e-5)
    assert eps == pytest.approx(1 - np.sort(m)[k - 1])


def test_budget_tie_break_is_seeded():
    emb = np.eye(4, 8, dtype=np.float32)
    emb = np.concatenate([emb, emb, emb])  # 3 exact copies of 4 vectors, M in {0, 1}
    emb[4:] += np.float32(0.02)  # copies slightly off: M equal within each cluster
    r1 = select(emb, k=6, seed=1, n_clusters=4)
    r2 = select(emb, k=6, seed=1, n_clusters=4)
    assert np.array_equal(r1.indices, r2.indices)
    assert len(r1.indices) == 6
    assert r1.stats["n_tied_at_threshold"] >= 2


def test_blocked_max_matches_full_matrix_for_any_block():
    rng = np.random.default_rng(2)
    x = normalize_embeddings(rng.normal(size=(257, 16)).astype(np.float32))
    ref = np.triu(x @ x.T, 1).max(axis=0)
    for block in (1, 5, 64, 256, 257, 1000, None):
        np.testing.assert_allclose(max_earlier_similarity(x, block), ref, atol=1e-6)


def test_memory_bounded_on_20k_member_cluster():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(20_000, 16)).astype(np.float32)
    tracemalloc.start()
    try:
        result = select(emb, eps=0.3, n_clusters=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.stats["cluster_size_max"] == 20_000
    full_matrix = 20_000**2 * 4
    assert peak < full_matrix / 20, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    "params, k, emb_fix, match",
    [
        ({"n_clusters": 1000}, 10, None, "n_clusters"),
        ({"eps": 0.0}, 10, None, "eps"),
        ({"eps": 1.5}, 10, None, "eps"),
        ({}, 10_000, None, "budget"),
        ({"n_clusters": 4}, 2, None, "budget .* impossible"),
        ({}, 10, "nan", "NaN"),
        ({}, 10, "zero", "all zeros"),
        ({"keep": "middle"}, 10, None, "keep"),
        ({"epsilon": 0.1}, 10, None, "unknown"),
    ],
)
def test_bad_input_is_a_user_error(params, k, emb_fix, match):
    emb, _ = planted_embeddings(n_bases=10, n_random=50)
    if emb_fix == "nan":
        emb[3, 1] = np.nan
    elif emb_fix == "zero":
        emb[7] = 0
    with pytest.raises(UserError, match=match):
        select(emb, k=k, **params)


def test_random_keep_rule_is_seeded_and_float16_memmap_input_works(tmp_path):
    emb, groups = planted_embeddings(seed=4)
    path = tmp_path / "emb.npy"
    np.save(path, emb.astype(np.float16))
    mm = np.load(path, mmap_mode="r")
    a = select(mm, eps=0.02, n_clusters=8, keep="random", seed=1)
    b = select(mm, eps=0.02, n_clusters=8, keep="random", seed=1)
    assert np.array_equal(a.indices, b.indices)
    kept = set(a.indices.tolist())
    assert all(sum(i in kept for i in g) == 1 for g in groups)
