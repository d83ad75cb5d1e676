"""Importing this module registers every built-in selector."""
import importlib

for _name in ("random", "quality", "spokes", "semdedup"):
    try:
        importlib.import_module(f"{__package__}.{_name}")
    except ModuleNotFoundError as exc:  # a selector file not written yet
        if exc.name != f"{__package__}.{_name}":
            raise
