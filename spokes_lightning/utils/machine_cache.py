"""The machine cache: work that many runs on one machine share, keyed by what determines it.

Today it holds the quality classifier trained on the shipped DCLM labels (the same labels,
embedding model and seed give the same classifier, so a new run copies it instead of embedding
the labels again). Where it lives: the config's ``cache_dir``, else ``$SPOKES_CACHE_DIR``, else
``~/.cache/spokes_lightning``; ``cache_dir: false`` turns it off.
"""
from __future__ import annotations

import os
from pathlib import Path


def machine_cache(cfg, kind: str) -> Path | None:
    """The folder of ``kind`` in the machine cache, or None when the cache is off."""
    setting = cfg.get("cache_dir") if hasattr(cfg, "get") else None
    if setting is False:
        return None
    root = setting or os.environ.get("SPOKES_CACHE_DIR") or Path.home() / ".cache" / "spokes_lightning"
    return Path(root).expanduser() / kind
