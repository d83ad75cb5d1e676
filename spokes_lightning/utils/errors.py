"""User-facing errors.

Anything a user can get wrong (a missing file, a bad budget, NaN features, ...) raises
:class:`UserError`. Command-line entry points catch it, print ONE line on stderr and exit
with code 2 (no traceback, nothing half-written). Library callers get a normal exception.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

EXIT_BAD_INPUT = 2


class UserError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


def fail(message: str) -> "None":
    """Print ``message`` as one line on stderr and exit with code 2."""
    line = " ".join(str(message).split())
    print(f"error: {line}", file=sys.stderr, flush=True)
    if _in_a_process_group():
        # leave at once: tearing the process group down after the other ranks have gone can abort
        # (gloo), and the launcher would then report a signal instead of this exit code
        sys.stdout.flush()
        os._exit(EXIT_BAD_INPUT)
    raise SystemExit(EXIT_BAD_INPUT)


def _in_a_process_group() -> bool:
    """True inside an initialized torch.distributed group of several ranks (torch is not imported here)."""
    dist = sys.modules.get("torch.distributed")
    try:
        return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
    except Exception:  # a half-initialized group: not ours to judge
        return False


@contextmanager
def user_errors_exit():
    """Turn :class:`UserError` and filesystem errors raised inside the block into ``fail``."""
    try:
        yield
    except UserError as exc:
        fail(str(exc))
    except FileNotFoundError as exc:
        fail(f"file not found: {exc.filename or exc}")
    except OSError as exc:  # read-only directory, a path under a file, a full disk, ...
        where = f" {exc.filename}" if exc.filename else ""
        fail(f"cannot write or read{where}: {exc.strerror or exc}")


def exit_on_uncaught_user_error() -> None:
    """Make a :class:`UserError` that nobody catches end a script like an entry point: one line, exit 2.

    Installs, once per process, a ``sys.excepthook`` that reports an uncaught ``UserError`` with
    :func:`fail` (no traceback) and hands every other exception to the hook it replaced. Code that
    catches the error is unaffected, and so are IPython/Jupyter and pytest (they do not use
    ``sys.excepthook``). The adapters for user-written training scripts (the Hugging Face
    ``Trainer`` ones) call it, so a plain ``trainer.train()`` script reports bad input in one line;
    ``with user_errors_exit():`` around a script's body does the same explicitly.
    """
    previous = sys.excepthook
    if getattr(previous, "_reports_user_errors", False):
        return

    def hook(kind, value, traceback):
        if isinstance(value, UserError):
            fail(str(value))  # SystemExit(2) from the hook: the interpreter exits with code 2
        previous(kind, value, traceback)

    hook._reports_user_errors = True
    sys.excepthook = hook


def require_package(module: str, pip_name: str | None = None):
    """Import an optional dependency or raise a one-line pip hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UserError(
            f"this step needs the '{module}' package: pip install {pip_name or module}"
        ) from exc
