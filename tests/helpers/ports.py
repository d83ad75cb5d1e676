"""Rendezvous ports for multi-process tests that may run side by side (pytest-xdist).

Binding port 0 hands out a port from the kernel's ephemeral range, the same range gloo's own
connections draw from, and two workers can be handed the same port between its release and the
launcher's bind: a rank then joins another test's store and waits forever. Each xdist worker
therefore takes ports from its own block below the ephemeral range (32768 and up on Linux)."""
from __future__ import annotations

import itertools
import os
import socket

_BASE, _BLOCK = 20000, 1000
_counter = itertools.count()


def _worker_index() -> int:
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # "gw3" -> 3; no xdist -> block 0
    digits = "".join(ch for ch in name if ch.isdigit())
    return int(digits or 0) % 12


def free_port() -> int:
    """A port on 127.0.0.1 no other worker of this session is handed, and bindable right now."""
    start = _BASE + _BLOCK * _worker_index()
    for _ in range(_BLOCK):
        port = start + (next(_counter) + os.getpid()) % _BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {start}..{start + _BLOCK - 1}")


def run_with_timeout(cmd, timeout, **kwargs):
    """subprocess.run(capture_output=True, text=True) whose timeout reports what the processes printed."""
    import subprocess

    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        tail = lambda b: (b.decode(errors="replace") if isinstance(b, bytes) else (b or ""))[-3000:]  # noqa: E731
        raise AssertionError(f"{cmd[:6]} ... timed out after {timeout}s\n--- stdout\n{tail(exc.stdout)}"
                             f"\n--- stderr\n{tail(exc.stderr)}") from None
