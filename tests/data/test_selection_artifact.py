"""Selection artifacts: round trip, hashes, atomic manifest-last layout, unknown ids."""
from __future__ import annotations

import json

import numpy as np
import pytest

from spokes_lightning.utils.errors import UserError
from spokes_lightning.data.selection_artifact import (
    array_sha256,
    file_sha256,
    read_selection,
    write_selection,
)
from spokes_lightning.selectors import SelectionResult


def _result():
    scores = np.array([0.1, 0.9, 0.5, 0.7])
    return SelectionResult(indices=np.array([1, 3, 2]), scores=scores, stats={"x": np.float32(2.5)})


def test_round_trip(tmp_path):
    ids = ["a", "b", "c", "d"]
    features = tmp_path / "f.npy"
    np.save(features, np.arange(8.0).reshape(4, 2))
    path = write_selection(tmp_path / "sel", "quality", _result(), ids, {"threshold": None}, 7,
                           {"quality": file_sha256(features)}, tokens_selected=123)
    assert path == tmp_path / "sel" / "quality"
    sel = read_selection(path, corpus_ids=ids)
    assert sel.method == "quality"
    assert sel.ids == ["b", "d", "c"]
    assert sel.indices.dtype == np.int64 and sel.indices.tolist() == [1, 3, 2]
    np.testing.assert_array_equal(sel.scores, _result().scores)
    m = sel.manifest
    assert (m["n_pool"], m["n_selected"], m["seed"], m["tokens_selected"]) == (4, 3, 7, 123)
    assert m["stats"] == {"x": 2.5}
    assert m["input_hashes"]["quality"] == file_sha256(features)
    assert "created" in m
    assert not list(path.glob(".tmp-*"))


def test_unknown_ids_and_missing_manifest(tmp_path):
    path = write_selection(tmp_path, "random", _result(), ["a", "b", "c", "d"], {}, 0, {})
    with pytest.raises(UserError, match="not in the corpus"):
        read_selection(path, corpus_ids=["a", "b", "c"])
    (path / "manifest.json").unlink()
    with pytest.raises(UserError, match="no finished selection"):
        read_selection(path)


def test_rewrite_without_scores_removes_old_scores(tmp_path):
    ids = ["a", "b", "c", "d"]
    write_selection(tmp_path, "m", _result(), ids, {}, 0, {})
    path = write_selection(tmp_path, "m", SelectionResult(indices=np.array([0])), ids, {}, 0, {})
    sel = read_selection(path)
    assert sel.scores is None and sel.ids == ["a"]
    assert np.load(path / "ids.npy").tolist() == [b"a"] and not (path / "ids.json").exists()


def test_selections_of_older_versions_with_ids_json_still_read(tmp_path):
    path = write_selection(tmp_path, "m", _result(), ["a", "b", "c", "d"], {}, 0, {})
    ids = read_selection(path).ids
    (path / "ids.npy").unlink()
    (path / "ids.json").write_text(json.dumps(ids))
    assert read_selection(path).ids == ids


def test_bad_indices_are_refused(tmp_path):
    with pytest.raises(ValueError):
        write_selection(tmp_path, "m", SelectionResult(indices=np.array([0, 9])), ["a"], {}, 0, {})
    with pytest.raises(ValueError):
        write_selection(tmp_path, "m", SelectionResult(indices=np.array([0, 0])), ["a", "b"],
                        {}, 0, {})
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_hashes(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    p = tmp_path / "a.npy"
    np.save(p, a)
    mm = np.load(p, mmap_mode="r")
    assert array_sha256(a) == array_sha256(mm)
    assert array_sha256(a) != array_sha256(a.astype(np.float64))
    assert array_sha256(a) != array_sha256(a.reshape(4, 3))
    b = a.copy()
    b[2, 3] += 1
    assert array_sha256(a) != array_sha256(b)
    q = tmp_path / "b.npy"
    np.save(q, b)
    assert file_sha256(p) != file_sha256(q) and len(file_sha256(p)) == 64
