"""The selection pool: every input of every selector, joined once by document id.

Each source (a feature store, a score file, the corpus's lengths or domain field) comes as
``(ids, values)``. :meth:`SelectionPool.join` keeps the documents of the first source that
every other source has and whose quality scores are finite, in the first source's order, and
aligns every array to that order. Arrays already in that order are not copied (a memmapped
gradient store stays on disk). The pipeline's select stage, the Lightning callback and the
``spokes select`` CLI all build their pool here, so they agree on rows and on input hashes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from spokes_lightning.data.id_arrays import IdArray, first_duplicate, id_array
from spokes_lightning.utils.errors import UserError
from spokes_lightning.core import distributed as D
from spokes_lightning.core.vendi import DEFAULT_CHUNK_ROWS
from spokes_lightning.selectors.base import INPUT_HINTS, SelectionInputs, SelectionResult, Selector, get_selector
from spokes_lightning.data.selection_artifact import array_sha256

#: fields hashed into every selection manifest (when present), the same for every entry point
HASHED_FIELDS = ("features", "embeddings", "quality", "domains")
Source = tuple[Sequence[str], Any]


@dataclass(frozen=True)
class Lazy:
    """A pool context value computed on first use (a tokenizer object, by contrast, is callable
    itself and is stored as it is)."""

    make: Callable[[], Any]


@dataclass
class SelectionPool:
    inputs: SelectionInputs
    n_unselectable: int = 0  # documents of the corpus that cannot be selected (no features, ...)
    #: computes a missing field on first use, e.g. {"domains": clusters of the embeddings}
    providers: dict[str, Callable[["SelectionPool"], Any]] = field(default_factory=dict)
    memo: dict = field(default_factory=dict)  # selections computed in this process (:meth:`run`)
    #: what a selector that trains or reads text may use (the pipeline fills it; the CLI and the
    #: callback leave it empty): "texts" -> pool texts in row order, "validation_texts" -> the
    #: held-out texts, "tokenizer" -> the export tokenizer, "work_dir" (a Path for scratch runs),
    #: "seed" (the run's seed). A value may be a :class:`Lazy` factory, called on first use.
    context: dict[str, Any] = field(default_factory=dict)
    _hashes: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return self.inputs.ids

    @property
    def n(self) -> int:
        return len(self.inputs.ids)

    @property
    def lengths(self) -> np.ndarray | None:
        return self.inputs.lengths

    def run(self, name: str, params: dict, k: int, seed: int, everywhere: bool = False) -> SelectionResult | None:
        """``get_selector(name, **params).select(...)`` on this pool, computed once per settings.

        Under a process group a collective selector runs on every rank with a chunk-aligned row
        shard (scores gathered in rank order); any other selector runs on rank 0 and other ranks
        get None, unless ``everywhere`` (an analysis every rank needs, e.g. SPOKES's alpha sweep).
        """
        selector = get_selector(name, **params)
        inputs = self.inputs_for(selector)
        settings = {key: v for key, v in selector.params.items() if key != "log"}
        key = json.dumps([name, settings, int(k), int(seed)], sort_keys=True, default=str)
        if self.memo.get(key, 0) is None and everywhere:
            del self.memo[key]  # computed on rank 0 only before: compute it here too
        if key not in self.memo:
            rank, world = D.world()
            if world > 1 and selector.collective:
                start, stop = D.shard_bounds(self.n, rank, world, align=DEFAULT_CHUNK_ROWS)
                result = selector.select(inputs.rows(start, stop), k, seed)
                if result.scores is not None:
                    result.scores = np.concatenate(D.all_gather_objects(np.asarray(result.scores)))
            elif rank == 0 or everywhere:
                result = selector.select(inputs, k, seed)
            else:
                result = None
            self.memo[key] = result
        return None if self.memo[key] is None else replace(self.memo[key])

    def inputs_for(self, selector: Selector) -> SelectionInputs:
        """The inputs, with every field the selector requires present (one line if one is missing)."""
        for name in selector.requires:
            if getattr(self.inputs, name) is None and name in self.providers:
                self.provide(name)
            if getattr(self.inputs, name) is None:
                raise UserError(f"method '{selector.name}' needs {name}: {INPUT_HINTS.get(name, name)}")
        return self.inputs

    def need(self, method: str, name: str):
        """``context[name]`` (a :class:`Lazy` made on first use), or one line saying where it exists."""
        if name not in self.context:
            raise UserError(f"method '{method}' needs {name}, which only the pipeline's select stage "
                            "provides (launch/run.py); give the method's settings explicitly elsewhere")
        value = self.context[name]
        if isinstance(value, Lazy):
            value = self.context[name] = value.make()
        return value

    def provide(self, name: str) -> None:
        value = self.providers[name](self)
        if name == "domains":
            self.inputs.domains, self.inputs.domain_names = value
        else:
            setattr(self.inputs, name, value)

    def input_hashes(self) -> dict[str, str]:
        """sha256 of every present input array in pool order (:data:`HASHED_FIELDS` + named scores)."""
        arrays = {f: getattr(self.inputs, f) for f in HASHED_FIELDS}
        arrays.update({f"quality_scores.{k}": v for k, v in (self.inputs.quality_scores or {}).items()})
        arrays.update({f"extras.{k}": v for k, v in (self.inputs.extras or {}).items()})
        for name, value in arrays.items():
            if value is not None and name not in self._hashes:
                self._hashes[name] = array_sha256(np.asarray(value) if not isinstance(value, np.ndarray) else value)
        return {k: v for k, v in sorted(self._hashes.items()) if arrays.get(k) is not None}

    @classmethod
    def join(cls, sources: dict[str, Source], quality_scores: dict[str, Source] | None = None, *,
             strict: bool = False, n_total: int | None = None,
             labels: dict[str, str] | None = None) -> "SelectionPool":
        """Align ``sources`` (field -> (ids, values)) and named ``quality_scores`` by document id.

        ``strict``: every source must cover exactly the same documents (the callback, whose
        stores come from one predict run); otherwise documents missing anywhere are dropped and
        counted. ``n_total`` is the corpus size, for :attr:`n_unselectable`; ``labels`` name
        the sources in error messages (e.g. "embeddings store runs/emb").
        """
        said = lambda name: (labels or {}).get(name, name)  # noqa: E731
        sources = {k: v for k, v in sources.items() if v is not None}
        named = {f"quality_scores.{k}": v for k, v in (quality_scores or {}).items()}
        everything = {**sources, **named}
        if not everything:
            raise UserError("selection needs at least one input (features, embeddings or quality)")
        for name in sources:
            if name not in ("features", "embeddings", "quality", "lengths", "domains") and not name.startswith("extras."):
                raise UserError(f"unknown selection input '{name}'; known: {', '.join(INPUT_HINTS)}")
        ref_name, (ref_ids, _) = next(iter(everything.items()))
        ref = id_array(ref_ids)
        if first_duplicate(ref) is not None:
            raise UserError(f"{said(ref_name)} lists a document id more than once")
        arrays: dict[str, np.ndarray | None] = {}  # None: the same ids in the same order as the reference
        for name, (ids, values) in everything.items():
            arr = ref if name == ref_name else id_array(ids)
            if len(arr) != len(values):
                raise UserError(f"{said(name)} has {len(values)} rows but {len(arr)} ids")
            same = len(arr) == len(ref) and bool(np.array_equal(arr, ref))
            if not same and first_duplicate(arr) is not None:
                raise UserError(f"{said(name)} lists a document id more than once")
            if strict and len(arr) != len(ref):
                raise UserError(f"{said(name)} has {len(arr)} documents but {said(ref_name)} has {len(ref)}")
            if strict and not same and not np.array_equal(np.sort(arr), np.sort(ref)):
                raise UserError(f"{said(name)} and {said(ref_name)} cover different documents")
            arrays[name] = None if same else arr
        keep = np.ones(len(ref), dtype=bool)
        for arr in arrays.values():
            if arr is not None:
                keep &= np.isin(ref, arr)
        ids = ref if keep.all() else ref[keep]

        def rows_of(name):
            arr = arrays[name]
            if arr is None:
                return None if len(ids) == len(ref) else np.flatnonzero(keep)
            order = np.argsort(arr, kind="stable")
            return order[np.searchsorted(arr[order], ids)]

        aligned = {name: _gather(values, rows_of(name),
                                 vector=name not in ("features", "embeddings") and not name.startswith("extras."))
                   for name, (_, values) in everything.items()}
        finite = np.ones(len(ids), dtype=bool)
        for name in ("quality", *named):
            if name in aligned:
                aligned[name] = np.asarray(aligned[name], dtype=np.float64)
                finite &= np.isfinite(aligned[name])
        if not finite.all():  # documents without a finite score cannot be ranked: drop them
            rows = np.flatnonzero(finite)
            ids = ids[rows]
            aligned = {name: _gather(v, rows, vector=isinstance(v, list)) for name, v in aligned.items()}
        domains, domain_names = _labels(aligned.pop("domains")) if "domains" in aligned else (None, None)
        scores = {k.split(".", 1)[1]: aligned.pop(k) for k in list(aligned) if k.startswith("quality_scores.")}
        extras = {k.split(".", 1)[1]: aligned.pop(k) for k in list(aligned) if k.startswith("extras.")}
        inputs = SelectionInputs(ids=IdArray(ids), domains=domains, domain_names=domain_names,
                                 quality_scores=scores or None, extras=extras or None, **aligned)
        total = len(ref) if n_total is None else int(n_total)
        return cls(inputs=inputs, n_unselectable=total - len(ids))


#: a memory-mapped matrix whose rows must be reordered is copied into a temporary file-backed map
#: (in blocks of this many rows) rather than into RAM: a 173M x 1024 store stays on disk
GATHER_ROWS = 1 << 16


def _gather(values, rows: np.ndarray | None, vector: bool):
    """``values[rows]`` (all rows, uncopied, when ``rows`` is None); vectors flattened."""
    if isinstance(values, list):
        return values if rows is None else [values[r] for r in rows]
    if vector:
        values = np.asarray(values)
        values = values.reshape(-1) if values.ndim == 2 and values.shape[1] == 1 else values
    if rows is None:
        return values
    if isinstance(values, np.memmap) and values.ndim == 2:
        import tempfile

        out = np.memmap(tempfile.TemporaryFile(prefix="spokes-pool-"), dtype=values.dtype, mode="w+",
                        shape=(len(rows), values.shape[1]))  # the file is gone once the map is
        for start in range(0, len(rows), GATHER_ROWS):
            block = rows[start : start + GATHER_ROWS]
            order = np.argsort(block, kind="stable")  # read the source in row order
            out[start + order] = values[block[order]]
        return out
    return np.asarray(values[rows])


def _labels(values) -> tuple[np.ndarray, list[str]]:
    """Domain labels as int64 codes into sorted unique names."""
    if isinstance(values, np.ndarray) and values.dtype.kind == "S":  # UTF-8 bytes sort as their code points
        names, codes = np.unique(values, return_inverse=True)
        return codes.astype(np.int64).reshape(-1), [n.decode("utf-8") for n in names.tolist()]
    names = sorted({str(v) for v in values})
    code = {name: i for i, name in enumerate(names)}
    return np.array([code[str(v)] for v in values], dtype=np.int64), names
