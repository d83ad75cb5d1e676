"""What a finished stage hands on, recorded in its marker so that a cached stage is checked before use.

Each file a stage hands on (see :meth:`Stage.handed_on`) is recorded with its size and a
BLAKE2 digest: files up to :data:`FULL_HASH_BYTES` are hashed whole; larger ones (feature
matrices at corpus scale) by their size and :data:`SAMPLE_BLOCKS` blocks spread over the file,
so checking a cached run stays cheap. Sizes are compared first, digests only when every size
matches.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

FULL_HASH_BYTES = 256 << 20
SAMPLE_BLOCKS = 64
SAMPLE_BYTES = 1 << 18


def file_digest(path: str | os.PathLike) -> str:
    """BLAKE2b-128 of the whole file, or (for big files) of 64 blocks spread over it."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
            return h.hexdigest()
        step = (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1)
        for i in range(SAMPLE_BLOCKS):
            fh.seek(i * step)
            h.update(fh.read(SAMPLE_BYTES))
    return "sampled:" + h.hexdigest()


def expand_files(run_dir: Path, rel_paths) -> list[str]:
    """The files (relative to run_dir) behind ``rel_paths``: a directory stands for every file in it."""
    out: list[str] = []
    for rel in rel_paths:
        path = run_dir / rel
        if path.is_dir():
            out.extend(str(p.relative_to(run_dir)) for p in sorted(path.rglob("*"))
                       if p.is_file() and not p.name.startswith(".tmp-"))
        elif path.is_file():
            out.append(str(rel))
    return sorted(set(out))


def record_outputs(run_dir: Path, rel_paths) -> dict[str, dict]:
    """``{relative path: {"size", "digest"}}`` of every file behind ``rel_paths``."""
    return {rel: {"size": (run_dir / rel).stat().st_size, "digest": file_digest(run_dir / rel)}
            for rel in expand_files(run_dir, rel_paths)}


def first_problem(run_dir: Path, record: dict[str, dict]) -> str | None:
    """None when every recorded file is there with its size and digest, else what is wrong (one phrase)."""
    for rel, want in record.items():
        path = run_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size} bytes where {want['size']} were written"
    for rel, want in record.items():
        if file_digest(run_dir / rel) != want["digest"]:
            return f"{rel} has changed since it was written (digest differs)"
    return None


def remove_outputs(run_dir: Path, record: dict[str, dict]) -> None:
    """Delete the recorded files, so that a stage made again cannot reuse any of them."""
    root = run_dir.resolve()
    for rel in record:
        path = (run_dir / rel).resolve()
        if path.is_relative_to(root) and path != root:  # a marker never names files outside run_dir
            path.unlink(missing_ok=True)
