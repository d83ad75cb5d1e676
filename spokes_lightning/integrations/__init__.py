"""Adapters for training loops that are not Lightning (:mod:`.accelerate`).
:mod:`.hf_trainer`: a stock ``transformers.Trainer`` trained on a selection only (dataset + callback), or
with online reselection (``OnlineTrainerSelection``)."""
