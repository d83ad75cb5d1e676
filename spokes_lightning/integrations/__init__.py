"""Adapters for training loops that are not Lightning (:mod:`.accelerate`)."""
