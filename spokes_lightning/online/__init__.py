"""Online reselection: the model being trained picks what it trains on next (SPOKES objective).

Reading order: :mod:`.objective` (the objective of trained-on + new picks, greedy picks),
:mod:`.plan` (segments, windows, how picks become batches), :mod:`.sketch` (gradient sketches of
the live model), :mod:`.reselect` (the rules: online / random / static), then the adapters
:mod:`.lightning` and :mod:`.hf_trainer` (``OnlineTrainerSelection``: a stock ``transformers.Trainer``).
"""
from .objective import TrainedOnGram, greedy_window_picks, online_objective
from .plan import OnlinePlan, OnlineStreamDataset, SegmentFiller
from .reselect import MODES, OnlineReselector

__all__ = ["MODES", "OnlinePlan", "OnlineReselector", "OnlineStreamDataset", "OnlineTrainerSelection",
           "SegmentFiller", "TrainedOnGram", "build_reselector", "greedy_window_picks", "online_objective"]

_LAZY = {"OnlineTrainerSelection": "hf_trainer", "build_reselector": "lightning"}  # import transformers / lightning


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
