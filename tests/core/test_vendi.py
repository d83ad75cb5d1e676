"""G-Vendi from the d x d Gram equals the n x n kernel definition (paper eq. 1 and 6)."""
import numpy as np
import pytest

from spokes_lightning import UserError, batch_vendi_score, vendi_score
from spokes_lightning.core.vendi import ExactGramSum, gram_matrix, vendi_score_kernel


@pytest.mark.parametrize("n,d", [(40, 96), (300, 24)])  # N < d and N > d
@pytest.mark.parametrize("weighted", [False, True])
def test_gram_route_matches_kernel_definition(n, d, weighted):
    rng = np.random.default_rng(n + d)
    x = rng.standard_normal((n, d)) + 0.3 * rng.standard_normal(d)  # shared direction: uneven spectrum
    w = rng.random(n) if weighted else None
    got = vendi_score(x, w, chunk_rows=17)
    want = vendi_score_kernel(x, w)
    assert got == pytest.approx(want, rel=1e-6)
    assert 1.0 <= got <= min(n, d) + 1e-9


def test_vendi_extremes():
    x = np.tile(np.arange(1.0, 9.0), (50, 1))
    assert vendi_score(x) == pytest.approx(1.0)
    assert vendi_score(np.eye(16) * 3.0) == pytest.approx(16.0)


def test_memmap_streaming_same_as_in_memory(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 32)).astype(np.float16)
    np.save(tmp_path / "f.npy", x)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    assert isinstance(mm, np.memmap)
    assert vendi_score(mm, chunk_rows=64) == pytest.approx(vendi_score(x.astype(np.float64)), rel=1e-12)


def test_gram_sum_is_order_and_chunking_independent():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((999, 20))
    w = rng.random(999)
    w /= w.sum()
    # different chunk sizes change per-chunk rounding only at the 1e-15 level...
    a, _ = gram_matrix(x, w, chunk_rows=64, total_weight=1.0)
    b, _ = gram_matrix(x, w, chunk_rows=1000, total_weight=1.0)
    assert np.allclose(a, b, rtol=0, atol=1e-14)
    # ...and the fixed-point accumulator makes the SUM of given parts exactly order-independent
    parts = [rng.standard_normal((5, 5)) * 1e-3 for _ in range(20)]
    s1, s2 = ExactGramSum(5, 1.0), ExactGramSum(5, 1.0)
    for p in parts:
        s1.add(p)
    for p in reversed(parts):
        s2.add(p)
    assert np.array_equal(s1.value(), s2.value())


def test_zero_rows_error_names_them_or_are_dropped():
    x = np.ones((6, 4))
    x[[2, 5]] = 0.0
    with pytest.raises(UserError, match=r"rows 2, 5"):
        vendi_score(x)
    with pytest.warns(UserWarning, match="dropped 2"):
        assert vendi_score(x, drop_zero_rows=True) == pytest.approx(1.0)


def test_nan_rows_are_named():
    x = np.ones((10, 3))
    x[7, 1] = np.nan
    with pytest.raises(UserError, match="first bad row: 7"):
        vendi_score(x)


def test_batch_vendi_is_mean_of_batches():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 16))
    got = batch_vendi_score(x, batch_size=20, batches=5, seed=3)
    rng2 = np.random.default_rng(3)
    want = np.mean([vendi_score(x[np.sort(rng2.choice(200, 20, replace=False))]) for _ in range(5)])
    assert got == pytest.approx(want)
    assert got < vendi_score(x)  # small batches see fewer directions
    with pytest.raises(UserError):
        batch_vendi_score(x, batch_size=500, batches=2)
