"""The report's section on the ``online`` stage: random vs static SPOKES vs online SPOKES at one token budget.

Read from what the stage wrote (``online/comparison.json``, one record per arm, see
:mod:`.online_stage`); absent when the stage did not run or was disabled.
"""
from __future__ import annotations

import json
from pathlib import Path

from spokes_lightning.pipeline.outputs import OnlineOutput

#: what each arm is, in the report's words
ARM_NAMES = {"random": "random", "static": "static SPOKES", "online": "online SPOKES"}


def _scorer(records: dict) -> str | None:
    """The arm whose final model scored every arm's G-Vendi (``gvendi_<arm>_final_model``)."""
    for r in records.values():
        for key in r:
            if key.startswith("gvendi_") and key.endswith("_final_model"):
                return key[len("gvendi_"):-len("_final_model")]
    return None


def online_markdown(outputs: OnlineOutput | None, run_dir: Path, online_cfg) -> str:
    """``## Online reselection``: the stage's comparison table and what it shows; "" without one."""
    if outputs is None or not outputs.ran:
        return ""
    records = json.loads((Path(run_dir) / outputs.comparison).read_text())
    if not records:
        return ""
    scorer = _scorer(records)
    first = next(iter(records.values()))
    lines = ["\n## Online reselection (stage `online`)\n\n",
             f"Every arm trains the same model from the same seed for {first['steps']} steps "
             f"({first['tokens_trained']} tokens) through the same stream of candidate windows "
             f"({online_cfg.window} candidates, a new segment every {online_cfg.every_n_steps} steps); only the "
             "rule that fills a segment differs: " + "; ".join(
                 f"`{arm}`: " + {"random": "a random order of each window",
                                 "static": f"SPOKES selected once before training with the frozen proxy "
                                           f"(`{online_cfg.static_method}` selection)",
                                 "online": "SPOKES reselected every segment with the model being trained "
                                           f"(first segments: `{online_cfg.fallback}`)"}.get(arm, arm)
                 for arm in records) + ".\n\n"]
    if scorer is not None:
        lines.append(f"G-Vendi of the documents each arm trained on, under projections no arm selected with: the "
                     f"`{scorer}` arm's final model (a fresh projection) and the frozen proxy's independent "
                     "projection. Overhead: reselection time as a share of the rest of training.\n\n")
    lines.append(comparison_table(records, scorer or "?"))
    by = lambda key: ", ".join(f"{ARM_NAMES.get(a, a)} {r[key]:.3f}" for a, r in records.items()  # noqa: E731
                               if r.get(key) is not None)
    lines.append(f"\nValidation loss: {by('val_loss')}.")
    if scorer is not None:
        gv = ", ".join(f"{ARM_NAMES.get(a, a)} {r[f'gvendi_{scorer}_final_model']:.1f}" for a, r in records.items())
        lines.append(f" G-Vendi ({scorer} final model): {gv}.")
    return "".join(lines) + " One seed per arm: no intervals, so small differences are not distinguishable from " \
                            "training noise.\n"


def comparison_table(records: dict[str, dict], scorer: str) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = [f"| arm | docs trained on | tokens | G-Vendi ({scorer} final model, indep. proj.) | "
             "G-Vendi (frozen proxy, indep. proj.) | val loss | OLMES avg | fit s | reselection s (sketch / choose) | "
             "overhead |", "|" + "---|" * 10]
    for arm, r in records.items():
        lines.append(f"| {arm} | {r['n_trained_on']} | {r['tokens_trained']} | {fmt(r.get(f'gvendi_{scorer}_final_model'), '.1f')} | "
                     f"{fmt(r.get('gvendi_proxy_independent'), '.1f')} | {r['val_loss']:.3f} | {fmt(r.get('olmes_avg'), '.2f')} | "
                     f"{r['fit_seconds']:.1f} | {r['reselect_seconds']:.1f} ({r['sketch_seconds']:.1f} / "
                     f"{r['choose_seconds']:.1f}) | {100 * r['overhead_share']:.1f}% |")
    return "\n".join(lines) + "\n"
