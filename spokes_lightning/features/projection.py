"""Rademacher random projections (JL sketches) of per-document gradients.

Paper eq. 4 (section 3.1): ``z = R g / sqrt(k)`` with ``R`` in {-1, +1}^{k x D}. Two ways to
apply it without ever holding the whole ``R``:

* :class:`DenseRademacherProjector` - the exact eq. 4 on flattened gradients. ``R`` is cut into
  column blocks; each block is a pure function of ``(seed, parameter name, block index)`` and is
  generated once per batch of gradients (the batch is projected block by block).
* :class:`KroneckerLayerSketch` - the LoGra-style factorisation for one ``nn.Linear`` (see
  ``spokes_math.md``, Kronecker section): ``R_out dW R_in^T = sum_t (R_out delta_t)(R_in x_t)^T``,
  which is ``(R_out (x) R_in) vec(dW)`` without forming ``dW``; scaled by ``1/sqrt(k_o k_i)``
  so every layer block is an unbiased sketch of that layer's gradient inner products. The
  sides are 4x wider than ``sqrt(k)`` (:func:`kronecker_side`) because a Kronecker sketch of a
  low-rank gradient is much noisier than a dense sketch of the same size.

Every random matrix comes from :func:`rademacher`, so it is identical on every rank and restart.
"""
from __future__ import annotations

import hashlib
import math

import torch

DEFAULT_BLOCK_COLS = 16384

_BYTE_SIGNS: torch.Tensor | None = None


def stream_seed(seed: int, name: str, block: int) -> int:
    """A 63-bit generator seed that is a pure function of ``(seed, name, block)``."""
    digest = hashlib.sha256(f"{int(seed)}|{name}|{int(block)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _byte_signs() -> torch.Tensor:
    """256 x 8 table: the +-1 signs encoded by the bits of each byte value."""
    global _BYTE_SIGNS
    if _BYTE_SIGNS is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _BYTE_SIGNS = bits.to(torch.float32) * 2 - 1
    return _BYTE_SIGNS


def rademacher(
    seed: int, name: str, block: int, rows: int, cols: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A ``rows x cols`` matrix of i.i.d. +-1 (float32), a pure function of its arguments.

    Random bytes are drawn on the CPU from a generator seeded by :func:`stream_seed` and unpacked
    eight signs per byte (8x fewer generator draws than one draw per entry).
    """
    gen = torch.Generator(device="cpu").manual_seed(stream_seed(seed, name, block))
    n_bytes = (cols + 7) // 8
    codes = torch.randint(0, 256, (rows, n_bytes), generator=gen, dtype=torch.int64)
    signs = _byte_signs()[codes].reshape(rows, n_bytes * 8)[:, :cols]
    return signs.contiguous().to(device)


class DenseRademacherProjector:
    """Exact eq. 4 over named flat pieces (one per parameter), R generated in column blocks.

    The full ``R`` (k x D) is the concatenation, in ``pieces`` order, of the column blocks
    ``rademacher(seed, name, j, k, block_cols)`` (the last block of a piece is cut to size).
    """

    def __init__(self, k: int, pieces: dict[str, int], seed: int = 0, block_cols: int = DEFAULT_BLOCK_COLS,
                 cache_blocks: bool | str = False):
        if k <= 0:
            raise ValueError("k must be positive")
        self.k = int(k)
        self.pieces = dict(pieces)
        self.seed = int(seed)
        self.block_cols = int(block_cols)
        # for a projector applied to many batches, keep the blocks: ``"int8"`` (1 byte per entry,
        # converted each use) or ``"float32"`` (4 bytes, ~3x faster on CPU); ``True`` means int8
        if cache_blocks not in (False, True, "int8", "float32"):
            raise ValueError(f"cache_blocks must be False, 'int8' or 'float32', got {cache_blocks!r}")
        self._cache_dtype = {True: torch.int8, "int8": torch.int8, "float32": torch.float32}.get(cache_blocks)
        self._cache: dict[tuple[str, int], torch.Tensor] | None = {} if self._cache_dtype is not None else None

    @property
    def input_dim(self) -> int:
        return sum(self.pieces.values())

    def blocks(self, name: str):
        """Yield ``(block index, column slice)`` of one piece."""
        size = self.pieces[name]
        for j, start in enumerate(range(0, size, self.block_cols)):
            yield j, slice(start, min(start + self.block_cols, size))

    def block_matrix(self, name: str, j: int, width: int, device="cpu") -> torch.Tensor:
        if self._cache is None:
            return rademacher(self.seed, name, j, self.k, self.block_cols, device)[:, :width]
        key = (name, j)
        if key not in self._cache or self._cache[key].device != torch.device(device):
            signs = rademacher(self.seed, name, j, self.k, self.block_cols)[:, :width]
            self._cache[key] = signs.to(self._cache_dtype).to(device)
        return self._cache[key].float()  # a no-op for a float32 cache

    def project_piece(self, name: str, grads: torch.Tensor, blocks=None) -> torch.Tensor:
        """``R_piece @ g`` (unscaled) for a batch ``grads`` [b, piece size]; ``blocks`` picks a subset."""
        grads = grads.reshape(grads.shape[0], -1).float()
        out = torch.zeros(grads.shape[0], self.k, device=grads.device)
        wanted = None if blocks is None else set(blocks)
        for j, cols in self.blocks(name):
            if wanted is not None and j not in wanted:
                continue
            r = self.block_matrix(name, j, cols.stop - cols.start, grads.device)
            out += grads[:, cols] @ r.T
        return out

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Eq. 4 for a batch: ``grads[name]`` is [b, piece size]; returns [b, k] = R g / sqrt(k)."""
        total = None
        for name in self.pieces:
            part = self.project_piece(name, grads[name])
            total = part if total is None else total + part
        return total / math.sqrt(self.k)

    def materialize(self) -> torch.Tensor:
        """The whole ``R`` (k x D); for tests on small D only."""
        cols = [
            self.block_matrix(name, j, s.stop - s.start) for name in self.pieces for j, s in self.blocks(name)
        ]
        return torch.cat(cols, dim=1)


KRONECKER_OVERSAMPLE = 4


def kronecker_side(k: int) -> int:
    """Default per-Linear sketch side ``k_o = k_i = 4 * ceil(sqrt(k))`` (128 for k = 1024).

    A Kronecker sketch of a low-rank gradient behaves like a JL sketch of far fewer than
    ``side**2`` dims (its error scales with ``1/side``, not ``1/side**2``), so each Linear gets
    ``16 k`` dims, enough that the first stage adds little to the noise of the final dense
    projection to exactly ``k``. Measured on the bench proxy (bench_features.py): per-pair cosine
    error 0.044 at side 32, 0.035 at 64, 0.034 at 128, against 0.031 for the exact eq. 4.
    """
    return KRONECKER_OVERSAMPLE * max(1, math.isqrt(k - 1) + 1)


class KroneckerLayerSketch:
    """Per-document sketch of one ``nn.Linear``'s gradient from its inputs and output grads.

    Each side (input, output) is projected by its own Rademacher matrix of ``side`` rows, scaled
    ``1/sqrt(side)``; a side no wider than ``side`` is kept exact (identity, no sketch noise).
    """

    def __init__(self, name: str, in_features: int, out_features: int, side: int, seed: int, device="cpu"):
        self.name = name
        self.side = int(side)
        self.r_in = self._side_matrix(seed, f"{name}:in", in_features, device)
        self.r_out = self._side_matrix(seed, f"{name}:out", out_features, device)
        self.width = self.r_in.shape[0] * self.r_out.shape[0]

    def _side_matrix(self, seed: int, name: str, features: int, device) -> torch.Tensor:
        if features <= self.side:
            return torch.eye(features, device=device)
        return rademacher(seed, name, 0, self.side, features, device) / math.sqrt(self.side)

    def to(self, device) -> "KroneckerLayerSketch":
        self.r_in, self.r_out = self.r_in.to(device), self.r_out.to(device)
        return self

    def project_inputs(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``R_in x_t`` for every token [b, T, k_i]; masked tokens contribute zero."""
        px = x.float() @ self.r_in.T
        if mask is not None:
            px = px * mask.unsqueeze(-1).to(px.dtype)
        return px

    def block(self, projected_inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
        """``sum_t (R_out delta_t)(R_in x_t)^T`` (both sides already scaled), flattened: [b, k_o*k_i]."""
        return self.block_from_projected(projected_inputs, output_grads.float() @ self.r_out.T)

    @staticmethod
    def block_from_projected(projected_inputs: torch.Tensor, projected_grads: torch.Tensor) -> torch.Tensor:
        """The same block from ``R_out delta_t`` [b, T, k_o] computed elsewhere (the fused head)."""
        blk = torch.einsum("bto,bti->boi", projected_grads, projected_inputs)
        return blk.reshape(blk.shape[0], -1)

    def dense_equivalent(self) -> torch.Tensor:
        """``R_out (x) R_in`` (scaled) acting on row-major ``vec(dW)``; tests only."""
        return torch.kron(self.r_out, self.r_in)
