"""spokes-lightning: quality + diversity selection of LLM pretraining data (SPOKES)."""
from spokes_lightning.utils.errors import UserError
from spokes_lightning.core.spokes import SpokesResult, run_spokes
from spokes_lightning.core.vendi import batch_vendi_score, gram_matrix, vendi_score

__all__ = ["UserError", "SpokesResult", "run_spokes", "vendi_score", "batch_vendi_score", "gram_matrix"]
__version__ = "0.1.0"
