"""The pipeline as a list of stages (each cached and resumable in run_dir)."""
from __future__ import annotations

from spokes_lightning.utils.errors import UserError

from spokes_lightning.pipeline.data_stages import CorpusStage, ProxyStage, TokenizerStage
from spokes_lightning.pipeline.feature_stages import FeaturesStage
from spokes_lightning.pipeline.online_stage import OnlineStage
from spokes_lightning.pipeline.preflight import check_run_dir
from spokes_lightning.pipeline.report_stage import ReportStage
from spokes_lightning.pipeline.run_lock import RunDirLock
from spokes_lightning.pipeline.select_stage import SelectStage
from spokes_lightning.pipeline.stage import RunContext, log, run_pipeline
from spokes_lightning.pipeline.train_stages import EvaluateStage, ExportStage, PretrainStage

STAGES = [CorpusStage(), TokenizerStage(), ProxyStage(), FeaturesStage(), SelectStage(), ExportStage(),
          PretrainStage(), EvaluateStage(),
          OnlineStage(),  # before the report: its comparison is a section of report.md when it ran
          ReportStage()]
#: the stage names, in order: what ``stages=[...]`` may list (checked by :func:`check_config`)
STAGE_NAMES = tuple(s.name for s in STAGES)


def check_config(cfg, stages=STAGES) -> None:
    """Preflight, before any heavy work: the run_dir, the stage names, then every stage's own
    :meth:`~spokes_lightning.pipeline.stage.Stage.check` (all of them, whichever ``stages=[...]``
    runs, so that a later run of the same config cannot fail on a setting late). One line if not."""
    check_run_dir(cfg.run_dir)
    names = tuple(s.name for s in stages)
    for name in cfg.stages or ():
        if name not in names:
            raise UserError(f"unknown stage '{name}'; stages are: {', '.join(names)}")
    for stage in stages:
        stage.check(cfg)


def run_and_report(stages, cfg):
    """Run the pipeline holding the run_dir's lock, then say what this run produced."""
    with RunDirLock(cfg.run_dir):
        ctx = run_pipeline(stages, cfg, None if cfg.stages is None else list(cfg.stages))
    announce(ctx)
    return ctx


def announce(ctx: RunContext) -> None:
    """``Report: <path>`` when report.md belongs to this run's settings; else which stages ran."""
    from spokes_lightning.core.distributed import world

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
