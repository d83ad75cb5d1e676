"""Selection budgets: a count (``400``) or a fraction (``0.1``) of the pool."""
from __future__ import annotations

import math

from .errors import UserError


def parse_budget(text: str | int | float) -> int | float:
    """``"400"`` -> 400 (a count); ``"0.1"`` / ``"1.0"`` -> a fraction (written with a point)."""
    if isinstance(text, bool):
        raise UserError(f"budget must be a count or a fraction, got {text!r}")
    if isinstance(text, (int, float)):
        return text
    s = str(text).strip()
    try:
        if any(c in s for c in ".eE"):
            return float(s)
        return int(s)
    except ValueError:
        raise UserError(f"budget must be a count (400) or a fraction (0.1), got {text!r}") from None


def budget_to_count(budget: int | float, n: int) -> int:
    """Resolve a budget against a pool of ``n`` items: floor(fraction * n) or the count itself."""
    if isinstance(budget, float):
        if not (0.0 < budget <= 1.0) or math.isnan(budget):
            raise UserError(f"a fractional budget must be in (0, 1], got {budget}")
        k = int(math.floor(budget * n))
        if k <= 0:
            raise UserError(f"budget {budget} of {n} documents selects nothing")
        return k
    if budget <= 0 or budget > n:
        raise UserError(f"budget must be in [1, {n}] documents, got {budget}")
    return int(budget)
