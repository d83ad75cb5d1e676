"""Stage 8: summary.json (a contract), report.md (paper Table 2 layout + selection table) and plots."""
from __future__ import annotations

import json
import time

import numpy as np

from spokes_lightning.utils.atomic import write_json_atomic, write_text_atomic
from spokes_lightning.features.store import open_feature_store
from spokes_lightning.data.selection_artifact import read_selection
from spokes_lightning.core.vendi import batch_vendi_score, vendi_score
from spokes_lightning.pipeline import plots
from spokes_lightning.pipeline.data_stages import pool_documents, pool_rows
from spokes_lightning.core.overlap import subset_overlap_pct
from spokes_lightning.pipeline.select_stage import ordered_methods, selection_pool, spokes_method
from spokes_lightning.pipeline.outputs import (CorpusOutput, EvaluateOutput, ExportOutput, FeaturesOutput,
                                               OnlineOutput, PretrainOutput, ReportOutput, SelectedMethod,
                                               SelectOutput)
from spokes_lightning.pipeline.stage import RunContext, Stage

#: the report's source-mix column names this many sources, the rest as "other"
SOURCE_MIX_TOP = 3


def _pretrained(ctx: RunContext) -> dict:
    out = ctx.optional(PretrainOutput)
    return out.methods if out else {}


def method_summary(ctx: RunContext, method: str, sel_info: SelectedMethod, pool, independent) -> dict:
    cfg = ctx.cfg
    sel = read_selection(ctx.run_dir / sel_info.selection)
    idx = np.asarray(sel.indices)
    feats = pool.inputs.features
    rows = np.asarray(feats[np.sort(idx)], dtype=np.float32)
    b = cfg.report.batch_gvendi
    bsize = min(int(b.batch_size), len(idx))
    pre = _pretrained(ctx).get(method)
    evaluated, exported = ctx.optional(EvaluateOutput), ctx.optional(ExportOutput)
    ev = evaluated.scores.get(method) if evaluated else None
    exp = exported.methods.get(method) if exported else None
    return {
        "n_selected": int(len(idx)),
        "n_copies": int(sel.copies().sum()),  # documents counted with their multiplicity (QuaDMix)
        "n_tokens": int(exp.n_tokens if exp else sel_info.n_tokens),
        "epochs": pre.epochs if pre else None,
        "gvendi": vendi_score(rows),
        "gvendi_independent": vendi_score(independent.rows_of(sel.ids)) if independent is not None else None,
        "batch_gvendi": batch_vendi_score(feats, bsize, int(b.batches), seed=int(cfg.seed), indices=idx),
        "mean_quality": float(np.mean(pool.inputs.quality[idx])),
        "mean_length": float(np.mean(pool.lengths[idx])),
        "val_loss": pre.val_loss if pre else None,
        "eval": None if ev is None else {**{t: {k: ev[t][k] for k in ("acc", "stderr", "chance")} for t in ev
                                               if t != "avg"}, "avg": ev["avg"]},
        "selection": sel_info.selection,
        "megatron_prefix": exp.megatron_prefix if exp else None,
    }


def item_scores_by_method(ctx: RunContext) -> dict:
    """``{method: {task: 0/1 array (seeds, items)}}`` from the evaluate stage's item files."""
    from spokes_lightning.evaluation.item_scores import load_item_scores

    evaluated = ctx.optional(EvaluateOutput)
    items = evaluated.items if evaluated else {}
    return {m: load_item_scores(ctx.run_dir / path) for m, path in items.items()}


def table2(ctx: RunContext, summary: dict, tasks: list[str]) -> str:
    """Paper Table 2 layout with 95% bootstrap intervals and paired differences to random (no ranks)."""
    from spokes_lightning.pipeline.report_tables import table2_data, table2_markdown

    items = {m: v for m, v in item_scores_by_method(ctx).items() if m in summary["methods"]}
    if not items:
        return "_No evaluation in this run (evaluate stage disabled, no tasks, or no trained models)._\n"
    data = table2_data(items, tasks, baseline="random", seed=int(ctx.cfg.seed))
    summary["table2"] = data
    chance = summary["methods"][next(iter(items))]["eval"]
    pretrained = _pretrained(ctx)
    losses = {m: [r.val_loss for r in pretrained[m].runs] if m in pretrained else [] for m in items}
    losses = {m: v for m, v in losses.items() if v and None not in v}
    return table2_markdown(items, tasks, chance={t: chance[t]["chance"] for t in tasks}, data=data,
                           val_losses=losses or None)


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


def corpus_line(corpus: CorpusOutput) -> str:
    """How the pool was read: documents read, held out, and malformed records passed over."""
    inputs = "?" if corpus.inputs is None else corpus.inputs
    line = (f"\nCorpus: {corpus.n_read} documents read from {inputs} input(s), "
            f"{corpus.n_validation} held out for validation, {corpus.n_pool} in the pool")
    if corpus.skipped_records:
        line += (f"; {corpus.skipped_records} malformed record(s) skipped (`data.on_error: skip`), "
                 f"e.g. {corpus.skipped_examples[0]}")
    if corpus.empty_texts:
        line += f"; {corpus.empty_texts} empty text(s) left out (nothing to select them by)"
    return line + ".\n"


def feature_sources(feats: FeaturesOutput) -> str:
    """Where the gradient features and embeddings came from (one line), and why an independent column is n/a."""
    def origin(path: str | None, computed: str) -> str:
        return f"imported from `{path}`" if path else computed

    line = (f"Features: gradients {origin(feats.gradients_imported_from, 'computed here with the proxy LM')}; "
            f"embeddings {origin(feats.embeddings_imported_from, 'computed here')}.\n\n")
    if feats.gradients_imported_from:
        line += ("The gradient features were imported: there is no independent projection of them, so the "
                 "G-Vendi (indep. proj.) column is n/a.\n\n")
    return line


def representation_markdown(summary) -> str:
    """Paper Fig. 4 as a table: Vendi of random vs SPOKES under each representation."""
    rows = summary.get("representations")
    if not rows:
        return ""
    head = ("\n### Representations (paper Fig. 4)\n\nSPOKES run on each representation at the spokes budget "
            f"(k = {rows[0]['k']}), each subset scored in its own space (Vendi scores of spaces of different "
            "dimension are not on one scale: compare within a row); random is the mean of 5 seeds.\n\n"
            "| representation | dimension | random | SPOKES | ratio |\n|---|---|---|---|---|\n")
    return head + "".join(f"| {r['representation']} | {r.get('dim', '?')} | {r['random']:.1f} | {r['spokes']:.1f} | "
                          f"{r['spokes'] / r['random']:.2f}x |\n" for r in rows)


def _cell(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def alpha_overlap_markdown(sweep: dict | None, chosen: float, paper: dict) -> str:
    """Paper Fig. 2 as a table: this run's alpha sweep beside the paper's chosen-alpha overlaps."""
    if not sweep:
        return ""
    lines = ["\n### Alpha overlaps (paper Fig. 2)\n\nOverlap (%) of the joint SPOKES subset with the quality-only "
             f"and diversity-only subsets at the same budget (k = {sweep['k']}), per alpha; the paper's rows are "
             f"its chosen alpha per corpus ({paper['source']}). {paper['claim']}\n\n",
             "| alpha | overlap with quality-only % | overlap with diversity-only % | G-Vendi | mean quality |\n",
             "|---|---|---|---|---|\n"]
    for r in sweep["rows"]:
        mark = " (chosen)" if r["alpha"] == chosen else ""
        lines.append(f"| {r['alpha']:g}{mark} | {r['overlap_quality']:.1f} | {r['overlap_diversity']:.1f} | "
                     f"{r['gvendi']:.1f} | {r['mean_quality']:.3f} |\n")
    for r in paper["rows"]:
        lines.append(f"| paper, {r['dataset']}: {r['alpha']:g} | {r['overlap_quality']:.1f} | "
                     f"{r['overlap_diversity']:.1f} | – | – |\n")
    return "".join(lines)


def gvendi_vs_k_markdown(summary: dict, paper: dict) -> str:
    """Paper Fig. 3 as a table (this run's curves) and the paper's claim (its figure has no readable numbers)."""
    curves = summary.get("rounding_curves")
    if not curves:
        return ""
    rules = [r for r in curves if r not in ("k", "random")]
    lines = ["\n### G-Vendi vs k (paper Fig. 3)\n\nG-Vendi of the k-subset each rounding rule makes from one "
             "relaxed SPOKES solve (alpha = 0), beside a random k-subset; the last k is the whole pool.\n\n",
             "| k | " + " | ".join(rules) + " | random |\n", "|---" * (len(rules) + 2) + "|\n"]
    for i, k in enumerate(curves["k"]):
        cells = [f"{curves[r][i]:.1f}" for r in rules] + [f"{curves['random'][i]:.1f}"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |\n")
    below = len(curves["k"]) - 1  # the last k is the whole pool, the same for every rule
    rising = [r for r in rules if all(b >= a for a, b in zip(curves[r][:below], curves[r][1:below]))]
    above = [r for r in rules if all(v > x for v, x in zip(curves[r][:below], curves["random"][:below]))]
    lines.append(f"\nPaper ({paper['source']}): {paper['claim']} This run, for k below the whole pool: "
                 f"G-Vendi rises with k for {', '.join(rising) or 'no rule'}; it is above random at every k for "
                 f"{', '.join(above) or 'no rule'}.\n")
    return "".join(lines)


def table1_markdown(result: dict | None, paper: dict, features_n_layers: int) -> str:
    """Paper Table 1 beside this run's proxy: row-wise Spearman of last-n-layer vs full-gradient kernels."""
    head = "\n## Kernel calibration (paper Table 1)\n\n"
    if result is None:
        return ""
    if "skipped" in result:
        return head + f"Not computed: {result['skipped']}.\n"
    depth, models = result["n_model_layers"], paper["models"]
    ours = {r["last_n_layers"]: r["spearman_vs_full"] for r in result["rows"]}
    ns = sorted(set(ours) | {int(n) for m in models.values() for n in m})
    head_text = " + output head" if result["include_head"] else ""
    how = ("exact per-document gradients" if result["method"] == "exact"
           else "dense Rademacher sketches of the per-document gradients")
    lines = [head, f"Average row-wise Spearman correlation (diagonal excluded) between the cosine kernel of the "
             f"gradients of the last n decoder blocks{head_text} and that of all {depth} blocks{head_text}, over "
             f"{result['documents']} pool documents (first {result['max_length']} tokens), from {how} of this "
             f"run's proxy; the features stage uses n = {features_n_layers}. The paper's columns: its two proxy "
             f"models, {paper['documents']} samples ({paper['source']}).\n\n",
             f"| last n layers | this run's proxy ({depth} layers) | " + " | ".join(f"paper: {m}" for m in models)
             + " |\n", "|---" * (len(models) + 2) + "|\n"]
    for n in ns:
        lines.append(f"| {n} | {_cell(ours.get(n), '.4f')} | "
                     + " | ".join(_cell(v.get(str(n)), ".4f") for v in models.values()) + " |\n")
    lines.append(f"\nPaper: {paper['claim']}\n")
    return "".join(lines)


def fig5_markdown(result: dict | None, paper: dict) -> str:
    """Paper Fig. 5 beside this run: SPOKES subset overlap (%) of each JL dimension k with the reference."""
    head = "\n## JL dimension vs overlap (paper Fig. 5)\n\n"
    if result is None:
        return ""
    if "skipped" in result and "k_ref" not in result:
        return head + f"Not computed: {result['skipped']}.\n"
    if result["reference"] == "proxy_sketch":
        source = (f"a {result['projection']} sketch at k = {result['k_ref']} of the gradients of the proxy's last "
                  f"{result['n_layers']} layers, computed here (first {result['max_length']} tokens)")
    else:
        source = f"this run's gradient features (k = {result['k_ref']})"
        if result.get("note"):
            source += f" ({result['note']})"
    text = (f"Overlap (%) between the diversity-only SPOKES subset of a Rademacher JL map of the reference rows to k "
            f"dimensions and the subset of the reference itself, per selection fraction, over {result['documents']} "
            f"pool documents; reference: {source}. This run's features use k = {result['run_k']}.\n\n")
    if "skipped" in result:
        return head + text + f"Not computed: {result['skipped']}.\n"
    fractions = result["fractions"]
    lines = [head, text, "| k | " + " | ".join(f"fraction {f:g}" for f in fractions) + " |\n",
             "|---" * (len(fractions) + 1) + "|\n"]
    by = {(r["k"], r["fraction"]): r["overlap_pct"] for r in result["rows"]}
    for k in result["k_values"]:
        lines.append(f"| {k} | " + " | ".join(f"{by[(k, f)]:.1f}" for f in fractions) + " |\n")
    for p in paper["points"]:
        lines.append(f"| paper: {p['k']:,} vs {paper['reference_k']:,} ({paper['documents']:,} documents) | "
                     + " | ".join(f"{p['overlap_pct']:.1f}" if f == p["fraction"] else "–" for f in fractions)
                     + " |\n")
    lines.append(f"\nPaper ({paper['source']}; {paper['setup']}): {paper['claim']}\n")
    return "".join(lines)


class ReportStage(Stage):
    name = "report"
    output_type = ReportOutput
    volatile = ("summary.json",)  # stage_seconds
    needs = ("corpus", "tokenizer", "features", "select", "export", "pretrain", "evaluate", "online")

    def settings(self, cfg):
        return {"report": cfg.report, "wandb": cfg.wandb}

    def handed_on(self, outputs):
        return [outputs.summary, outputs.report, *outputs.figures.values()]

    def run(self, ctx):
        started = time.perf_counter()
        cfg = ctx.cfg
        pool = selection_pool(ctx)
        feats = ctx.output(FeaturesOutput)
        independent = (open_feature_store(ctx.run_dir / feats.gradients_independent)
                       if feats.gradients_independent else None)
        select = ctx.output(SelectOutput)
        summary = {
            "recipe": str(cfg.recipe_name),
            "n_documents": len(pool.ids),
            "batch_gvendi": {"batch_size": int(cfg.report.batch_gvendi.batch_size),
                             "batches": int(cfg.report.batch_gvendi.batches)},
            "stage_seconds": {},  # filled in last: every stage's wall time, this one's included
            "methods": {m: method_summary(ctx, m, select.methods[m], pool, independent)
                        for m in ordered_methods(cfg, select.methods)},
        }
        figures = self.figures(ctx, pool, select, summary)
        report = self.markdown(ctx, summary, figures)
        summary["stage_seconds"] = {**ctx.stage_seconds, self.name: time.perf_counter() - started}
        write_json_atomic(ctx.run_dir / "summary.json", summary)
        write_text_atomic(ctx.run_dir / "report.md", report)
        if cfg.wandb.enabled:
            from spokes_lightning.pipeline.wandb_log import log_comparison

            log_comparison(ctx, summary)
        return ReportOutput(summary="summary.json", report="report.md", figures=figures)

    def figures(self, ctx, pool, select, summary) -> dict:
        out = {}
        fig_dir = ctx.run_dir / "figures"
        spokes = spokes_method(ctx.cfg)
        if spokes is not None:
            from spokes_lightning.pipeline.figure_data import representation_table, rounding_curves

            name, params = spokes
            seed = int(ctx.cfg.seed)
            ks, curves, rand = rounding_curves(pool.inputs.features, params, seed)
            plots.gvendi_vs_k(fig_dir / "fig3_gvendi_vs_k.png", ks, curves, rand)
            out["fig3"] = "figures/fig3_gvendi_vs_k.png"
            spokes_rows = read_selection(ctx.run_dir / select.methods[name].selection).indices
            summary["rounding_curves"] = {"k": ks, "random": rand, **curves}
            summary["representations"] = representation_table(pool.inputs.features, pool.inputs.embeddings,
                                                               np.asarray(spokes_rows), params, seed)
            plots.representation_bars(fig_dir / "fig4_representations.png", summary["representations"])
            out["fig4"] = "figures/fig4_representations.png"
        from spokes_lightning.pipeline.figure_data import cached_calibration_studies, paper_figures

        if select.alpha_sweep:
            sweep = json.loads((ctx.run_dir / select.alpha_sweep).read_text())
            plots.alpha_tradeoff(fig_dir / "fig1_alpha_tradeoff.png", sweep["rows"], select.alpha)
            plots.alpha_overlaps(fig_dir / "fig2_overlaps.png", sweep["rows"], select.alpha,
                                 paper_figures()["fig2"]["rows"])
            out.update(fig1="figures/fig1_alpha_tradeoff.png", fig2="figures/fig2_overlaps.png")
        summary.update(cached_calibration_studies(ctx, pool))  # paper Table 1 and Fig. 5 on this run's proxy and pool
        if summary["fig5"].get("rows"):
            plots.jl_overlap(fig_dir / "fig5_jl_overlap.png", summary["fig5"]["rows"], summary["fig5"]["k_ref"],
                             paper_figures()["fig5"])
            out["fig5"] = "figures/fig5_jl_overlap.png"
        curves = {}
        for m, p in _pretrained(ctx).items():
            from spokes_lightning.models.pretrain_record import read_curve

            curves[m] = read_curve(ctx.run_dir / p.metrics)
        if curves:
            plots.training_curves(fig_dir / "training_curves.png", curves)
            out["curves"] = "figures/training_curves.png"
        return out

    def markdown(self, ctx, summary, figures) -> str:
        from spokes_lightning.evaluation import OLMES_DEPARTURES
        from spokes_lightning.pipeline.report_online import online_markdown
        from spokes_lightning.pipeline.report_tables import departures_markdown, paper_reference, shots_markdown

        cfg = ctx.cfg
        tasks = list(cfg.evaluate.tasks)
        sel = ctx.output(SelectOutput)
        evaluated = ctx.optional(EvaluateOutput)
        contamination = evaluated.contamination if evaluated else {}
        from spokes_lightning.pipeline.figure_data import paper_figures

        paper = paper_figures()
        parts = [f"# spokes-lightning report: recipe `{summary['recipe']}`\n",
                 f"Pool: {summary['n_documents']} selectable documents ({sel.n_unselectable} without features, "
                 f"counted not selected); budget {cfg.selection.budget} ({cfg.selection.budget_unit}); ",
                 (f"alpha for spokes_quality = {sel.alpha:g}"  # None: no SPOKES method, no alpha chosen
                  f"{' (auto, paper section 3.2)' if cfg.selection.alpha == 'auto' else ''}.\n"
                  if sel.alpha is not None else "no SPOKES method, so no alpha.\n"),
                 corpus_line(ctx.output(CorpusOutput)),
                 "\n## Downstream accuracy (paper Table 2 layout)\n\n",
                 table2(ctx, summary, tasks),
                 "\nShots: ", shots_markdown(cfg.evaluate.get("num_fewshot"), tasks),
                 "\nScale note: these are tiny local models trained on the demo pool; compare methods with each "
                 "other, not with the published 1B/100B-token numbers below.\n\n", paper_reference(),
                 "\n## Selections\n\nG-Vendi is on the gradient features SPOKES optimized; the independent column "
                 "re-scores the same documents under a gradient sketch with another projection seed.\n\n",
                 feature_sources(ctx.output(FeaturesOutput)),
                 selection_table(ctx, summary), representation_markdown(summary),
                 alpha_overlap_markdown(json.loads((ctx.run_dir / sel.alpha_sweep).read_text())
                                        if sel.alpha_sweep else None, sel.alpha, paper["fig2"]),
                 gvendi_vs_k_markdown(summary, paper["fig3"]),
                 table1_markdown(summary.get("table1"), paper["table1"], int(cfg.features.gradients.n_layers)),
                 fig5_markdown(summary.get("fig5"), paper["fig5"]),
                 "\n## Decontamination (documents sharing a "
                 f"{cfg.evaluate.decontamination_ngram}-gram with any evaluation item)\n\n| Method | contaminated | of |\n|---|---|---|\n",
                 "".join(f"| {m} | {contamination[m].n_contaminated} | {contamination[m].n_documents} |\n"
                         for m in ordered_methods(cfg, contamination)),
                 online_markdown(ctx.optional(OnlineOutput), ctx.run_dir, cfg.get("online")),
                 "\n## Departures from OLMES\n\n", departures_markdown(
                     OLMES_DEPARTURES, summary.get("table2", {}).get("n_items"), str(cfg.evaluate.split),
                     None if cfg.evaluate.limit is None else int(cfg.evaluate.limit)),
                 "\n## Figures\n\n", plots.figures_markdown(figures),
                 "\n## Stage wall times\n\nIn `summary.json` (`stage_seconds`), not here: this file is the same, "
                 "byte for byte, whether a run went through at once or was resumed.\n"]
        return "".join(parts)
