"""Megatron's indexed-dataset files (``PREFIX.bin`` + ``PREFIX.idx``), written without megatron-core.

The export only ever writes one kind of file: one sequence per document, token ids of one integer
dtype. Doing that here, in a few lines of numpy, keeps megatron-core (about 4 s of imports, torch's
compiler stack included) out of every tokenizing process; megatron-core stays what reads the files
(:mod:`spokes_lightning.megatron.dataset`), and the tests compare these bytes with its
``IndexedDatasetBuilder`` (``tests/megatron/test_export_scale.py``).

The layout (megatron-core 0.16, ``datasets/indexed_dataset.py``, index version 1):

* ``.bin``: the token ids of every sequence, back to back, in the dtype named by the index;
* ``.idx``: the 9-byte magic ``MMIDIDX\\x00\\x00``, the version (``<Q`` = 1), the dtype code
  (``<B``), the sequence count and the document count (``<Q`` each, the count of document
  boundaries, a leading 0 included), then the tokens per sequence (``int32``), the byte offset of
  each sequence in the ``.bin`` (``int64``) and the document boundaries as sequence indices
  (``int64``, starting with 0).
"""
from __future__ import annotations

import os
import struct

import numpy as np

from spokes_lightning.utils.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = struct.pack("<Q", 1)
HEADER_BYTES = len(MAGIC) + len(VERSION) + 1  # + the dtype code
COUNTS = struct.Struct("<QQ")  # sequence count, document count (the leading 0 included)
#: Megatron's dtype codes (its ``DType`` enum)
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
               np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
_DTYPE_OF_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


def optimal_token_dtype(vocab_size: int | None) -> type:
    """``uint16`` when every id fits (vocabulary < 65500), else ``int32``, as Megatron's ``preprocess_data.py``."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def index_header(dtype) -> bytes:
    """The first :data:`HEADER_BYTES` bytes of an index whose tokens are ``dtype``."""
    code = DTYPE_CODES.get(np.dtype(dtype))
    if code is None:
        raise UserError(f"Megatron indexed datasets cannot hold tokens of dtype {np.dtype(dtype)}")
    return MAGIC + VERSION + struct.pack("<B", code)


def read_index_header(idx_path: str | os.PathLike) -> tuple[bytes, int, int, int]:
    """``(header bytes, sequence count, document count, token itemsize)`` of an ``.idx`` file."""
    with open(idx_path, "rb") as fh:
        head = fh.read(HEADER_BYTES + COUNTS.size)
    if len(head) < HEADER_BYTES + COUNTS.size or not head.startswith(MAGIC) or \
            head[len(MAGIC):HEADER_BYTES - 1] != VERSION or head[HEADER_BYTES - 1] not in _DTYPE_OF_CODE:
        raise UserError(f"{idx_path} is not a Megatron index file")
    n_seq, n_doc = COUNTS.unpack(head[HEADER_BYTES:])
    return head[:HEADER_BYTES], n_seq, n_doc, _DTYPE_OF_CODE[head[HEADER_BYTES - 1]].itemsize


def index_counts(idx_path: str | os.PathLike, chunk: int = 1 << 20) -> tuple[int, int]:
    """``(sequences, tokens)`` of an ``.idx`` file: what ``len(IndexedDataset)`` and the sum of its
    ``sequence_lengths`` give (EOD tokens included), read ``chunk`` lengths at a time."""
    _, n_seq, _, _ = read_index_header(idx_path)
    tokens = 0
    with open(idx_path, "rb") as fh:
        fh.seek(HEADER_BYTES + COUNTS.size)
        for start in range(0, n_seq, chunk):
            lengths = np.fromfile(fh, dtype=np.int32, count=min(chunk, n_seq - start))
            if lengths.size != min(chunk, n_seq - start):
                raise UserError(f"{idx_path} is truncated")
            tokens += int(lengths.sum(dtype=np.int64))
    return n_seq, tokens


def sequence_offsets(lengths: np.ndarray, itemsize: int, start: int = 0) -> np.ndarray:
    """Byte offset of each sequence in the ``.bin``: ``start`` plus the bytes of those before it."""
    ends = np.cumsum(lengths, dtype=np.int64) * np.int64(itemsize)
    return np.int64(start) + ends - np.asarray(lengths, dtype=np.int64) * np.int64(itemsize)


class IndexedDatasetWriter:
    """Write documents (one sequence each) to ``bin_path``; :meth:`finish` writes the index.

    The bytes are those of megatron-core's ``IndexedDatasetBuilder`` fed ``add_document(tokens,
    [len(tokens)])`` per document and ``finalize(idx_path)``. It keeps one int per document (a shard's
    worth), and :meth:`close` releases the ``.bin`` without writing an index.
    """

    def __init__(self, bin_path: str | os.PathLike, dtype):
        self.dtype = np.dtype(dtype)
        self.header = index_header(self.dtype)
        self.lengths: list[int] = []
        self.data = open(bin_path, "wb")

    def add_document(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        self.data.write(tokens.tobytes())
        self.lengths.append(tokens.size)

    def finish(self, idx_path: str | os.PathLike) -> None:
        self.data.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        n = lengths.size
        with open(idx_path, "wb") as out:
            out.write(self.header + COUNTS.pack(n, n + 1))
            out.write(lengths.tobytes())
            out.write(sequence_offsets(lengths, self.dtype.itemsize).tobytes())
            out.write(np.arange(n + 1, dtype=np.int64).tobytes())  # document i is sequence i

    def close(self) -> None:
        self.data.close()
