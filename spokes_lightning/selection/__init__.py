"""The selection layer: the pool every selector reads, the driver, artifacts and budgets."""
