"""Where selectors come from: this package's files, installed plugins and files a user names.

A selector is one file that defines a :class:`~.base.Selector` subclass decorated with
``@register``. It becomes available in four ways, all equivalent:

* a module in ``spokes_lightning/selectors/`` (found by listing the package: no list to edit);
* an installed package declaring the entry point group ``spokes_lightning.selectors``;
* the ``SPOKES_SELECTORS`` environment variable: module names or ``.py`` paths, separated by
  ``os.pathsep`` (reaches every entry point, DDP workers included);
* :func:`load_plugins`: ``spokes select --plugin FILE``, ``selection.plugins=[...]`` in a recipe,
  or ``SelectionCallback(plugins=[...])``.

A selector file that fails to import is an error naming the file, never a method that
silently disappears from ``--help``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pkgutil
import sys
from pathlib import Path

from spokes_lightning.utils.errors import UserError

ENTRY_POINT_GROUP = "spokes_lightning.selectors"
ENV_VAR = "SPOKES_SELECTORS"
_NOT_SELECTORS = {"base", "discovery"}
_loaded: set[str] = set()


def load_selectors() -> None:
    """Import every built-in selector, the installed plugins and ``$SPOKES_SELECTORS`` (once each)."""
    if "builtin" not in _loaded:
        package = importlib.import_module(__package__)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in _NOT_SELECTORS and not info.name.startswith("_"):
                _import_module(f"{__package__}.{info.name}")
        _loaded.add("builtin")
        _load_entry_points()
    env = os.environ.get(ENV_VAR, "")
    if env:
        load_plugins([p for p in env.split(os.pathsep) if p.strip()])


def load_plugins(plugins) -> list[str]:
    """Import selector plugins given as module names or ``.py`` paths; returns what was loaded."""
    done = []
    for plugin in plugins or []:
        plugin = str(plugin).strip()
        if plugin in _loaded:
            continue
        if plugin.endswith(".py") or os.sep in plugin:
            _import_file(Path(plugin))
        else:
            _import_module(plugin)
        _loaded.add(plugin)
        done.append(plugin)
    return done


def _import_module(name: str) -> None:
    try:
        importlib.import_module(name)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"selector module {name} failed to import: {type(exc).__name__}: {exc}") from None


def _import_file(path: Path) -> None:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise UserError(f"selector plugin file not found: {path}")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"spokes_selector_plugin_{path.stem}_{digest}"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except UserError:
        del sys.modules[name]
        raise
    except Exception as exc:
        del sys.modules[name]
        raise UserError(f"selector plugin {path} failed to import: {type(exc).__name__}: {exc}") from None


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:
            raise UserError(f"selector plugin '{ep.name}' ({ep.value}) failed to import: "
                            f"{type(exc).__name__}: {exc}") from None
