"""Data selectors, one file each, registered by name (see :mod:`.base` and :mod:`.discovery`)."""
from spokes_lightning.selectors.base import (  # noqa: F401
    INPUT_HINTS,
    SELECTORS,
    Param,
    SelectionInputs,
    SelectionResult,
    Selector,
    available_methods,
    get_selector,
    register,
    selector_class,
    top_k_indices,
)
from spokes_lightning.selectors.discovery import load_plugins  # noqa: F401
