"""Online reselection: the objective's greedy picks vs random on generated data, the segment plan
(every token once, the same picks at any world size), the reselector's rules and resume, the
Lightning adapter on a tiny LLaMA, and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spokes_lightning.utils.errors import UserError
from spokes_lightning.online import OnlinePlan, OnlineReselector, SegmentFiller, TrainedOnGram, greedy_window_picks
from spokes_lightning.online.objective import online_objective, unit_rows
from spokes_lightning.core.vendi import vendi_score

torch.set_num_threads(1)


class CountFiller:
    """Full after ``n`` picks (the objective tests count documents, not tokens)."""

    def __init__(self, n):
        self.n, self.picks = n, []

    def add(self, i):
        self.picks.append(i)

    @property
    def full(self):
        return len(self.picks) >= self.n

    def describe(self):
        return f"{self.n} picks"


def clustered(rng, n, d, clusters, spread):
    centers = rng.standard_normal((clusters, d))
    sizes = rng.dirichlet(np.full(clusters, 0.5)) * n  # unequal clusters: random over-samples big ones
    labels = np.repeat(np.arange(clusters), np.maximum(1, np.round(sizes).astype(int)))[:n]
    labels = np.concatenate([labels, rng.integers(0, clusters, n - len(labels))])
    return centers[labels] + spread * rng.standard_normal((n, d))


@pytest.mark.parametrize("seed,n,d,clusters,spread", [(0, 120, 16, 6, 0.3), (1, 200, 32, 10, 0.6),
                                                      (2, 80, 8, 4, 1.0), (3, 300, 24, 15, 0.2)])
def test_greedy_picks_beat_random_on_the_union(seed, n, d, clusters, spread):
    """G-Vendi of trained-on + picks beats random picks of the same size, on data nobody tuned on."""
    rng = np.random.default_rng(seed)
    trained_rows = clustered(rng, 40, d, clusters, spread)
    window = clustered(rng, n, d, clusters, spread)
    unit, keep = unit_rows(window)
    trained = TrainedOnGram(d)
    trained.add(unit_rows(trained_rows)[0])
    m = n // 5
    picks = greedy_window_picks(unit, keep, None, 0.0, trained, CountFiller(m), block=max(1, m // 4))
    assert len(picks) == m == len(set(picks))
    ours = vendi_score(np.vstack([trained_rows, window[picks]]))
    randoms = [vendi_score(np.vstack([trained_rows, window[rng.choice(n, m, replace=False)]])) for _ in range(20)]
    assert ours > np.percentile(randoms, 95), (ours, max(randoms))
    # the trained-on Gram is honoured: picks avoid what was already trained on
    fresh = greedy_window_picks(unit, keep, None, 0.0, TrainedOnGram(d), CountFiller(m), block=max(1, m // 4))
    assert vendi_score(np.vstack([trained_rows, window[picks]])) >= vendi_score(
        np.vstack([trained_rows, window[fresh]])) - 1e-9


def test_quality_term_and_gram_bookkeeping():
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((60, 12))
    unit, keep = unit_rows(rows)
    g = TrainedOnGram(12)
    g.add(unit[:10], np.ones(10))
    assert np.allclose(g.gram, unit[:10].T @ unit[:10]) and g.count == 10 and g.quality_sum == 10
    assert math.isclose(g.vendi(), vendi_score(rows[:10]), rel_tol=1e-9)
    assert math.isclose(online_objective(g.gram, g.count, g.quality_sum, 0.0), math.log(g.vendi()), rel_tol=1e-9)
    quality = rng.uniform(0.1, 1.0, 60)
    picks = greedy_window_picks(unit, keep, quality, 1.0, g, CountFiller(8), block=8)
    assert sorted(picks) == sorted(np.argsort(-quality)[:8].tolist())  # alpha = 1: the quality top-k
    state = TrainedOnGram.from_state(g.state())
    assert np.array_equal(state.gram, g.gram) and state.count == g.count
    with pytest.raises(UserError, match="cannot fill"):
        greedy_window_picks(unit[:3], keep[:3], None, 0.0, g, CountFiller(5), block=2)
    with pytest.raises(UserError, match="needs quality"):
        greedy_window_picks(unit, keep, None, 0.5, g, CountFiller(2), block=2)


# --------------------------------------------------------------------------- the plan
def make_plan(n=200, steps=10, every=3, window=30, batch=4, seq=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(1, 50, rng.integers(3, 40)).astype(np.int64) for _ in range(n)]
    return OnlinePlan([f"d{i:03d}" for i in range(n)], tokens, steps, every, batch, seq, window, seed, pad_id=0)


def test_plan_serves_each_planned_token_at_most_once_and_fills_every_step():
    for world in (1, 2, 4):
        plan = make_plan()
        res = OnlineReselector(plan, [""] * len(plan.ids), "random")
        res.plan_initial()
        for step in range(1, plan.total_steps):
            res.reselect(None, None, step)
        assert len(plan.segments) == plan.n_segments == 4
        seen = {}
        for step in range(plan.total_steps):
            for rank in range(world):
                batch = plan.collate(plan.step_sequences(step, rank, world))
                assert batch["input_ids"].shape == (plan.global_batch // world, plan.seq_length)
                real = batch["attention_mask"] == 1
                assert torch.equal(batch["labels"][real], batch["input_ids"][real])
                assert bool((batch["labels"][~real] == -100).all())
                for seq in plan.step_sequences(step, rank, world):
                    for d, a, b in seq:
                        for t in range(a, b):
                            assert (d, t) not in seen
                            seen[d, t] = step
        planned = {d for s in plan.segments for d in s}
        assert {d for d, _ in seen} <= planned
        for s, picks in enumerate(plan.segments):
            assert plan.lengths[picks].sum() >= plan.tokens_per_segment
            assert set(picks) <= set(plan.window_indices(s).tolist())
        trained = plan.trained_on(world)
        assert set(trained) == {plan.ids[d] for d, _ in seen}


def test_picks_do_not_depend_on_world_size():
    plans = []
    for world in (1, 2):
        plan = make_plan(seed=3)
        res = OnlineReselector(plan, [""] * len(plan.ids), "random")
        res.plan_initial()
        for step in range(1, plan.total_steps):
            res.reselect(None, None, step)
        plans.append(plan.segments)
    assert plans[0] == plans[1]


def test_static_rule_consumes_the_selection_and_refuses_foreign_ids():
    plan = make_plan()
    chosen = plan.ids[::2]
    res = OnlineReselector(plan, [""] * len(plan.ids), "static", static_ids=chosen)
    res.plan_initial()
    for step in range(1, plan.total_steps):
        res.reselect(None, None, step)
    used = [plan.ids[d] for s in plan.segments for d in s]
    assert set(used) <= set(chosen) and len(used) == len(set(used))
    with pytest.raises(UserError, match="not in the training set"):
        OnlineReselector(make_plan(), [""] * 200, "static", static_ids=["d000", "elsewhere"])
    small = OnlineReselector(make_plan(), [""] * 200, "static", static_ids=["d000", "d001"])
    with pytest.raises(UserError, match="runs out"):
        small.plan_initial()


@pytest.mark.parametrize("kwargs,message", [
    ({"every": 0}, "every_n_steps must be >= 1"), ({"every": -2}, "every_n_steps must be >= 1"),
    ({"window": 2}, "smaller than the"), ({"window": 0}, "window must be >= 1"),
    ({"window": 60}, "candidates but the pool has"), ({"steps": 0}, "nothing to train"),
])
def test_bad_schedules_are_one_line_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        make_plan(**kwargs)


def test_filler_counts_tokens():
    f = SegmentFiller(np.array([5, 7, 9]), 12)
    f.add(0)
    assert not f.full
    f.add(1)
    assert f.full and f.total == 12
