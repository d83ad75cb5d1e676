"""What a local pretraining run leaves behind: its loss curve, its result and their cache keys.

``metrics.csv`` holds the curve (:func:`curve_to_csv` / :func:`read_curve`); ``result.json``
(a :class:`PretrainResult` without the curve) is written last, and its ``config_hash``
(:func:`run_hashes`) lets a re-run with the same settings and data skip training.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from spokes_lightning.utils.settings_hash import canonical_json

CURVE_FIELDS = ("step", "tokens_seen", "loss", "lr")


@dataclass
class PretrainResult:
    """What one pretraining run produced."""

    out_dir: str
    model_dir: str
    metrics_path: str
    config_hash: str
    steps: int
    tokens_seen: int
    dataset_tokens: int
    epochs: float  # tokens seen / tokens in the dataset
    final_loss: float
    val_loss: float | None
    curve: list[dict] = field(default_factory=list)
    cached: bool = False


def curve_to_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def read_curve(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as fh:
        return [
            {"step": int(r["step"]), "tokens_seen": int(r["tokens_seen"]),
             "loss": float(r["loss"]), "lr": float(r["lr"])}
            for r in csv.DictReader(fh)
        ]


def _file_digest(path: str, *digests) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            for digest in digests:
                digest.update(chunk)


def run_hashes(settings: dict, prefix: str, val_documents) -> tuple[str, str]:
    """(config hash: every setting + the training data + validation texts, data hash: the data alone).

    One pass over the ``.idx`` / ``.bin`` bytes gives both.
    """
    config = hashlib.sha256(canonical_json(settings).encode())
    data = hashlib.sha256()
    for suffix in (".idx", ".bin"):
        _file_digest(prefix + suffix, config, data)
    for text in val_documents or []:
        config.update(hashlib.sha256(text.encode("utf-8")).digest())
    return config.hexdigest()[:16], data.hexdigest()[:16]


def sample_index_dir(out_dir: Path, data_hash: str) -> Path:
    """Megatron's sample-index cache for this data: ``gpt_dataset_cache/<data hash>``.

    Megatron names its cached document / sample / shuffle indices after the dataset's path and
    settings, not its bytes: data re-exported under the same prefix (another selection) would
    reuse indices of the old data. Keyed by the data's hash, it cannot; caches of other data go.
    """
    root = out_dir / "gpt_dataset_cache"
    if root.is_dir():
        for child in root.iterdir():
            if child.name == data_hash:
                continue
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    return root / data_hash


def load_cached(out_dir: Path, wanted_hash: str) -> PretrainResult | None:
    result_path = out_dir / "result.json"
    if not result_path.exists():
        return None
    try:
        saved = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if saved.get("config_hash") != wanted_hash:
        return None
    # the paths of this out_dir, even when the run_dir was copied or moved since
    saved.update(out_dir=str(out_dir), model_dir=str(out_dir / "model"), metrics_path=str(out_dir / "metrics.csv"))
    if not (out_dir / "model" / "config.json").exists():
        return None
    saved["cached"] = True
    saved["curve"] = read_curve(saved["metrics_path"])
    return PretrainResult(**saved)
