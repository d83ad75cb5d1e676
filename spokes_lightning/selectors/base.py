"""One interface for every data selector (TRAK-style: one abstract class, many implementations).

A selector takes a :class:`SelectionInputs` (the features the method needs), a budget ``k``
(a document count, already resolved) and a seed, and returns a :class:`SelectionResult`:
the selected row indices best first, optional per-document scores/weights, and a stats dict.
Selectors register themselves by name with :func:`register`; the CLI and the pipeline look
them up with :func:`get_selector`.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from spokes_lightning.utils.errors import UserError


#: every input a selector may read, with the line that tells a user how to provide it
INPUT_HINTS = {
    "features": "gradient features (the features stage, or --features)",
    "embeddings": "sentence embeddings (the features stage, or --embeddings)",
    "quality": "one quality score per document (the features stage, or --quality)",
    "quality_scores": "named quality scores (the features stage, or --quality NAME=FILE)",
    "domains": "a domain label per document (a 'source'/'domain' field, selection.domains, or --domains)",
    "lengths": "token counts per document (the tokenizer stage, or --lengths)",
    "ids": "document ids",
    "extras": "method-specific arrays (a feature family's 'extras.<name>' output, or --extra NAME=FILE)",
}


@dataclass
class SelectionInputs:
    """What a selector may read, N rows each. Arrays may be read-only ``np.memmap``.

    ``quality`` is the primary score (the one quality-only baselines rank by);
    ``quality_scores`` holds every named score (``{"dclm": ..., "fineweb_edu": ...}``), the
    primary one included. ``domains`` are int64 labels into ``domain_names``.
    """

    features: np.ndarray | None = None  # N x d gradient features (SPOKES, G-Vendi)
    embeddings: np.ndarray | None = None  # N x e sentence embeddings (SemDeDup, clusters)
    quality: np.ndarray | None = None  # N primary quality scores
    ids: list[str] | None = None  # N document ids
    lengths: np.ndarray | None = None  # N token counts
    quality_scores: dict[str, np.ndarray] | None = None  # name -> N scores
    domains: np.ndarray | None = None  # N int64 labels
    domain_names: list[str] | None = None  # label -> name
    #: method-specific arrays by name, e.g. Quad's preconditioned reference gradient (a d-vector);
    #: an array with N rows is per document and follows the pool's rows, any other is global
    extras: dict[str, np.ndarray] | None = None

    @property
    def n(self) -> int:
        for a in (self.features, self.embeddings, self.quality, self.ids, self.lengths, self.domains):
            if a is not None:
                return len(a)
        for a in (self.quality_scores or {}).values():
            return len(a)
        raise UserError("selection inputs are empty: give features, embeddings or quality")

    def rows(self, start: int, stop: int) -> "SelectionInputs":
        """The inputs of rows [start, stop) (a rank's shard for collective selectors)."""
        n = self.n
        cut = {name: (None if value is None else value[start:stop])
               for name, value in vars(self).items() if name not in ("quality_scores", "domain_names", "extras")}
        scores = None if self.quality_scores is None else {
            name: v[start:stop] for name, v in self.quality_scores.items()}
        extras = None if self.extras is None else {
            name: v[start:stop] if len(np.shape(v)) and np.shape(v)[0] == n else v for name, v in self.extras.items()}
        return SelectionInputs(**cut, quality_scores=scores, domain_names=self.domain_names, extras=extras)


@dataclass
class SelectionResult:
    """What a selector chose: rows best first, and how often / how heavily each is taken.

    ``multiplicity[i]`` is how many copies of row ``indices[i]`` the training data holds
    (QuaDMix's sampling gives several; None means one each); ``weights[i]`` an optional
    per-selected-document weight. ``scores`` covers the whole pool (N), higher = better.
    """

    indices: np.ndarray  # int64, best first where the method ranks, else ascending
    scores: np.ndarray | None = None  # per-document score / weight (N), higher = better
    stats: dict[str, Any] = field(default_factory=dict)
    multiplicity: np.ndarray | None = None  # int64 >= 1, aligned with indices
    weights: np.ndarray | None = None  # float, aligned with indices


@dataclass(frozen=True)
class Param:
    """One declared selector parameter: its type, default and allowed values.

    ``kind`` is int, float, str, bool or object (passed through unchecked, e.g. a log callback).
    ``check``/``rule`` bound a number (``rule`` is shown in the error, e.g. "> 0"); ``choices``
    lists the allowed strings. ``None`` is allowed only when the default is ``None``.
    """

    kind: type
    default: Any = None
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    choices: tuple[str, ...] | None = None
    #: the value "auto" is allowed: the driver resolves it before the selector is built
    #: (``selection.<key>`` when that is set, else the selector's :meth:`Selector.resolve_auto`)
    auto: bool = False

    def parse(self, method: str, key: str, value: Any) -> Any:
        where = f"method '{method}': parameter {key}"
        if value is None and self.default is None:
            return None
        if value == "auto" and self.auto:
            raise UserError(f"{where} is 'auto', which is resolved by the pipeline's select stage; "
                            "give a number here")
        if self.kind is object:
            return value
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise UserError(f"{where} must be true or false, got {value!r}")
        if self.kind is str:
            if not isinstance(value, str):
                raise UserError(f"{where} must be a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise UserError(f"{where} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} must be {'an integer' if self.kind is int else 'a number'}, got {value!r}")
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise UserError(f"{where} must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise UserError(f"{where} must be a finite number, got {value!r}")
        if self.check is not None and not self.check(value):
            raise UserError(f"{where} must be {self.rule}, got {value!r}")
        return value


class Selector(ABC):
    """Base class: subclasses set ``name``, ``requires``, ``params_spec`` and implement :meth:`select`.

    Parameters are validated when the selector is built: an unknown key is an error listing
    the known ones, and each value is checked against its :class:`Param` (type, range,
    choices); ``self.params`` then holds every declared parameter, defaults filled in.
    """

    name: ClassVar[str]
    #: which fields of SelectionInputs must be present, e.g. ("features",) or ("domains", "quality")
    requires: ClassVar[tuple[str, ...]] = ()
    #: fields read when present (e.g. SPOKES reads quality when alpha > 0); recorded in the manifest
    reads: ClassVar[tuple[str, ...]] = ()
    #: True when select() calls torch.distributed collectives itself: every rank calls it with
    #: its row shard (the driver cuts the shards); otherwise rank 0 alone selects
    collective: ClassVar[bool] = False
    #: under a token budget: "rank" = called with k = N, its ranking taken until the tokens run out
    #: (methods that rank every document); "share" = called with k = the same share of documents
    #: as the tokens are of the pool, then trimmed to the tokens (methods that sample a set)
    token_budget: ClassVar[str] = "rank"
    #: which field the CLI's ``--features`` file fills for this method
    feature_field: ClassVar[str] = "features"
    #: one-line description shown by ``spokes select --help``
    summary: ClassVar[str] = ""
    #: the parameters this method accepts (``--param KEY=VALUE``, recipe method specs)
    params_spec: ClassVar[dict[str, Param]] = {}

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.params_spec))
        if unknown:
            known = ", ".join(sorted(self.params_spec)) or "(none)"
            raise UserError(f"method '{self.name}': unknown parameter(s) {', '.join(unknown)}; known: {known}")
        self.params = {key: spec.parse(self.name, key, params.get(key, spec.default))
                       for key, spec in self.params_spec.items()}

    def check_inputs(self, inputs: SelectionInputs) -> None:
        for name in self.requires:
            if getattr(inputs, name) is None:
                raise UserError(f"method '{self.name}' needs {name}: {INPUT_HINTS.get(name, name)}")

    @classmethod
    def resolve_auto(cls, key: str, params: dict[str, Any], pool, k: int, seed: int,
                     options: dict[str, Any]) -> tuple[Any, dict | None]:
        """The value of parameter ``key`` given as "auto": (value, a record for the report or None).

        ``pool`` is the :class:`~spokes_lightning.selection.pool.SelectionPool`, ``k`` the
        document budget, ``params`` the method's other settings and ``options`` the caller's
        settings for auto resolution (e.g. ``alpha_grid``). Called on every rank.
        """
        raise UserError(f"method '{cls.name}': parameter {key} cannot be 'auto'")

    @abstractmethod
    def select(self, inputs: SelectionInputs, k: int, seed: int = 0) -> SelectionResult:
        """Return the ``k`` selected row indices (best first) plus scores and stats."""


SELECTORS: dict[str, type[Selector]] = {}


def register(cls: type[Selector]) -> type[Selector]:
    """Class decorator: make ``cls`` available under ``cls.name`` (a clash is an error)."""
    known = SELECTORS.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise UserError(f"two selectors are named '{cls.name}': {known.__module__} and {cls.__module__}")
    SELECTORS[cls.name] = cls
    return cls


def get_selector(name: str, **params: Any) -> Selector:
    from spokes_lightning.selectors.discovery import load_selectors

    load_selectors()
    if name not in SELECTORS:
        raise UserError(f"unknown method '{name}'; available: {', '.join(available_methods())}")
    return SELECTORS[name](**params)


def selector_class(name: str) -> type[Selector]:
    from spokes_lightning.selectors.discovery import load_selectors

    load_selectors()
    if name not in SELECTORS:
        raise UserError(f"unknown method '{name}'; available: {', '.join(available_methods())}")
    return SELECTORS[name]


def available_methods() -> list[str]:
    from spokes_lightning.selectors.discovery import load_selectors

    load_selectors()
    return sorted(SELECTORS)


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, best first; ties broken toward the lower index."""
    scores = np.asarray(scores)
    order = np.lexsort((np.arange(len(scores)), -scores.astype(np.float64)))
    return order[:k].astype(np.int64)
