"""The training stream of an online run: segments of ``R`` steps, each filled with picked documents.

Training is cut into segments of ``steps_per_segment`` (R) optimizer steps. Segment ``s`` is
filled with documents picked from window ``s`` of the candidate order (a seeded permutation of the
candidate pool, windows of ``window`` documents, never revisited), in pick order, until the picks
hold ``R x global_batch x seq_length`` tokens (:class:`SegmentFiller`; the same rule at every world
size, so the picks never depend on the number of ranks). Then, identically on every rank:

1. the picks are dealt in pick order to the rank holding the fewest tokens (ties -> lower rank:
   :func:`spokes_lightning.data.batches.deal_to_ranks`, the deal of the static loaders);
2. each rank packs its documents (tokens + one EOS each, :func:`spokes_lightning.data.batches.pack_documents`)
   into ``seq_length`` sequences and keeps the first ``R x local_batch``; a rank that falls short
   gets whole padding sequences (loss mask 0) and the tail past the segment is not trained on;
3. step ``i`` of the segment takes sequences ``i, i + R, i + 2R, ...`` (padding spread over steps).

Batches have the schema of every other loader (:func:`spokes_lightning.data.batches.collate`):
``input_ids``, ``labels`` (``-100`` on padding, shifted by the model) and ``attention_mask``.

Segments are planned one ahead of training (two before the first step), so the data loaders'
look-ahead never reaches a segment that a reselection has not planned yet.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from spokes_lightning.data.batches import collate, deal_to_ranks, pack_documents, sequence_item
from spokes_lightning.utils.errors import UserError

Sequence_ = list[tuple[int, int, int]]  # (pool index, token start, token stop) pieces of one sequence


class SegmentFiller:
    """Adds picked documents until they hold ``need`` tokens."""

    def __init__(self, lengths: np.ndarray, need: int):
        self.lengths, self.need, self.total, self.picks = lengths, int(need), 0, []

    def add(self, index: int) -> None:
        self.picks.append(int(index))
        self.total += int(self.lengths[index])

    @property
    def full(self) -> bool:
        return self.total >= self.need

    def describe(self) -> str:
        return f"{self.need} tokens, {self.total} picked"


@dataclass
class OnlinePlan:
    """Candidate pool (ids + token arrays), the schedule, and the segments planned so far."""

    ids: list[str]
    tokens: list[np.ndarray]  # per candidate: its tokens + EOS
    total_steps: int
    steps_per_segment: int
    global_batch: int  # sequences per optimizer step over all ranks
    seq_length: int
    window: int
    seed: int
    pad_id: int
    segments: list[list[int]] = field(default_factory=list)  # pool indices, pick order

    def __post_init__(self):
        if self.steps_per_segment <= 0:
            raise UserError(f"online.every_n_steps must be >= 1, got {self.steps_per_segment}")
        if self.total_steps < 1:
            raise UserError(f"the run has {self.total_steps} steps: nothing to train")
        if self.window < 1:
            raise UserError(f"online.window must be >= 1, got {self.window}")
        self.lengths = np.array([len(t) for t in self.tokens], dtype=np.int64)
        self.order = np.random.default_rng([int(self.seed), 7]).permutation(len(self.ids))
        self.n_segments = -(-self.total_steps // self.steps_per_segment)
        if self.n_segments * self.window > len(self.ids):
            raise UserError(f"{self.n_segments} segments x window {self.window} = {self.n_segments * self.window} "
                            f"candidates but the pool has {len(self.ids)}: lower online.window or raise every_n_steps")
        mean = float(self.lengths.mean()) if len(self.lengths) else 0.0
        expected = self.tokens_per_segment / max(mean, 1.0)
        if self.window < expected:
            raise UserError(f"online.window = {self.window} is smaller than the ~{expected:.0f} picks one segment "
                            f"needs ({self.tokens_per_segment} tokens at {mean:.0f} tokens per candidate): "
                            "raise online.window")

    @property
    def tokens_per_segment(self) -> int:
        return self.steps_per_segment * self.global_batch * self.seq_length

    def window_indices(self, segment: int) -> np.ndarray:
        return self.order[segment * self.window : (segment + 1) * self.window]

    def filler(self) -> SegmentFiller:
        return SegmentFiller(self.lengths, self.tokens_per_segment)

    def add_segment(self, picks: Sequence[int]) -> None:
        total = int(self.lengths[list(picks)].sum()) if len(picks) else 0
        if total < self.tokens_per_segment:
            raise UserError(f"segment {len(self.segments)} holds {total} tokens, needs {self.tokens_per_segment}")
        self.segments.append([int(p) for p in picks])

    def steps_in_segment(self, s: int) -> int:
        return min(self.steps_per_segment, self.total_steps - s * self.steps_per_segment)

    # ------------------------------------------------------------------ serving
    def rank_sequences(self, s: int, rank: int, world: int) -> list[Sequence_]:
        """Rank ``rank``'s ``R x local_batch`` sequences of segment ``s`` (``[]`` = padding)."""
        if s >= len(self.segments):
            raise UserError(f"training reached segment {s} but only {len(self.segments)} are planned: "
                            "the online reselection callback must be in the trainer's callbacks")
        local = self.global_batch // world
        shards = deal_to_ranks(self.segments[s], self.lengths, world)
        sequences = pack_documents(shards[rank], self.lengths, self.seq_length)[: self.steps_per_segment * local]
        return sequences + [[] for _ in range(self.steps_per_segment * local - len(sequences))]

    def step_sequences(self, step: int, rank: int, world: int) -> list[Sequence_]:
        s, i = divmod(step, self.steps_per_segment)
        return self.rank_sequences(s, rank, world)[i :: self.steps_per_segment]

    def item(self, sequence: Sequence_) -> dict[str, torch.Tensor]:
        """One sequence in the batch schema (:func:`spokes_lightning.data.batches.sequence_item`)."""
        return sequence_item(self.tokens, sequence, self.seq_length, self.pad_id)

    def collate(self, sequences: list[Sequence_]) -> dict[str, Any]:
        """A batch in the schema of every loader (``input_ids``, ``labels``, ``attention_mask``, ...)."""
        return collate(self.tokens, self.ids, sequences, self.seq_length, self.pad_id)

    def trained_on(self, world: int) -> list[str]:
        """Ids of the documents with at least one token in a trained (non-padding) position."""
        seen: set[int] = set()
        for s in range(min(len(self.segments), self.n_segments)):
            for rank in range(world):  # step i of a segment trains sequences i, i + R, ...
                for i, seq in enumerate(self.rank_sequences(s, rank, world)):
                    if i % self.steps_per_segment < self.steps_in_segment(s):
                        seen.update(d for d, _, _ in seq)
        return [self.ids[d] for d in sorted(seen)]


class OnlineStreamDataset(torch.utils.data.IterableDataset):
    """This rank's batches of an :class:`OnlinePlan`, from ``start_step`` on (Lightning, one per rank)."""

    def __init__(self, plan: OnlinePlan, rank: int, world: int, start_step: int = 0):
        if plan.global_batch % world:
            raise UserError(f"global batch {plan.global_batch} must split evenly over {world} ranks")
        self.plan, self.rank, self.world, self.start_step = plan, rank, world, int(start_step)

    def __iter__(self):
        for step in range(self.start_step, self.plan.total_steps):
            yield self.plan.collate(self.plan.step_sequences(step, self.rank, self.world))
