"""The built-in feature families, one module each (see :mod:`spokes_lightning.pipeline.feature_registry`)."""
from __future__ import annotations

import importlib
import pkgutil


def all_families() -> list:
    """Every feature family, the built-in modules imported (and so registered) first, in run order."""
    from spokes_lightning.pipeline.feature_registry import registered_families

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return registered_families()
