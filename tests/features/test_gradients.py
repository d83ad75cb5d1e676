"""ProxyGradients on a tiny random-init Llama: selected params, eq. 4, batch independence."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from tiny_proxy import build_tiny_proxy, tiny_documents  # noqa: E402

from spokes_lightning.utils.errors import UserError  # noqa: E402
from spokes_lightning.features.gradients import ProxyGradients  # noqa: E402
from spokes_lightning.features.projection import DenseRademacherProjector  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory):
    return build_tiny_proxy(tmp_path_factory.mktemp("proxy"), layers=4)


@pytest.fixture(scope="module")
def docs():
    return tiny_documents(16)


def make(proxy_dir, **kw):
    kw.setdefault("k", 64)
    kw.setdefault("max_length", 32)
    return ProxyGradients(str(proxy_dir), **kw)


def _params_with_grad(module, docs):
    kept, toks, _ = module.tokenize([i for i, _ in docs[:4]], [t for _, t in docs[:4]])
    module.document_losses(*module.pad(toks)).sum().backward()
    return {n for n, p in module.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_only_last_n_layers_and_head_get_gradients(proxy_dir, docs):
    m = make(proxy_dir, n_layers=2)
    got = _params_with_grad(m, docs)
    assert any(".layers.3." in n for n in got) and any(".layers.2." in n for n in got)
    assert not any(".layers.0." in n or ".layers.1." in n for n in got)
    assert "model.embed_tokens.weight" in got  # tied head
    assert {n for n, p in m.model.named_parameters() if p.requires_grad} == got
    no_head = make(proxy_dir, n_layers=1, include_head=False)
    got = _params_with_grad(no_head, docs)
    assert got and all(".layers.3." in n for n in got)
    assert no_head.n_selected_parameters < m.n_selected_parameters


def test_dense_rows_are_eq4_on_the_true_per_document_gradient(proxy_dir, docs):
    m = make(proxy_dir, projection="dense", dense_block_cols=4096)
    out = m.rows_for(["a", "b"], [docs[0][1], docs[1][1]])
    names = list(m.grad_params)
    flats = []
    for text in (docs[0][1], docs[1][1]):
        _, toks, _ = m.tokenize(["x"], [text])
        m.model.zero_grad()
        m.document_losses(*m.pad(toks)).sum().backward()
        flats.append(torch.cat([m.grad_params[n].grad.reshape(-1) for n in names]))
    g = torch.stack(flats)
    r = DenseRademacherProjector(64, {n: m.grad_params[n].numel() for n in names}, 0, 4096).materialize()
    torch.testing.assert_close(out["rows"], g @ r.T / math.sqrt(64), rtol=1e-3, atol=1e-4)


def test_kronecker_kernel_tracks_the_true_gradient_kernel(proxy_dir, docs):
    """Cosine similarities of kronecker rows follow the exact gradient cosines (same params)."""
    m = make(proxy_dir, k=1024)
    ids, texts = [i for i, _ in docs], [t for _, t in docs]
    out = m.rows_for(ids, texts)
    linear_params = [dict(m.model.named_modules())[n].weight for n in m.linear_names]
    flats = []
    for text in [texts[ids.index(i)] for i in out["ids"]]:
        _, toks, _ = m.tokenize(["x"], [text])
        grads = torch.autograd.grad(m.document_losses(*m.pad(toks)).sum(), linear_params)
        flats.append(torch.cat([g.reshape(-1) for g in grads]))
    g = torch.nn.functional.normalize(torch.stack(flats), dim=1)
    z = torch.nn.functional.normalize(out["rows"], dim=1)
    iu = np.triu_indices(len(g), 1)
    exact, sketch = (g @ g.T).numpy()[iu], (z @ z.T).numpy()[iu]
    assert np.corrcoef(exact, sketch)[0, 1] > 0.9
    assert np.abs(exact - sketch).mean() < 0.1


@pytest.mark.parametrize("projection", ["kronecker", "dense"])
def test_rows_do_not_depend_on_batch_mates(proxy_dir, docs, projection):
    m = make(proxy_dir, projection=projection)
    target = docs[0]
    short = [d for d in docs if 0 < len(d[1]) < len(target[1])][:2]
    long = sorted(docs, key=lambda d: -len(d[1]))[:3]
    a = m.rows_for([target[0]] + [i for i, _ in short], [target[1]] + [t for _, t in short])
    b = m.rows_for([i for i, _ in long] + [target[0]], [t for _, t in long] + [target[1]])
    row_a, row_b = a["rows"][0], b["rows"][b["ids"].index(target[0])]
    assert max(len(t) for _, t in long) > len(target[1])  # target really is padded in batch b
    torch.testing.assert_close(row_a, row_b, rtol=1e-4, atol=1e-5)


def test_skipped_documents_are_recorded(proxy_dir):
    m = make(proxy_dir)
    class Eos:  # the same tokenizer, with or without an EOS token
        def __init__(self, inner, eos):
            self.inner, self.eos_token_id = inner, eos

        def __call__(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    raw = m.tokenizer
    assert len(raw("a")["input_ids"]) == 1
    m.tokenizer = Eos(raw, 1)
    out = m.rows_for(["e", "one", "ok"], ["", "a", "data model gradient token layer"])
    # a one-token document predicts EOS, as it would in pretraining: it gets a row of its own
    assert out["ids"] == ["one", "ok"] and out["rows"].shape == (2, 64) and out["skipped"] == {"e": "empty text"}
    assert torch.isfinite(out["rows"]).all() and out["rows"][0].abs().sum() > 0
    none = m.rows_for(["e"], ["   "])
    assert none["rows"] is None and none["skipped"] == {"e": "empty text"}

    m.tokenizer = Eos(raw, None)  # no EOS: a one-token document has no target and is reported
    out = m.rows_for(["one", "ok"], ["a", "data model gradient token layer"])
    assert out["ids"] == ["ok"] and "fewer than 2 tokens (1)" in out["skipped"]["one"]


def test_seed_determines_rows(proxy_dir, docs):
    ids, texts = [i for i, _ in docs[:4]], [t for _, t in docs[:4]]
    a = make(proxy_dir, seed=1).rows_for(ids, texts)["rows"]
    b = make(proxy_dir, seed=1).rows_for(ids, texts)["rows"]
    c = make(proxy_dir, seed=2).rows_for(ids, texts)["rows"]
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("projection", ["kronecker", "dense"])
def test_extra_seeds_share_one_backward_and_equal_separate_runs(proxy_dir, docs, projection):
    ids, texts = [i for i, _ in docs[:4]], [t for _, t in docs[:4]]
    both = make(proxy_dir, seed=1, extra_seeds=[7], projection=projection)
    assert both.feature_dim == 128 and both.manifest()["extra_seeds"] == [7]
    rows = both.rows_for(ids, texts)["rows"]
    first = make(proxy_dir, seed=1, projection=projection).rows_for(ids, texts)["rows"]
    second = make(proxy_dir, seed=7, projection=projection).rows_for(ids, texts)["rows"]
    assert rows.shape == (first.shape[0], 128)
    torch.testing.assert_close(rows[:, :64], first, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rows[:, 64:], second, rtol=1e-4, atol=1e-6)
    with pytest.raises(UserError, match="seeds must differ"):
        make(proxy_dir, seed=1, extra_seeds=[1])


def test_fused_head_gives_the_rows_of_the_unfused_head(proxy_dir, docs):
    ids, texts = [i for i, _ in docs[:6]], [t for _, t in docs[:6]]
    fused = make(proxy_dir, seed=3)
    plain = make(proxy_dir, seed=3, fused_head=False)
    rows_fused, rows_plain = fused.rows_for(ids, texts)["rows"], plain.rows_for(ids, texts)["rows"]
    assert fused._fused and fused.head_name == "lm_head" and not plain._fused
    assert fused.manifest()["fused_head"] and not plain.manifest()["fused_head"]
    torch.testing.assert_close(rows_fused, rows_plain, rtol=1e-3, atol=1e-5)
    # the head's share of the row is real: dropping the head changes the rows
    no_head = make(proxy_dir, seed=3, include_head=False).rows_for(ids, texts)["rows"]
    assert not torch.allclose(no_head, rows_fused, rtol=1e-2, atol=1e-3)


def test_fused_head_cross_entropy_matches_autograd():
    from spokes_lightning.features.fused_head import IGNORE, HeadCrossEntropy

    torch.manual_seed(0)
    hidden = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 6, dtype=torch.float64)
    targets = torch.randint(0, 40, (10,))
    targets[[3, 9]] = IGNORE
    w = torch.rand(10, dtype=torch.float64)
    r_out = torch.randn(5, 40, dtype=torch.float64)
    sink = {}
    out = HeadCrossEntropy.apply(hidden, weight, targets, w, {"a": r_out}, sink, 3)
    (out * torch.arange(10)).sum().backward()
    ref_h = hidden.detach().clone().requires_grad_(True)
    logits = (ref_h @ weight.T).requires_grad_(True)
    logits.retain_grad()
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE)
    ref = ce * w
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    (ref * torch.arange(10)).sum().backward()
    torch.testing.assert_close(hidden.grad, ref_h.grad)
    torch.testing.assert_close(sink["a"].double(), logits.grad @ r_out.T, rtol=1e-5, atol=1e-6)


def test_bad_input_is_one_line_user_error(proxy_dir, tmp_path):
    cases = [
        (dict(model=str(tmp_path / "missing")), "does not exist"),
        (dict(model=str(proxy_dir), k=0), "k must be positive"),
        (dict(model=str(proxy_dir), n_layers=5), "has 4 decoder layers"),
        (dict(model=str(proxy_dir), projection="sparse"), "unknown projection"),
        (dict(model="nonexistent-org/no-such-model"), "unreachable"),
    ]
    for kwargs, text in cases:
        with pytest.raises(UserError, match=text) as info:
            ProxyGradients(**kwargs)
        assert "\n" not in str(info.value)
