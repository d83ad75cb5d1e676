"""The corpus -> Megatron data -> pretraining -> evaluation -> report pipeline.

``launch/run.py`` composes a Hydra recipe and calls :func:`run_pipeline`; the pipeline is a
plain list of stages (:data:`STAGES`), each a small class with one ``run`` method, cached in
``run_dir`` by a hash of its settings and of its upstream stages.
"""
from spokes_lightning.pipeline.stage import RunContext, Stage, run_pipeline  # noqa: F401
