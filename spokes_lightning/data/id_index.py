"""Document ids -> rows of a document store, in 16 bytes per document (no Python dict of ids).

Ids are hashed to 64 bits (BLAKE2b) and sorted once; a look-up is a binary search. Two ids of
the pool with the same hash (about one chance in 10^3 at 173M documents) are kept apart in a
small dict, so every id of the pool is found at its own row. An id that is NOT in the pool
can still meet a pool id's hash (about m n / 2^64 for m look-ups): callers that read the
row anyway compare its id (:func:`spokes_lightning.pipeline.data_stages.documents_by_ids`).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from spokes_lightning.data.ingest import id_hash

MISSING = -1


def hash_ids(ids: Iterable[str]) -> np.ndarray:
    return np.fromiter((id_hash(str(i)) for i in ids), dtype=np.uint64)


class IdIndex:
    """Rows of documents by id, from their 64-bit hashes (row order = the hashes' order)."""

    def __init__(self, hashes: np.ndarray, id_of_row: Callable[[int], str]):
        self.n = len(hashes)
        self.order = np.argsort(hashes, kind="stable")
        self.sorted = hashes[self.order]
        equal = np.flatnonzero(self.sorted[1:] == self.sorted[:-1])
        self.collisions = {id_of_row(int(self.order[j])): int(self.order[j]) for i in equal for j in (i, i + 1)}
        self._colliding = set(self.sorted[equal].tolist())

    @classmethod
    def of_ids(cls, ids: Sequence[str]) -> "IdIndex":
        return cls(hash_ids(ids), lambda row: str(ids[row]))

    @classmethod
    def of_store(cls, store, block: int = 65536) -> "IdIndex":
        """Of a document store's id column, read block by block (only the hashes are kept)."""
        parts = [hash_ids(store.column_array("id", s, s + block)) for s in range(0, len(store), block)]
        hashes = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
        return cls(hashes, lambda row: store.column_array("id", row, row + 1)[0])

    def rows(self, ids: Sequence[str], missing_ok: bool = True) -> np.ndarray:
        """Row of each id: ``MISSING`` (-1) where absent, or KeyError when ``missing_ok`` is False."""
        wanted = hash_ids(ids)
        rows = np.full(len(wanted), MISSING, dtype=np.int64)
        if self.n:
            where = np.minimum(np.searchsorted(self.sorted, wanted), self.n - 1)
            found = self.sorted[where] == wanted
            rows[found] = self.order[where[found]]
        if self._colliding:
            for k, h in enumerate(wanted.tolist()):
                if h in self._colliding:
                    rows[k] = self.collisions.get(str(ids[k]), MISSING)
        if not missing_ok and (rows == MISSING).any():
            raise KeyError(str(ids[int(np.flatnonzero(rows == MISSING)[0])]))
        return rows
