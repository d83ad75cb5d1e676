"""The selection driver: pool + method specs + budget -> one artifact per method.

Every entry point is a thin adapter over :func:`select_methods`: the pipeline's select stage,
the Lightning :class:`~spokes_lightning.callbacks.selection.SelectionCallback`, the
``spokes select`` CLI and the integrations. For each method it

1. resolves parameters given as ``"auto"`` (a value the caller fixes, e.g. ``selection.alpha``,
   or the selector's own :meth:`~spokes_lightning.selectors.base.Selector.resolve_auto`);
2. resolves the budget: documents (``k``) or tokens (the method ranks the whole pool, or samples
   the same share of documents, and its order is taken until the tokens, copies counted, run out);
3. runs the selector: on rank 0 alone, or on every rank with its row shard when the selector
   is ``collective`` (SPOKES all-reduces its Grams); an error on any rank is raised on all;
4. writes the artifact (rank 0), with multiplicities and the pool's input hashes.

Selectors are deterministic, so a selection is computed once per settings in a process
(:func:`run_selector`'s memo), however many analyses ask for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from spokes_lightning.core import distributed as D
from spokes_lightning.utils.errors import UserError
from spokes_lightning.selectors.base import SelectionResult, selector_class, top_k_indices
from spokes_lightning.data.selection_artifact import check_multiplicity, write_selection
from spokes_lightning.selection.budget import budget_to_count, parse_budget
from spokes_lightning.selection.pool import SelectionPool

BUDGET_UNITS = ("documents", "tokens")


@dataclass(frozen=True)
class Budget:
    """A resolved budget: ``k`` documents, or ``tokens`` (then ``k`` is the same share of documents)."""

    unit: str
    k: int
    tokens: int | None = None

    @classmethod
    def resolve(cls, budget, unit: str, pool: SelectionPool) -> "Budget":
        if unit not in BUDGET_UNITS:
            raise UserError(f"budget unit must be 'documents' or 'tokens', got {unit!r}")
        budget = parse_budget(budget if isinstance(budget, (int, float)) else str(budget))
        n = pool.n
        if unit == "documents":
            return cls(unit, budget_to_count(budget, n))
        if pool.lengths is None:
            raise UserError("a token budget needs the documents' token counts (lengths)")
        total = int(np.asarray(pool.lengths).sum())
        target = int(budget * total) if isinstance(budget, float) else int(budget)
        if not 0 < target <= total:
            raise UserError(f"token budget {budget} is outside (0, {total}] tokens")
        share = target / max(1, total)  # analyses that compare document sets use the same share
        return cls(unit, max(1, min(n, int(n * share))), target)


def on_all_ranks(step: Callable[[], Any]) -> Any:
    """Run ``step``; if it failed on ANY rank, raise on every rank (UserError stays UserError)."""
    value, failure, message = None, None, None
    try:
        value = step()
    except Exception as exc:  # shared with the other ranks so nobody waits forever
        failure, message = exc, f"{type(exc).__name__}: {exc}"
    messages = [m for m in D.all_gather_objects(message) if m]
    if failure is not None:
        raise failure
    if messages:
        if messages[0].startswith("UserError: "):
            raise UserError(messages[0][len("UserError: "):])
        raise RuntimeError(f"selection failed on another rank: {messages[0]}")
    return value


def run_selector(pool: SelectionPool, name: str, params: dict, k: int, seed: int,
                 everywhere: bool = False) -> SelectionResult | None:
    """:meth:`SelectionPool.run` (kept as a function: the driver's callers read it here)."""
    return pool.run(name, params, k, seed, everywhere=everywhere)


def resolve_auto(pool: SelectionPool, method: str, spec: dict, k: int, seed: int,
                 fixed: dict[str, Any], records: dict) -> dict:
    """``spec`` with every "auto" parameter replaced: by ``fixed[key]`` when given, else by the
    selector's :meth:`resolve_auto` (its record kept in ``records[method][key]``)."""
    spec = dict(spec)
    cls = selector_class(spec["selector"])
    for key, value in list(spec.items()):
        if value != "auto" or key == "selector":
            continue
        param = cls.params_spec.get(key)
        if param is None or not param.auto:
            raise UserError(f"method '{method}': parameter {key} cannot be 'auto'")
        if fixed.get(key) not in (None, "auto"):
            spec[key] = fixed[key]
        else:
            others = {p: v for p, v in spec.items() if p not in ("selector", key)}
            spec[key], record = cls.resolve_auto(key, others, pool, k, seed, fixed)
            records.setdefault(method, {})[key] = record
    return spec


def check_spec(method: str, spec: dict) -> None:
    """A method spec names a known selector with valid parameters ("auto" where allowed): one line if not."""
    if "selector" not in spec:
        raise UserError(f"method '{method}' needs a 'selector' key")
    cls = selector_class(spec["selector"])
    params = {}
    for key, value in spec.items():
        if key == "selector":
            continue
        param = cls.params_spec.get(key)
        if value == "auto" and param is not None:
            if not param.auto:
                raise UserError(f"method '{method}': parameter {key} cannot be 'auto'")
            continue  # resolved at select time
        params[key] = value
    cls(**params)


def select_method(pool: SelectionPool, spec: dict, budget: Budget, seed: int) -> SelectionResult | None:
    """One method's final selection (rank 0; None elsewhere): ``k`` documents or a token prefix."""
    spec = dict(spec)
    name = spec.pop("selector")
    if budget.unit == "documents":
        return run_selector(pool, name, spec, budget.k, seed)
    share = selector_class(name).token_budget == "share"
    result = run_selector(pool, name, spec, budget.k if share else pool.n, seed)
    if result is None:
        return None
    order, copies = ((np.asarray(result.indices, dtype=np.int64), check_multiplicity(name, result, len(result.indices)))
                     if share else full_ranking(result, pool.n))
    weighted = np.asarray(pool.lengths, dtype=np.int64)[order] * copies
    fits = np.cumsum(weighted) <= budget.tokens
    keep = max(1, int(fits.sum()) if fits.all() else int(np.argmin(fits)))
    result.indices, result.multiplicity = order[:keep], copies[:keep]
    if result.weights is not None and len(result.weights) == len(order):
        result.weights = np.asarray(result.weights)[:keep]
    return result


def full_ranking(result: SelectionResult, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(every row best first, copies of each): the method's own order, then the rest by score."""
    order = np.asarray(result.indices, dtype=np.int64)
    copies = check_multiplicity("method", result, len(order))
    if len(order) == n:
        return order, copies
    if result.scores is None:
        raise UserError("a token budget needs a method that ranks every document (it returned "
                        f"{len(order)} of {n} without scores)")
    rest = top_k_indices(np.asarray(result.scores), n)
    rest = rest[~np.isin(rest, order)]
    return np.concatenate([order, rest]), np.concatenate([copies, np.ones(len(rest), dtype=np.int64)])


def select_methods(pool: SelectionPool, specs: dict[str, dict], budget, unit: str, seed: int,
                   out_dir: str | Path, fixed: dict[str, Any] | None = None,
                   records: dict | None = None, log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Run every method (name -> spec with a ``selector`` key) and write its artifact under ``out_dir``.

    Call on every rank under torch.distributed (or in one process without it). Returns
    ``{method: {path, params, n_selected, n_copies, n_tokens}}`` on every rank.
    """
    fixed, records = fixed or {}, records if records is not None else {}
    rank, _ = D.world()
    resolved = on_all_ranks(lambda: Budget.resolve(budget, unit, pool))
    hashes = on_all_ranks(lambda: pool.input_hashes() if rank == 0 else {})
    out: dict[str, dict] = {}
    for method, spec in specs.items():
        if "selector" not in spec:
            raise UserError(f"method '{method}' needs a 'selector' key")

        def step(method=method, spec=spec):
            params = resolve_auto(pool, method, spec, resolved.k, seed, fixed, records)
            result = select_method(pool, params, resolved, seed)
            if rank != 0:
                return None
            copies = check_multiplicity(method, result, len(result.indices))
            tokens = None if pool.lengths is None else int(
                (np.asarray(pool.lengths, dtype=np.int64)[result.indices] * copies).sum())
            path = write_selection(out_dir, method, result, pool.ids, params, seed, hashes, tokens)
            return {"path": path, "params": params, "n_selected": int(len(result.indices)),
                    "n_copies": int(copies.sum()), "n_tokens": tokens}

        info = on_all_ranks(step)
        out[method] = D.all_gather_objects(info)[0] if D.world()[1] > 1 else info
        if log is not None and rank == 0:
            log(f"select: {method}: {out[method]['n_selected']} documents"
                + (f" ({out[method]['n_copies']} with copies)" if out[method]["n_copies"] != out[method]["n_selected"] else "")
                + ("" if out[method]["n_tokens"] is None else f", {out[method]['n_tokens']} tokens"))
    return out
