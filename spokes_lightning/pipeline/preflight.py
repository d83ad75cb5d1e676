"""Checks that run before any heavy work: a bad config fails in one line, at once.

Each stage checks its own settings (:meth:`~spokes_lightning.pipeline.stage.Stage.check`);
:func:`spokes_lightning.pipeline.stages.check_config` runs them all. This module holds the checks
several stages share."""
from __future__ import annotations

from pathlib import Path

from spokes_lightning.selection.budget import parse_budget
from spokes_lightning.utils.errors import UserError


def document_limit(value, key: str) -> int | None:
    """A ``*.limit`` setting: null (no limit) or a whole number >= 0; one line otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{key} must be a whole number of documents (or null for no limit), got {value!r}")
    if value < 0:
        raise UserError(f"{key} must be >= 0 (or null for no limit), got {value}")
    return value


def hub_resource(ref, setting: str, what: str) -> None:
    """A reference that is not a local directory must be a reachable hub id (fail fast otherwise)."""
    from spokes_lightning.data.hub import hub_is_reachable, looks_like_path, offline_message

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






def check_pool_budget(cfg, n_pool: int) -> None:
    """Once the corpus is read: a document budget must fit the selectable pool."""
    if cfg.selection.budget_unit == "documents":
        budget = parse_budget(str(cfg.selection.budget))
        if isinstance(budget, int) and budget > n_pool:
            raise UserError(f"selection.budget={budget} documents but the pool has only {n_pool} "
                            "(after holding out the validation set)")
