"""Selection budgets: a count (``400``) or a fraction (``0.1``) of the pool."""
from __future__ import annotations

import math

from spokes_lightning.utils.errors import UserError


def parse_budget(text: str | int | float) -> int | float:
    """``"400"`` -> 400 (a count); ``"0.1"`` / ``"1.0"`` -> a fraction (written with a point).

    Scientific notation without a point (``"1e3"``) is a count when it is a whole number;
    anything else in that form is refused, since only a decimal point makes a fraction.
    """
    if isinstance(text, bool):
        raise UserError(f"budget must be a count or a fraction, got {text!r}")
    if isinstance(text, (int, float)):
        return text
    s = str(text).strip()
    try:
        if "." in s:
            return float(s)
        if any(c in s for c in "eE"):
            value = float(s)
            if not (math.isfinite(value) and value.is_integer()):
                raise ValueError
            return int(value)
        return int(s)
    except ValueError:
        raise UserError(f"budget must be a count (400 or 1e3) or a fraction with a decimal point (0.1), "
                        f"got {text!r}") from None


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
