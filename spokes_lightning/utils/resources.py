"""Where the shipped files are: inside the installed package, or in the source checkout.

A wheel carries the checkout's ``recipes/`` as ``spokes_lightning/recipes`` and ``data/demo/`` as
``spokes_lightning/demo_data`` (``[tool.setuptools.package-dir]`` in pyproject.toml). A source
checkout, with or without an editable install, has neither folder inside the package and reads
the checkout's own folders, so a checkout's paths are what they always were.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

#: packaged name -> the folder in a source checkout
SHIPPED = {"recipes": "recipes", "demo_data": "data/demo"}
#: a recipe path under this prefix names a shipped demo file (see :func:`shipped_data_path`)
DEMO_PREFIX = "data/demo/"


def shipped_dir(name: str) -> Path:
    """The folder that holds the shipped ``name`` (a key of :data:`SHIPPED`)."""
    packaged = resources.files("spokes_lightning") / name
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / SHIPPED[name]  # spokes_lightning/utils/ -> the checkout


def shipped_data_path(path: str) -> str:
    """``path`` itself, or -- when it is a relative ``data/demo/...`` path that names nothing in the
    working directory -- the shipped copy of that demo file (an absolute path)."""
    import glob

    if not path.startswith(DEMO_PREFIX) or glob.glob(path):
        return path
    shipped = shipped_dir("demo_data") / path[len(DEMO_PREFIX):]
    return str(shipped) if glob.glob(str(shipped)) else path
