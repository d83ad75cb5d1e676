"""The shared selection layer: the pool's id-join, "auto" parameters, budgets with copies."""
from __future__ import annotations

import numpy as np
import pytest

from spokes_lightning.utils.errors import UserError
from spokes_lightning.data.selection_artifact import read_selection
from spokes_lightning.selection.driver import Budget, check_spec, select_methods
from spokes_lightning.selection.pool import SelectionPool
from spokes_lightning.selectors import SELECTORS, SelectionResult, Selector, register


def test_join_aligns_by_id_drops_what_is_missing_and_keeps_aligned_arrays_uncopied(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"d{i}" for i in range(8)]
    feats = rng.standard_normal((8, 3)).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    quality = np.arange(8, dtype=np.float64)
    quality[5] = np.nan  # cannot be ranked: dropped
    emb_ids = ids[::-1][:-1]  # reversed, and d0 missing
    emb = rng.standard_normal((7, 4))
    pool = SelectionPool.join({"features": (ids, mm), "embeddings": (emb_ids, emb), "quality": (ids, quality),
                               "domains": (ids, list("abbaabba"))}, n_total=10)
    assert pool.ids == ["d1", "d2", "d3", "d4", "d6", "d7"] and pool.n_unselectable == 4
    np.testing.assert_array_equal(pool.inputs.features, feats[[1, 2, 3, 4, 6, 7]])
    np.testing.assert_array_equal(pool.inputs.embeddings, emb[[6, 5, 4, 3, 1, 0]])
    assert pool.inputs.domains.tolist() == [1, 1, 0, 0, 1, 0] and pool.inputs.domain_names == ["a", "b"]
    whole = SelectionPool.join({"features": (ids, mm), "quality": (ids, np.arange(8.0))})
    assert whole.inputs.features is mm  # already aligned: no copy of the (memmapped) gradients
    assert set(whole.input_hashes()) == {"features", "quality"}


def test_strict_join_names_the_stores(tmp_path):
    with pytest.raises(UserError, match="embeddings store E has 2 documents but features store F has 3"):
        SelectionPool.join({"features": (["a", "b", "c"], np.ones((3, 2))), "embeddings": (["a", "b"], np.ones((2, 2)))},
                           strict=True, labels={"features": "features store F", "embeddings": "embeddings store E"})
    with pytest.raises(UserError, match="lists a document id more than once"):
        SelectionPool.join({"features": (["a", "a"], np.ones((2, 2)))})


def planted_pool(seed: int, n: int = 300, d: int = 24) -> SelectionPool:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    ids = [str(i) for i in range(n)]
    return SelectionPool.join({"features": (ids, x), "quality": (ids, rng.random(n) + 0.1),
                               "lengths": (ids, rng.integers(5, 50, n))})


def test_auto_alpha_is_fixed_by_the_caller_or_resolved_by_the_sweep(tmp_path):
    """The bug of issue 12: {selector: spokes, alpha: auto} under the name spokes."""
    pool = planted_pool(1)
    spec = {"spokes": {"selector": "spokes", "alpha": "auto", "steps": 3}}
    check_spec("spokes", spec["spokes"])
    select_methods(pool, spec, 30, "documents", 0, tmp_path / "fixed", fixed={"alpha": 0.01})
    assert read_selection(tmp_path / "fixed" / "spokes").manifest["params"]["alpha"] == 0.01
    records = {}
    select_methods(pool, spec, 30, "documents", 0, tmp_path / "auto", fixed={"alpha_grid": [0.01, 0.1]},
                   records=records)
    sweep = records["spokes"]["alpha"]
    chosen = read_selection(tmp_path / "auto" / "spokes").manifest["params"]["alpha"]
    assert chosen == sweep["auto_alpha"] in (0.01, 0.1) and [r["alpha"] for r in sweep["rows"]] == [0, 0.01, 0.1, 1]
    with pytest.raises(UserError, match="parameter steps cannot be 'auto'"):
        check_spec("spokes", {"selector": "spokes", "steps": "auto"})
    with pytest.raises(UserError, match="needs a 'selector' key"):
        check_spec("mine", {"alpha": 0.1})


@pytest.fixture
def registered():
    """Register test selectors for one test only (other tests list every registered method)."""
    added = []

    def add(cls):
        added.append(register(cls).name)
        return cls

    yield add
    for name in added:
        SELECTORS.pop(name, None)


class _Doubler(Selector):
    """Test selector: the top-k by quality, the best half taken twice, with weights."""

    name = "test_doubler"
    requires = ("quality",)

    def select(self, inputs, k, seed=0):
        order = np.argsort(-np.asarray(inputs.quality), kind="stable")[:k]
        copies = np.where(np.arange(len(order)) < len(order) // 2, 2, 1)
        return SelectionResult(indices=order.astype(np.int64), scores=np.asarray(inputs.quality),
                               multiplicity=copies.astype(np.int64), weights=np.linspace(1, 0.5, len(order)))


@pytest.mark.parametrize("seed", [2, 3])
def test_token_budget_counts_copies(tmp_path, seed, registered):
    registered(_Doubler)
    pool = planted_pool(seed)
    lengths = np.asarray(pool.lengths)
    budget = int(lengths.sum() * 0.2)
    select_methods(pool, {"d": {"selector": "test_doubler"}}, budget, "tokens", 0, tmp_path)
    sel = read_selection(tmp_path / "d")
    used = int((lengths[sel.indices] * sel.copies()).sum())
    assert used <= budget < used + 2 * lengths.max()  # the prefix stops where the next copies would not fit
    assert sel.manifest["tokens_selected"] == used and sel.manifest["n_copies"] == int(sel.copies().sum())
    assert sel.copies().max() == 2 and len(sel.weights) == len(sel.indices)
    random_budget = Budget.resolve(budget, "tokens", pool)
    assert random_budget.tokens == budget and 1 <= random_budget.k < pool.n


def test_bad_multiplicity_is_refused(tmp_path, registered):
    @registered
    class _Zero(Selector):
        name = "test_zero_copies"

        def select(self, inputs, k, seed=0):
            return SelectionResult(indices=np.arange(k, dtype=np.int64), multiplicity=np.zeros(k, dtype=np.int64))

    with pytest.raises(ValueError, match="multiplicity must be integers >= 1"):
        select_methods(planted_pool(4), {"z": {"selector": "test_zero_copies"}}, 5, "documents", 0, tmp_path)
    assert not (tmp_path / "z" / "manifest.json").exists()
