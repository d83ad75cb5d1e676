"""The built-in feature families, one module each (see :mod:`spokes_lightning.features.registry`)."""
