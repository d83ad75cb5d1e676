"""QuaDMix (spokes_lightning/selectors/quadmix): Eq. 1-3 against hand-computed values, the a.b
multiplicities, Algorithm 1, the LightGBM search on a synthetic landscape, the proxy-run cache, the
selector through the CLI and the driver, a tiny end-to-end ``params: auto`` search, and the
heuristic quality family's switch."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from spokes_lightning.utils.errors import UserError
from spokes_lightning.data.selection_artifact import read_selection
from spokes_lightning.selection.driver import select_methods
from spokes_lightning.selection.pool import SelectionPool
from spokes_lightning.pipeline.outputs import FeaturesOutput
from spokes_lightning.selectors import get_selector
from spokes_lightning.selectors.quadmix.parameters import (QuaDMixParams, load_params, parameter_vectors,
                                                         sample_parameters)
from spokes_lightning.selectors.quadmix.proxy_runs import ProxyRunner, ProxySettings
from spokes_lightning.selectors.quadmix.sampling import (draw_copies, merged_quality, normalize_criteria,
                                                       quality_rank, sampling_value)
from spokes_lightning.selectors.quadmix.search import search
from spokes_lightning.selectors.quadmix.selector import parameter_search

from tiny_text import tiny_corpus, tiny_tokenizer

PARAMS = {"domains": {"*": {"alpha": [0.6, 0.4], "lambda": 30.0, "omega": 0.1, "eta": 0.5, "epsilon": 0.001}}}


# --------------------------------------------------------------------------- Eq. 1-3


def test_sampling_function_matches_hand_computed_values():
    # lambda 10, omega 0.1, eta 0.5, epsilon 0.001
    # r = 0:    2 / (1 + e^-1)   = 1.4621171573 -> sqrt = 1.2091803659 -> + 0.001
    # r = 0.05: 2 / (1 + e^-0.5) = 1.2449186624 -> sqrt = 1.1157592313 -> + 0.001
    # r = omega: (2 / 2)^eta + epsilon = 1.001; r > omega: epsilon
    got = sampling_value([0.0, 0.05, 0.1, 0.1000001, 0.7], 10.0, 0.1, 0.5, 0.001)
    np.testing.assert_allclose(got, [1.2101803659, 1.1167592313, 1.001, 0.001, 0.001], rtol=0, atol=1e-9)
    # eta 1, lambda 1000: almost 2 just below omega; eta 0: 1 + epsilon everywhere below omega
    assert sampling_value(0.0, 1000.0, 0.05, 1.0, 0.0) == pytest.approx(2.0, abs=1e-12)
    np.testing.assert_allclose(sampling_value([0.0, 0.03], 5.0, 0.05, 0.0, 0.0004), [1.0004, 1.0004])
    # per-document parameters broadcast
    np.testing.assert_allclose(sampling_value([0.0, 0.0], [10.0, 1.0], [0.1, 0.0], [0.5, 1.0], [0.001, 0.0]),
                               [1.2101803659, 1.0], atol=1e-9)


def test_sampling_function_is_non_increasing_in_rank():
    rng = np.random.default_rng(0)
    r = np.linspace(0.0, 1.0, 2001)
    for vector in parameter_vectors(300, 1, 1, rng):
        lam, omega, eta, eps = vector[1:]
        s = sampling_value(r, lam, omega, eta, eps)
        assert (np.diff(s) <= 1e-12).all() and s.min() == pytest.approx(eps)
        assert s.max() <= 2.0 ** eta + eps + 1e-12


def test_normalisation_flips_toolkit_scores_to_smaller_is_better():
    # toolkit scores [3, 1, 2] (higher = better): share of the pool scoring better, ties counted half
    sigma = normalize_criteria(np.array([[3.0], [1.0], [2.0]]), "rank")
    np.testing.assert_allclose(sigma[:, 0], [0.5 / 3, 2.5 / 3, 1.5 / 3])
    z = normalize_criteria(np.array([[3.0], [1.0], [2.0]]), "zscore")
    np.testing.assert_allclose(z[:, 0], [-1.224744871, 1.224744871, 0.0], atol=1e-9)
    with pytest.raises(UserError):
        normalize_criteria(np.ones((3, 1)), "minmax")


def test_merged_quality_and_token_weighted_rank_by_hand():
    sigma = np.array([[0.2, 0.4], [0.0, 0.2], [0.4, 0.0], [0.9, 0.9]])
    domains = np.array([0, 0, 0, 1])
    alpha = np.array([[0.5, 0.5], [1.0, 0.0]])
    q = merged_quality(sigma, domains, alpha)
    np.testing.assert_allclose(q, [0.3, 0.1, 0.2, 0.9])
    # domain 0 sorted: 0.1 (2 tokens), 0.2 (3 tokens), 0.3 (1 token); inclusive token shares of 6
    r = quality_rank(q, domains, np.array([1, 2, 3, 7]), 2)
    np.testing.assert_allclose(r, [6 / 6, 2 / 6, 5 / 6, 1.0])
    np.testing.assert_allclose(quality_rank(q, domains, None, 2), [1.0, 1 / 3, 2 / 3, 1.0])


def test_percentiles_from_a_sample_approximate_the_exact_ranks():
    rng = np.random.default_rng(3)
    n = 30_000
    q, domains, lengths = rng.random(n), rng.integers(0, 2, n), rng.integers(1, 100, n)
    exact = quality_rank(q, domains, lengths, 2, sample=n)
    estimate = quality_rank(q, domains, lengths, 2, sample=2_000, rng=rng)
    assert np.abs(exact - estimate).max() < 0.06 and not np.array_equal(exact, estimate)


# --------------------------------------------------------------------------- a.b multiplicities, budget


def test_copies_are_floor_or_ceil_with_the_right_expectation():
    x = np.array([0.3, 1.7, 2.5, 0.0, 0.5, 3.0])  # sums to 8
    draws = np.array([draw_copies(x, np.random.default_rng(s))[0] for s in range(4000)])
    assert (draws.sum(1) == 8).all()
    assert ((draws == np.floor(x)) | (draws == np.floor(x) + 1)).all()
    np.testing.assert_allclose(draws.mean(0), x, atol=0.03)
    assert (draws[:, 3] == 0).all() and (draws[:, 5] == 3).all()


def _inputs(n=400, seed=0, m=3):
    from spokes_lightning.selectors import SelectionInputs

    rng = np.random.default_rng(seed)
    return SelectionInputs(ids=[str(i) for i in range(n)], domains=rng.integers(0, m, n),
                           domain_names=[f"d{j}" for j in range(m)], lengths=rng.integers(5, 300, n),
                           quality_scores={"a": rng.random(n), "b": rng.normal(size=n)})


def test_selector_meets_the_budget_and_copies_have_the_expected_mean():
    inputs = _inputs()
    sel = get_selector("quadmix", params=PARAMS)
    results = [sel.select(inputs, 60, seed) for seed in range(600)]
    assert all(int(r.multiplicity.sum()) == 60 for r in results)  # scale: exactly k copies
    expected = results[0].scores
    assert expected.sum() == pytest.approx(60.0)
    counts = np.zeros(inputs.n)
    for r in results:
        np.add.at(counts, r.indices, r.multiplicity)
    np.testing.assert_allclose(counts / len(results), expected, atol=0.1)
    r0 = results[0]
    assert len(set(r0.indices.tolist())) == len(r0.indices) and (r0.multiplicity >= 1).all()
    assert sel.select(inputs, 60, 7).indices.tolist() == sel.select(inputs, 60, 7).indices.tolist()


def test_higher_quality_documents_get_more_copies_in_expectation():
    inputs = _inputs(n=600)
    r = get_selector("quadmix", params={"domains": {"*": {"alpha": [1.0, 0.0], "lambda": 50.0, "omega": 0.1,
                                                           "eta": 1.0, "epsilon": 0.0}}}).select(inputs, 50, 0)
    a, domains = inputs.quality_scores["a"], inputs.domains
    for m in range(3):
        rows = np.flatnonzero(domains == m)
        order = rows[np.argsort(-a[rows])]  # best first under the toolkit's convention
        assert (np.diff(r.scores[order]) <= 1e-12).all()
        assert r.scores[order[0]] > 0 and r.scores[order[-1]] == 0  # epsilon 0: the tail is never drawn


def test_raw_rule_keeps_the_papers_values_and_caps_at_k():
    inputs = _inputs()
    big = get_selector("quadmix", params=PARAMS, budget_rule="raw").select(inputs, 400, 1)
    assert big.stats["scale"] == 1.0 and big.multiplicity.sum() <= 400
    assert big.scores.sum() == pytest.approx(big.stats["sampling_total"])
    small = get_selector("quadmix", params=PARAMS, budget_rule="raw").select(inputs, 10, 1)
    assert small.multiplicity.sum() <= 10


def test_explicit_params_are_checked():
    names = ["d0", "d1"]
    with pytest.raises(UserError, match="no values for domain"):
        load_params({"domains": {"d0": PARAMS["domains"]["*"]}}, ["a", "b"], names)
    with pytest.raises(UserError, match="lacks"):
        load_params({"criteria": ["a", "zzz"], "domains": PARAMS["domains"]}, ["a", "b"], names)
    with pytest.raises(UserError, match="omega"):
        load_params({"domains": {"*": {**PARAMS["domains"]["*"], "omega": 2.0}}}, ["a", "b"], names)
    p = load_params({"domains": {"*": {"alpha": {"b": 1.0}, "lambda": 1, "omega": 0.1, "eta": 1, "epsilon": 0}}},
                    ["a", "b"], names)
    assert p.alpha.tolist() == [[0.0, 1.0], [0.0, 1.0]]
    assert load_params(json.dumps(p.to_dict()), ["a", "b"], names).to_dict() == p.to_dict()
    with pytest.raises(UserError, match="needs params"):
        get_selector("quadmix").select(_inputs(), 10)


# --------------------------------------------------------------------------- Algorithm 1


class _Scripted:
    """A generator whose random() returns the given arrays in turn (Algorithm 1 by hand)."""

    def __init__(self, *arrays):
        self.arrays = list(arrays)

    def random(self, shape):
        return np.asarray(self.arrays.pop(0), dtype=np.float64).reshape(shape)


def test_algorithm_1_by_hand():
    # a = (0.2, 0.6) -> a~ = (0.25, 0.75); domain 1: b = (0.5, 0.5) -> alpha = (0.25, 0.75);
    # domain 2: b = (1.0, 0.2) -> a~ b = (0.25, 0.15) -> alpha = (0.625, 0.375);
    # (lambda, omega, eta, epsilon) = (0.5, 0.3, 0.7, 0.4) -> (10^1.5, 0.03, 0.7, 0.0004) and (0, 1, 0, 1) -> (1, 0.1, 0, 0.001)
    rng = _Scripted([0.2, 0.6], [0.5, 0.5, 1.0, 0.2], [0.5, 0.0, 0.3, 1.0, 0.7, 0.0, 0.4, 1.0])
    p = sample_parameters(["x", "y"], ["d1", "d2"], rng)
    np.testing.assert_allclose(p.alpha, [[0.25, 0.75], [0.625, 0.375]])
    np.testing.assert_allclose(p.lam, [10 ** 1.5, 1.0])
    np.testing.assert_allclose(p.omega, [0.03, 0.1])
    np.testing.assert_allclose(p.eta, [0.7, 0.0])
    np.testing.assert_allclose(p.eps, [0.0004, 0.001])
    assert QuaDMixParams.from_vector(p.vector(), p.criteria, p.domains).to_dict() == p.to_dict()


def test_algorithm_1_ranges_and_shapes():
    n, m, count = 3, 4, 20_000
    v = parameter_vectors(count, n, m, np.random.default_rng(1))
    assert v.shape == (count, m * (n + 4))
    block = v.reshape(count, m, n + 4)
    alpha, lam, omega, eta, eps = block[..., :n], block[..., n], block[..., n + 1], block[..., n + 2], block[..., n + 3]
    assert (alpha >= 0).all() and np.allclose(alpha.sum(-1), 1.0)
    assert lam.min() >= 1 and lam.max() <= 1000 and abs(np.log10(lam).mean() - 1.5) < 0.03
    assert omega.min() >= 0 and omega.max() <= 0.1 and abs(omega.mean() - 0.05) < 0.002
    assert eta.min() >= 0 and eta.max() <= 1 and abs(eta.mean() - 0.5) < 0.01
    assert eps.min() >= 0 and eps.max() <= 0.001 and abs(eps.mean() - 0.0005) < 0.00002
    # the global weight a~ is shared by the domains of one draw: their alphas correlate
    assert np.corrcoef(alpha[:, 0, 0], alpha[:, 1, 0])[0, 1] > 0.2


# --------------------------------------------------------------------------- search


def _landscape(vector, n=2, m=2):
    """A known loss: best at alpha_1 = 0.8, lambda = 100, omega = 0.08, eta = 0.3 in every domain."""
    b = np.asarray(vector).reshape(m, n + 4)
    return float(np.sum((b[:, 0] - 0.8) ** 2 + ((np.log10(b[:, n]) - 2.0) / 3) ** 2
                        + ((b[:, n + 1] - 0.08) / 0.1) ** 2 + (b[:, n + 2] - 0.3) ** 2))


def test_search_beats_random_search_with_the_same_evaluations():
    runs, wins, gaps = 150, 0, []
    for seed in range(3):
        found = search(_landscape, 2, 2, runs=runs, seed=seed)
        ours = _landscape(found["theta"])
        rand = min(_landscape(v) for v in parameter_vectors(runs, 2, 2, np.random.default_rng([seed, 99])))
        wins += ours < rand
        gaps.append(rand - ours)
        assert found["proxy_losses"].shape == (runs,) and found["top_thetas"].shape == (10, 12)
    assert wins == 3 and min(gaps) > 0


# --------------------------------------------------------------------------- proxy runs, end to end


@pytest.fixture(scope="module")
def tiny():
    docs = tiny_corpus(48, seed=1)
    texts = [d["text"] for d in docs]
    val = [d["text"] for d in tiny_corpus(6, seed=2)]
    return texts, val, tiny_tokenizer(texts + val)


SMALL = dict(n_layers=1, hidden=32, heads=4, seq_length=32, steps=4, batch_size=4, lr=3e-3, val_tokens=256)


def test_proxy_runs_are_cached_by_their_settings(tiny, tmp_path):
    texts, val, tok = tiny
    rows, copies = np.arange(0, 40, 2), np.r_[np.full(10, 2), np.ones(10, int)]
    first = ProxyRunner(texts, val, tok, tmp_path, ProxySettings(**SMALL))
    loss = first.loss(rows, copies)
    assert first.runs == 1 and math.isfinite(loss) and len(list(tmp_path.glob("*.json"))) == 1
    again = ProxyRunner(texts, val, tok, tmp_path, ProxySettings(**SMALL))
    assert again.loss(rows, copies) == loss and again.runs == 0  # read back
    other = ProxyRunner(texts, val, tok, tmp_path, ProxySettings(**{**SMALL, "steps": 5}))
    other.loss(rows, copies)
    assert other.runs == 1 and len(list(tmp_path.glob("*.json"))) == 2
    first.loss(rows, np.ones(20, int))  # other copies: another dataset
    assert first.runs == 2


def _tiny_pool(texts, val, tok, work_dir):
    n = len(texts)
    rng = np.random.default_rng(4)
    ids = [f"doc-{i}" for i in range(n)]
    lengths = np.array([len(tok(t)["input_ids"]) for t in texts])
    pool = SelectionPool.join({"lengths": (ids, lengths), "domains": (ids, [f"s{i % 2}" for i in range(n)])},
                              quality_scores={"a": (ids, rng.random(n)), "b": (ids, rng.random(n))})
    pool.context.update(texts=list(texts), validation_texts=list(val), tokenizer=tok,
                        work_dir=work_dir, seed=0)
    return pool


TINY_PROXY = {"proxy_runs": 3, "proxy_layers": 1, "proxy_hidden": 32, "proxy_heads": 4, "proxy_seq_length": 32,
              "proxy_steps": 4, "proxy_batch_size": 4, "proxy_val_tokens": 256, "search_candidates": 2000}


def test_params_auto_end_to_end_and_a_killed_search_resumes(tiny, tmp_path):
    texts, val, tok = tiny
    pool = _tiny_pool(texts, val, tok, tmp_path / "work")
    records = {}
    out = select_methods(pool, {"qm": {"selector": "quadmix", "params": "auto", **TINY_PROXY}}, "0.25", "documents",
                         0, tmp_path / "sel", records=records)
    rec = records["qm"]["params"]
    assert rec["trained_here"] == 3 and len(rec["proxy_losses"]) == 3
    assert set(rec["params"]["domains"]) == {"s0", "s1"} and rec["params"]["criteria"] == ["a", "b"]
    assert out["qm"]["n_copies"] == 12  # 0.25 of 48 documents, copies counted
    art = read_selection(out["qm"]["path"])
    assert art.manifest["params"]["params"] == rec["params"] and int(art.copies().sum()) == 12
    cache = sorted((tmp_path / "work" / "quadmix" / "proxies").glob("*.json"))
    assert len(cache) == 3 and list((tmp_path / "work" / "quadmix").glob("search-*.json"))
    cache[0].unlink()  # as if the search had been killed before its last proxy finished
    again = parameter_search(get_selector("quadmix", **TINY_PROXY), _tiny_pool(texts, val, tok, tmp_path / "work").inputs,
                             12, 0, texts=texts, validation_texts=val, tokenizer=tok, work_dir=tmp_path / "work")
    assert again["trained_here"] == 1 and again["params"] == rec["params"]


def test_params_auto_without_the_pipeline_is_one_line():
    pool = SelectionPool.join({"domains": (["0", "1"], ["x", "y"])},
                              quality_scores={"a": (["0", "1"], [0.1, 0.2]), "b": (["0", "1"], [0.3, 0.1])})
    with pytest.raises(UserError, match="needs texts, which only the pipeline"):
        select_methods(pool, {"qm": {"selector": "quadmix", "params": "auto"}}, "1", "documents", 0, "/nonexistent")


# --------------------------------------------------------------------------- CLI and driver


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("quadmix")
    rng = np.random.default_rng(7)
    n = 120
    np.save(d / "F.npy", rng.standard_normal((n, 8)).astype(np.float32))
    np.save(d / "Q1.npy", rng.random(n))
    np.save(d / "Q2.npy", rng.random(n))
    np.save(d / "L.npy", rng.integers(10, 200, n))
    (d / "D.json").write_text(json.dumps([f"site{int(v)}" for v in rng.integers(0, 3, n)]))
    (d / "params.json").write_text(json.dumps(PARAMS))
    return d


def spokes(*args):
    return subprocess.run([sys.executable, "-m", "spokes_lightning", *map(str, args)], capture_output=True,
                          text=True, timeout=180)


def test_cli_with_explicit_params(files, tmp_path):
    d = files
    out = tmp_path / "sel.npy"
    r = spokes("select", "--method", "quadmix", "--features", d / "F.npy", "--quality", f"a={d / 'Q1.npy'}",
               "--quality", f"b={d / 'Q2.npy'}", "--domains", d / "D.json", "--lengths", d / "L.npy",
               "--param", f"params={d / 'params.json'}", "--budget", "30", "--out", out)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip())
    indices, copies = np.load(out), np.load(rec["multiplicity"])
    assert rec["copies"] == copies.sum() == 30 and len(indices) == len(copies) == rec["selected"]
    # the same selection in process, from the same inputs
    pool = SelectionPool.join(
        {"features": ([str(i) for i in range(120)], np.load(d / "F.npy")),
         "lengths": ([str(i) for i in range(120)], np.load(d / "L.npy")),
         "domains": ([str(i) for i in range(120)], json.loads((d / "D.json").read_text()))},
        quality_scores={"a": ([str(i) for i in range(120)], np.load(d / "Q1.npy")),
                        "b": ([str(i) for i in range(120)], np.load(d / "Q2.npy"))})
    same = get_selector("quadmix", params=PARAMS).select(pool.inputs, 30, 0)
    assert same.indices.tolist() == indices.tolist() and same.multiplicity.tolist() == copies.tolist()
    bad = spokes("select", "--method", "quadmix", "--features", d / "F.npy", "--quality", f"a={d / 'Q1.npy'}",
                 "--quality", f"b={d / 'Q2.npy'}", "--param", f"params={json.dumps(PARAMS)}", "--budget", "30",
                 "--out", tmp_path / "bad.npy")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: method 'quadmix' needs domains")
    assert not (tmp_path / "bad.npy").exists()


def test_driver_documents_and_tokens(files, tmp_path):
    d = files
    ids = [str(i) for i in range(120)]
    lengths = np.load(d / "L.npy")
    pool = SelectionPool.join({"lengths": (ids, lengths), "domains": (ids, json.loads((d / "D.json").read_text()))},
                              quality_scores={"a": (ids, np.load(d / "Q1.npy")), "b": (ids, np.load(d / "Q2.npy"))})
    specs = {"qm": {"selector": "quadmix", "params": PARAMS}, "random": {"selector": "random"}}
    out = select_methods(pool, specs, "0.25", "documents", 0, tmp_path / "docs")
    art = read_selection(out["qm"]["path"])
    assert out["qm"]["n_copies"] == 30 and int(np.sum(art.multiplicity)) == 30
    assert out["qm"]["n_tokens"] == int((lengths[art.indices] * art.multiplicity).sum())
    # a token budget: the driver asks for the whole pool and takes a prefix of the random order;
    # the raw rule keeps the paper's values (about 1-2 copies above omega), so the prefix is many documents
    raw = {"qm": {**specs["qm"], "budget_rule": "raw"}}
    tokens = select_methods(pool, raw, "0.08", "tokens", 0, tmp_path / "tok")
    art = read_selection(tokens["qm"]["path"])
    assert tokens["qm"]["n_tokens"] <= 0.08 * lengths.sum() and tokens["qm"]["n_selected"] > 3
    assert (np.asarray(art.scores)[art.indices] > 0.5).mean() > 0.8  # drawn above omega, not from epsilon


# --------------------------------------------------------------------------- the heuristic quality family


def test_heuristic_criteria_by_hand():
    from spokes_lightning.pipeline.families.quality_heuristics import heuristic_scores

    s = heuristic_scores("a b c d e a b c d e\nsame line\nsame line\n 123")
    assert s["heuristic_length"] == pytest.approx(math.log1p(15))
    assert s["heuristic_unique_lines"] == pytest.approx(1 - 9 / (19 + 9 + 9 + 3))
    # 15 words -> 11 5-grams, of which "a b c d e" repeats once
    assert s["heuristic_unique_ngrams"] == pytest.approx(1 - 1 / 11)
    assert s["heuristic_alpha"] == pytest.approx(26 / 29)
    assert heuristic_scores("")["heuristic_alpha"] == 0.0 and heuristic_scores("")["heuristic_unique_ngrams"] == 1.0


def test_heuristic_family_runs_only_with_quadmix():
    from spokes_lightning.pipeline.families.quality_heuristics import QualityHeuristics
    from spokes_lightning.cli.run import compose
    from spokes_lightning.pipeline.feature_stages import FeaturesStage

    family = QualityHeuristics()
    plain = compose(["recipe=demo"])
    assert not family.enabled(plain) and family.settings(plain) == {}
    assert "quality_heuristics" not in FeaturesStage().settings(plain)
    with_qm = compose(["recipe=demo", "+selection.specs.qm={selector: quadmix, params: auto}",
                       "selection.methods=[random,qm]"])
    assert family.enabled(with_qm) and "quality_heuristics" in family.settings(with_qm)
    assert family.handed_on(FeaturesOutput()) == []


def test_heuristic_family_writes_named_scores_the_select_stage_reads(tmp_path):
    from spokes_lightning.data.corpus import Document
    from spokes_lightning.pipeline.families.quality_heuristics import HEURISTICS, QualityHeuristics, heuristic_scores
    from spokes_lightning.pipeline.stage import RunContext

    ctx = RunContext(cfg=None, run_dir=tmp_path)
    docs = [Document(id=f"d{i}", text=t, source="x") for i, t in enumerate(["one two", "a\na\na", "x y z " * 9])]
    ctx.documents["pool"] = docs
    family = QualityHeuristics()
    out = family.run(ctx)
    assert sorted(out) == sorted(f"quality_scores.{h}" for h in HEURISTICS)
    for name in HEURISTICS:  # what select_stage.selection_pool reads: {scores: .npy, ids: .npy of S<n>}
        value = out[f"quality_scores.{name}"]
        assert np.load(tmp_path / value["ids"]).tolist() == [b"d0", b"d1", b"d2"]
        np.testing.assert_allclose(np.load(tmp_path / value["scores"]), [heuristic_scores(d.text)[name] for d in docs])
    handed_on = family.handed_on(FeaturesOutput.from_json(out))
    assert all((tmp_path / f).is_file() for f in handed_on) and len(handed_on) == 5
