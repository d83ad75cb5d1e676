"""Stages 5-7: export (the Megatron handoff), local pretraining, OLMES-style evaluation."""
from __future__ import annotations

from pathlib import Path

from ..selection.artifact import read_selection
from .data_stages import documents_by_ids, export_tokenizer, pool_documents, pool_rows, validation_documents
from .select_stage import ordered_methods
from .stage import RunContext, Stage, log, to_plain


def _selected_rows(ctx: RunContext, method: str):
    """(the pool rows of the method's documents in selection order, the copies of each)."""
    sel = read_selection(ctx.run_dir / ctx.output("select")["methods"][method]["selection"])
    return pool_rows(ctx, sel.ids), sel.copies()


class ExportStage(Stage):
    """Per method: jsonl.gz + parquet, Megatron .bin/.idx (one EOD per doc), a LLaMA-1B launch script."""

    name = "export"
    needs = ("corpus", "tokenizer", "select")
    all_ranks = True  # tokenizer shards are split over the ranks (shard s on rank s % world), rank 0 merges

    def settings(self, cfg):
        return {k: v for k, v in to_plain(cfg.export).items() if k != "workers"}  # workers: who, not what

    def handed_on(self, outputs):
        return [path for exp in outputs.values()
                for path in (exp["megatron_prefix"] + ".bin", exp["megatron_prefix"] + ".idx", exp["script"],
                             exp["jsonl"], exp["parquet"])]

    def run(self, ctx):
        from ..export import export_selection

        tok = export_tokenizer(ctx)
        out = {}
        e = ctx.cfg.export
        pool = pool_documents(ctx)
        for method in ordered_methods(ctx.cfg, ctx.output("select")["methods"]):
            rows, copies = _selected_rows(ctx, method)
            res = export_selection(pool, rows, method, ctx.run_dir, tok, copies=copies,
                                   workers=int(e.get("workers") or 1), seq_length=int(e.seq_length),
                                   global_batch_size=int(e.global_batch_size), lr=float(e.lr),
                                   train_tokens=float(e.train_tokens))
            out[method] = {"n_docs": res.n_docs, "n_tokens": res.n_tokens_without_eod,
                           "megatron_prefix": ctx.rel(Path(res.data_prefix + ".bin"))[: -len(".bin")],
                           "script": ctx.rel(Path(res.script_path)), "jsonl": ctx.rel(Path(res.jsonl_path)),
                           "parquet": ctx.rel(Path(res.parquet_path)),
                           "timings": {k: v for k, v in res.timings.items() if k.endswith("_s")}}
            log(f"export: {method}: {res.n_docs} documents, {res.n_tokens_without_eod} tokens -> {out[method]['megatron_prefix']}")
        return out


class PretrainStage(Stage):
    """Same small LLaMA, same seed, same token budget for every method, on its Megatron data."""

    name = "pretrain"
    needs = ("corpus", "tokenizer", "export")

    def settings(self, cfg):
        return {"pretrain": cfg.pretrain, "seed": cfg.seed}

    def handed_on(self, outputs):
        return [path for pre in outputs.values() for path in (pre["model_dir"], pre["metrics"])]

    def run(self, ctx):
        from ..models.pretrain import pretrain_on_megatron_data

        p = ctx.cfg.pretrain
        if not p.enabled:
            log("pretrain: disabled in this recipe (run the generated Megatron scripts instead)")
            return {}
        tok = export_tokenizer(ctx)
        val = [d.text for d in validation_documents(ctx)]
        out = {}
        exports = ctx.output("export")
        for method in ordered_methods(ctx.cfg, exports):
            exp = exports[method]
            res = pretrain_on_megatron_data(
                ctx.run_dir / exp["megatron_prefix"], tok, ctx.run_dir / "pretrain" / method,
                token_budget=int(p.token_budget), seq_length=int(p.seq_length), n_layers=int(p.n_layers),
                hidden=int(p.hidden), heads=int(p.heads), batch_size=int(p.batch_size), lr=float(p.lr),
                seed=int(ctx.cfg.seed), devices=p.devices, strategy=p.strategy, val_documents=val)
            out[method] = {"model_dir": ctx.rel(Path(res.model_dir)), "metrics": ctx.rel(Path(res.metrics_path)),
                           "steps": res.steps, "tokens_seen": res.tokens_seen, "epochs": res.epochs,
                           "final_loss": res.final_loss, "val_loss": res.val_loss}
            log(f"pretrain: {method}: {res.steps} steps, {res.epochs:.2f} epochs, final loss {res.final_loss:.3f}, "
                f"val loss {res.val_loss:.3f}")
        return out


class EvaluateStage(Stage):
    """OLMES's 10 tasks (lm-eval over the shipped files) + 13-gram decontamination per method."""

    name = "evaluate"
    needs = ("corpus", "select", "pretrain")

    def settings(self, cfg):
        return cfg.evaluate

    def run(self, ctx):
        from ..evaluation import contamination_by_selection, evaluate_model

        e = ctx.cfg.evaluate
        out = {"scores": {}, "contamination": {}}
        methods = ctx.output("select")["methods"]
        selections = {m: read_selection(ctx.run_dir / methods[m]["selection"]).ids
                      for m in ordered_methods(ctx.cfg, methods)}
        selected = sorted({i for ids in selections.values() for i in ids})
        contamination = contamination_by_selection(selections, [(d.id, d.text) for d in documents_by_ids(ctx, selected)],
                                                   n=int(e.decontamination_ngram))
        for m, c in contamination.items():
            out["contamination"][m] = {"n_contaminated": c["n_contaminated"], "n_documents": c["n_documents"],
                                       "ids": c["contaminated_ids"][:50]}
        if not e.tasks:
            return out
        trained = ctx.output("pretrain")
        for method in ordered_methods(ctx.cfg, trained):
            pre = trained[method]
            scores = evaluate_model(ctx.run_dir / pre["model_dir"], tasks=list(e.tasks), split=str(e.split),
                                    limit=None if e.limit is None else int(e.limit), batch_size=int(e.batch_size))
            out["scores"][method] = scores
            log(f"evaluate: {method}: average accuracy {scores['avg']:.2f}")
        return out
