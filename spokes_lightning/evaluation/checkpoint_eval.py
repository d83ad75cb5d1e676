"""``spokes evaluate``: any checkpoint (Hugging Face or Megatron-LM) through the pipeline's evaluation.

The same code as the pipeline's evaluate stage: OLMES-style cloze tasks over the shipped files
with lm-eval (:func:`spokes_lightning.evaluation.run.evaluate_with_items`). A Megatron-LM
``--save`` directory is first converted (:mod:`spokes_lightning.megatron.convert`) with
``tokenizer`` into ``<out>.converted/`` next to the results file.

``results.json`` holds the per-task summary, the 10-task average, each item's 0/1 score (for
paired comparisons), the shots used and the settings.
"""
from __future__ import annotations

from pathlib import Path

from spokes_lightning.utils.atomic import write_json_atomic
from spokes_lightning.utils.errors import UserError
from spokes_lightning.evaluation.tasks import check_task_names, shots_for


def parse_tasks(text: str) -> list[str]:
    """``"arc_easy,piqa"`` -> checked task names (``all`` = the 10 OLMES tasks)."""
    from spokes_lightning.evaluation.tasks import ALL_TASKS

    if text.strip() == "all":
        return list(ALL_TASKS)
    return list(check_task_names([t.strip() for t in text.split(",") if t.strip()]))


def evaluate_checkpoint(model: str | Path, tasks, out: str | Path, *, tokenizer: str | Path | None = None,
                        limit: int | None = None, num_fewshot: int | None = None, split: str = "test",
                        batch_size: int = 16) -> dict:
    """Evaluate ``model`` (HF dir or Megatron checkpoint dir) on ``tasks``; write ``out`` (JSON) last."""
    from spokes_lightning.megatron.convert import resolve_model_dir
    from spokes_lightning.evaluation.run import evaluate_with_items

    out = Path(out)
    if out.suffix != ".json":
        raise UserError(f"--out must be a .json file, got {out}")
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a directory")
    tasks = list(check_task_names(tasks))
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    model_dir = resolve_model_dir(model, tokenizer_dir=tokenizer, cache_dir=out.with_suffix(".converted"))
    summary, items = evaluate_with_items(model_dir, tasks, split=split, limit=limit, batch_size=batch_size,
                                         num_fewshot=num_fewshot)
    shots = {t: [s.id for s in shots_for(t, num_fewshot)] for t in tasks}
    result = {
        "model": str(model), "hf_model_dir": str(model_dir), "split": split, "limit": limit,
        "num_fewshot": num_fewshot, "tasks": tasks, "scores": summary,
        "items": {t: [int(v) for v in items[t]] for t in tasks}, "shots": shots,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    return {"out": str(out), "model": str(model_dir), "avg": summary["avg"],
            **{t: summary[t]["acc"] for t in tasks}}
