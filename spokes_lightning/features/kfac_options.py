"""The choices and defaults of the K-FAC influence direction (:mod:`.kfac`), without torch, so a
selector can declare its parameters (selectors/quad.py) in a process that never loads a model."""

HESSIANS = ("kfac", "none")
DAMPING_SPLITS = ("pi", "sqrt", "eigen")
QKV_MODES = ("joint", "separate")
DEFAULT_DAMPING = 0.1
DEFAULT_MAX_FACTOR_DIM = 8192
