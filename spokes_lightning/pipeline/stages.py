"""The pipeline as a list of stages (each cached and resumable in run_dir)."""
from __future__ import annotations

import json

from ..atomic import write_json_atomic
from .data_stages import CorpusStage, ProxyStage, TokenizerStage
from .feature_stages import FeaturesStage
from .report_stage import ReportStage
from .select_stage import SelectStage
from .stage import log, run_pipeline
from .train_stages import EvaluateStage, ExportStage, PretrainStage

STAGES = [CorpusStage(), TokenizerStage(), ProxyStage(), FeaturesStage(), SelectStage(), ExportStage(),
          PretrainStage(), EvaluateStage(), ReportStage()]


def run_and_report(stages, cfg):
    ctx = run_pipeline(stages, cfg, None if cfg.stages is None else list(cfg.stages))
    summary_path = ctx.run_dir / "summary.json"
    if summary_path.exists():  # record every stage's wall time, the report's own included
        summary = json.loads(summary_path.read_text())
        summary["stage_seconds"] = ctx.cache["stage_seconds"]
        write_json_atomic(summary_path, summary)
    if (ctx.run_dir / "report.md").exists():
        log(f"report: {(ctx.run_dir / 'report.md').resolve()}")
        print(f"Report: {(ctx.run_dir / 'report.md').resolve()}", flush=True)
    return ctx
