"""Stages 5-7: export (the Megatron handoff), local pretraining, OLMES-style evaluation."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from spokes_lightning.data.selection_artifact import read_selection
from spokes_lightning.pipeline.data_stages import documents_by_ids, export_tokenizer, pool_documents, pool_rows, validation_documents
from spokes_lightning.pipeline.select_stage import ordered_methods
from spokes_lightning.pipeline.preflight import document_limit
from spokes_lightning.pipeline.outputs import (Contamination, EvaluateOutput, ExportedMethod, ExportOutput,
                                               PretrainedMethod, PretrainOutput, PretrainRun, SelectOutput,
                                               TokenizerOutput)
from spokes_lightning.pipeline.stage import RunContext, Stage, log, read_marker, to_plain
from spokes_lightning.utils.output_check import first_problem
from spokes_lightning.utils.settings_hash import settings_hash

#: part of every method's export key: raise it when the exported bytes change for the same inputs
EXPORT_FORMAT = 1


def _selected_rows(ctx: RunContext, method: str):
    """(the pool rows of the method's documents in selection order, the copies of each)."""
    sel = read_selection(ctx.run_dir / ctx.output(SelectOutput).methods[method].selection)
    return pool_rows(ctx, sel.ids), sel.copies()


class ExportStage(Stage):
    """Per method: jsonl.gz + parquet, Megatron .bin/.idx (one EOD per doc), a LLaMA-1B launch script."""

    name = "export"
    output_type = ExportOutput
    needs = ("corpus", "tokenizer", "select")
    all_ranks = True  # tokenizer shards are split over the ranks (shard s on rank s % world), rank 0 merges

    def settings(self, cfg):
        return {k: v for k, v in to_plain(cfg.export).items() if k != "workers"}  # workers: who, not what

    def handed_on(self, outputs):
        return [path for exp in outputs.methods.values()
                for path in (exp.megatron_prefix + ".bin", exp.megatron_prefix + ".idx", exp.script,
                             exp.jsonl, exp.parquet)]

    def method_inputs(self, ctx, method: str, rows, copies) -> str:
        """A key for everything one method's files are made from: its documents and copies in order,
        the pool, the tokenizer, the export settings and where the run directory is (the launch
        script names its paths)."""
        digest = lambda a: hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()  # noqa: E731
        return settings_hash({"method": method, "rows": digest(rows), "copies": digest(copies),
                              "corpus": ctx.keys["corpus"], "tokenizer": ctx.keys["tokenizer"],
                              "settings": to_plain(self.settings(ctx.cfg)), "run_dir": str(ctx.run_dir.resolve()),
                              "format": EXPORT_FORMAT})

    def kept(self, ctx, previous: dict | None, method: str, inputs: str) -> ExportedMethod | None:
        """The last export of ``method`` when it was made from the same inputs and its files are intact."""
        old = previous["outputs"].methods.get(method) if previous else None
        if old is None or old.inputs != inputs:
            return None
        files = {rel: previous.get("files", {}).get(rel) for rel in self.handed_on(ExportOutput(methods={method: old}))}
        if None in files.values() or not (ctx.run_dir / "megatron" / "tokenizer").is_dir():
            return None
        return old if first_problem(ctx.run_dir, files) is None else None

    def run(self, ctx):
        from spokes_lightning.megatron.export import export_selection

        tok = export_tokenizer(ctx)
        previous = read_marker(ctx.run_dir / "stages" / f"{self.name}.json", ExportOutput)  # the last export
        out = {}
        e = ctx.cfg.export
        pool = pool_documents(ctx)
        for method in ordered_methods(ctx.cfg, ctx.output(SelectOutput).methods):
            rows, copies = _selected_rows(ctx, method)
            inputs = self.method_inputs(ctx, method, rows, copies)
            kept = self.kept(ctx, previous, method, inputs)
            if kept is not None:  # e.g. another method added: this one's files are as they were
                out[method] = kept
                log(f"export: {method}: the same documents and settings as its last export; its files are kept")
                continue
            res = export_selection(pool, rows, method, ctx.run_dir, tok, copies=copies,
                                   workers=int(e.get("workers") or 1), seq_length=int(e.seq_length),
                                   global_batch_size=int(e.global_batch_size), lr=float(e.lr),
                                   train_tokens=float(e.train_tokens))
            out[method] = ExportedMethod(
                n_docs=res.n_docs, n_tokens=res.n_tokens_without_eod,
                megatron_prefix=ctx.rel(Path(res.data_prefix + ".bin"))[: -len(".bin")],
                script=ctx.rel(Path(res.script_path)), jsonl=ctx.rel(Path(res.jsonl_path)),
                parquet=ctx.rel(Path(res.parquet_path)),
                timings={k: v for k, v in res.timings.items() if k.endswith("_s")}, inputs=inputs)
            log(f"export: {method}: {res.n_docs} documents, {res.n_tokens_without_eod} tokens -> {out[method].megatron_prefix}")
        return ExportOutput(methods=out)


def pretrain_seeds(cfg) -> list[int]:
    """``pretrain.seeds``, or the run's ``seed`` alone."""
    seeds = cfg.pretrain.get("seeds")
    return [int(cfg.seed)] if not seeds else [int(s) for s in seeds]


def pretrain_token_budget(cfg, dataset_tokens: dict[str, int]) -> int:
    """``pretrain.token_budget``, or ``epochs`` x the largest selection's tokens, in whole steps.

    One budget for every method (the paper's fixed-token comparison); with the budget left to
    null, even the largest selection is seen ``epochs`` times (Section 5.3: about one epoch).
    """
    p = cfg.pretrain
    if p.get("token_budget") is not None:
        return int(p.token_budget)
    per_step = int(p.batch_size) * int(p.seq_length)
    wanted = float(p.get("epochs") or 1.0) * max(dataset_tokens.values())
    return int(math.ceil(wanted / per_step)) * per_step


class PretrainStage(Stage):
    """Same small Megatron-architecture LLaMA, same seeds, same token budget for every method, on its Megatron data."""

    name = "pretrain"
    output_type = PretrainOutput
    needs = ("corpus", "tokenizer", "export")

    def settings(self, cfg):
        return {"pretrain": cfg.pretrain, "seed": cfg.seed}

    def handed_on(self, outputs):
        return [path for pre in outputs.methods.values() for run in pre.runs for path in (run.model_dir, run.metrics)]

    def run(self, ctx):
        from spokes_lightning.megatron.dataset import indexed_dataset_stats
        from spokes_lightning.models.pretrain import pretrain_on_megatron_data

        p = ctx.cfg.pretrain
        if not p.enabled:
            log("pretrain: disabled in this recipe (run the generated Megatron scripts; evaluate.checkpoints "
                "brings their checkpoints back)")
            return PretrainOutput()
        tok = export_tokenizer(ctx)
        val = [d.text for d in validation_documents(ctx)]
        exports = ctx.output(ExportOutput).methods
        methods = ordered_methods(ctx.cfg, exports)
        sizes = {m: indexed_dataset_stats(ctx.run_dir / exports[m].megatron_prefix)[1] for m in methods}
        budget = pretrain_token_budget(ctx.cfg, sizes)
        log(f"pretrain: {budget} tokens per model ({budget / max(sizes.values()):.2f} epochs of the largest "
            f"selection), seeds {pretrain_seeds(ctx.cfg)}")
        out = {}
        for method in methods:
            runs = []
            for seed in pretrain_seeds(ctx.cfg):
                res = pretrain_on_megatron_data(
                    ctx.run_dir / exports[method].megatron_prefix, tok,
                    ctx.run_dir / "pretrain" / method / f"seed_{seed}", token_budget=budget,
                    seq_length=int(p.seq_length), n_layers=int(p.n_layers), hidden=int(p.hidden),
                    heads=int(p.heads), batch_size=int(p.batch_size), lr=float(p.lr), seed=seed,
                    devices=p.devices, strategy=p.strategy, val_documents=val)
                runs.append(PretrainRun(seed=seed, model_dir=ctx.rel(Path(res.model_dir)),
                                        checkpoint=ctx.rel(Path(res.out_dir) / "megatron"),
                                        metrics=ctx.rel(Path(res.metrics_path)), final_loss=res.final_loss,
                                        val_loss=res.val_loss))
                log(f"pretrain: {method} seed {seed}: {res.steps} steps, {res.epochs:.2f} epochs, final loss "
                    f"{res.final_loss:.3f}, val loss {res.val_loss:.3f}")
            out[method] = PretrainedMethod(
                model_dir=runs[0].model_dir, metrics=runs[0].metrics, steps=res.steps, tokens_seen=res.tokens_seen,
                dataset_tokens=res.dataset_tokens, epochs=res.epochs,
                final_loss=float(np.mean([r.final_loss for r in runs])),
                val_loss=float(np.mean([r.val_loss for r in runs])), runs=runs)
        return PretrainOutput(methods=out)


def models_to_evaluate(ctx: RunContext) -> dict[str, list[tuple[str, Path]]]:
    """``{method: [(label, HF model dir), ...]}``: ``evaluate.checkpoints`` if set, else this run's models.

    A checkpoint may be a Hugging Face directory or a Megatron-LM ``--save`` directory, which is
    converted once into ``evaluate/converted/<method>/<i>`` with ``evaluate.tokenizer`` (default:
    the run's exported tokenizer).
    """
    from spokes_lightning.megatron.convert import resolve_model_dir

    e = ctx.cfg.evaluate
    if e.get("checkpoints"):
        tokenizer = e.get("tokenizer") or (ctx.run_dir / ctx.output(TokenizerOutput).dir)
        out = {}
        for method, dirs in to_plain(e.checkpoints).items():
            dirs = [dirs] if isinstance(dirs, str) else list(dirs)
            out[method] = [(f"checkpoint {i}", resolve_model_dir(d, tokenizer_dir=tokenizer,
                                                                 cache_dir=ctx.run_dir / "evaluate" / "converted" / method / str(i)))
                           for i, d in enumerate(dirs)]
        return out
    pretrained = ctx.optional(PretrainOutput)
    trained = pretrained.methods if pretrained else {}
    return {m: [(f"seed {r.seed}", ctx.run_dir / r.model_dir) for r in trained[m].runs]
            for m in ordered_methods(ctx.cfg, trained)}


class EvaluateStage(Stage):
    """OLMES's 10 tasks (lm-eval over the shipped files) + 13-gram decontamination per method."""

    name = "evaluate"
    output_type = EvaluateOutput
    needs = ("corpus", "select", "pretrain")

    def check(self, cfg):
        from spokes_lightning.evaluation.tasks import check_task_names

        if cfg.evaluate.tasks:
            check_task_names(list(cfg.evaluate.tasks))
        document_limit(cfg.evaluate.get("limit"), "evaluate.limit")

    def settings(self, cfg):
        return cfg.evaluate

    def run(self, ctx):
        from spokes_lightning.evaluation import contamination_by_selection
        from spokes_lightning.evaluation.item_scores import save_item_scores
        from spokes_lightning.evaluation.run import evaluate_with_items

        e = ctx.cfg.evaluate
        scores_by_method, items_by_method = {}, {}
        methods = ctx.output(SelectOutput).methods
        selections = {m: read_selection(ctx.run_dir / methods[m].selection).ids
                      for m in ordered_methods(ctx.cfg, methods)}
        selected = sorted({i for ids in selections.values() for i in ids})
        contamination = contamination_by_selection(selections, [(d.id, d.text) for d in documents_by_ids(ctx, selected)],
                                                   n=int(e.decontamination_ngram))
        contaminated = {m: Contamination(n_contaminated=c["n_contaminated"], n_documents=c["n_documents"],
                                         ids=c["contaminated_ids"][:50]) for m, c in contamination.items()}
        for method, models in (models_to_evaluate(ctx) if e.tasks else {}).items():
            per_model, items = [], []
            for label, model_dir in models:
                scores, correct = evaluate_with_items(
                    model_dir, tasks=list(e.tasks), split=str(e.split), limit=None if e.limit is None else int(e.limit),
                    batch_size=int(e.batch_size), num_fewshot=e.get("num_fewshot"))
                per_model.append(scores)
                items.append(correct)
                log(f"evaluate: {method} ({label}): average accuracy {scores['avg']:.2f}")
            path = ctx.run_dir / "evaluate" / f"{method}_items.npz"
            save_item_scores(path, {t: np.stack([c[t] for c in items]) for t in e.tasks})
            items_by_method[method] = ctx.rel(path)
            scores_by_method[method] = mean_scores(per_model)
        return EvaluateOutput(scores=scores_by_method, contamination=contaminated, items=items_by_method,
                              num_fewshot=e.get("num_fewshot"))


def mean_scores(per_model: list[dict]) -> dict:
    """Per-task summaries averaged over models (seeds): accuracy and stderr means, the rest from the first."""
    if len(per_model) == 1:
        return per_model[0]
    first = per_model[0]
    out = {t: {**first[t], "acc": float(np.mean([s[t]["acc"] for s in per_model])),
               "stderr": float(np.mean([s[t]["stderr"] for s in per_model]))} for t in first if t != "avg"}
    out["avg"] = float(np.mean([s["avg"] for s in per_model]))
    return out
