"""OLMES-style evaluation over local files, validation loss and n-gram decontamination.

Heavy dependencies (lm-eval, transformers) are imported only when a function needs them.
"""
from spokes_lightning.evaluation.decontamination import (
    contaminated_documents,
    contamination_by_selection,
    eval_item_texts,
)
from spokes_lightning.evaluation.departures import OLMES_DEPARTURES
from spokes_lightning.evaluation.run import evaluate_model
from spokes_lightning.evaluation.tasks import ALL_TASKS, TASK_SPECS, chance_level, load_cloze_items
from spokes_lightning.models.val_loss import validation_loss

__all__ = [
    "ALL_TASKS", "OLMES_DEPARTURES", "TASK_SPECS", "chance_level", "contaminated_documents",
    "contamination_by_selection", "eval_item_texts", "evaluate_model", "load_cloze_items",
    "validation_loss",
]
