"""Report Table 2 with bootstrap intervals and paired differences against a baseline.

No best/second marks: with ~100 items per task a task accuracy has a standard error of
4-5 points, so ranking methods by point estimates is mostly noise. A cell is bold only
when the paired 95 % interval of its difference from the baseline excludes 0.
"""
from __future__ import annotations

import numpy as np

from spokes_lightning.evaluation.stats import B_DEFAULT, LEVEL, mean_ci, paired_difference, validation_loss_ci
from spokes_lightning.evaluation.tasks import TASK_LABELS


def _select(items: dict, tasks: list[str], method: str) -> dict:
    missing = [t for t in tasks if t not in items]
    if missing:
        raise ValueError(f"method {method!r} has no item scores for {missing}")
    return {t: items[t] for t in tasks}


def table2_data(per_method_items: dict, tasks, baseline: str = "random", seed: int = 0,
                B: int = B_DEFAULT, level: float = LEVEL) -> dict:
    """Numbers behind :func:`table2_markdown` (JSON-ready, for summary.json).

    ``per_method_items``: ``{method: {task: 0/1 array (seeds, items)}}``. Returns
    ``{"tasks", "baseline", "B", "seed", "level", "n_items": {task: n}, "methods": {method:
    {"n_seeds", "avg": {"mean", "lo", "hi"}, "per_task": {task: {"mean", "lo", "hi", "n_items"}},
    "vs_baseline": paired_difference(...) or None}}}``; ``baseline`` is None when absent.
    """
    tasks = list(tasks)
    if not per_method_items:
        raise ValueError("no methods to tabulate")
    methods = {m: _select(items, tasks, m) for m, items in per_method_items.items()}
    base = methods.get(baseline)
    out = {"tasks": tasks, "baseline": baseline if base is not None else None, "B": int(B), "seed": int(seed),
           "level": level, "n_items": {}, "methods": {}}
    for m, items in methods.items():
        ci = mean_ci(items, B=B, seed=seed, level=level)
        diff = None
        if base is not None and m != baseline:
            diff = paired_difference(items, base, B=B, seed=seed, level=level)
        out["methods"][m] = {"n_seeds": ci["n_seeds"],
                             "avg": {k: ci[k] for k in ("mean", "lo", "hi")},
                             "per_task": ci["per_task"], "vs_baseline": diff}
        for t, p in ci["per_task"].items():
            if out["n_items"].setdefault(t, p["n_items"]) != p["n_items"]:
                raise ValueError(f"{t}: methods were evaluated on different item counts")
    return out


def _bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


def _counts_phrase(values: list[int], unit: str) -> str:
    lo, hi = min(values), max(values)
    return f"{lo} {unit}" if lo == hi else f"{lo}-{hi} {unit}"


def table2_markdown(per_method_items: dict, tasks, labels: dict | None = None, baseline: str = "random",
                    seed: int = 0, B: int = B_DEFAULT, chance: dict | None = None,
                    data: dict | None = None, val_losses: dict | None = None) -> str:
    """Markdown Table 2: per-task accuracy (mean over seeds), average [95% CI], Δ vs baseline [95% CI].

    ``labels``: task -> column name (default: the paper's). ``chance``: optional task -> chance
    accuracy (%) for a last row. ``data``: a :func:`table2_data` result to render instead of
    recomputing it from ``per_method_items``. ``val_losses``: method -> per-seed validation
    losses, shown in a last column with their interval across seeds.
    """
    tasks = list(tasks)
    labels = {**TASK_LABELS, **(labels or {})}
    if data is None:
        data = table2_data(per_method_items, tasks, baseline=baseline, seed=seed, B=B)
    base = data["baseline"]
    pct = round(100 * data["level"])
    cols = [labels.get(t, t) for t in tasks] + [f"Avg [{pct}% CI]"]
    if base is not None:
        cols.append(f"Δ vs {base} [{pct}% CI]")
    losses = val_loss_data(val_losses, level=data["level"]) if val_losses else {}
    if losses:
        cols.append(f"val loss [{pct}% CI]")
    lines = ["| Method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, row in data["methods"].items():
        diff = row["vs_baseline"]
        cells = []
        for t in tasks:
            marked = diff is not None and diff["per_task"][t]["excludes_zero"]
            arrow = ("↑" if diff["per_task"][t]["diff"] > 0 else "↓") if marked else ""
            cells.append(_bold(f"{row['per_task'][t]['mean']:.1f}{arrow}", marked))
        avg = row["avg"]
        cells.append(f"{avg['mean']:.1f} [{avg['lo']:.1f}, {avg['hi']:.1f}]")
        if base is not None:
            cells.append("(baseline)" if diff is None else
                         _bold(f"{diff['diff']:+.1f} [{diff['lo']:+.1f}, {diff['hi']:+.1f}]", diff["excludes_zero"]))
        if losses:
            v = losses.get(m)
            cells.append("n/a" if v is None else f"{v['mean']:.3f}" + (
                " (one seed)" if v["lo"] is None else f" [{v['lo']:.3f}, {v['hi']:.3f}]"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if chance:
        vals = [float(chance[t]) for t in tasks]
        lines.append("| _chance_ | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {np.mean(vals):.1f} |"
                     + (" |" if base is not None else "") + (" |" if losses else ""))
    legend = _legend(data, tasks, baseline)
    return "\n".join(lines) + "\n\n" + "\n\n".join(legend) + "\n"


def _legend(data: dict, tasks: list[str], baseline: str) -> list[str]:
    """What the numbers, intervals and marks of Table 2 are."""
    base, pct = data["baseline"], round(100 * data["level"])
    n_items = _counts_phrase([data["n_items"][t] for t in tasks], "items per task")
    seeds = sorted({row["n_seeds"] for row in data["methods"].values()})
    seed_text = (f"{seeds[0]} pretraining seed{'s' if seeds[0] > 1 else ''} per method" if len(seeds) == 1 else
                 "pretraining seeds per method: "
                 + ", ".join(f"{m} {r['n_seeds']}" for m, r in data["methods"].items()))
    several = max(seeds) > 1
    legend = [f"Accuracy in % (task's OLMES metric), mean over seeds; {n_items}, {seed_text}. "
              f"Avg is the unweighted mean over the {len(tasks)} tasks. Intervals are {pct}% percentile bootstrap "
              f"intervals, B = {data['B']} resamples (seed {data['seed']}), resampling items within each task"
              + (" and pretraining seeds (hierarchical: seeds, then items)." if several else
                 "; with one pretraining seed they cover item sampling only, not training-seed variation.")]
    if base is None:
        return legend + [f"No `{baseline}` baseline in this run, so no paired differences and no marks."]
    seed_pairing = " (and of seed indices, seed k with seed k, when both have as many seeds)" if several else ""
    return legend + [
        f"Δ is the method minus {base} on the same items, paired: each resample draws one set of items per task"
        f"{seed_pairing} applied to both methods. **Bold**: the paired {pct}% interval of the difference from "
        f"{base} excludes 0 (per-task cells: that task's difference, ↑ above / ↓ below {base}; not adjusted for "
        "multiple comparisons). Methods are not ranked: an unmarked difference is not distinguishable from "
        "resampling noise at this sample size."]


def val_loss_data(per_method_losses: dict, level: float = LEVEL) -> dict:
    """``{method: validation_loss_ci(losses)}`` for summary.json."""
    return {m: validation_loss_ci(v, level=level) for m, v in per_method_losses.items()}


def val_loss_markdown(per_method_losses: dict, level: float = LEVEL) -> str:
    """Markdown table: method, mean validation loss over seeds, t-interval (or n/a with one seed), seeds."""
    pct = round(100 * level)
    data = val_loss_data(per_method_losses, level=level)
    lines = [f"| Method | val loss (mean over seeds) | {pct}% CI | seeds |", "|---|---|---|---|"]
    for m, d in data.items():
        ci = "n/a (one seed)" if d["lo"] is None else f"[{d['lo']:.4f}, {d['hi']:.4f}]"
        lines.append(f"| {m} | {d['mean']:.4f} | {ci} | {d['n_seeds']} |")
    note = (f"Interval: Student-t {pct}% interval of the mean over pretraining seeds; a method with one seed "
            "has no interval, so its differences from others cannot be judged from this table.")
    return "\n".join(lines) + "\n\n" + note + "\n"


# --------------------------------------------------------------------------- notes under Table 2


def shots_markdown(num_fewshot, tasks: list[str]) -> str:
    """Which fixed solved examples preceded every item (OLMES: 5 per task), by item id."""
    from spokes_lightning.evaluation.tasks import shots_for

    k = num_fewshot
    if k is None:
        head = "0-shot for every task except MMLU (5 shots: the first 5 `dev` rows of the item's own subject)."
    else:
        head = (f"{int(k)} fixed shots per task (OLMES): the first {int(k)} rows of each task's `val` split "
                "(left out when `val` is evaluated); MMLU: the first rows of the item's own subject in `dev`.")
    lines = [head + "\n"]
    if k:
        for t in tasks:
            ids = [s.id for s in shots_for(t, k)]
            lines.append(f"- {TASK_LABELS.get(t, t)}: " + (", ".join(f"`{i}`" for i in ids) if t != "mmlu"
                                                        else f"{len(ids)} dev rows ({int(k)} per subject)"))
    return "\n".join(lines) + "\n"


def paper_reference() -> str:
    """The published Table 2 (``paper_table2.json``) as a markdown table."""
    import json
    from pathlib import Path

    ref = json.loads((Path(__file__).with_name("paper_table2.json")).read_text())
    head = "| Published (paper Table 2) | " + " | ".join(TASK_LABELS[t] for t in ref["tasks"]) + " | Avg |\n"
    head += "|---" * (len(ref["tasks"]) + 2) + "|\n"
    return head + "".join(f"| {name} | " + " | ".join(f"{v:.1f}" for v in vals) + " |\n"
                          for name, vals in ref["rows"].items())


def departures_markdown(departures: list[str], n_items: dict[str, int] | None, split: str,
                        limit: int | None) -> str:
    """The departures from OLMES as a list, with this run's item counts: ``n_items`` (task -> items
    scored, from the evaluate stage's item files, as in Table 2; None: nothing evaluated) in the items
    line and the MMLU line, in place of the shipped files' counts (which the items line keeps, as such)."""
    import re

    if n_items:
        how = f"split `{split}`" + (f"; `evaluate.limit` = {limit} keeps the first {limit} items of each task"
                                    if limit is not None else "; every shipped item")
        run_items = f"Items in this run: {_counts_phrase(list(n_items.values()), 'items per task')} ({how})."
    else:
        run_items = "Items in this run: none evaluated (no evaluate stage, no tasks, or no trained models)."
    out = []
    for d in departures:
        if d.startswith("Items:"):
            d = f"{run_items} Shipped files: {d[len('Items:'):].strip()}"
        elif d.startswith("MMLU is scored as one task") and n_items and "mmlu" in n_items:
            d = re.sub(r"over \d+ items", f"over {n_items['mmlu']} items", d)
        out.append(f"- {d}\n")
    return "".join(out)
