"""What each stage hands on: one frozen dataclass per stage (paths are relative to run_dir).

A stage's ``run`` returns its output object; the runner stores ``to_json()`` in the stage's
marker ``<run_dir>/stages/<name>.json`` and a later process reads it back with ``from_json``, so
a stage reads what an earlier one made as typed fields (``ctx.output(SelectOutput).methods``),
the same whether the earlier stage ran in this process or was taken from run_dir.

Markers written before these types held plain dicts; ``upgrade`` turns the few shapes that
differ (export and pretrain keyed by method at the top; features' flat ``extras.<name>`` and
``quality_scores.<name>`` keys; a disabled stage's ``{}``) into today's, so existing run
directories stay valid. A marker that cannot be read as its type makes the stage run again.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

O = TypeVar("O", bound="StageOutput")


class OutputFormatError(ValueError):
    """A marker's outputs do not fit the stage's output type."""


def _build(kind: Any, value: Any, where: str) -> Any:
    """``value`` (read from JSON) as ``kind``: dataclasses, dict[str, X], list[X], X | None, plain."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise OutputFormatError(f"{where}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(kind)
        names = {f.name for f in dataclasses.fields(kind) if f.init}
        unknown = sorted(set(value) - names)
        if unknown:
            raise OutputFormatError(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            return kind(**{k: _build(hints[k], v, f"{where}.{k}") for k, v in value.items()})
        except TypeError as err:  # a required field is missing
            raise OutputFormatError(f"{where}: {err}") from None
    if origin is dict:
        if not isinstance(value, dict):
            raise OutputFormatError(f"{where}: expected an object, got {type(value).__name__}")
        return {k: _build(args[1], v, f"{where}[{k!r}]") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise OutputFormatError(f"{where}: expected a list, got {type(value).__name__}")
        return [_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value, where) if len(inner) == 1 else value
    return value


@dataclass(frozen=True)
class StageOutput:
    """Base of the stage outputs: JSON in the marker, typed in the code."""

    #: the name of the stage that makes it (the key of ``RunContext.results``)
    stage: ClassVar[str] = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls: type[O], data: dict) -> O:
        if not isinstance(data, dict):
            raise OutputFormatError(f"{cls.stage}: outputs are not an object")
        return _build(cls, cls.upgrade(dict(data)), cls.stage)

    @classmethod
    def upgrade(cls, data: dict) -> dict:
        """A marker written by an earlier version, in today's shape (the default: unchanged)."""
        return data


def _keyed_by_method(data: dict, probe: str) -> dict:
    """Earlier export/pretrain markers held ``{method: {...}}``; today's hold ``{"methods": {...}}``."""
    methods = data.get("methods")
    if set(data) == {"methods"} and isinstance(methods, dict) and not (probe in methods):
        return data
    return {"methods": data}


# -- corpus, tokenizer, proxy --------------------------------------------------------------------

@dataclass(frozen=True)
class CorpusOutput(StageOutput):
    """The pool and validation document stores, and what reading the corpus counted."""

    stage: ClassVar[str] = "corpus"
    pool: str
    validation: str
    n_read: int
    n_pool: int
    n_validation: int
    sources: dict[str, int] = field(default_factory=dict)
    skipped_records: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    replaced_bytes: int = 0
    derived_ids: int = 0
    inputs: int | None = None  # input files (None: a marker from before it was counted)
    empty_texts: int = 0


@dataclass(frozen=True)
class TokenizerOutput(StageOutput):
    stage: ClassVar[str] = "tokenizer"
    dir: str  # the saved tokenizer
    vocab_size: int
    lengths: str  # tokens per pool document, .npy in pool order
    pool_tokens: int


@dataclass(frozen=True)
class ProxyOutput(StageOutput):
    stage: ClassVar[str] = "proxy"
    model: str  # a run_dir-relative directory when trained here, else the given hub id / path
    trained: bool
    loss: float | None = None


# -- features -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExtraArray:
    """A feature family's array for selectors: per document when ``ids`` is given, else global."""

    array: str
    ids: str | None = None


@dataclass(frozen=True)
class NamedScores:
    """A named per-document score (``quality_scores.<name>``): scores .npy + ids."""

    scores: str
    ids: str


@dataclass(frozen=True)
class FeaturesOutput(StageOutput):
    """The feature families' stores and score files (fields a family did not fill stay None)."""

    stage: ClassVar[str] = "features"
    gradients: str | None = None
    gradients_independent: str | None = None  # another projection seed, for honest scoring
    gradients_imported_from: str | None = None
    embeddings: str | None = None
    embeddings_imported_from: str | None = None
    quality: str | None = None
    quality_ids: str | None = None
    quality_source: str | None = None
    quality_classifier: dict[str, Any] | None = None  # quality.source=dclm_labels: how it was chosen
    quad_reference_info: dict[str, Any] | None = None
    extras: dict[str, ExtraArray] = field(default_factory=dict)
    quality_scores: dict[str, NamedScores] = field(default_factory=dict)

    @classmethod
    def upgrade(cls, data: dict) -> dict:
        """Families hand on ``extras.<name>`` / ``quality_scores.<name>`` keys: gathered into the two maps."""
        out: dict = {}
        for key, value in data.items():
            prefix, _, name = key.partition(".")
            if name and prefix in ("extras", "quality_scores"):
                out.setdefault(prefix, {})[name] = value
            else:
                out[key] = value
        return out


# -- select, export, pretrain, evaluate ------------------------------------------------------------

@dataclass(frozen=True)
class SelectedMethod:
    selection: str  # the selection artifact's directory
    n_selected: int
    n_copies: int
    n_tokens: int


@dataclass(frozen=True)
class SelectOutput(StageOutput):
    stage: ClassVar[str] = "select"
    n_pool: int
    n_unselectable: int
    alpha: float | None  # None: no SPOKES method, so no alpha chosen
    methods: dict[str, SelectedMethod]
    alpha_sweep: str | None = None
    auto_params: str | None = None


@dataclass(frozen=True)
class ExportedMethod:
    n_docs: int
    n_tokens: int  # without the EOD tokens
    megatron_prefix: str  # <prefix>.bin / <prefix>.idx
    script: str
    jsonl: str
    parquet: str
    timings: dict[str, float] = field(default_factory=dict)
    inputs: str = ""  # what it was exported from (ExportStage.method_inputs): equal means the same files


@dataclass(frozen=True)
class ExportOutput(StageOutput):
    stage: ClassVar[str] = "export"
    methods: dict[str, ExportedMethod] = field(default_factory=dict)

    @classmethod
    def upgrade(cls, data: dict) -> dict:
        return _keyed_by_method(data, "megatron_prefix")


@dataclass(frozen=True)
class PretrainRun:
    seed: int
    model_dir: str  # Hugging Face directory
    checkpoint: str  # megatron-core checkpoint
    metrics: str
    final_loss: float
    val_loss: float


@dataclass(frozen=True)
class PretrainedMethod:
    model_dir: str  # the first seed's
    metrics: str
    steps: int
    tokens_seen: int
    dataset_tokens: int
    epochs: float
    final_loss: float  # mean over seeds
    val_loss: float
    runs: list[PretrainRun]


@dataclass(frozen=True)
class PretrainOutput(StageOutput):
    stage: ClassVar[str] = "pretrain"
    methods: dict[str, PretrainedMethod] = field(default_factory=dict)  # empty: pretraining disabled

    @classmethod
    def upgrade(cls, data: dict) -> dict:
        return _keyed_by_method(data, "runs")


@dataclass(frozen=True)
class Contamination:
    n_contaminated: int
    n_documents: int
    ids: list[str]  # the first 50


@dataclass(frozen=True)
class EvaluateOutput(StageOutput):
    stage: ClassVar[str] = "evaluate"
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> task -> summary, + "avg"
    contamination: dict[str, Contamination] = field(default_factory=dict)
    items: dict[str, str] = field(default_factory=dict)  # method -> per-item correctness .npz
    num_fewshot: int | None = None


# -- online, report ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class OnlineOutput(StageOutput):
    stage: ClassVar[str] = "online"
    table: str | None = None  # None: the online stage is off
    comparison: str | None = None
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ran(self) -> bool:
        return self.comparison is not None


@dataclass(frozen=True)
class ReportOutput(StageOutput):
    stage: ClassVar[str] = "report"
    summary: str
    report: str
    figures: dict[str, str] = field(default_factory=dict)


OUTPUT_TYPES: dict[str, type[StageOutput]] = {
    t.stage: t for t in (CorpusOutput, TokenizerOutput, ProxyOutput, FeaturesOutput, SelectOutput, ExportOutput,
                         PretrainOutput, EvaluateOutput, OnlineOutput, ReportOutput)}
