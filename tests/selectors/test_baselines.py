"""Random and quality baselines: seeded reproducibility, exact top-k with ties, threshold mode."""
from __future__ import annotations

import numpy as np
import pytest

from spokes_lightning.utils.errors import UserError
from spokes_lightning.selectors import SelectionInputs, get_selector


def test_random_is_reproducible_by_seed():
    inputs = SelectionInputs(ids=[str(i) for i in range(1000)])
    a = get_selector("random").select(inputs, 100, seed=3).indices
    b = get_selector("random").select(inputs, 100, seed=3).indices
    c = get_selector("random").select(inputs, 100, seed=4).indices
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(np.unique(a)) == 100 and a.min() >= 0 and a.max() < 1000


def test_quality_top_k_exact_with_ties():
    q = np.array([0.5, 0.9, 0.7, 0.9, 0.7, 0.1, 0.7])
    result = get_selector("quality").select(SelectionInputs(quality=q), 4, seed=0)
    # 0.9 (rows 1, 3), then the 0.7 ties broken toward the lower index (rows 2, 4; not 6)
    assert result.indices.tolist() == [1, 3, 2, 4]


def test_quality_threshold_mode():
    q = np.array([3.5, 1.0, 3.0625, 2.9, 4.0])
    result = get_selector("quality", threshold=3.0625).select(SelectionInputs(quality=q), 1, 0)
    assert result.indices.tolist() == [4, 0, 2]
    with pytest.raises(UserError):
        get_selector("quality", threshold=5).select(SelectionInputs(quality=q), 1, 0)
