"""One pipeline run per run_dir at a time: an exclusive lock on ``<run_dir>/.run.lock``.

The lock is an ``flock`` on the file, so the kernel drops it when its holder ends in any way
(SIGKILL included); the file itself records who holds it (pid, host, start time). A second
run on the same run_dir stops at once with one line naming the holder. A lock file left
behind by a process that has ended is taken over with a log line. The extra ranks of a DDP job
(processes Lightning or torchrun start with a rank > 0 in the environment) run under the lock
of their rank 0 and do not take it themselves.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from spokes_lightning.utils.errors import UserError

LOCK_NAME = ".run.lock"


def _holder_text(info: dict | None) -> str:
    if not info:
        return "another process (it has not written its pid yet)"
    return f"pid {info.get('pid')} on host {info.get('host')} (started {info.get('started')})"


def _read_holder(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw.decode()) if raw.strip() else None
    except (OSError, ValueError):
        return None


def is_extra_rank() -> bool:
    """True in a process started for a DDP rank other than global rank 0."""
    return any(int(os.environ.get(var, "0") or 0) > 0 for var in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _same_file(fd: int, path: Path) -> bool:
    """True when ``path`` still names the file open as ``fd`` (not removed or replaced by a releaser)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


class RunDirLock:
    """``with RunDirLock(run_dir): ...``: holds the run_dir for this process, or raises UserError."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunDirLock":
        if is_extra_rank():
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise UserError(f"run_dir {self.run_dir} is in use by {_holder_text(holder)}; wait for "
                                    "that run to end, or use another run_dir") from None
                if _same_file(fd, self.path):
                    break
                os.close(fd)  # the holder released and removed it meanwhile: lock the new file
        except OSError as exc:
            raise UserError(f"cannot use run_dir {self.run_dir}: {exc.strerror or exc}") from None
        previous = _read_holder(fd)
        if previous:
            print(f"[spokes] taking over the lock left in {self.path} by {_holder_text(previous)}; "
                  "that process has ended", file=sys.stderr, flush=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        if _same_file(self.fd, self.path):
            self.path.unlink(missing_ok=True)  # removed while still held: a waiting opener re-checks
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
