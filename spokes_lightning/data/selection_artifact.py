"""Selection artifacts: what a selector chose, written atomically, readable by training.

Layout of ``<out_dir>/<method>/``::

    indices.npy       int64 row indices into the pool, in the selector's order (best first), unique
    ids.npy           the selected document ids, same order (fixed-width UTF-8 bytes, dtype S<n>,
                      as a feature store's ids.npy; selections of older versions hold ids.json)
    multiplicity.npy  int64 copies of each selected document (1 for most methods), same order
    weights.npy       per-selected-document weights (only if the selector gives any), same order
    scores.npy        per-pool-document scores (only if the selector gives any)
    manifest.json     method, params, seed, input hashes, counts, copies, tokens, stats, time

Training (SelectedDataModule, the Megatron export, the token accounting) takes document
``ids[i]`` ``multiplicity[i]`` times.

Every file is written through a temp file + rename, and ``manifest.json`` is written last
(after removing a stale one), so a directory with a manifest is always a complete selection.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from spokes_lightning.utils.atomic import save_npy_atomic, write_json_atomic
from spokes_lightning.data.id_arrays import decode_ids, encode_ids
from spokes_lightning.utils.errors import UserError

MANIFEST = "manifest.json"
IDS, LEGACY_IDS = "ids.npy", "ids.json"
_HASH_ROWS = 65_536


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """Hex sha256 of an array's dtype, shape and C-order bytes (streams memmaps by rows)."""
    a = array if isinstance(array, np.ndarray) else np.asarray(array)
    h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
    if a.ndim == 0:
        h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()
    for start in range(0, a.shape[0], _HASH_ROWS):
        h.update(np.ascontiguousarray(a[start : start + _HASH_ROWS]).tobytes())
    return h.hexdigest()


@dataclass
class Selection:
    """A selection read back from disk."""

    path: Path
    method: str
    indices: np.ndarray
    ids: list[str]
    scores: np.ndarray | None
    manifest: dict[str, Any]
    multiplicity: np.ndarray | None = None  # copies per selected document (None: one each)
    weights: np.ndarray | None = None

    def copies(self) -> np.ndarray:
        """int64 copies of each selected document (ones when the artifact has none)."""
        if self.multiplicity is None:
            return np.ones(len(self.indices), dtype=np.int64)
        return self.multiplicity

    def id_counts(self) -> dict[str, int]:
        """``{document id: copies}`` in selection order."""
        return dict(zip(self.ids, self.copies().tolist()))


def write_selection(
    out_dir: str | Path,
    method: str,
    result,
    ids: list[str],
    params: dict[str, Any],
    seed: int,
    input_hashes: dict[str, str],
    tokens_selected: int | None = None,
) -> Path:
    """Write ``result`` (a SelectionResult over the pool ``ids``) to ``<out_dir>/<method>/``."""
    indices = np.asarray(result.indices, dtype=np.int64)
    n_pool = len(ids)
    if indices.ndim != 1 or (len(indices) and (indices.min() < 0 or indices.max() >= n_pool)):
        raise ValueError(f"{method}: selection indices out of range for a pool of {n_pool}")
    if len(np.unique(indices)) != len(indices):
        raise ValueError(f"{method}: selection indices contain duplicates (use multiplicity for copies)")
    copies = check_multiplicity(method, result, len(indices))
    weights = getattr(result, "weights", None)
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != indices.shape or not np.isfinite(weights).all():
            raise ValueError(f"{method}: weights must be finite and one per selected document")
    target = Path(out_dir) / method
    target.mkdir(parents=True, exist_ok=True)
    stale = target / MANIFEST
    if stale.exists():
        stale.unlink()
    save_npy_atomic(target / "indices.npy", indices)
    save_npy_atomic(target / IDS, encode_ids(ids[i] for i in indices))
    (target / LEGACY_IDS).unlink(missing_ok=True)
    save_npy_atomic(target / "multiplicity.npy", copies)
    for name, values in (("scores.npy", result.scores), ("weights.npy", weights)):
        if values is not None:
            save_npy_atomic(target / name, np.asarray(values))
        elif (target / name).exists():
            (target / name).unlink()
    manifest = {
        "method": method,
        "params": _jsonable(params),
        "seed": int(seed),
        "input_hashes": dict(input_hashes),
        "n_pool": n_pool,
        "n_selected": int(len(indices)),
        "n_copies": int(copies.sum()),
        "tokens_selected": None if tokens_selected is None else int(tokens_selected),
        "stats": _jsonable(result.stats),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(target / MANIFEST, manifest)
    return target


def read_selection(path: str | Path, corpus_ids: Iterable[str] | None = None) -> Selection:
    """Read a selection directory; with ``corpus_ids``, every selected id must be in it."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise UserError(f"no finished selection at {path} (missing {MANIFEST})")
    manifest = json.loads((path / MANIFEST).read_text())
    indices = np.load(path / "indices.npy")
    if (path / IDS).exists():
        ids = decode_ids(np.load(path / IDS))
    else:  # written by an older version
        ids = json.loads((path / LEGACY_IDS).read_text())
    if len(ids) != len(indices) or len(ids) != manifest.get("n_selected", len(ids)):
        raise UserError(f"selection at {path} is inconsistent: {len(ids)} ids, "
                        f"{len(indices)} indices, manifest says {manifest.get('n_selected')}")
    scores = np.load(path / "scores.npy") if (path / "scores.npy").exists() else None
    multiplicity = np.load(path / "multiplicity.npy") if (path / "multiplicity.npy").exists() else None
    if multiplicity is not None and (multiplicity.shape != indices.shape or (multiplicity < 1).any()):
        raise UserError(f"selection at {path} has a multiplicity.npy that does not match its indices")
    weights = np.load(path / "weights.npy") if (path / "weights.npy").exists() else None
    if corpus_ids is not None:
        known = set(corpus_ids)
        missing = [i for i in ids if i not in known]
        if missing:
            raise UserError(f"selection at {path} names {len(missing)} id(s) not in the corpus, "
                            f"e.g. {missing[0]!r}")
    return Selection(path=path, method=manifest.get("method", path.name), indices=indices,
                     ids=ids, scores=scores, manifest=manifest, multiplicity=multiplicity, weights=weights)


def check_multiplicity(method: str, result, n_selected: int) -> np.ndarray:
    """The result's copies per selected row as int64 >= 1 (ones when it gives none)."""
    multiplicity = getattr(result, "multiplicity", None)
    if multiplicity is None:
        return np.ones(n_selected, dtype=np.int64)
    m = np.asarray(multiplicity)
    if m.shape != (n_selected,) or m.dtype.kind not in "iu" or (m < 1).any():
        raise ValueError(f"{method}: multiplicity must be integers >= 1, one per selected document")
    return m.astype(np.int64)


def _jsonable(obj):
    """Round-trip through JSON so numpy scalars / arrays become plain values."""
    from spokes_lightning.utils.atomic import json_default

    return json.loads(json.dumps(obj, default=json_default))
