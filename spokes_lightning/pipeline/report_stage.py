"""Stage 8: summary.json (a contract), report.md (paper Table 2 layout + selection table) and plots."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from ..atomic import write_json_atomic, write_text_atomic
from ..evaluation.tasks import TASK_LABELS
from ..features.store import open_feature_store
from ..selection.artifact import read_selection
from ..vendi import batch_vendi_score, vendi_score
from . import plots
from .data_stages import pool_documents, pool_rows
from ..selection.compare import subset_overlap_pct
from .select_stage import ordered_methods, selection_pool, spokes_method
from .stage import RunContext, Stage

#: the report's source-mix column names this many sources, the rest as "other"
SOURCE_MIX_TOP = 3


def _rows_of(store, ids):
    pos = {i: r for r, i in enumerate(store.ids)}
    return np.asarray(store.matrix[np.sort([pos[i] for i in ids])], dtype=np.float32)


def method_summary(ctx: RunContext, method: str, sel_info: dict, pool, independent) -> dict:
    cfg = ctx.cfg
    sel = read_selection(ctx.run_dir / sel_info["selection"])
    idx = np.asarray(sel.indices)
    feats = pool.inputs.features
    rows = np.asarray(feats[np.sort(idx)], dtype=np.float32)
    b = cfg.report.batch_gvendi
    bsize = min(int(b.batch_size), len(idx))
    pre = ctx.results.get("pretrain", {}).get(method, {})
    ev = ctx.results.get("evaluate", {}).get("scores", {}).get(method)
    exp = ctx.results.get("export", {}).get(method, {})
    return {
        "n_selected": int(len(idx)),
        "n_copies": int(sel.copies().sum()),  # documents counted with their multiplicity (QuaDMix)
        "n_tokens": int(exp.get("n_tokens", sel_info["n_tokens"])),
        "epochs": pre.get("epochs"),
        "gvendi": vendi_score(rows),
        "gvendi_independent": vendi_score(_rows_of(independent, sel.ids)) if independent is not None else None,
        "batch_gvendi": batch_vendi_score(feats, bsize, int(b.batches), seed=int(cfg.seed), indices=idx),
        "mean_quality": float(np.mean(pool.inputs.quality[idx])),
        "mean_length": float(np.mean(pool.lengths[idx])),
        "val_loss": pre.get("val_loss"),
        "eval": None if ev is None else {**{t: {k: ev[t][k] for k in ("acc", "stderr", "chance")} for t in ev
                                               if t != "avg"}, "avg": ev["avg"]},
        "selection": sel_info["selection"],
        "megatron_prefix": exp.get("megatron_prefix"),
    }


def _rank_marks(values: list[float]) -> list[str]:
    order = sorted(set(v for v in values if v is not None and not math.isnan(v)), reverse=True)
    best, second = (order + [None, None])[:2]
    return ["**" if v == best else "<u>" if v == second else "" for v in values]


def table2(summary: dict, tasks: list[str]) -> str:
    methods = [m for m, s in summary["methods"].items() if s["eval"]]
    if not methods:
        return "_No evaluation in this run (evaluate stage disabled or no tasks)._\n"
    head = "| Method | " + " | ".join(TASK_LABELS.get(t, t) for t in tasks) + " | Avg |\n"
    head += "|---" * (len(tasks) + 2) + "|\n"
    cols = tasks + ["avg"]
    values = {m: [summary["methods"][m]["eval"][t]["acc"] if t != "avg" else summary["methods"][m]["eval"]["avg"]
                  for t in cols] for m in methods}
    marks = {m: [""] * len(cols) for m in methods}
    for c in range(len(cols)):
        for m, mark in zip(methods, _rank_marks([values[m][c] for m in methods])):
            marks[m][c] = mark
    lines = []
    for m in methods:
        cells = []
        for c, t in enumerate(cols):
            v = values[m][c]
            se = summary["methods"][m]["eval"][t]["stderr"] if t != "avg" else None
            text = f"{v:.1f}" + (f" ± {se:.1f}" if se is not None and not math.isnan(se) else "")
            mk = marks[m][c]
            cells.append(f"{mk}{text}{'</u>' if mk == '<u>' else mk}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |\n")
    first = summary["methods"][methods[0]]["eval"]
    chance = [first[t]["chance"] for t in tasks]
    lines.append("| _chance_ | " + " | ".join(f"{c:.1f}" for c in chance) + f" | {np.mean(chance):.1f} |\n")
    return head + "".join(lines)


def paper_reference() -> str:
    ref = json.loads((Path(__file__).with_name("paper_table2.json")).read_text())
    head = "| Published (paper Table 2) | " + " | ".join(TASK_LABELS[t] for t in ref["tasks"]) + " | Avg |\n"
    head += "|---" * (len(ref["tasks"]) + 2) + "|\n"
    return head + "".join(f"| {name} | " + " | ".join(f"{v:.1f}" for v in vals) + " |\n"
                          for name, vals in ref["rows"].items())


def source_mix(counts: dict[str, int], top: int = SOURCE_MIX_TOP) -> str:
    """``"c4 50%, fineweb 30%, dolma 15%, other (4 sources) 5%"``: the largest ``top`` sources, then the rest."""
    total = max(1, sum(counts.values()))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    cells = [f"{name} {100 * n / total:.0f}%" for name, n in ranked[:top]]
    rest = ranked[top:]
    if rest:
        cells.append(f"other ({len(rest)} source{'s' if len(rest) > 1 else ''}) "
                     f"{100 * sum(n for _, n in rest) / total:.0f}%")
    return ", ".join(cells)


def selection_table(ctx: RunContext, summary: dict) -> str:
    methods = list(summary["methods"])
    ids = {m: np.asarray(read_selection(ctx.run_dir / summary["methods"][m]["selection"]).indices) for m in methods}
    pool = selection_pool(ctx)
    store = pool_documents(ctx)
    head = ("| Method | n selected | tokens | epochs | G-Vendi | G-Vendi (indep. proj.) | batch G-Vendi | "
            "mean quality | mean length | source mix | " + " | ".join(f"overlap {m} %" for m in methods) + " |\n")
    head += "|---" * (10 + len(methods)) + "|\n"
    lines = []
    for m in methods:
        s = summary["methods"][m]
        srcs: dict[str, int] = {}
        rows = pool_rows(ctx, [pool.ids[i] for i in ids[m]])
        for source in store.take_columns(rows, ("source",))["source"]:
            srcs[source] = srcs.get(source, 0) + 1
        mix = source_mix(srcs)
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        copies = "" if s.get("n_copies", s["n_selected"]) == s["n_selected"] else f" ({s['n_copies']} with copies)"
        lines.append(f"| {m} | {s['n_selected']}{copies} | {s['n_tokens']} | {fmt(s['epochs'], '.2f')} | {s['gvendi']:.1f} | "
                     f"{fmt(s['gvendi_independent'], '.1f')} | {s['batch_gvendi']:.1f} | {s['mean_quality']:.3f} | "
                     f"{s['mean_length']:.0f} | {mix} | "
                     + " | ".join(f"{subset_overlap_pct(ids[m], ids[o]):.0f}" for o in methods) + " |\n")
    return head + "".join(lines)


def corpus_line(corpus: dict) -> str:
    """How the pool was read: documents read, held out, and malformed records passed over."""
    line = (f"\nCorpus: {corpus['n_read']} documents read from {corpus.get('inputs', '?')} input(s), "
            f"{corpus['n_validation']} held out for validation, {corpus['n_pool']} in the pool")
    if corpus.get("skipped_records"):
        line += (f"; {corpus['skipped_records']} malformed record(s) skipped (`data.on_error: skip`), "
                 f"e.g. {corpus['skipped_examples'][0]}")
    return line + ".\n"


def feature_sources(feats: dict) -> str:
    """Where the gradient features and embeddings came from (one line), and why an independent column is n/a."""
    def origin(key: str, computed: str) -> str:
        path = feats.get(f"{key}_imported_from")
        return f"imported from `{path}`" if path else computed

    line = (f"Features: gradients {origin('gradients', 'computed here with the proxy LM')}; "
            f"embeddings {origin('embeddings', 'computed here')}.\n\n")
    if feats.get("gradients_imported_from"):
        line += ("The gradient features were imported: there is no independent projection of them, so the "
                 "G-Vendi (indep. proj.) column is n/a.\n\n")
    return line


def representation_markdown(summary) -> str:
    """Paper Fig. 4 as a table: Vendi of random vs SPOKES under each representation."""
    rows = summary.get("representations")
    if not rows:
        return ""
    head = ("\n### Representations (paper Fig. 4)\n\nSPOKES run on each representation at the spokes budget "
            f"(k = {rows[0]['k']}), each subset scored in its own space; random is the mean of 5 seeds.\n\n"
            "| representation | random | SPOKES | ratio |\n|---|---|---|---|\n")
    return head + "".join(f"| {r['representation']} | {r['random']:.1f} | {r['spokes']:.1f} | "
                          f"{r['spokes'] / r['random']:.2f}x |\n" for r in rows)


class ReportStage(Stage):
    name = "report"
    volatile = ("summary.json",)  # stage_seconds
    needs = ("corpus", "tokenizer", "features", "select", "export", "pretrain", "evaluate")

    def settings(self, cfg):
        return {"report": cfg.report, "wandb": cfg.wandb}

    def handed_on(self, outputs):
        return [outputs["summary"], outputs["report"], *outputs["figures"].values()]

    def run(self, ctx):
        started = time.perf_counter()
        cfg = ctx.cfg
        pool = selection_pool(ctx)
        feats = ctx.output("features")
        independent = (open_feature_store(ctx.run_dir / feats["gradients_independent"])
                       if feats.get("gradients_independent") else None)
        select = ctx.output("select")
        summary = {
            "recipe": str(cfg.recipe_name),
            "n_documents": len(pool.ids),
            "batch_gvendi": {"batch_size": int(cfg.report.batch_gvendi.batch_size),
                             "batches": int(cfg.report.batch_gvendi.batches)},
            "stage_seconds": {},  # filled in last: every stage's wall time, this one's included
            "methods": {m: method_summary(ctx, m, select["methods"][m], pool, independent)
                        for m in ordered_methods(cfg, select["methods"])},
        }
        figures = self.figures(ctx, pool, select, summary)
        report = self.markdown(ctx, summary, figures)
        summary["stage_seconds"] = {**ctx.stage_seconds, self.name: time.perf_counter() - started}
        write_json_atomic(ctx.run_dir / "summary.json", summary)
        write_text_atomic(ctx.run_dir / "report.md", report)
        if cfg.wandb.enabled:
            from .wandb_log import log_comparison

            log_comparison(ctx, summary)
        return {"summary": "summary.json", "report": "report.md", "figures": figures}

    def figures(self, ctx, pool, select, summary) -> dict:
        out = {}
        fig_dir = ctx.run_dir / "figures"
        spokes = spokes_method(ctx.cfg)
        if spokes is not None:
            from .figure_data import representation_table, rounding_curves

            name, params = spokes
            seed = int(ctx.cfg.seed)
            ks, curves, rand = rounding_curves(pool.inputs.features, params, seed)
            plots.gvendi_vs_k(fig_dir / "fig3_gvendi_vs_k.png", ks, curves, rand)
            out["fig3"] = "figures/fig3_gvendi_vs_k.png"
            spokes_rows = read_selection(ctx.run_dir / select["methods"][name]["selection"]).indices
            summary["rounding_curves"] = {"k": ks, "random": rand, **curves}
            summary["representations"] = representation_table(pool.inputs.features, pool.inputs.embeddings,
                                                               np.asarray(spokes_rows), params, seed)
            plots.representation_bars(fig_dir / "fig4_representations.png", summary["representations"])
            out["fig4"] = "figures/fig4_representations.png"
        if select.get("alpha_sweep"):
            sweep = json.loads((ctx.run_dir / select["alpha_sweep"]).read_text())
            plots.alpha_tradeoff(fig_dir / "fig1_alpha_tradeoff.png", sweep["rows"], select["alpha"])
            plots.alpha_overlaps(fig_dir / "fig2_overlaps.png", sweep["rows"], select["alpha"])
            out.update(fig1="figures/fig1_alpha_tradeoff.png", fig2="figures/fig2_overlaps.png")
        curves = {}
        for m, p in ctx.results.get("pretrain", {}).items():
            from ..models.pretrain_record import read_curve

            curves[m] = read_curve(ctx.run_dir / p["metrics"])
        if curves:
            plots.training_curves(fig_dir / "training_curves.png", curves)
            out["curves"] = "figures/training_curves.png"
        return out

    def markdown(self, ctx, summary, figures) -> str:
        from ..evaluation import OLMES_DEPARTURES

        cfg = ctx.cfg
        tasks = list(cfg.evaluate.tasks)
        sel = ctx.output("select")
        contamination = ctx.results.get("evaluate", {}).get("contamination", {})
        parts = [f"# spokes-lightning report: recipe `{summary['recipe']}`\n",
                 f"Pool: {summary['n_documents']} selectable documents ({sel['n_unselectable']} without features, "
                 f"counted not selected); budget {cfg.selection.budget} ({cfg.selection.budget_unit}); "
                 f"alpha for spokes_quality = {sel['alpha']:g}"
                 f"{' (auto, paper section 3.2)' if cfg.selection.alpha == 'auto' else ''}.\n",
                 corpus_line(ctx.output("corpus")),
                 "\n## Downstream accuracy (paper Table 2 layout; % , ± standard error; **best**, <u>second</u>)\n\n",
                 table2(summary, tasks),
                 "\nScale note: these are tiny local models trained on the demo pool; compare methods with each "
                 "other, not with the published 1B/100B-token numbers below.\n\n", paper_reference(),
                 "\n## Selections\n\nG-Vendi is on the gradient features SPOKES optimized; the independent column "
                 "re-scores the same documents under a gradient sketch with another projection seed.\n\n",
                 feature_sources(ctx.output("features")),
                 selection_table(ctx, summary), representation_markdown(summary),
                 "\n## Decontamination (documents sharing a "
                 f"{cfg.evaluate.decontamination_ngram}-gram with any evaluation item)\n\n| Method | contaminated | of |\n|---|---|---|\n",
                 "".join(f"| {m} | {contamination[m]['n_contaminated']} | {contamination[m]['n_documents']} |\n"
                         for m in ordered_methods(cfg, contamination)),
                 "\n## Departures from OLMES\n\n", "".join(f"- {d}\n" for d in OLMES_DEPARTURES),
                 "\n## Figures\n\n", "".join(f"![{k}]({v})\n\n" for k, v in figures.items()),
                 "\n## Stage wall times\n\nIn `summary.json` (`stage_seconds`), not here: this file is the same, "
                 "byte for byte, whether a run went through at once or was resumed.\n"]
        return "".join(parts)
