"""SelectionCallback: run data selectors right after a feature-extraction ``Trainer.predict``.

A thin Lightning adapter over the shared selection driver
(:func:`spokes_lightning.selection.driver.select_methods`): at ``on_predict_end`` (called on
every rank) it waits for all ranks, builds the :class:`~spokes_lightning.selection.pool.SelectionPool`
from the finished stores (joined by id; the stores must cover the same documents), runs each
method once and writes one artifact per method from rank 0, then waits again. Collective
selectors (SPOKES) run on every rank with a row shard; the result equals a 1-process run. An
error on any rank is raised on every rank, so no rank is left waiting in a barrier.

The stores must be finished (``FeatureStoreWriter.finalize``) before this callback runs: put
the callback that finalizes them earlier in the Trainer's callback list::

    sel = SelectionCallback("runs/sel", {"random": {}, "semdedup": {"eps": 0.1}},
                            budget="0.5", embeddings="runs/emb", quality="runs/quality")
    Trainer(callbacks=[finalize_stores, sel]).predict(model, loader)

``domains`` (one label per document, in the features store's id order, or ``{id: label}``),
``lengths`` (token counts, same order) and ``quality_scores`` (name -> store path) feed
selectors that need them; ``plugins`` names selector files or modules to load first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from lightning.pytorch.callbacks import Callback

from spokes_lightning.utils.errors import UserError
from spokes_lightning.features.store import open_feature_store
from spokes_lightning.selection.driver import on_all_ranks, select_methods
from spokes_lightning.selection.pool import SelectionPool
from spokes_lightning.selectors import load_plugins

STORE_FIELDS = ("features", "embeddings", "quality")


def pool_from_stores(stores: dict[str, str | Path | None], lengths=None, domains=None,
                     quality_scores: dict[str, str | Path] | None = None) -> SelectionPool:
    """The selection pool of finished feature stores (field -> store directory), joined by id."""
    opened = {field: open_feature_store(path) for field, path in stores.items() if path}
    named = {name: open_feature_store(path) for name, path in (quality_scores or {}).items()}
    if not opened and not named:
        raise UserError("selection needs at least one feature store (features, embeddings or quality)")
    for field, store in opened.items():
        if field == "quality" and store.matrix.ndim == 2 and store.matrix.shape[1] != 1:
            raise UserError(f"quality store {store.path} must be N x 1, got {store.matrix.shape}")
    sources = {field: (store.ids, store.matrix) for field, store in opened.items()}
    labels = {field: f"{field} store {store.path}" for field, store in opened.items()}
    ref_ids = next(iter({**opened, **named}.values())).ids
    for name, values in (("lengths", lengths), ("domains", domains)):
        if values is None:
            continue
        if isinstance(values, Mapping):
            sources[name] = (list(values), list(values.values()))
        else:
            values = list(values) if name == "domains" else np.asarray(values)
            if len(values) != len(ref_ids):
                raise UserError(f"{name} has {len(values)} entries but the stores have {len(ref_ids)} documents")
            sources[name] = (ref_ids, values)
    return SelectionPool.join(sources, {n: (s.ids, s.matrix) for n, s in named.items()}, strict=True,
                              labels=labels)


def run_selections(
    out_dir: str | Path,
    methods: dict[str, dict[str, Any]],
    budget: int | float | str,
    seed: int = 0,
    features: str | Path | None = None,
    embeddings: str | Path | None = None,
    quality: str | Path | None = None,
    lengths: np.ndarray | Sequence[int] | None = None,
    domains: Sequence | Mapping | None = None,
    quality_scores: dict[str, str | Path] | None = None,
    budget_unit: str = "documents",
    plugins: Sequence[str] = (),
) -> dict[str, Path]:
    """Run every method on the stores; rank 0 writes one artifact per method.

    ``methods`` maps an artifact name to its parameters; the selector is the name itself
    unless the parameters hold a ``selector`` key. Call on every rank under torch.distributed
    (or in a single process without one).
    """
    def prepare():
        load_plugins(plugins)
        return pool_from_stores({"features": features, "embeddings": embeddings, "quality": quality},
                                lengths, domains, quality_scores)

    pool = on_all_ranks(prepare)
    specs = {m: {"selector": m, **dict(p or {})} for m, p in methods.items()}
    written = select_methods(pool, specs, budget, budget_unit, seed, out_dir)
    return {m: Path(info["path"]) for m, info in written.items()}


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
        **inputs: Any,
    ):
        self.out_dir = Path(out_dir)
        self.methods = dict(methods) if isinstance(methods, dict) else {m: {} for m in methods}
        self.budget = budget
        self.seed = int(seed)
        self.inputs = {"features": features, "embeddings": embeddings, "quality": quality,
                       "lengths": lengths, **inputs}
        self.written: dict[str, Path] = {}

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier("spokes-selection-start")
        self.written = run_selections(self.out_dir, self.methods, self.budget, self.seed, **self.inputs)
        trainer.strategy.barrier("spokes-selection-end")
