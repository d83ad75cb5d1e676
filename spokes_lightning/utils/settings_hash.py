"""The one way settings become a key: sha256 of their canonical JSON.

Stage markers, feature-family inputs, online arms and plans, QuaDMix searches and proxy runs, and
the HF Trainer's selection fingerprint all key their caches with :func:`settings_hash`, so two
settings give the same key exactly when their canonical JSON is equal.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(settings: Any) -> str:
    """JSON with sorted keys; values JSON cannot hold (paths, numpy scalars) as their ``str``."""
    return json.dumps(settings, sort_keys=True, default=str)


def settings_hash(settings: Any, length: int | None = 16) -> str:
    """The first ``length`` hex digits (all 64 for None) of sha256(:func:`canonical_json`)."""
    digest = hashlib.sha256(canonical_json(settings).encode()).hexdigest()
    return digest if length is None else digest[:length]
