"""Stage ``online``: random vs static SPOKES vs online SPOKES at the same token budget (recipe demo_online).

Every arm trains the same small LLaMA (``pretrain.*``: shape, batch, lr, seed, steps =
token_budget // (batch x seq_length)) through the same stream (:mod:`spokes_lightning.online.plan`:
the same windows of the same candidate order, the same segments of ``online.every_n_steps``
steps); only the rule that fills a segment differs:

* ``random``: a random order of each window;
* ``static``: SPOKES selected once before training with the frozen proxy (the select stage's
  ``online.static_method``, a token budget), in a seeded order;
* ``online``: online SPOKES with the model being trained (:mod:`spokes_lightning.online.reselect`).

Measured per arm: the documents actually trained on and their G-Vendi under two projections no arm
selected with (the frozen proxy's independent projection, from the features stage, and a fresh
Kronecker projection with another seed of the RANDOM arm's final model), validation loss, the
OLMES-style average, and the reselection wall time as a share of the rest of training.
Each arm's result is cached under ``online/<arm>/`` (a killed stage resumes after the last arm).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from spokes_lightning.utils.atomic import write_json_atomic, write_text_atomic
from spokes_lightning.utils.errors import UserError
from spokes_lightning.pipeline.report_online import comparison_table
from spokes_lightning.pipeline.data_stages import export_tokenizer, pool_documents, validation_documents
from spokes_lightning.pipeline.outputs import FeaturesOutput, OnlineOutput, SelectOutput
from spokes_lightning.pipeline.stage import RunContext, Stage, log, to_plain
from spokes_lightning.utils.settings_hash import settings_hash

SCORE_SEED_OFFSET = 1_000_003  # the scoring projection's seed: cfg.seed + this, used by no arm


def _steps(cfg) -> int:
    p = cfg.pretrain
    if p.get("token_budget") is None:
        raise UserError("the online stage needs pretrain.token_budget (a number of tokens for every arm)")
    steps = int(p.token_budget) // (int(p.batch_size) * int(p.seq_length))
    if steps < 1:
        raise UserError(f"pretrain.token_budget {p.token_budget} is below one step")
    return steps


def _quality(ctx: RunContext) -> dict[str, float] | None:
    feats = ctx.output(FeaturesOutput)
    if not feats.quality:
        return None
    from spokes_lightning.data.id_arrays import IdArray, id_array
    from spokes_lightning.pipeline.feature_registry import read_ids

    ids = list(IdArray(id_array(read_ids(ctx.run_dir / feats.quality_ids))))
    return dict(zip(ids, np.load(ctx.run_dir / feats.quality).astype(float).ravel().tolist()))


def train_arm(ctx: RunContext, arm: str, out_dir: Path, static_ids) -> dict:
    """Train one arm; returns its record (cached in ``out_dir/result.json`` under the settings key)."""
    import lightning as L
    import torch

    from spokes_lightning.models.val_loss import validation_loss
    from spokes_lightning.models.lightning_lm import CausalLMModule, StderrTrainingBar
    from spokes_lightning.models.llama import build_llama
    from spokes_lightning.models.pretrain import pretrain_llama_config, save_model
    from spokes_lightning.integrations.online_lightning import OnlineReselectionCallback, OnlineSelectionDataModule

    cfg, o, p = ctx.cfg, ctx.cfg.online, ctx.cfg.pretrain
    key = settings_hash({"arm": arm, "online": to_plain(o), "pretrain": to_plain(p), "seed": cfg.seed,
                         "static": list(static_ids or [])})
    cached = out_dir / "result.json"
    if cached.exists():
        record = json.loads(cached.read_text())
        if record.get("key") == key and (out_dir / "model").is_dir():
            log(f"online: {arm}: cached")
            return record
    tok = export_tokenizer(ctx)
    docs = [(d.id, d.text) for d in pool_documents(ctx)]
    steps = _steps(cfg)
    rule = {"alpha": float(o.alpha), "fallback": str(o.fallback), "rounds": int(o.rounds),
            "sketch": to_plain(o.sketch), "quality": _quality(ctx) if float(o.alpha) > 0 else None,
            "static_ids": static_ids}
    dm = OnlineSelectionDataModule(docs, tok, total_steps=steps, every_n_steps=int(o.every_n_steps),
                                   window=int(o.window), global_batch=int(p.batch_size),
                                   seq_length=int(p.seq_length), seed=int(cfg.seed), mode=arm, **rule)
    config = pretrain_llama_config(len(tok), seq_length=int(p.seq_length), n_layers=int(p.n_layers),
                                   hidden=int(p.hidden), heads=int(p.heads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = CausalLMModule(build_llama(config, int(cfg.seed)), float(p.lr), weight_decay=0.1)
    callback = OnlineReselectionCallback(dm)
    trainer = L.Trainer(accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1,
                        max_steps=steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        deterministic=True, use_distributed_sampler=False,
                        callbacks=[callback, StderrTrainingBar()])
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_seconds = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(module.model, tok, out_dir / "model")
    records = dm.reselector.records
    reselect = dm.reselector.overhead_seconds
    sketch = float(sum(r["sketch_seconds"] for r in records if r["planned_at_step"] > 0))
    trained = dm.plan.trained_on(1)
    record = {
        "key": key, "arm": arm, "steps": steps, "tokens_per_step": int(p.batch_size) * int(p.seq_length),
        "n_trained_on": len(trained), "trained_on": trained, "segments": records,
        "fit_seconds": fit_seconds, "reselect_seconds": reselect, "sketch_seconds": sketch,
        "choose_seconds": reselect - sketch,
        "overhead_share": reselect / max(fit_seconds - reselect, 1e-9),
        "val_loss": validation_loss(out_dir / "model", [d.text for d in validation_documents(ctx)],
                                    max_length=int(p.seq_length)),
    }
    write_json_atomic(cached, record)
    log(f"online: {arm}: {len(trained)} documents trained on, fit {fit_seconds:.1f} s, reselection "
        f"{reselect:.1f} s ({100 * record['overhead_share']:.1f}% of the rest), val loss {record['val_loss']:.3f}")
    return record


def score_gvendi(model_dir: Path, tokenizer, ids_by_arm: dict[str, list[str]], texts: dict[str, str],
                 *, k: int, max_length: int, seed: int) -> dict[str, float]:
    """G-Vendi of each arm's trained-on documents under one projection of one model (rows computed once)."""
    from spokes_lightning.features.gradients import ProxyGradients
    from spokes_lightning.models.llama import load_causal_lm
    from spokes_lightning.utils.progress import progress
    from spokes_lightning.core.vendi import vendi_score

    module = ProxyGradients(load_causal_lm(model_dir), tokenizer, k=k, seed=seed, max_length=max_length,
                                 dtype="float32")
    union = sorted({i for ids in ids_by_arm.values() for i in ids})
    rows: dict[str, np.ndarray] = {}
    for start in progress(range(0, len(union), 16), "online: scoring sketches"):
        chunk = union[start : start + 16]
        out = module.rows_for(chunk, [texts[i] for i in chunk])
        rows.update(zip(out["ids"], out["rows"].numpy()) if out["rows"] is not None else [])
    return {arm: vendi_score(np.stack([rows[i] for i in ids if i in rows])) for arm, ids in ids_by_arm.items()}


def check_online(cfg) -> None:
    """The online comparison's settings (stage ``online``), before any heavy work."""
    from spokes_lightning.online.reselect import FALLBACKS, MODES

    o = cfg.online
    for key in ("every_n_steps", "window", "rounds"):
        value = o[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"online.{key} must be a whole number >= 1, got {value!r}")
    bad = [a for a in o.arms if a not in MODES]
    if bad or not o.arms:
        raise UserError(f"online.arms must list some of {', '.join(MODES)}, got {list(o.arms)}")
    if o.fallback not in FALLBACKS:
        raise UserError(f"online.fallback must be one of {', '.join(FALLBACKS)}, got {o.fallback!r}")
    if not (isinstance(o.alpha, (int, float)) and 0 <= float(o.alpha) <= 1):
        raise UserError(f"online.alpha must be a number in [0, 1], got {o.alpha!r}")
    if ("static" in o.arms or o.fallback == "static") and o.static_method not in cfg.selection.methods:
        raise UserError(f"online.static_method {o.static_method!r} is not in selection.methods "
                        f"({', '.join(cfg.selection.methods)})")


class OnlineStage(Stage):
    name = "online"
    output_type = OnlineOutput
    needs = ("corpus", "tokenizer", "features", "select")

    def settings(self, cfg):
        if cfg.get("online") is None or not cfg.online.enabled:
            return {"enabled": False}  # off: its other settings change nothing (nor re-run the report)
        return {"online": cfg.online, "pretrain": cfg.pretrain, "evaluate": cfg.evaluate, "seed": cfg.seed}

    def check(self, cfg):
        if cfg.get("online") is not None and cfg.online.enabled:
            check_online(cfg)

    def handed_on(self, outputs):
        return [outputs.table, outputs.comparison] if outputs.ran else []

    def run(self, ctx):
        from spokes_lightning.evaluation import evaluate_model
        from spokes_lightning.features.store import open_feature_store
        from spokes_lightning.data.selection_artifact import read_selection
        from spokes_lightning.core.vendi import vendi_score

        cfg, o = ctx.cfg, ctx.cfg.online
        if not o.enabled:
            return OnlineOutput()
        methods = ctx.output(SelectOutput).methods
        static_ids = None
        if "static" in o.arms or o.fallback == "static":
            if o.static_method not in methods:
                raise UserError(f"online.static_method {o.static_method!r} was not selected "
                                f"(selected: {', '.join(methods)})")
            static_ids = read_selection(ctx.run_dir / methods[o.static_method].selection).ids
        records = {arm: train_arm(ctx, arm, ctx.path("online", arm), static_ids if arm == "static" or
                                  (arm == "online" and o.fallback == "static") else None) for arm in o.arms}
        ids_by_arm = {arm: r["trained_on"] for arm, r in records.items()}
        texts = {d.id: d.text for d in pool_documents(ctx)}
        feats = ctx.output(FeaturesOutput)
        if feats.gradients_independent:
            store = open_feature_store(ctx.run_dir / feats.gradients_independent)
            for arm, r in records.items():
                r["gvendi_proxy_independent"] = vendi_score(store.rows_of(ids_by_arm[arm]))
        scorer = "random" if "random" in records else next(iter(records))
        by_final = score_gvendi(ctx.run_dir / "online" / scorer / "model", export_tokenizer(ctx), ids_by_arm, texts,
                                k=int(o.score.k), max_length=int(o.score.max_length),
                                seed=int(cfg.seed) + SCORE_SEED_OFFSET)
        e = cfg.evaluate
        for arm, r in records.items():
            r[f"gvendi_{scorer}_final_model"] = by_final[arm]
            r["tokens_trained"] = r["steps"] * r["tokens_per_step"]
            if e.tasks:
                scores = evaluate_model(ctx.run_dir / "online" / arm / "model", tasks=list(e.tasks), split=str(e.split),
                                        limit=None if e.limit is None else int(e.limit), batch_size=int(e.batch_size))
                r["olmes_avg"] = scores["avg"]
        table = comparison_table(records, scorer)
        write_text_atomic(ctx.path("online", "comparison.md"), table)
        summary = {arm: {k: v for k, v in r.items() if k not in ("trained_on", "segments")} for arm, r in records.items()}
        write_json_atomic(ctx.path("online", "comparison.json"), summary)
        log("online: comparison\n" + table)
        return OnlineOutput(table="online/comparison.md", comparison="online/comparison.json", arms=summary)
