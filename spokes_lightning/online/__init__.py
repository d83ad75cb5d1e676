"""Online reselection: the model being trained picks what it trains on next (SPOKES objective).

Reading order: :mod:`.objective` (the objective of trained-on + new picks, greedy picks),
:mod:`.plan` (segments, windows, how picks become batches), :mod:`.sketch` (gradient sketches of
the live model), :mod:`.reselect` (the rules: online / random / static, and ``build_reselector``,
the framework-free core). The training-loop adapters live with the other integrations:
:mod:`spokes_lightning.integrations.online_lightning` (a DataModule and a callback) and
:mod:`spokes_lightning.integrations.online_hf_trainer` (``OnlineTrainerSelection``: a stock
``transformers.Trainer``).
"""
from spokes_lightning.online.objective import TrainedOnGram, greedy_window_picks, online_objective
from spokes_lightning.online.plan import OnlinePlan, OnlineStreamDataset, SegmentFiller
from spokes_lightning.online.reselect import MODES, OnlineReselector, build_reselector

__all__ = ["MODES", "OnlinePlan", "OnlineReselector", "OnlineStreamDataset", "SegmentFiller", "TrainedOnGram",
           "build_reselector", "greedy_window_picks", "online_objective"]
