"""Feature stores made from matrices computed elsewhere (``spokes import-features``) and their use
by the pipeline (``features.gradients.store`` / ``embeddings.store``).

:func:`import_features` copies an N x d float16/float32 ``.npy`` (memory-mapped, copied and checked
for NaN/Inf in row blocks, never read whole) and N ids (a text file with one id per line, or an
``.npy`` of strings or integers) into a finished store: ``features.npy``, ``ids.npy``,
``skipped.json`` (empty) and ``manifest.json`` with ``source: imported``, the paths it came from,
``kind``, ``independent_projection: false`` and the provenance settings given. It is built in a
temporary directory next to OUT and renamed into place at the end: a refused or killed import
leaves nothing at OUT.
"""
from __future__ import annotations

import json
import os
import shutil
import secrets
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from spokes_lightning.utils.atomic import atomic_path, write_json_atomic
from spokes_lightning.utils.errors import UserError
from spokes_lightning.data.id_arrays import BLOCK, as_id_array, count_present, first_duplicate, sorted_ids, write_ids_npy
from spokes_lightning.features.store import FEATURES, IDS, LEGACY_IDS, MANIFEST, SKIPPED, open_feature_store

KINDS = ("gradients", "embeddings")
#: manifest keys that describe the result, not where it came from
RESULT_KEYS = ("independent_projection", "dim", "dtype", "n_documents", "n_skipped", "complete")
#: manifest keys the import itself sets (provenance given with --meta may not use them)
RESERVED = ("source", "from", "ids_from", "kind", "projection", "k", "seed", "model", *RESULT_KEYS)
#: bytes of F copied per block
COPY_BYTES = 64 << 20


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # a pickle, text, a truncated file: np.load says many things
        text = str(exc)
        why = ("not a .npy array file (text, pickle or another format)" if "pickle" in text
               else f"{exc.__class__.__name__}: {text.splitlines()[0] if text else ''}")
        raise UserError(f"cannot read {what} file {path}: {why}") from None


def open_source_matrix(path: Path) -> np.ndarray:
    x = _load_npy(path, "features")
    if x.dtype.kind != "f":
        raise UserError(f"features {path} must be float16 or float32, it is {x.dtype}")
    if x.ndim != 2:
        raise UserError(f"features {path} must be a 2-d N x d matrix, it has shape {x.shape}")
    if 0 in x.shape:
        raise UserError(f"features {path} is empty (shape {x.shape})")
    return x


def id_source(path: Path) -> tuple[int, int, Callable[[], Iterator[np.ndarray]]]:
    """``(n, width, blocks)`` of an ids file: ``blocks()`` yields ``S<n>`` arrays (read twice, never whole)."""
    if path.suffix == ".npy":
        arr = _load_npy(path, "ids")
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr.reshape(-1)
        if arr.ndim != 1:
            raise UserError(f"ids {path} must be a 1-d array, it has shape {arr.shape}")

        def blocks():
            for start in range(0, len(arr), BLOCK):
                yield as_id_array(arr[start : start + BLOCK])
    else:
        if not path.is_file():
            raise UserError(f"ids file not found: {path}")

        def blocks():
            with open(path, "rb") as fh:
                pending = []
                for number, line in enumerate(fh, 1):
                    line = line.rstrip(b"\r\n")
                    if not line:
                        raise UserError(f"ids {path}: line {number} is empty (one id per line)")
                    pending.append(line)
                    if len(pending) == BLOCK:
                        yield _bytes_block(pending, path)
                        pending = []
                if pending:
                    yield _bytes_block(pending, path)
    n, width = 0, 1
    for block in blocks():
        if block.dtype.kind == "S" and block.size:
            try:
                np.char.decode(block, "utf-8")
            except UnicodeDecodeError:
                raise UserError(f"ids {path} hold bytes that are not UTF-8 text") from None
        n += len(block)
        width = max(width, block.dtype.itemsize)
    return n, width, blocks


def _bytes_block(lines: list[bytes], path: Path) -> np.ndarray:
    if any(b.endswith(b"\0") for b in lines):
        raise UserError(f"ids {path}: an id ends with a NUL character")
    return np.array(lines, dtype=f"S{max(map(len, lines))}")


def check_out(out: Path, provenance: dict) -> bool:
    """Refuse an OUT that is a file, a non-empty directory or a store imported from other inputs.

    True when OUT is a store imported from the same inputs and settings (it gets replaced)."""
    if not out.parent.is_dir():
        raise UserError(f"output directory does not exist: {out.parent}")
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the feature store")
    if not any(out.iterdir()):
        return False
    try:
        old = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        raise UserError(f"--out {out} is a non-empty directory that is not a feature store; choose a new directory")
    made_from = {k: v for k, v in old.items() if k not in RESULT_KEYS}
    if made_from != provenance:
        differ = sorted(k for k in {*made_from, *provenance} if made_from.get(k) != provenance.get(k))
        raise UserError(f"--out {out} is already a feature store made from something else ({', '.join(differ)} "
                        "differ); choose a new directory or delete it")
    return True


def import_features(features: str | Path, ids: str | Path, out: str | Path, kind: str = "gradients",
                    settings: dict[str, Any] | None = None, log=None) -> dict:
    """Build the store OUT from FEATURES + IDS (see the module doc); returns the command's summary."""
    log = log or (lambda m: print(f"[spokes] {m}", file=sys.stderr, flush=True))
    if kind not in KINDS:
        raise UserError(f"--kind must be {' or '.join(KINDS)}, got {kind!r}")
    features, ids, out = Path(features), Path(ids), Path(out)
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    provenance = {"source": "imported", "from": str(features.resolve()), "ids_from": str(ids.resolve()),
                  "kind": kind, **settings}
    replace = check_out(out, provenance)
    x = open_source_matrix(features)
    n, d = x.shape
    if settings.get("k") is not None and int(settings["k"]) != d:
        raise UserError(f"--k {settings['k']} but features {features} have {d} columns")
    n_ids, width, blocks = id_source(ids)
    if n_ids != n:
        raise UserError(f"features {features} have {n} rows but ids {ids} list {n_ids} ids")
    dtype = np.dtype(np.float32) if x.dtype == np.float64 else x.dtype
    if dtype != x.dtype:
        log(f"import-features: {features} is float64; stored as float32")
    tmp = out.parent / f".{out.name}.import-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # next to OUT (same file system: the final rename is atomic), with the usual permissions
    try:
        write_ids_npy(tmp / IDS, blocks, n, width)
        duplicate = first_duplicate(np.load(tmp / IDS, mmap_mode="r"))
        if duplicate is not None:
            raise UserError(f"ids {ids} list {duplicate!r} more than once")
        copy_rows(x, tmp / FEATURES, dtype, str(features))
        write_json_atomic(tmp / SKIPPED, {})
        write_json_atomic(tmp / MANIFEST, {**provenance, "independent_projection": False, "dim": int(d),
                                           "dtype": str(dtype), "n_documents": int(n), "n_skipped": 0,
                                           "complete": True})
        open_feature_store(tmp)  # the same checks every reader makes
        _move_into_place(tmp, out, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"import-features: {n} x {d} {dtype} {kind} from {features} -> {out}")
    return {"store": str(out), "kind": kind, "n": int(n), "dim": int(d), "dtype": str(dtype)}


def copy_rows(x: np.ndarray, target: Path, dtype: np.dtype, what: str) -> None:
    """``x`` into the ``.npy`` ``target`` in row blocks, each checked for NaN / Inf first."""
    rows = max(1, COPY_BYTES // max(1, x.shape[1] * x.dtype.itemsize))
    with atomic_path(target, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=x.shape)
        for start in range(0, x.shape[0], rows):
            block = np.asarray(x[start : start + rows]).astype(dtype, copy=False)
            ok = np.isfinite(block).all(axis=1)
            if not ok.all():
                raise UserError(f"features {what} contain NaN or Inf (first bad row: {start + int(np.argmin(ok))})")
            out[start : start + len(block)] = block
        out.flush()
        del out


def _move_into_place(tmp: Path, out: Path, replace: bool) -> None:
    if not replace:
        if out.is_dir():
            out.rmdir()  # empty (checked before)
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- the pipeline's side


def configured_store(node) -> Path | None:
    """The ``store`` setting of a config node (``features.gradients`` / ``embeddings``), or None."""
    value = node.get("store") if node is not None else None
    return None if value in (None, "") else Path(str(value)).expanduser()


def check_configured_store(path: Path, setting: str, kind: str) -> None:
    """Preflight (cheap): the directory holds a finished store of this kind; the full checks come when it is used."""
    if not (path / FEATURES).is_file() or not ((path / IDS).is_file() or (path / LEGACY_IDS).is_file()):
        raise UserError(f"{setting}={path} is not a finished feature store (make one with spokes import-features)")
    try:
        found = json.loads((path / MANIFEST).read_text()).get("kind") if (path / MANIFEST).exists() else None
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{setting}={path}: {MANIFEST} cannot be read") from None
    if found not in (None, kind):
        raise UserError(f"{setting}={path} holds {found} features, not {kind}")


def use_configured_store(ctx, path: Path, setting: str, kind: str) -> str:
    """Open and validate the store for this run's pool; its absolute path (the stage output).

    Its ids are joined to the pool by the select stage (extra ids ignored, pool documents
    without a row counted as unselectable); a store whose ids cover none of the pool is refused.
    """
    from spokes_lightning.pipeline.data_stages import pool_documents
    from spokes_lightning.pipeline.stage import log

    check_configured_store(path, setting, kind)
    store = open_feature_store(path)
    store_of_pool = pool_documents(ctx)
    pool = sorted_ids(i for s in range(0, len(store_of_pool), 65536) for i in store_of_pool.column_array("id", s, s + 65536))
    ids = store.ids_array()
    covered = count_present(pool, ids)
    if covered == 0:
        example = ids[0].decode("utf-8", "replace") if len(ids) else "-"
        raise UserError(f"{setting}={path}: none of its {len(ids)} ids is a pool document id "
                        f"(store ids look like {example!r}, pool ids like "
                        f"{pool[0].decode('utf-8', 'replace') if len(pool) else '-'!r})")
    log(f"features: {kind} imported from {path}: {store.matrix.shape}, {covered} of the {len(pool)} pool "
        f"documents have a row ({len(pool) - covered} without), {len(ids) - covered} rows not in the pool")
    return str(path.resolve())
