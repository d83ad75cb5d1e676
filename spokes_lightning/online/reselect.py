"""OnlineReselector: plans each training segment by one rule; the framework adapters call it.

Rules (``mode``), all over the same windows of the same candidate order (:mod:`.plan`):

* ``online``: online SPOKES (:mod:`.objective`). Segments 0 and 1 come from the fallback
  (``random`` picks of their windows, or ``static``: the static selection's documents); at step
  ``j R`` (j >= 1) the window of segment ``j + 1`` is sketched with the model being trained and
  the picks maximise ``alpha ln Q + (1 - alpha) ln G-Vendi`` of everything planned so far plus the
  picks. Sketches of the fallback picks are taken at the first reselection (they enter the Gram).
* ``random``: a seeded random order of each window (the control: same machinery, no choice).
* ``static``: the documents of a selection made once before training (frozen proxy), in a seeded
  order, consumed segment after segment.

Every rank runs the same code on the same rows; the picks of rank 0 are broadcast so all ranks
hold the same plan whatever the BLAS threads do. ``state()``/``load_state()`` carry everything a
resumed run needs (plan, Gram, records) with exact float64 values.
"""
from __future__ import annotations

import base64
import math
import time
from typing import Any, Sequence

import numpy as np

from spokes_lightning.core import distributed as D
from spokes_lightning.data.batches import id_text_pairs, pad_id_of, tokenize_documents
from spokes_lightning.utils.errors import UserError
from spokes_lightning.online.objective import TrainedOnGram, greedy_window_picks, unit_rows
from spokes_lightning.online.plan import OnlinePlan, SegmentFiller

MODES = ("online", "random", "static")
FALLBACKS = ("random", "static")
DEFAULT_ROUNDS = 4  # greedy blocks per reselection (each block: one d x d eigh)


class OnlineReselector:
    def __init__(self, plan: OnlinePlan, texts: Sequence[str], mode: str = "online", *, alpha: float = 0.0,
                 quality: dict[str, float] | None = None, static_ids: Sequence[str] | None = None,
                 fallback: str = "random", rounds: int = DEFAULT_ROUNDS, sketch: dict | None = None):
        if mode not in MODES:
            raise UserError(f"unknown online mode {mode!r}; choose one of: {', '.join(MODES)}")
        if fallback not in FALLBACKS:
            raise UserError(f"unknown online fallback {fallback!r}; choose one of: {', '.join(FALLBACKS)}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise UserError(f"online alpha must be in [0, 1], got {alpha}")
        if rounds < 1:
            raise UserError(f"online greedy rounds must be >= 1, got {rounds}")
        self.plan, self.texts, self.mode, self.alpha = plan, list(texts), mode, float(alpha)
        self.fallback, self.rounds, self.sketch_settings = fallback, int(rounds), dict(sketch or {})
        index = {doc_id: i for i, doc_id in enumerate(plan.ids)}
        self.quality = None
        if quality is not None:
            missing = [i for i in plan.ids if i not in quality]
            if missing and self.alpha > 0:
                raise UserError(f"{len(missing)} candidate(s) have no quality score, e.g. {missing[0]!r}")
            self.quality = np.array([float(quality.get(i, 0.0)) for i in plan.ids])
        if self.alpha > 0 and self.quality is None and mode == "online":
            raise UserError(f"online alpha = {alpha} > 0 needs quality scores for the candidates")
        self.static_order: list[int] = []
        if mode == "static" or (mode == "online" and fallback == "static"):
            if not static_ids:
                raise UserError(f"online mode {mode!r} with fallback {fallback!r} needs a static selection")
            unknown = [i for i in static_ids if i not in index]
            if unknown:
                raise UserError(f"the static selection names {len(unknown)} id(s) not in the training set, "
                                f"e.g. {unknown[0]!r}")
            rng = np.random.default_rng([plan.seed, 11])
            self.static_order = [index[i] for i in np.array(list(static_ids))[rng.permutation(len(static_ids))]]
        self.static_cursor = 0
        self.trained: TrainedOnGram | None = None
        self.in_gram = 0  # segments whose picks are in the Gram
        self.records: list[dict[str, Any]] = []
        self.sketcher = None

    # ------------------------------------------------------------------ rules
    def _random_picks(self, segment: int) -> list[int]:
        window = self.plan.window_indices(segment)
        filler = self.plan.filler()
        for i in window[np.random.default_rng([self.plan.seed, 13, segment]).permutation(len(window))]:
            if filler.full:
                break
            filler.add(int(i))
        if not filler.full:
            raise UserError(f"window {segment} ({len(window)} candidates) cannot fill a segment "
                            f"({filler.describe()}): raise online.window")
        return filler.picks

    def _static_picks(self) -> list[int]:
        filler = self.plan.filler()
        while not filler.full:
            if self.static_cursor >= len(self.static_order):
                raise UserError(f"the static selection ({len(self.static_order)} documents) runs out before "
                                f"the run's {self.plan.total_steps} steps: select a larger token budget")
            filler.add(self.static_order[self.static_cursor])
            self.static_cursor += 1
        return filler.picks

    def _sketch(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Unit float64 rows of the pool indices (zero rows for documents the sketch skips)."""
        ids = [self.plan.ids[i] for i in indices]
        kept, rows = self.sketcher.sketch(ids, [self.texts[i] for i in indices])
        full = np.zeros((len(ids), rows.shape[1]), dtype=np.float64)
        position = {doc_id: j for j, doc_id in enumerate(ids)}
        for doc_id, row in zip(kept, rows):
            full[position[doc_id]] = row
        return unit_rows(full)

    def _online_picks(self, segment: int) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        if self.trained is None:
            self.trained = TrainedOnGram(self.sketcher.module.feature_dim)
        while self.in_gram < segment:  # the fallback segments: sketched once, now
            done = self.plan.segments[self.in_gram]
            unit, _ = self._sketch(done)
            self.trained.add(unit, None if self.quality is None else self.quality[done])
            self.in_gram += 1
        window = self.plan.window_indices(segment)
        unit, keep = self._sketch(window)
        sketch_seconds = time.perf_counter() - t0
        mean_length = float(self.plan.lengths[window].mean())
        block = math.ceil(self.plan.tokens_per_segment / max(mean_length, 1.0) / self.rounds)
        local = greedy_window_picks(unit, keep, None if self.quality is None else self.quality[window],
                                    self.alpha, self.trained,
                                    SegmentFiller(self.plan.lengths[window], self.plan.tokens_per_segment), block)
        picks = [int(window[i]) for i in local]
        picks = D.all_gather_objects(picks)[0]  # rank 0's picks on every rank
        chosen = np.array([int(np.flatnonzero(window == p)[0]) for p in picks])
        self.trained.add(unit[chosen], None if self.quality is None else self.quality[picks])
        self.in_gram = segment + 1
        return picks, sketch_seconds

    # ------------------------------------------------------------------ schedule
    def _plan_segment(self, segment: int, step: int) -> None:
        t0 = time.perf_counter()
        sketch_seconds = 0.0
        rule = self.mode if (self.mode != "online" or segment >= 2) else self.fallback
        if rule == "online":
            picks, sketch_seconds = self._online_picks(segment)
        elif rule == "static":
            picks = self._static_picks()
        else:
            picks = self._random_picks(segment)
        self.plan.add_segment(picks)
        record = {"segment": segment, "planned_at_step": step, "rule": rule, "n_picks": len(picks),
                  "tokens": int(self.plan.lengths[picks].sum()), "seconds": time.perf_counter() - t0,
                  "sketch_seconds": sketch_seconds}
        if rule == "online":
            record["gvendi_planned_own_sketches"] = self.trained.vendi()
        self.records.append(record)

    def plan_initial(self) -> None:
        """Segments 0 and 1 (before the first step)."""
        for segment in range(len(self.plan.segments), min(2, self.plan.n_segments)):
            self._plan_segment(segment, 0)

    def due(self, step: int) -> bool:
        return step > 0 and step % self.plan.steps_per_segment == 0

    def reselect(self, model, tokenizer, step: int) -> dict | None:
        """At step ``j R``: plan segment ``j + 1`` (no-op past the last segment or when planned)."""
        segment = step // self.plan.steps_per_segment + 1
        if not self.due(step) or segment >= self.plan.n_segments or segment < len(self.plan.segments):
            return None
        if self.mode == "online" and self.sketcher is None:
            from spokes_lightning.online.sketch import LiveGradientSketcher

            self.sketcher = LiveGradientSketcher(model, tokenizer, **self.sketch_settings)
        self._plan_segment(segment, step)
        return self.records[-1]

    @property
    def overhead_seconds(self) -> float:
        return float(sum(r["seconds"] for r in self.records if r["planned_at_step"] > 0))

    # ------------------------------------------------------------------ resume
    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"segments": [[self.plan.ids[i] for i in s] for s in self.plan.segments],
                               "static_cursor": self.static_cursor, "in_gram": self.in_gram,
                               "records": [dict(r) for r in self.records], "mode": self.mode}
        if self.trained is not None:
            out["trained"] = self.trained.state()
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise UserError(f"the saved online state is for mode {state.get('mode')!r}, this run is {self.mode!r}")
        index = {doc_id: i for i, doc_id in enumerate(self.plan.ids)}
        try:
            self.plan.segments = [[index[i] for i in s] for s in state["segments"]]
        except KeyError as exc:
            raise UserError(f"the saved online state names document {exc.args[0]!r}, not in this training set") from None
        self.static_cursor, self.in_gram = int(state["static_cursor"]), int(state["in_gram"])
        self.records = list(state["records"])
        self.trained = TrainedOnGram.from_state(state["trained"]) if "trained" in state else None


def encode_state(value):
    """JSON-able copy of a reselector state, numpy arrays as exact base64 bytes: fits transformers'
    ``trainer_state.json`` and a Lightning checkpoint loaded with ``torch.load(weights_only=True)``."""
    if isinstance(value, np.ndarray):
        return {"__ndarray__": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode(),
                "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, dict):
        return {k: encode_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_state(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def decode_state(value):
    if isinstance(value, dict) and "__ndarray__" in value:
        raw = base64.b64decode(value["__ndarray__"])
        return np.frombuffer(raw, dtype=value["dtype"]).reshape(value["shape"]).copy()
    if isinstance(value, dict):
        return {k: decode_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_state(v) for v in value]
    return value


def build_reselector(documents, tokenizer, *, total_steps: int, every_n_steps: int, window: int,
                     global_batch: int, seq_length: int, seed: int = 0, mode: str = "online",
                     text_field: str = "text", **rule: Any) -> OnlineReselector:
    """Tokenize the candidate pool once and build the plan + reselector (any framework)."""
    if seq_length < 2 or global_batch < 1:
        raise UserError(f"seq_length must be >= 2 and global_batch >= 1, got {seq_length}, {global_batch}")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise UserError("the tokenizer has no EOS token (set tokenizer.eos_token)")
    pairs = id_text_pairs(documents, text_field)
    if not pairs:
        raise UserError("the candidate pool is empty")
    tokens = tokenize_documents(tokenizer, [t for _, t in pairs], int(tokenizer.eos_token_id), label="tokenize candidates")
    plan = OnlinePlan([i for i, _ in pairs], tokens, int(total_steps), int(every_n_steps), int(global_batch),
                      int(seq_length), int(window), int(seed), pad_id_of(tokenizer))
    return OnlineReselector(plan, [t for _, t in pairs], mode, **rule)
