"""Feature families: the kinds of per-document features the features stage computes.

Each family is a small :class:`FeatureFamily` subclass in one module of
:mod:`spokes_lightning.pipeline.families`, registered by name with :func:`register`; every
module there is imported on first use, so adding a feature type is adding one file. The
features stage runs the enabled families in ``order`` (a family may read an earlier one's store).

The contract:

* ``name``: the registry key; ``computes``: one line saying what it computes; ``order``;
* ``settings(cfg)``: the config that shapes its output (part of the features stage's key);
* ``enabled(cfg)``: whether this run computes it;
* ``cache_key(ctx)``: what its store derives from (upstream stage keys + settings); a store
  resumes only from chunks made from the same key (:func:`store_for_inputs`);
* ``module(ctx)``: the feature module whose ``manifest()`` is its store's ``manifest.json``
  (None for a family that writes no store);
* ``run(ctx)``: computes (or resumes) its feature store or score file; returns its part of the
  stage's outputs: fields of :class:`~spokes_lightning.pipeline.outputs.FeaturesOutput` by name,
  with per-document arrays for selectors as ``extras.<name>`` (``{"array": .npy, "ids": .npy}``)
  and named scores as ``quality_scores.<name>`` (``{"scores": .npy, "ids": .npy}``);
* ``handed_on(outputs)``: the files among the stage's outputs that later stages read (none
  when this family did not run);
* ``check(cfg)``: preflight, one line for bad settings before any work (called when enabled);
* ``reads``: the names of earlier families whose outputs it reads (their keys are part of its own).

Each family is cached on its own (:func:`run_family`): a family whose key (its settings, the
features stage's upstream keys and the keys of the families it ``reads``) and recorded files are
unchanged is taken from ``features/families/<name>.json`` without loading a model, so a rerun
that only adds or drops a family (a method that needs one) computes that family alone.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np

from spokes_lightning.utils.atomic import save_npy_atomic, write_json_atomic
from spokes_lightning.utils.errors import UserError
from spokes_lightning.utils.settings_hash import settings_hash

#: in each store directory: the key of what its chunks were computed from
INPUTS_FILE = "inputs.json"
#: the files of a finished store that later stages read
STORE_FILES = ("features.npy", "ids.npy", "skipped.json", "manifest.json")
#: the same for a store written before ids.npy (an imported store may be one): ids + skipped in one file
LEGACY_STORE_FILES = ("features.npy", "ids.json", "manifest.json")

_REGISTRY: dict[str, type["FeatureFamily"]] = {}


class FeatureFamily:
    """One kind of per-document feature; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    computes: ClassVar[str] = ""
    order: ClassVar[int] = 100
    reads: ClassVar[tuple[str, ...]] = ()

    def settings(self, cfg) -> dict:
        return {}

    def enabled(self, cfg) -> bool:
        return True

    def cache_key(self, ctx) -> dict | None:
        return None

    def module(self, ctx):
        return None

    def run(self, ctx) -> dict:
        raise NotImplementedError

    def handed_on(self, outputs) -> list[str]:
        """``outputs``: the features stage's :class:`~spokes_lightning.pipeline.outputs.FeaturesOutput`."""
        return []

    def check(self, cfg) -> None:
        """Preflight: refuse bad settings in one line before any stage runs (only when enabled)."""


def register(cls: type[FeatureFamily]) -> type[FeatureFamily]:
    """Class decorator: add a family to the registry under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"feature family {cls.__name__} needs a unique name, got {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_families() -> list[FeatureFamily]:
    """Every family registered so far, in run order (:func:`spokes_lightning.pipeline.families.all_families`
    imports the built-in ones first)."""
    return [cls() for cls in sorted(_REGISTRY.values(), key=lambda c: (c.order, c.name))]


# --------------------------------------------------------------------------- one family's cache

#: under run_dir: one record per family of what it last computed (key, outputs, their files)
FAMILY_RECORDS = ("features", "families")


def family_key(ctx, family: FeatureFamily, upstream: tuple[str, ...], earlier: dict[str, str]) -> str:
    """What ``family``'s outputs derive from: its settings, the upstream stages' keys and the keys
    of the families it reads (``earlier``: name -> key of the families run before it)."""
    from spokes_lightning.pipeline.stage import to_plain

    missing = [name for name in family.reads if name not in earlier]
    if missing:
        raise UserError(f"feature family {family.name} reads {', '.join(missing)}, which did not run before it")
    return settings_hash({"family": family.name, "settings": to_plain(family.settings(ctx.cfg)),
                          "upstream": {name: ctx.keys.get(name) for name in upstream},
                          "reads": {name: earlier[name] for name in family.reads}})


def run_family(ctx, family: FeatureFamily, key: str) -> dict:
    """``family.run(ctx)``, or its recorded outputs when they were made under ``key`` and every file
    they name is as it was written (sizes and digests, as a stage marker checks them)."""
    from spokes_lightning.core.distributed import world
    from spokes_lightning.data.ranks import barrier
    from spokes_lightning.pipeline.outputs import FeaturesOutput
    from spokes_lightning.pipeline.stage import log
    from spokes_lightning.utils.atomic import json_round_trip
    from spokes_lightning.utils.output_check import first_problem, record_outputs

    record = ctx.run_dir.joinpath(*FAMILY_RECORDS, f"{family.name}.json")
    try:
        old = json.loads(record.read_text())
        reusable = old["key"] == key and first_problem(ctx.run_dir, old["files"]) is None
    except (OSError, ValueError, KeyError, TypeError):
        reusable = False
    barrier()  # every rank has looked before rank 0 replaces the record
    if reusable:
        log(f"features: {family.name}: cached (same settings and inputs), skipping")
        return old["outputs"]
    if world()[0] == 0:
        record.unlink(missing_ok=True)
    part = json_round_trip(family.run(ctx))
    if world()[0] == 0:
        files = record_outputs(ctx.run_dir, family.handed_on(FeaturesOutput.from_json(part)))
        write_json_atomic(record, {"key": key, "outputs": part, "files": files})
    barrier()
    return part


# --------------------------------------------------------------------------- shared by families


def extract_kwargs(cfg) -> dict:
    """The ``features.*`` settings :func:`~spokes_lightning.features.extract.extract_features` takes.

    Under ``torchrun`` (a process group of several ranks) Lightning runs on those ranks:
    ``LOCAL_WORLD_SIZE`` devices per node, ``WORLD_SIZE / LOCAL_WORLD_SIZE`` nodes, DDP.
    """
    import os

    from spokes_lightning.core.distributed import world

    out = {"chunk_size": int(cfg.features.chunk_size), "batch_size": int(cfg.features.batch_size),
           "devices": cfg.features.devices, "strategy": cfg.features.strategy}
    _, world_size = world()
    if world_size > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        out.update(devices=local, num_nodes=world_size // local, strategy="ddp")
    return out


def drop_null_store(node, *keys):
    """The config section ``node`` without the ``store`` entry of ``node.<keys>`` when that is null.

    Stage and store keys hash these sections; leaving a null ``store`` out keeps the keys of runs
    made before the setting existed (their computed stores stay usable)."""
    inner = node
    for key in keys:
        inner = inner.get(key) if inner is not None else None
    if inner is None or "store" not in inner or inner.get("store") is not None:
        return node
    from copy import deepcopy

    from omegaconf import open_dict

    copy = target = deepcopy(node)
    for key in keys:
        target = target[key]
    with open_dict(target):
        del target["store"]
    return copy


def corpus_inputs(ctx, **settings) -> dict:
    """What a store over the pool alone (embeddings, classifier quality) derives from."""
    return {"corpus": ctx.keys.get("corpus"), "chunk_size": int(ctx.cfg.features.chunk_size), **settings}


def store_for_inputs(ctx, name: str, derives_from: dict) -> Path:
    """``features/<name>``, emptied first when its chunks were computed from other inputs.

    Chunks resume a killed run only when ``derives_from`` (upstream stage keys and the settings
    that shape the rows) is unchanged: a retrained proxy or another corpus at the same path gives
    a fresh store, as in a new run_dir. Batch size, devices and strategy are not part of it.
    """
    from spokes_lightning.pipeline.stage import log

    from spokes_lightning.data.ranks import barrier
    from spokes_lightning.core.distributed import world

    path = ctx.run_dir / "features" / name
    key = settings_hash(derives_from)
    record = path / INPUTS_FILE
    try:
        same = json.loads(record.read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        same = False
    barrier()  # every rank has looked before rank 0 empties the store
    if not same and world()[0] == 0:
        if path.exists():
            log(f"features: {name}: the chunks there were computed from other inputs; computing them again")
            shutil.rmtree(path)
        write_json_atomic(record, {"key": key, "inputs": derives_from})
    barrier()
    return path


def pool_id_array(pool, block: int = 1 << 16) -> np.ndarray:
    """Every pool id in pool order as ``S<n>`` (a document store is read one id block at a time)."""
    from spokes_lightning.data.id_arrays import encode_ids

    if hasattr(pool, "column_array"):
        parts = [encode_ids(pool.column_array("id", s, s + block)) for s in range(0, len(pool), block)]
    else:
        parts = [encode_ids([d.id for d in pool])]
    return np.concatenate(parts) if parts else encode_ids([])


def read_ids(path) -> list | np.ndarray:
    """A per-document id file: ``.npy`` (``S<n>``) or a JSON list (run dirs of older versions)."""
    import json as _json
    from pathlib import Path as _Path

    path = _Path(path)
    return np.load(path) if path.suffix == ".npy" else _json.loads(path.read_text())


class QualitySource(FeatureFamily):
    """A quality score per pool document -> ``features/quality.npy`` (+ ``quality_ids.npy``, the ids
    as fixed-width UTF-8: 173M ids are no JSON list to parse).

    Exactly one source runs: the one named by ``quality.source``. Subclasses give ``source``
    and ``scores(ctx, pool) -> (scores, extra outputs)``.
    """

    source: ClassVar[str] = ""
    order: ClassVar[int] = 300

    def settings(self, cfg) -> dict:
        return {"quality": cfg.quality}

    def enabled(self, cfg) -> bool:
        return str(cfg.quality.source) == self.source

    def scores(self, ctx, pool) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    def run(self, ctx) -> dict:
        from spokes_lightning.pipeline.data_stages import pool_documents

        pool = pool_documents(ctx)
        scores, extra = self.scores(ctx, pool)
        save_npy_atomic(ctx.path("features", "quality.npy"), np.asarray(scores, dtype=np.float64))
        save_npy_atomic(ctx.path("features", "quality_ids.npy"), pool_id_array(pool))
        return {"quality_source": self.source, **extra,
                "quality": "features/quality.npy", "quality_ids": "features/quality_ids.npy"}

    def handed_on(self, outputs) -> list[str]:
        return [outputs.quality, outputs.quality_ids] if outputs.quality_source == self.source else []


def check_quality_source(cfg, registered: list[FeatureFamily]) -> None:
    """``quality.source`` must name a registered :class:`QualitySource`: one line otherwise."""
    sources = [f.source for f in registered if isinstance(f, QualitySource)]
    if str(cfg.quality.source) not in sources:
        raise UserError(f"quality.source must be {', '.join(sources[:-1])} or {sources[-1]}, "
                        f"got {cfg.quality.source!r}")
