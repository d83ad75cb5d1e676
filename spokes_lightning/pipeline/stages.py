"""The pipeline as a list of stages (each cached and resumable in run_dir)."""
from __future__ import annotations

from .data_stages import CorpusStage, ProxyStage, TokenizerStage
from .feature_stages import FeaturesStage
from .online_stage import OnlineStage
from .report_stage import ReportStage
from .run_lock import RunDirLock
from .select_stage import SelectStage
from .stage import RunContext, log, run_pipeline
from .train_stages import EvaluateStage, ExportStage, PretrainStage

STAGES = [CorpusStage(), TokenizerStage(), ProxyStage(), FeaturesStage(), SelectStage(), ExportStage(),
          PretrainStage(), EvaluateStage(),
          OnlineStage(),  # before the report: its comparison is a section of report.md when it ran
          ReportStage()]
#: the stage names, in order: what ``stages=[...]`` may list (checked by preflight)
STAGE_NAMES = tuple(s.name for s in STAGES)


def run_and_report(stages, cfg):
    """Run the pipeline holding the run_dir's lock, then say what this run produced."""
    with RunDirLock(cfg.run_dir):
        ctx = run_pipeline(stages, cfg, None if cfg.stages is None else list(cfg.stages))
    announce(ctx)
    return ctx


def announce(ctx: RunContext) -> None:
    """``Report: <path>`` when report.md belongs to this run's settings; else which stages ran."""
    from ..distributed import world

    if world()[0] != 0:
        return
    report = (ctx.run_dir / "report.md").resolve()
    if "report" in ctx.results:
        log(f"report: {report}")
        print(f"Report: {report}", flush=True)
        return
    line = (f"Stages run: {', '.join(ctx.ran) or 'none'}; taken from run_dir: {', '.join(ctx.cached) or 'none'}. "
            "No report for these settings yet (the report stage did not run)")
    if "report" in ctx.unusable:
        line += f"; the report in run_dir cannot be used ({ctx.unusable['report']})"
    elif report.exists():
        line += f"; {report} is from an earlier run with other settings and was left as it was"
    print(line + ".", flush=True)
