"""Rademacher projections: eq. 4 done in blocks, and the Kronecker (LoGra-style) layer sketch."""
import math

import pytest
import torch
from torch import nn

from spokes_lightning.features.projection import (
    DenseRademacherProjector,
    KroneckerLayerSketch,
    kronecker_side,
    rademacher,
    stream_seed,
)

torch.set_num_threads(1)


def test_rademacher_is_a_pure_function_of_seed_name_block():
    a = rademacher(3, "w", 0, 16, 37)
    assert a.shape == (16, 37) and set(a.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(a, rademacher(3, "w", 0, 16, 37))
    assert not torch.equal(a, rademacher(4, "w", 0, 16, 37))
    assert not torch.equal(a, rademacher(3, "v", 0, 16, 37))
    assert not torch.equal(a, rademacher(3, "w", 1, 16, 37))
    assert stream_seed(3, "w", 0) == stream_seed(3, "w", 0) != stream_seed(3, "w", 1)
    big = rademacher(0, "w", 0, 64, 4096)
    assert abs(big.mean().item()) < 0.02  # balanced signs


def _naive_r(k, pieces, seed, block_cols):
    cols = []
    for name, size in pieces.items():
        for j in range(math.ceil(size / block_cols)):
            width = min(block_cols, size - j * block_cols)
            cols.append(rademacher(seed, name, j, k, block_cols)[:, :width])
    return torch.cat(cols, dim=1)


def test_dense_projection_is_eq4_on_the_whole_gradient():
    pieces = {"a.weight": 50, "b.weight": 23}
    proj = DenseRademacherProjector(k=12, pieces=pieces, seed=7, block_cols=16)
    g = {n: torch.randn(3, s, dtype=torch.float64).float() for n, s in pieces.items()}
    r = _naive_r(12, pieces, 7, 16)
    assert r.shape == (12, 73)
    flat = torch.cat([g["a.weight"], g["b.weight"]], dim=1)
    expected = flat @ r.T / math.sqrt(12)
    torch.testing.assert_close(proj.project(g), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj.materialize(), r)


def test_blocks_give_the_same_r_in_any_order():
    proj = DenseRademacherProjector(k=8, pieces={"w": 100}, seed=1, block_cols=16)
    g = torch.randn(2, 100)
    full = proj.project_piece("w", g)
    n_blocks = len(list(proj.blocks("w")))
    parts = sum(proj.project_piece("w", g, blocks=[j]) for j in reversed(range(n_blocks)))
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)
    other = DenseRademacherProjector(k=8, pieces={"w": 100}, seed=2, block_cols=16)
    assert torch.equal(proj.materialize(), DenseRademacherProjector(8, {"w": 100}, 1, 16).materialize())
    assert not torch.equal(proj.materialize(), other.materialize())


def test_dense_projection_preserves_inner_products_approximately():
    torch.manual_seed(0)
    g = torch.randn(6, 3000)
    z = DenseRademacherProjector(k=2048, pieces={"g": 3000}, seed=0, block_cols=1000).project({"g": g})
    exact = g @ g.T
    approx = z @ z.T
    assert torch.allclose(approx.diagonal(), exact.diagonal(), rtol=0.1)
    assert (approx - exact).abs().max() < 0.1 * exact.diagonal().mean()


def _per_doc_grads(lin, x, mask):
    """True per-document dW of loss_i = sum_t mask * <c_t, y_t>^2 (autograd, one doc at a time)."""
    grads = []
    for i in range(x.shape[0]):
        lin.zero_grad()
        y = lin(x[i : i + 1])
        loss = ((y * torch.linspace(-1, 1, y.shape[-1])).sum(-1) ** 2 * mask[i : i + 1]).sum()
        loss.backward()
        grads.append(lin.weight.grad.clone())
    return torch.stack(grads)


def test_kronecker_block_equals_kron_product_times_true_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(10, 7, bias=False)
    x = torch.randn(3, 5, 10)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    sketch = KroneckerLayerSketch("layer", 10, 7, side=4, seed=0)
    xr = x.clone().requires_grad_(False)
    y = lin(xr)
    loss = ((y * torch.linspace(-1, 1, 7)).sum(-1) ** 2 * mask).sum()
    (delta,) = torch.autograd.grad(loss, y)
    block = sketch.block(sketch.project_inputs(x, mask), delta)
    true = _per_doc_grads(lin, x, mask)  # [b, out, in]
    expected = true.reshape(3, -1) @ sketch.dense_equivalent().T
    torch.testing.assert_close(block, expected, rtol=1e-4, atol=1e-5)


def test_kronecker_padding_tokens_change_nothing():
    torch.manual_seed(1)
    sketch = KroneckerLayerSketch("layer", 6, 5, side=3, seed=2)
    x, delta = torch.randn(1, 4, 6), torch.randn(1, 4, 5)
    alone = sketch.block(sketch.project_inputs(x, None), delta)
    x_pad = torch.cat([x, 100 * torch.randn(1, 3, 6)], dim=1)  # garbage inputs at padding
    d_pad = torch.cat([delta, torch.randn(1, 3, 5)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    padded = sketch.block(sketch.project_inputs(x_pad, mask), d_pad)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_kronecker_side_oversamples_k():
    assert kronecker_side(1024) == 128 and kronecker_side(1000) == 128 and kronecker_side(1) == 4
    assert all(kronecker_side(k) ** 2 >= 16 * k for k in range(1, 300))


def test_kronecker_narrow_side_is_kept_exact():
    torch.manual_seed(3)
    lin = nn.Linear(10, 7, bias=False)
    x = torch.randn(2, 4, 10)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
    sketch = KroneckerLayerSketch("layer", 10, 7, side=8, seed=0)  # out (7) exact, in (10) sketched
    assert torch.equal(sketch.r_out, torch.eye(7)) and sketch.r_in.shape == (8, 10)
    assert sketch.width == 7 * 8
    y = lin(x)
    loss = ((y * torch.linspace(-1, 1, 7)).sum(-1) ** 2 * mask).sum()
    (delta,) = torch.autograd.grad(loss, y)
    block = sketch.block(sketch.project_inputs(x, mask), delta)
    true = _per_doc_grads(lin, x, mask)  # [b, out, in]
    torch.testing.assert_close(block.reshape(2, 7, 8), true @ sketch.r_in.T, rtol=1e-4, atol=1e-5)


def test_bad_k_rejected():
    with pytest.raises(ValueError):
        DenseRademacherProjector(k=0, pieces={"w": 3})
