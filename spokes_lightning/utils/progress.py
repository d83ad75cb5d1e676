"""The one progress bar: tqdm on stderr, so stdout stays free for results."""
from __future__ import annotations

import sys
from typing import Iterable

#: tqdm settings shared by every bar (also Lightning's training bar, see models/llama.py)
BAR_SETTINGS = {"dynamic_ncols": True, "mininterval": 0.5, "smoothing": 0}


def progress(iterable: Iterable | None = None, desc: str = "", total: int | None = None,
             disable: bool = False, unit: str = "it"):
    """A tqdm bar over ``iterable`` (or a manual one: ``total`` + ``update``) on stderr."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=disable, unit=unit, file=sys.stderr,
                leave=False, **BAR_SETTINGS)
