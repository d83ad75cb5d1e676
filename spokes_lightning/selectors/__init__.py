"""Data selectors, one file each, registered by name (see :mod:`.base`)."""
from .base import (  # noqa: F401
    SELECTORS,
    Param,
    SelectionInputs,
    SelectionResult,
    Selector,
    available_methods,
    get_selector,
    register,
    top_k_indices,
)
