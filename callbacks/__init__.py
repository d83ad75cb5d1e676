"""Lightning callbacks of spokes-lightning."""
from .selection import SelectionCallback, run_selections  # noqa: F401
