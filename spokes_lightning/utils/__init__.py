"""Helpers every layer may use: atomic writes, one-line user errors, progress bars, shipped resources, output checks and the one settings hash. The bottom layer: it imports nothing of the package."""
