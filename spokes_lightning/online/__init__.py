"""Online reselection: the model being trained picks what it trains on next (SPOKES objective).

Reading order: :mod:`.objective` (the objective of trained-on + new picks, greedy picks),
:mod:`.plan` (segments, windows, how picks become batches), :mod:`.sketch` (gradient sketches of
the live model), :mod:`.reselect` (the rules: online / random / static), then the adapters
:mod:`.lightning` and :mod:`.hf_trainer`.
"""
from .objective import TrainedOnGram, greedy_window_picks, online_objective
from .plan import OnlinePlan, OnlineStreamDataset, SegmentFiller
from .reselect import MODES, OnlineReselector

__all__ = ["MODES", "OnlinePlan", "OnlineReselector", "OnlineStreamDataset", "SegmentFiller", "TrainedOnGram",
           "greedy_window_picks", "online_objective"]
