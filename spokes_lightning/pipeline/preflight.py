"""Checks that run before any heavy work: a bad config fails in one line, at once."""
from __future__ import annotations

from pathlib import Path

from ..selection.budget import budget_to_count, parse_budget
from ..errors import UserError
from .stage import to_plain


def known_stages() -> tuple[str, ...]:
    """The names ``stages=[...]`` may list: those of the pipeline's stage list (one source)."""
    from .stages import STAGE_NAMES  # not at import time: the stage modules import this one

    return STAGE_NAMES


def document_limit(value, key: str) -> int | None:
    """A ``*.limit`` setting: null (no limit) or a whole number >= 0; one line otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{key} must be a whole number of documents (or null for no limit), got {value!r}")
    if value < 0:
        raise UserError(f"{key} must be >= 0 (or null for no limit), got {value}")
    return value


def _hub_resource(ref, setting: str, what: str) -> None:
    """A reference that is not a local directory must be a reachable hub id (fail fast otherwise)."""
    from ..features.hub import hub_is_reachable, looks_like_path, offline_message

    if ref is None or Path(str(ref)).expanduser().is_dir():
        return
    if looks_like_path(str(ref)):
        raise UserError(f"{what} directory {ref} does not exist (set {setting}=...)")
    if not hub_is_reachable():
        raise UserError(offline_message(str(ref), what, setting, str(ref).split("/")[-1]))


def check_run_dir(run_dir) -> None:
    """run_dir must be (or be creatable as) a writable directory: one line otherwise."""
    path = Path(str(run_dir))
    if path.exists() and not path.is_dir():
        raise UserError(f"run_dir {path} is a file, not a directory")
    existing = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"run_dir {path} is under {existing}, which is a file")
    import tempfile

    try:  # os.access says yes to root on a read-only mount: try a real file
        tempfile.NamedTemporaryFile(dir=existing, prefix=".spokes-probe-").close()
    except OSError as exc:
        raise UserError(f"run_dir {path} is not writable ({existing}: {exc.strerror or exc})") from None


def check_method_specs(specs: dict, methods, plugins=()) -> None:
    """Every method of ``methods`` has a spec (its own, or ``{selector: name}`` for a selector's
    name, see :func:`.select_stage.resolve_method_specs`) naming a known selector with declared,
    valid parameters."""
    from ..selection.driver import check_spec
    from .select_stage import resolve_method_specs

    for m, spec in resolve_method_specs(specs, methods, plugins).items():
        check_spec(m, spec)


def check_alpha_settings(cfg) -> None:
    """selection.alpha / alpha_sweep / alpha_grid, so that the select stage cannot fail on them
    after the corpus, proxy and features stages have run."""
    from .select_stage import spokes_method

    sel = cfg.selection
    alpha = sel.alpha
    if alpha != "auto" and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                            or not 0 <= float(alpha) <= 1):
        raise UserError(f"selection.alpha must be a number in [0, 1] or 'auto', got {alpha!r}")
    if not isinstance(sel.alpha_sweep, bool):
        raise UserError(f"selection.alpha_sweep must be true or false, got {sel.alpha_sweep!r}")
    grid = to_plain(sel.alpha_grid)
    if not isinstance(grid, list) or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1 for a in grid):
        raise UserError(f"selection.alpha_grid must be a list of numbers in [0, 1], got {grid!r}")
    if spokes_method(cfg) is None:
        return  # alpha=auto and the sweep do not apply (the select stage says so in a note)
    if (alpha == "auto" or sel.alpha_sweep) and not any(0 < a < 1 for a in grid):
        raise UserError("the alpha sweep (selection.alpha=auto or selection.alpha_sweep=true) needs a value "
                        f"strictly between 0 and 1 in selection.alpha_grid, got {grid}")


def check_config(cfg) -> None:
    check_run_dir(cfg.run_dir)
    from .select_stage import selection_plugins

    check_method_specs(to_plain(cfg.selection.specs), cfg.selection.methods, selection_plugins(cfg))
    if cfg.stages is not None:
        known = known_stages()
        for s in cfg.stages:
            if s not in known:
                raise UserError(f"unknown stage '{s}'; stages are: {', '.join(known)}")
    budget = parse_budget(str(cfg.selection.budget))
    if isinstance(budget, float):
        budget_to_count(budget, 10**9)  # range check of the fraction
    elif budget <= 0:
        raise UserError(f"selection.budget must be positive, got {budget}")
    from ..selection.driver import BUDGET_UNITS

    if cfg.selection.budget_unit not in BUDGET_UNITS:
        raise UserError(f"selection.budget_unit must be {' or '.join(map(repr, BUDGET_UNITS))}, "
                        f"got {cfg.selection.budget_unit!r}")
    from ..evaluation.tasks import check_task_names
    from ..features.registry import check_quality_source, families
    from .select_stage import domain_rule

    domain_rule(cfg)
    registered = families()
    check_quality_source(cfg, registered)
    for family in registered:
        if family.enabled(cfg):
            family.check(cfg)
    if cfg.evaluate.tasks:
        check_task_names(list(cfg.evaluate.tasks))
    if cfg.get("online") is not None and cfg.online.enabled:
        check_online(cfg)
    check_alpha_settings(cfg)
    data = cfg.data
    document_limit(data.get("limit"), "data.limit")
    document_limit(cfg.evaluate.get("limit"), "evaluate.limit")
    if data.paths:
        from ..corpus import read_documents, resolve_paths

        resolve_paths(list(data.paths))  # missing files: one line
        read_documents(list(data.paths), text_field=data.text_field, id_field=data.id_field, limit=1)
    elif data.get("hub") and data.hub.get("name"):
        from ..features.hub import hub_is_reachable

        if not hub_is_reachable():
            raise UserError(f"cannot stream hub dataset '{data.hub.name}': the Hugging Face Hub is unreachable "
                            "(offline); point data.paths=[...] at local .jsonl/.jsonl.gz/.parquet copies")
    else:
        raise UserError("no data: set data.paths=[...] (local jsonl/jsonl.gz/parquet) or data.hub.name")
    _hub_resource(cfg.tokenizer.path, "tokenizer.path", "tokenizer")
    _hub_resource(cfg.proxy.model, "proxy.model", "proxy model")
    _hub_resource(cfg.embeddings.model, "embeddings.model", "embedding model")
    if cfg.quality.source == "classifier":
        _hub_resource(cfg.quality.model, "quality.model", "quality classifier")


def check_online(cfg) -> None:
    """The online comparison's settings (stage ``online``), before any heavy work."""
    from ..online.reselect import FALLBACKS, MODES

    o = cfg.online
    for key in ("every_n_steps", "window", "rounds"):
        value = o[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"online.{key} must be a whole number >= 1, got {value!r}")
    bad = [a for a in o.arms if a not in MODES]
    if bad or not o.arms:
        raise UserError(f"online.arms must list some of {', '.join(MODES)}, got {list(o.arms)}")
    if o.fallback not in FALLBACKS:
        raise UserError(f"online.fallback must be one of {', '.join(FALLBACKS)}, got {o.fallback!r}")
    if not (isinstance(o.alpha, (int, float)) and 0 <= float(o.alpha) <= 1):
        raise UserError(f"online.alpha must be a number in [0, 1], got {o.alpha!r}")
    if ("static" in o.arms or o.fallback == "static") and o.static_method not in cfg.selection.methods:
        raise UserError(f"online.static_method {o.static_method!r} is not in selection.methods "
                        f"({', '.join(cfg.selection.methods)})")


def check_pool_budget(cfg, n_pool: int) -> None:
    """Once the corpus is read: a document budget must fit the selectable pool."""
    if cfg.selection.budget_unit == "documents":
        budget = parse_budget(str(cfg.selection.budget))
        if isinstance(budget, int) and budget > n_pool:
            raise UserError(f"selection.budget={budget} documents but the pool has only {n_pool} "
                            "(after holding out the validation set)")
