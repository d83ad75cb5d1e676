"""Resolving a model reference (local directory or Hugging Face Hub id) without hanging offline.

Every pretrained component (proxy LM, tokenizer, sentence-transformer, quality classifier)
goes through :func:`load_pretrained`. A local directory is used as is; a missing local
directory is a :class:`UserError`; a hub id is first looked up in the local Hugging Face
cache (``local_files_only``) and only then on the hub, after a short reachability probe, so
an offline machine fails in about a second with one line saying how to point at a local
copy instead of retrying for minutes.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from spokes_lightning.utils.errors import UserError

HUB_PROBE_TIMEOUT_S = 2.0


def looks_like_path(ref: str) -> bool:
    """True for references a user clearly meant as a filesystem path (not ``org/name``)."""
    return (
        ref.startswith(("/", "./", "../", "~"))
        or ref.endswith(("/", os.sep))
        or ref.count("/") > 1
        or os.sep != "/" and os.sep in ref
    )


def hub_offline_reason(timeout_s: float = HUB_PROBE_TIMEOUT_S, flags: tuple[str, ...] = ("HF_HUB_OFFLINE",)) -> str | None:
    """Why the hub cannot be reached (an offline flag in ``flags`` is set, or no TCP connection), else None.

    Behind an HTTPS proxy a direct TCP probe proves nothing, so the hub then counts as reachable.
    """
    for flag in flags:
        if os.environ.get(flag, "").strip().lower() in {"1", "true", "yes", "on"}:
            return f"{flag} is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"cannot reach {host}:{port} ({exc.__class__.__name__})"
    return None


def hub_is_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True unless :func:`hub_offline_reason` has a reason."""
    return hub_offline_reason(timeout_s) is None


def offline_message(ref: str, what: str, setting: str, example: str) -> str:
    return (
        f"cannot load {what} '{ref}': it is not a local directory and the Hugging Face Hub is "
        f"unreachable (offline); download it on a machine with access and point at the local "
        f"directory instead, e.g. {setting}=/path/to/{example}"
    )


def load_pretrained(ref: str | os.PathLike, loader: Callable, *, what: str, setting: str, example: str):
    """Load ``ref`` with ``loader(name, local_files_only=...)``; fail fast and clearly offline.

    Order: an existing local directory; a path-like reference that does not exist
    (:class:`UserError` "... directory X does not exist"); a hub id from the local cache; the
    hub itself only after a short reachability probe (else one :class:`UserError` line).
    """
    ref_str = str(ref)
    path = Path(ref_str).expanduser()
    if path.is_dir():
        return loader(str(path), local_files_only=True)
    if path.exists():
        raise UserError(f"{what} path {ref_str} is a file, expected a model directory")
    if isinstance(ref, Path) or looks_like_path(ref_str):
        raise UserError(f"{what} directory {ref_str} does not exist")
    try:
        return loader(ref_str, local_files_only=True)
    except UserError:
        raise
    except Exception:  # not in the local cache: only now consider the network
        pass
    if not hub_is_reachable():
        raise UserError(offline_message(ref_str, what, setting, example))
    return loader(ref_str, local_files_only=False)
