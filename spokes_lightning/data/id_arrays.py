"""Document ids as numpy arrays of fixed-width UTF-8 bytes (dtype ``S<n>``), as in a store's ``ids.npy``.

Why this form: an ``.npy`` of ``S<n>`` memory-maps (nothing to parse, unlike a JSON list of
173M strings), sorts and compares inside numpy (``np.sort``, ``searchsorted``) and gives back
the exact strings. ``n`` is the longest id's UTF-8 length. numpy drops trailing NUL bytes of
``S`` items, so an id ending in NUL cannot be stored: :func:`encode_ids` refuses it.
"""
from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence
from typing import Callable, Iterable, Iterator

import numpy as np

from spokes_lightning.utils.atomic import atomic_path
from spokes_lightning.utils.errors import UserError

#: ids handled at once by the streaming helpers
BLOCK = 1 << 20


def encode_ids(ids: Iterable) -> np.ndarray:
    """``ids`` (str, or anything ``str()`` turns into one) as an ``S<n>`` array."""
    raw = [str(i).encode("utf-8") for i in ids]
    bad = next((b for b in raw if b.endswith(b"\0")), None)
    if bad is not None:
        raise UserError(f"document id {bad.decode('utf-8', 'replace')!r} ends with a NUL character")
    return np.array(raw, dtype=f"S{max([1, *map(len, raw)])}")


def as_id_array(values: np.ndarray) -> np.ndarray:
    """A block of ids read from a user's ``.npy`` (bytes, str or integers) as ``S<n>``."""
    values = np.asarray(values)
    if values.dtype.kind == "S":
        return values
    if values.dtype.kind in "iuU":
        return encode_ids(values.tolist())
    raise UserError(f"ids must be strings or integers, got an array of {values.dtype}")


def decode_ids(ids: np.ndarray) -> list[str]:
    return [b.decode("utf-8") for b in ids.tolist()]


def write_ids_npy(path: str | Path, blocks: Callable[[], Iterator[np.ndarray]], n: int, width: int) -> None:
    """``ids.npy`` of ``n`` ids of at most ``width`` bytes, filled from ``blocks()`` (atomic, streaming)."""
    with atomic_path(path, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=f"S{max(1, width)}", shape=(n,))
        r = 0
        for block in blocks():
            if r + len(block) > n:
                raise ValueError(f"more than the {n} ids announced for {path}")
            out[r : r + len(block)] = block
            r += len(block)
        if r != n:
            raise ValueError(f"{r} ids written to {path}, {n} announced")
        out.flush()
        del out


def _hashes(ids: np.ndarray) -> np.ndarray:
    """A 64-bit hash per id (equal ids, equal hashes), computed block by block."""
    width = ids.dtype.itemsize
    words = -(-width // 8)
    out = np.empty(len(ids), dtype=np.uint64)
    for start in range(0, len(ids), BLOCK):
        block = np.ascontiguousarray(ids[start : start + BLOCK])
        raw = np.zeros((len(block), words * 8), dtype=np.uint8)
        raw[:, :width] = block.view(np.uint8).reshape(len(block), width)
        h = np.full(len(block), 0xCBF29CE484222325, dtype=np.uint64)
        for column in raw.view("<u8").T:
            h ^= column
            h *= np.uint64(0x100000001B3)
            h ^= h >> np.uint64(29)
        out[start : start + len(block)] = h
    return out


def first_duplicate(ids: np.ndarray) -> str | None:
    """An id that occurs more than once in ``ids`` (None when all differ).

    Sorts 64-bit hashes rather than the strings (8 bytes a row, integer sort); only the ids
    whose hash occurs twice are compared exactly, so a collision never reports a false duplicate.
    """
    if len(ids) < 2:
        return None
    h = _hashes(ids)
    s = np.sort(h)
    clash = np.unique(s[1:][s[1:] == s[:-1]])
    del s
    if not len(clash):
        return None
    suspects = np.asarray(ids[np.flatnonzero(np.isin(h, clash))])
    values, counts = np.unique(suspects, return_counts=True)
    repeated = values[counts > 1]
    return repeated[0].decode("utf-8", "replace") if len(repeated) else None


def sorted_ids(ids: Iterable[str]) -> np.ndarray:
    """The ids of an iterable (e.g. pool documents' ``.id``) as one sorted ``S<n>`` array, encoded in blocks."""
    blocks, pending = [], []
    for i in ids:
        pending.append(i)
        if len(pending) == BLOCK:
            blocks.append(encode_ids(pending))
            pending = []
    blocks.append(encode_ids(pending))
    return np.sort(np.concatenate(blocks))


def count_present(sorted_reference: np.ndarray, ids: np.ndarray) -> int:
    """How many entries of ``ids`` occur in ``sorted_reference`` (both ``S<n>``; ``ids`` read in blocks)."""
    if not len(sorted_reference) or not len(ids):
        return 0
    dtype = f"S{max(sorted_reference.dtype.itemsize, ids.dtype.itemsize)}"
    ref = sorted_reference.astype(dtype, copy=False)
    found = 0
    for start in range(0, len(ids), BLOCK):
        block = np.asarray(ids[start : start + BLOCK]).astype(dtype)
        pos = np.minimum(np.searchsorted(ref, block), len(ref) - 1)
        found += int(np.count_nonzero(ref[pos] == block))
    return found


def id_array(ids) -> np.ndarray:
    """Any ids (an ``S`` array as it is, a ``U`` array or a list of str encoded) as ``S<n>``."""
    if isinstance(ids, IdArray):
        return ids.array
    if isinstance(ids, np.ndarray) and ids.dtype.kind == "S":
        return ids
    return encode_ids(ids.tolist() if isinstance(ids, np.ndarray) else ids)


class IdArray(Sequence):
    """Document ids kept as one ``S<n>`` array (n bytes a document, not a Python str each), read
    as str: ``len``, ``ids[i]`` (str), ``ids[rows]`` (an IdArray), iteration, ``==`` with a list."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i):
        if isinstance(i, (slice, np.ndarray, list)):
            return IdArray(self.array[i])
        return self.array[int(i)].decode("utf-8")

    def __iter__(self):
        for start in range(0, len(self.array), BLOCK):
            yield from decode_ids(self.array[start : start + BLOCK])

    def __eq__(self, other) -> bool:
        if isinstance(other, IdArray):
            return bool(np.array_equal(self.array, other.array))
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"IdArray({len(self)} ids)"
