"""Issue 21 (docs/selectors/peers.md): ``random`` under a token budget is a random sample.

The driver asks a ranking method for every row (k = N) and keeps the prefix that fits the tokens;
random used to return all N rows sorted, so the "sample" was the first documents of the pool."""
from __future__ import annotations

import numpy as np

from spokes_lightning.selection.driver import Budget, select_method
from spokes_lightning.selection.pool import SelectionPool
from spokes_lightning.selectors import get_selector


def pool(n=400, seed=5):
    rng = np.random.default_rng(seed)
    ids = [f"d{i}" for i in range(n)]
    return SelectionPool.join({"features": (ids, rng.standard_normal((n, 8)).astype(np.float32)),
                               "lengths": (ids, rng.integers(10, 100, n))})


def test_random_token_budget_is_the_seeded_permutation_prefix():
    p = pool()
    lengths = np.asarray(p.lengths)
    budget = Budget.resolve(int(lengths.sum() * 0.3), "tokens", p)
    chosen = select_method(p, {"selector": "random"}, budget, seed=7).indices
    order = np.random.default_rng(7).permutation(p.n)
    fits = np.cumsum(lengths[order]) <= budget.tokens
    assert chosen.tolist() == order[: int(np.argmin(fits))].tolist()
    assert chosen.tolist() != list(range(len(chosen)))  # not the start of the pool
    assert lengths[chosen].sum() <= budget.tokens < lengths[chosen].sum() + lengths.max()


def test_random_document_budget_is_unchanged():
    p = pool()
    rows = get_selector("random").select(p.inputs, 50, seed=3).indices
    assert rows.tolist() == np.sort(np.random.default_rng(3).permutation(p.n)[:50]).tolist()
