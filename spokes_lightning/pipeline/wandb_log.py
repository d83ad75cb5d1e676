"""wandb: one run per method in one group (offline by default), plus a comparison table run."""
from __future__ import annotations

import os

from spokes_lightning.pipeline.outputs import PretrainOutput
from spokes_lightning.pipeline.stage import RunContext, log


def log_comparison(ctx: RunContext, summary: dict) -> None:
    try:
        import wandb
    except ImportError:  # pragma: no cover
        log("wandb is not installed (pip install wandb); skipping the wandb comparison")
        return
    cfg = ctx.cfg.wandb
    mode = os.environ.get("WANDB_MODE", cfg.mode)
    wdir = ctx.run_dir / "wandb"
    wdir.mkdir(parents=True, exist_ok=True)
    from spokes_lightning.models.pretrain_record import read_curve

    columns = ["method", "n_selected", "n_tokens", "gvendi", "gvendi_independent", "batch_gvendi",
               "mean_quality", "mean_length", "val_loss", "avg_acc"]
    rows = []
    # every run comes from this one process: the installed-package list (about 0.25 s a run to
    # gather) is saved once, with the comparison run, not again with each method's run
    per_method = wandb.Settings(x_save_requirements=False)
    for method, s in summary["methods"].items():
        run = wandb.init(project=cfg.project, group=str(cfg.group), name=method, mode=mode, dir=str(wdir),
                         config={"method": method, "recipe": summary["recipe"]}, reinit="finish_previous",
                         settings=per_method)
        pretrained = ctx.optional(PretrainOutput)
        pre = pretrained.methods.get(method) if pretrained else None
        if pre:
            for row in read_curve(ctx.run_dir / pre.metrics):
                run.log({"train/loss": row["loss"], "train/tokens": row["tokens_seen"]}, step=row["step"])
        flat = {f"selection/{k}": v for k, v in s.items() if isinstance(v, (int, float)) and v is not None}
        if s["eval"]:
            flat.update({f"eval/{t}": v["acc"] for t, v in s["eval"].items() if t != "avg"})
            flat["eval/avg"] = s["eval"]["avg"]
        run.summary.update(flat)
        run.finish()
        rows.append([method, s["n_selected"], s["n_tokens"], s["gvendi"], s["gvendi_independent"], s["batch_gvendi"],
                     s["mean_quality"], s["mean_length"], s["val_loss"], (s["eval"] or {}).get("avg")])
    run = wandb.init(project=cfg.project, group=str(cfg.group), name="comparison", mode=mode, dir=str(wdir),
                     reinit="finish_previous")
    run.log({"comparison": wandb.Table(columns=columns, data=rows)})
    run.finish()
    log(f"wandb: {len(rows)} method runs + comparison in group '{cfg.group}' ({mode}; `wandb sync {wdir}/wandb/*` later)")
