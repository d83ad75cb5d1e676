"""One interface for every data selector (TRAK-style: one abstract class, many implementations).

A selector takes a :class:`SelectionInputs` (the features the method needs), a budget ``k``
(a document count, already resolved) and a seed, and returns a :class:`SelectionResult`:
the selected row indices best first, optional per-document scores/weights, and a stats dict.
Selectors register themselves by name with :func:`register`; the CLI and the pipeline look
them up with :func:`get_selector`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import UserError


@dataclass
class SelectionInputs:
    """What a selector may read. Arrays may be ``np.memmap`` (read-only, N rows each)."""

    features: np.ndarray | None = None  # N x d gradient features (SPOKES, G-Vendi)
    embeddings: np.ndarray | None = None  # N x e sentence embeddings (SemDeDup, clusters)
    quality: np.ndarray | None = None  # N quality scores
    ids: list[str] | None = None  # N document ids
    lengths: np.ndarray | None = None  # N token counts

    @property
    def n(self) -> int:
        for a in (self.features, self.embeddings, self.quality, self.ids, self.lengths):
            if a is not None:
                return len(a)
        raise UserError("selection inputs are empty: give features, embeddings or quality")


@dataclass
class SelectionResult:
    indices: np.ndarray  # int64, best first where the method ranks, else ascending
    scores: np.ndarray | None = None  # per-document score / weight (N), higher = better
    stats: dict[str, Any] = field(default_factory=dict)


class Selector(ABC):
    """Base class: subclasses set ``name``, ``requires`` and implement :meth:`select`."""

    name: ClassVar[str]
    #: which fields of SelectionInputs must be present, e.g. ("features",) or ("quality",)
    requires: ClassVar[tuple[str, ...]] = ()
    #: which field the CLI's ``--features`` file fills for this method
    feature_field: ClassVar[str] = "features"
    #: one-line description shown by ``spokes select --help``
    summary: ClassVar[str] = ""

    def __init__(self, **params: Any):
        self.params = params

    def check_inputs(self, inputs: SelectionInputs) -> None:
        for name in self.requires:
            if getattr(inputs, name) is None:
                raise UserError(f"method '{self.name}' needs {name}")

    @abstractmethod
    def select(self, inputs: SelectionInputs, k: int, seed: int = 0) -> SelectionResult:
        """Return the ``k`` selected row indices (best first) plus scores and stats."""


SELECTORS: dict[str, type[Selector]] = {}


def register(cls: type[Selector]) -> type[Selector]:
    SELECTORS[cls.name] = cls
    return cls


def get_selector(name: str, **params: Any) -> Selector:
    from . import load_all  # noqa: F401  (import side effect: registration)

    if name not in SELECTORS:
        raise UserError(f"unknown method '{name}'; available: {', '.join(available_methods())}")
    return SELECTORS[name](**params)


def available_methods() -> list[str]:
    from . import load_all  # noqa: F401

    return sorted(SELECTORS)


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, best first; ties broken toward the lower index."""
    scores = np.asarray(scores)
    order = np.lexsort((np.arange(len(scores)), -scores.astype(np.float64)))
    return order[:k].astype(np.int64)
