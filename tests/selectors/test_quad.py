"""Quad: K-FAC iHVP (exact where the Kronecker factorisation is), QKV as one block, the damping
split, the sketched reference direction on a tiny proxy, the UCB bandit, budget, starvation,
domain preference, the feature family's cache-key contract and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from tiny_proxy import build_tiny_proxy, tiny_documents  # noqa: E402

from spokes_lightning.utils.errors import UserError  # noqa: E402
from spokes_lightning.features import kfac  # noqa: E402
from spokes_lightning.pipeline.outputs import FeaturesOutput, ProxyOutput  # noqa: E402
from spokes_lightning.selectors import SelectionInputs, get_selector  # noqa: E402
from spokes_lightning.selectors.quad import cluster_scores  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- K-FAC algebra


def product_set(xs: torch.Tensor, ds: torch.Tensor):
    """Every (input, output-grad) pair: then E[dd^T (x) xx^T] = E[dd^T] (x) E[xx^T] exactly."""
    i, j = len(xs), len(ds)
    return xs.repeat_interleave(j, 0), ds.repeat(i, 1)


def linear_tokens(xs: torch.Tensor, ds: torch.Tensor, layer: nn.Linear):
    """Tokens through a real Linear with loss sum_t <c_t, W x_t>: autograd gives delta_t = c_t."""
    x, c = product_set(xs, ds)
    out = layer(x)
    (delta,) = torch.autograd.grad((out * c).sum(), [out])
    per_token = torch.einsum("to,ti->toi", delta, x).reshape(len(x), -1)  # row-major vec(delta x^T)
    return x.detach(), delta, per_token.double()


def test_kfac_ihvp_is_the_exact_damped_inverse_where_kfac_is_exact():
    torch.manual_seed(0)
    layer = nn.Linear(5, 4, bias=False).double()
    x, delta, per_token = linear_tokens(torch.randn(7, 5, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64),
                                        layer)
    block = kfac.Block("l", ["l"], 5, [4])
    acc = kfac.KFACFactors([block])
    acc.add(block, x[:20], delta[:20])  # two batches
    acc.add(block, x[20:], delta[20:])
    a, g = acc.factors(block)
    h = per_token.T @ per_token / len(per_token)
    torch.testing.assert_close(h, torch.kron(g, a))  # the factorisation is exact here
    v = torch.randn(4, 5, dtype=torch.float64)
    for lam in (1e-3, 0.3, 5.0):
        exact = torch.linalg.solve(h + lam * torch.eye(20, dtype=torch.float64), v.reshape(-1))
        torch.testing.assert_close(kfac.kfac_ihvp(a, g, v, lam, "eigen").reshape(-1), exact)
        for split in ("pi", "sqrt"):  # vec(G_d^-1 V A_d^-1) = ((G + l_G I) (x) (A + l_A I))^-1 vec(V)
            la, lg = kfac.split_damping(a, g, lam, split)
            assert la * lg == pytest.approx(lam)
            kron = torch.kron(g + lg * torch.eye(4, dtype=torch.float64), a + la * torch.eye(5, dtype=torch.float64))
            torch.testing.assert_close(kfac.kfac_ihvp(a, g, v, lam, split).reshape(-1),
                                       torch.linalg.solve(kron, v.reshape(-1)))
    # as lambda -> 0 the factored damping reaches the exact inverse too
    tiny = 1e-16  # the split adds lambda_G I (x) A + lambda_A G (x) I: an O(sqrt(lambda)) error
    exact = torch.linalg.solve(h + tiny * torch.eye(20, dtype=torch.float64), v.reshape(-1))
    torch.testing.assert_close(kfac.kfac_ihvp(a, g, v, tiny, "pi").reshape(-1), exact, rtol=1e-4, atol=1e-6)


def test_pi_damping_depends_only_on_the_kronecker_product():
    torch.manual_seed(1)
    a0, g0 = torch.randn(6, 6, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    a, g = a0 @ a0.T / 6, g0 @ g0.T / 3
    v = torch.randn(3, 6, dtype=torch.float64)
    lam = kfac.absolute_damping([(a, g)], 0.1)
    assert lam == pytest.approx(0.1 * float(torch.kron(g, a).diagonal().mean()))
    a2, g2 = torch.eye(2, dtype=torch.float64) * 3, torch.eye(4, dtype=torch.float64) * 5  # one lambda for all blocks
    assert kfac.absolute_damping([(a, g), (a2, g2)], 0.1) == pytest.approx(
        0.1 * float(torch.cat([torch.kron(g, a).diagonal(), torch.kron(g2, a2).diagonal()]).mean()))
    for c in (1e-3, 1e3):  # G (x) A unchanged: pi-damping gives the same iHVP, sqrt-damping does not
        assert kfac.absolute_damping([(a * c, g / c)], 0.1) == pytest.approx(lam)
        torch.testing.assert_close(kfac.kfac_ihvp(a * c, g / c, v, lam, "pi"), kfac.kfac_ihvp(a, g, v, lam, "pi"))
        assert not torch.allclose(kfac.kfac_ihvp(a * c, g / c, v, lam, "sqrt"), kfac.kfac_ihvp(a, g, v, lam, "sqrt"),
                                  rtol=1e-2)
    # badly scaled factors: pi is closer than sqrt to the exact (G (x) A + lambda I)^-1
    exact = kfac.kfac_ihvp(a * 1e3, g / 1e3, v, lam, "eigen")
    err = {s: float((kfac.kfac_ihvp(a * 1e3, g / 1e3, v, lam, s) - exact).norm()) for s in ("pi", "sqrt")}
    assert err["pi"] < err["sqrt"]
    # a diagonal G (wide factors) is the same as a dense diagonal matrix
    gd = g.diagonal().clone()
    for split in kfac.DAMPING_SPLITS:
        torch.testing.assert_close(kfac.kfac_ihvp(a, gd, v, lam, split), kfac.kfac_ihvp(a, torch.diag(gd), v, lam, split))


def test_qkv_as_one_block_keeps_the_cross_terms():
    torch.manual_seed(2)
    sizes = [4, 2, 2]
    layers = {n: nn.Linear(5, o, bias=False) for n, o in zip(("attn.q_proj", "attn.k_proj", "attn.v_proj"), sizes)}
    layers["attn.o_proj"] = nn.Linear(8, 5, bias=False)
    names = list(layers)
    joint = kfac.linear_blocks(layers, names, "joint")
    assert [b.name for b in joint] == ["attn.qkv", "attn.o_proj"] and joint[0].out_sizes == sizes
    assert [b.name for b in kfac.linear_blocks(layers, names, "separate")] == names
    xs = torch.randn(6, 5, dtype=torch.float64)

    def fit(ds):
        x, d = product_set(xs, ds)
        blk = joint[0]
        acc = kfac.KFACFactors([blk])
        acc.add(blk, x, d)
        a, g = acc.factors(blk)
        per_token = torch.einsum("to,ti->toi", d, x).reshape(len(x), -1).double()
        return a, g, per_token.T @ per_token / len(x)

    v = torch.randn(8, 5, dtype=torch.float64)
    lam = 0.05

    def separate(a, g):  # each of q, k, v with its own diagonal block of G
        parts, start = [], 0
        for o in sizes:
            parts.append(kfac.kfac_ihvp(a, g[start:start + o, start:start + o], v[start:start + o], lam, "eigen"))
            start += o
        return torch.cat(parts)

    a, g, h = fit(torch.randn(5, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64))  # correlated q|k|v output grads
    exact = torch.linalg.solve(h + lam * torch.eye(40, dtype=torch.float64), v.reshape(-1)).reshape(8, 5)
    torch.testing.assert_close(kfac.kfac_ihvp(a, g, v, lam, "eigen"), exact)
    assert (separate(a, g) - exact).norm() > 0.05 * exact.norm()
    # output grads with no q/k/v cross-covariance: the joint block equals the separate ones
    ds = torch.zeros(9, 8, dtype=torch.float64)
    ds[0:3, 0:4], ds[3:6, 4:6], ds[6:9, 6:8] = (torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64),
                                                torch.randn(3, 2, dtype=torch.float64))
    a, g, _ = fit(ds)
    torch.testing.assert_close(kfac.kfac_ihvp(a, g, v, lam, "eigen"), separate(a, g))


# --------------------------------------------------------------------------- on a tiny proxy


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory):
    return build_tiny_proxy(tmp_path_factory.mktemp("proxy"), vocab=300, hidden=16, layers=3)


def module_for(proxy_dir, projection="kronecker", k=512):
    from spokes_lightning.features.gradients import ProxyGradients

    return ProxyGradients(str(proxy_dir), n_layers=2, projection=projection, k=k, seed=3, max_length=24)


def per_doc_gradients(module, texts):
    """Exact per-document mean-loss gradients of the selected parameters (one backward each)."""
    names = list(module.grad_params)
    out = []
    for text in texts:
        _, toks, _ = module.tokenize(["x"], [text])
        grads = torch.autograd.grad(module.document_losses(*module.pad(toks)).sum(), [module.grad_params[n] for n in names])
        out.append({n: g.detach().double() for n, g in zip(names, grads)})
    return out


@pytest.mark.parametrize("projection", ["kronecker", "dense"])
def test_the_direction_uses_exactly_the_feature_sketch(proxy_dir, projection):
    m = module_for(proxy_dir, projection, k=64)
    texts = [t for _, t in tiny_documents(6) if len(t) > 10][:3]
    rows = m.rows_for(["a", "b", "c"], texts)["rows"]
    for text, row in zip(texts, rows):
        grad = per_doc_gradients(m, [text])[0]
        torch.testing.assert_close(kfac.sketch_direction(m, grad), row, rtol=1e-3, atol=1e-5)


def dense_kfac_scores(module, ref_texts, factor_texts, pool_texts, damping, split):
    """The same influence with every block's damped Hessian formed as a matrix and solved exactly."""
    modules = dict(module.model.named_modules())
    weights = kfac.weight_param_names(module)
    blocks = kfac.linear_blocks(modules, module.linear_names, "joint")
    acc = kfac.estimate_factors(module, factor_texts, blocks)
    g_ref = {n: g.double() for n, g in kfac.reference_gradient(module, ref_texts).items()}
    docs = per_doc_gradients(module, pool_texts)
    scores = np.zeros(len(docs))
    lam = kfac.absolute_damping([acc.factors(blk) for blk in blocks], damping)
    for blk in blocks:
        a, g = acc.factors(blk)
        la, lg = kfac.split_damping(a, g, lam, split)
        h = torch.kron(g + lg * torch.eye(len(g), dtype=torch.float64), a + la * torch.eye(len(a), dtype=torch.float64))
        u = torch.linalg.solve(h, torch.cat([g_ref[weights[m]] for m in blk.members]).reshape(-1))
        for i, d in enumerate(docs):
            scores[i] += float(u @ torch.cat([d[weights[m]] for m in blk.members]).reshape(-1))
    return scores


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_reference_direction_ranks_documents_like_the_dense_exact_influence(proxy_dir):
    from spokes_lightning.features.gradients import ProxyGradients

    seeds = list(range(3, 11))
    k = 1024
    m = ProxyGradients(str(proxy_dir), n_layers=2, projection="kronecker", k=k, seed=seeds[0], max_length=24,
                            extra_seeds=seeds[1:])
    docs = [t for _, t in tiny_documents(40, seed=4) if len(t) > 10]
    ref, factors, pool = docs[:6], docs[6:18], docs[18:]
    vec, info = kfac.reference_direction(m, ref, factors, hessian="kfac", damping=0.1, damping_split="pi")
    assert info["blocks"][0]["name"].endswith("self_attn.qkv") and info["blocks"][0]["members"] == 3
    rows = m.rows_for([str(i) for i in range(len(pool))], pool)["rows"].numpy()  # [seed | extra seeds]
    exact = dense_kfac_scores(m, ref, factors, pool, 0.1, "pi")
    # the same u, unsketched: the K-FAC path equals the dense exact influence
    g_ref = kfac.reference_gradient(m, ref)
    u, _ = kfac.precondition(m, g_ref, factors, damping=0.1, damping_split="pi")
    weights = sorted(set(kfac.weight_param_names(m).values()))
    grads = per_doc_gradients(m, pool)
    direct = np.array([sum(float((u[n].double() * d[n]).sum()) for n in weights) for d in grads])
    np.testing.assert_allclose(direct, exact, rtol=1e-4)
    # sketched: one seed is within the JL error |u| |g| / sqrt(k) of it; the mean over 8 seeds ranks alike
    u_norm = np.sqrt(sum(float((u[n].double() ** 2).sum()) for n in weights))
    g_norms = np.array([np.sqrt(sum(float((d[n] ** 2).sum()) for n in weights)) for d in grads])
    assert (np.abs(rows[:, :k] @ vec - exact) < 4 * u_norm * g_norms / np.sqrt(k)).all()
    per_seed = [rows[:, i * k:(i + 1) * k] @ kfac.sketch_direction(m, u, s).numpy() for i, s in enumerate(seeds)]
    np.testing.assert_allclose(per_seed[0], rows[:, :k] @ vec, rtol=1e-4, atol=1e-4)
    mean = np.mean(per_seed, axis=0)
    assert spearman(mean, exact) > 0.8 and np.corrcoef(mean, exact)[0, 1] > 0.9
    # hessian none: plain gradient similarity, the same checks
    plain, _ = kfac.reference_direction(m, ref, hessian="none")
    dots = np.array([sum(float((g_ref[n].double() * d[n]).sum()) for n in weights) for d in grads])
    g_norm = np.sqrt(sum(float((g_ref[n].double() ** 2).sum()) for n in weights))
    assert (np.abs(rows[:, :k] @ plain - dots) < 4 * g_norm * g_norms / np.sqrt(k)).all()
    mean = np.mean([rows[:, i * k:(i + 1) * k] @ kfac.sketch_direction(m, g_ref, s).numpy()
                    for i, s in enumerate(seeds)], axis=0)
    assert spearman(mean, dots) > 0.8 and np.corrcoef(mean, dots)[0, 1] > 0.9
    # K-FAC changes the direction (otherwise the preconditioning would do nothing)
    assert abs(np.dot(vec, plain) / np.linalg.norm(vec) / np.linalg.norm(plain)) < 0.99


def test_feature_family_hands_on_the_direction_and_stays_out_of_other_runs(proxy_dir, tmp_path):
    from spokes_lightning.data.corpus import Document
    from spokes_lightning.pipeline.families.quad_reference import QuadReference
    from spokes_lightning.pipeline.families import all_families as families
    from spokes_lightning.pipeline.stage import RunContext

    base = {"seed": 3, "selection": {"methods": ["random", "spokes"], "specs": {
        "random": {"selector": "random"}, "spokes": {"selector": "spokes"}, "quad": {"selector": "quad"}}}}
    fam = QuadReference()
    assert fam.settings(OmegaConf.create(base)) == {}
    assert not fam.enabled(OmegaConf.create(base))
    assert fam.settings(OmegaConf.create({"selection": {"methods": "???", "specs": {}}})) == {}
    assert "quad_reference" in [f.name for f in families()]
    ref = tmp_path / "ref.jsonl"
    texts = [t for _, t in tiny_documents(30, seed=9) if len(t) > 10]
    ref.write_text("".join(json.dumps({"context": t, "continuation": "fox"}) + "\n" for t in texts[:5]))
    specs = {**base["selection"]["specs"], "quad": {"selector": "quad", "reference": str(ref), "kfac_documents": 8},
             "quad_plain": {"selector": "quad", "reference": str(ref), "hessian": "none", "extra": "plain"}}
    cfg = OmegaConf.create({**base, "selection": {"methods": ["quad", "quad_plain"], "specs": specs},
                            "features": {"batch_size": 4, "gradients": {"n_layers": 2, "include_head": True,
                                                                      "projection": "kronecker", "k": 64,
                                                                      "max_length": 24, "dtype": "float32"}}})
    settings = fam.settings(cfg)["quad_reference"]
    assert set(settings) == {"quad_reference", "plain"} and settings["plain"]["hessian"] == "none"
    ctx = RunContext(cfg=cfg, run_dir=tmp_path / "run", results={"proxy": ProxyOutput(model=str(proxy_dir), trained=False)},
                     documents={"pool": [Document(f"d{i}", t, "s") for i, t in enumerate(texts)]})
    out = fam.run(ctx)
    assert out["extras.quad_reference"] == {"array": "features/quad_reference.npy"}
    assert sorted(fam.handed_on(FeaturesOutput.from_json(out))) == ["features/plain.npy", "features/quad_reference.npy"]
    vec = np.load(ctx.run_dir / "features" / "quad_reference.npy")
    assert vec.shape == (64,) and np.isfinite(vec).all()
    m = module_for(proxy_dir, "kronecker", k=64)
    want, _ = kfac.reference_direction(m, [f"{t} fox" for t in texts[:5]], hessian="none")
    np.testing.assert_allclose(np.load(ctx.run_dir / "features" / "plain.npy"), want, rtol=1e-4, atol=1e-6)
    clash = OmegaConf.merge(cfg, {"selection": {"specs": {"quad_plain": {"extra": "quad_reference"}}}})
    with pytest.raises(UserError, match="share extra 'quad_reference'"):
        fam.settings(clash)
    missing = OmegaConf.merge(cfg, {"selection": {"specs": {"quad": {"reference": str(tmp_path / "nope.jsonl")}}}})
    with pytest.raises(UserError, match="Quad reference set not found"):
        fam.run(RunContext(cfg=missing, run_dir=tmp_path / "run2", results=ctx.results, documents=ctx.documents))


def test_shipped_lambada_slice():
    from spokes_lightning.pipeline.families.quad_reference import read_reference
    from spokes_lightning.selectors.quad import DEFAULT_REFERENCE

    texts = read_reference(DEFAULT_REFERENCE, 10_000)
    assert len(texts) == 500 and all(len(t) > 50 for t in texts)
    manifest = json.loads((ROOT / "data/demo/manifest.json").read_text())
    assert manifest["files"]["reference/lambada_openai.jsonl.gz"]["rows"] == 500


# --------------------------------------------------------------------------- the bandit


def synthetic(seed, n_domains=4, per_domain=150, clusters_per_domain=3, k=32):
    """Domains = directions in feature space; embeddings cluster by (domain, sub-cluster)."""
    rng = np.random.default_rng(seed)
    mus = rng.standard_normal((n_domains, k))
    centers = rng.standard_normal((n_domains * clusters_per_domain, 16)) * 4
    domains = np.repeat(np.arange(n_domains), per_domain)
    sub = rng.integers(0, clusters_per_domain, len(domains))
    features = mus[domains] + 1.5 * rng.standard_normal((len(domains), k))
    embeddings = centers[domains * clusters_per_domain + sub] + rng.standard_normal((len(domains), 16))
    reference = (mus[0] + 1.5 * rng.standard_normal((50, k))).mean(0)  # a reference set from domain 0
    return features.astype(np.float32), embeddings.astype(np.float32), reference.astype(np.float32), domains


def quad_inputs(features, embeddings, reference):
    return SelectionInputs(features=features, embeddings=embeddings, extras={"quad_reference": reference})


def test_ucb_scores_favour_under_sampled_clusters():
    cs = cluster_scores(np.array([5.0, 50.0, 0.0]), np.array([10, 100, 0]), alpha=1.0)
    assert cs[2] == np.inf and cs[0] > cs[1]  # same mean 0.5: fewer samples, larger bonus
    assert np.isclose(cs[0], 0.5 + np.sqrt(2 * np.log(110) / 10))
    assert cluster_scores(np.array([5.0, 50.0]), np.array([10, 100]), alpha=0.0).tolist() == [0.5, 0.5]


def test_ucb_visits_every_cluster_and_exploration_spreads_the_visits():
    f, e, u, _ = synthetic(0)
    inputs = quad_inputs(f, e, u)
    explore = get_selector("quad", n_clusters=12, top_clusters=2, gamma=0.05, alpha=10.0, tau=-1.0)
    greedy = get_selector("quad", n_clusters=12, top_clusters=2, gamma=0.05, alpha=0.0, tau=-1.0)
    se, sg = explore.select(inputs, 150, seed=0).stats, greedy.select(inputs, 150, seed=0).stats
    assert se["clusters_visited"] == sg["clusters_visited"] == 12  # UCB's first pull of every arm
    # with a large bonus the least-sampled cluster keeps being revisited; greedily it is starved
    assert min(se["cluster_counts"]) > min(sg["cluster_counts"])
    assert np.std(se["cluster_counts"]) < np.std(sg["cluster_counts"])


@pytest.mark.parametrize("k", [1, 37, 600])
def test_selection_respects_the_budget_and_is_deterministic(k):
    f, e, u, _ = synthetic(1)
    sel = get_selector("quad", n_clusters=10)
    r = sel.select(quad_inputs(f, e, u), k, seed=5)
    assert len(r.indices) == len(set(r.indices.tolist())) == k and r.indices.dtype == np.int64
    assert np.array_equal(r.indices, sel.select(quad_inputs(f, e, u), k, seed=5).indices)
    assert r.stats["evaluations"] == int(np.isfinite(r.scores).sum()) <= len(f)
    if k < 600:
        assert r.stats["evaluations"] < len(f)  # the bandit scores only part of the pool
    passed = r.indices[: len(r.indices) - r.stats["filled_below_tau"]]
    assert (r.scores[passed] > 0.0025).all()


def test_threshold_starvation_fills_by_score_or_fails():
    f, e, u, _ = synthetic(2)
    r = get_selector("quad", n_clusters=8, tau=0.5).select(quad_inputs(f, e, u), 300, seed=0)
    assert len(r.indices) == 300 and r.stats["evaluations"] == len(f)
    n_fill = r.stats["filled_below_tau"]
    above = int((r.scores > 0.5).sum())
    assert n_fill == 300 - above > 0
    fills = r.indices[-n_fill:]
    assert (r.scores[fills] <= 0.5).all() and np.all(np.diff(r.scores[fills]) <= 0)
    rest = np.setdiff1d(np.arange(len(f)), r.indices)
    assert r.scores[rest].max() <= r.scores[fills].min()
    with pytest.raises(UserError, match="only .* of 300 documents score above tau=0.5"):
        get_selector("quad", n_clusters=8, tau=0.5, fill=False).select(quad_inputs(f, e, u), 300, seed=0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_one_domain_reference_pulls_that_domain(seed):
    f, e, u, domains = synthetic(10 + seed)
    k = 120
    picked = get_selector("quad", n_clusters=12).select(quad_inputs(f, e, u), k, seed=seed).indices
    rand = get_selector("random").select(SelectionInputs(features=f), k, seed=seed).indices
    share, random_share = np.mean(domains[picked] == 0), np.mean(domains[rand] == 0)
    assert share > random_share + 0.3 and share > 0.6


def test_missing_or_malformed_reference_is_one_line():
    f, e, u, _ = synthetic(3)
    sel = get_selector("quad")
    with pytest.raises(UserError, match=r"^method 'quad' needs extras.quad_reference: .*--extra quad_reference=FILE"):
        sel.select(SelectionInputs(features=f, embeddings=e), 10)
    with pytest.raises(UserError, match="must be a vector of 32 numbers"):
        sel.select(quad_inputs(f, e, u[:5]), 10)
    with pytest.raises(UserError, match="needs embeddings"):
        sel.select(SelectionInputs(features=f, extras={"quad_reference": u}), 10)


def test_cli_select_with_extra(tmp_path):
    f, e, u, domains = synthetic(4)
    for name, arr in (("f", f), ("e", e), ("u", u)):
        np.save(tmp_path / f"{name}.npy", arr)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "spokes_lightning", "select", "--method", "quad",
                               "--features", tmp_path / "f.npy", "--embeddings", tmp_path / "e.npy", "--budget", "40",
                               *args], capture_output=True, text=True, timeout=120)

    r = cli("--extra", f"quad_reference={tmp_path / 'u.npy'}", "--param", "n_clusters=12", "--out", tmp_path / "s.npy")
    assert r.returncode == 0, r.stderr
    picked = np.load(tmp_path / "s.npy")
    want = get_selector("quad", n_clusters=12).select(quad_inputs(f, e, u), 40, seed=0).indices
    assert np.array_equal(picked, want)
    for args, line in (((), "error: method 'quad' needs extras: "),  # no extra at all: the pool's line
                       (("--extra", f"other={tmp_path / 'u.npy'}"), "error: method 'quad' needs extras.quad_reference: ")):
        r = cli(*args, "--out", tmp_path / "t.npy")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(line)
        assert not (tmp_path / "t.npy").exists()
