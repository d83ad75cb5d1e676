"""SelectionCallback: run data selectors right after a feature-extraction ``Trainer.predict``.

At ``on_predict_end`` (called on every rank) the callback waits for all ranks (barrier), then
runs each configured selector ONCE and writes one selection artifact per method
(:mod:`spokes_lightning.selection_artifact`) from rank 0 only, then waits again.

* Ordinary selectors (random, quality, semdedup) are computed on rank 0 alone.
* Selectors that use ``torch.distributed`` collectives themselves (``spokes``: under a process
  group, ``run_spokes`` treats its input as this rank's row shard and all-reduces Grams, see
  the sharding section of the math notes) run on every rank with a contiguous row shard; the result's indices are
  global and the per-row scores are gathered to rank 0. The result equals a 1-process run.

After every step the ranks compare notes: an error on any rank is raised on every rank (as a
:class:`UserError` when it was one), so no rank is left waiting in a barrier.

The stores must be finished (``FeatureStoreWriter.finalize``) before this callback runs: put
the callback that finalizes them earlier in the Trainer's callback list::

    sel = SelectionCallback("runs/sel", {"random": {}, "semdedup": {"eps": 0.1}},
                            budget="0.5", embeddings="runs/emb", quality="runs/quality")
    Trainer(callbacks=[finalize_stores, sel]).predict(model, loader)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from lightning.pytorch.callbacks import Callback

from spokes_lightning import distributed as D
from spokes_lightning.budget import budget_to_count, parse_budget
from spokes_lightning.errors import UserError
from spokes_lightning.features.store import FeatureStore, open_feature_store
from spokes_lightning.selection_artifact import file_sha256, write_selection
from spokes_lightning.selectors.base import SelectionInputs, Selector, get_selector
from spokes_lightning.vendi import DEFAULT_CHUNK_ROWS

STORE_FIELDS = ("features", "embeddings", "quality")


def is_collective(selector: Selector) -> bool:
    """Selectors that call torch.distributed collectives themselves set ``collective = True``."""
    return bool(getattr(selector, "collective", False))


def load_stores(paths: dict[str, str | Path | None]
                ) -> tuple[list[str], dict[str, Any], dict[str, Path]]:
    """Open the given stores, check they cover the same documents, align rows to one id order.

    Returns (pool ids, {field: N x d array (quality: N vector)}, {field: matrix file}).
    """
    stores: dict[str, FeatureStore] = {f: open_feature_store(p) for f, p in paths.items() if p}
    if not stores:
        raise UserError("selection needs at least one feature store "
                        "(features, embeddings or quality)")
    ref_field, ref = next(iter(stores.items()))
    arrays, files = {}, {}
    for field, store in stores.items():
        if len(store) != len(ref):
            raise UserError(
                f"{field} store {store.path} has {len(store)} documents but {ref_field} store "
                f"{ref.path} has {len(ref)}"
            )
        matrix = store.matrix
        if store.ids != ref.ids:
            if set(store.ids) != set(ref.ids):
                raise UserError(f"{field} store {store.path} and {ref_field} store {ref.path} "
                                "cover different documents")
            row = {doc_id: i for i, doc_id in enumerate(store.ids)}
            matrix = matrix[np.array([row[d] for d in ref.ids])]
        if field == "quality":
            if matrix.ndim == 2 and matrix.shape[1] != 1:
                raise UserError(f"quality store {store.path} must be N x 1, got {matrix.shape}")
            matrix = np.asarray(matrix, dtype=np.float64).reshape(-1)
        arrays[field] = matrix
        files[field] = store.path / "features.npy"
    return list(ref.ids), arrays, files


def _on_all_ranks(step: Callable[[], Any]) -> Any:
    """Run ``step``; if it failed on ANY rank, raise on every rank (UserError stays UserError)."""
    value, failure, message = None, None, None
    try:
        value = step()
    except Exception as exc:  # shared with the other ranks so nobody waits forever
        failure, message = exc, f"{type(exc).__name__}: {exc}"
    messages = [m for m in D.all_gather_objects(message) if m]
    if failure is not None:
        raise failure
    if messages:
        if messages[0].startswith("UserError: "):
            raise UserError(messages[0][len("UserError: "):])
        raise RuntimeError(f"selection failed on another rank: {messages[0]}")
    return value


def _select_sharded(selector: Selector, inputs: SelectionInputs, k: int, seed: int):
    """Collective selector: each rank passes its row shard; scores are gathered in rank order."""
    rank, world = D.world()
    start, stop = D.shard_bounds(inputs.n, rank, world, align=DEFAULT_CHUNK_ROWS)  # whole chunks per rank
    fields = ("features", "embeddings", "quality", "ids", "lengths")
    shard = SelectionInputs(**{f: None if getattr(inputs, f) is None
                               else getattr(inputs, f)[start:stop] for f in fields})
    result = selector.select(shard, k, seed)
    if result.scores is not None and world > 1:
        parts = D.all_gather_objects(np.asarray(result.scores))
        result.scores = np.concatenate(parts)
    return result


def run_selections(
    out_dir: str | Path,
    methods: dict[str, dict[str, Any]],
    budget: int | float | str,
    seed: int = 0,
    features: str | Path | None = None,
    embeddings: str | Path | None = None,
    quality: str | Path | None = None,
    lengths: np.ndarray | None = None,
) -> dict[str, Path]:
    """Run every method on the stores; rank 0 writes one artifact per method.

    Call it on every rank under torch.distributed (or in a single process without one).
    """
    rank, _ = D.world()

    def prepare():
        ids, arrays, files = load_stores({f: p for f, p in
                                          zip(STORE_FIELDS, (features, embeddings, quality))})
        if lengths is not None and len(lengths) != len(ids):
            raise UserError(f"lengths has {len(lengths)} entries but the stores have "
                            f"{len(ids)} documents")
        k = budget_to_count(parse_budget(budget), len(ids))
        hashes = {f: file_sha256(p) for f, p in files.items()} if rank == 0 else {}
        return ids, SelectionInputs(ids=ids, lengths=lengths, **arrays), k, hashes

    ids, inputs, k, hashes = _on_all_ranks(prepare)
    written: dict[str, Path] = {}
    for method, params in methods.items():
        params = dict(params or {})

        def step():
            selector = get_selector(method, **params)
            if is_collective(selector):
                result = _select_sharded(selector, inputs, k, seed)
            elif rank == 0:
                result = selector.select(inputs, k, seed)
            else:
                return None
            if rank != 0:
                return None
            tokens = None if lengths is None else int(np.asarray(lengths)[result.indices].sum())
            return write_selection(out_dir, method, result, ids, params, seed, hashes,
                                   tokens_selected=tokens)

        path = _on_all_ranks(step)
        written[method] = path if path is not None else Path(out_dir) / method
    return written


class SelectionCallback(Callback):
    """Selects data from the stores a predict run just wrote; each artifact written once."""

    def __init__(
        self,
        out_dir: str | Path,
        methods: dict[str, dict[str, Any]] | list[str],
        budget: int | float | str,
        seed: int = 0,
        features: str | Path | None = None,
        embeddings: str | Path | None = None,
        quality: str | Path | None = None,
        lengths: np.ndarray | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.methods = dict(methods) if isinstance(methods, dict) else {m: {} for m in methods}
        self.budget = budget
        self.seed = int(seed)
        self.stores = {"features": features, "embeddings": embeddings, "quality": quality}
        self.lengths = lengths
        self.written: dict[str, Path] = {}

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier("spokes-selection-start")
        self.written = run_selections(self.out_dir, self.methods, self.budget, self.seed,
                                      lengths=self.lengths, **self.stores)
        trainer.strategy.barrier("spokes-selection-end")
