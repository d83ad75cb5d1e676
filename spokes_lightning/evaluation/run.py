"""Evaluate a local Hugging Face causal LM on the 10 OLMES tasks with lm-eval.

``evaluate_model`` wraps the saved model directory (``save_pretrained`` model +
tokenizer) in lm-eval's ``HFLM``, runs the local cloze tasks of
:mod:`spokes_lightning.evaluation.tasks` through ``lm_eval.simple_evaluate`` and reports,
per task, the accuracy under the task's OLMES normalization (Gu et al., 2024, Table 3),
its standard error, the chance level and the item count, plus the unweighted average
over the tasks. ``engine="olmes"`` hands the same model to the official ``olmes`` CLI
instead (see :mod:`spokes_lightning.evaluation.olmes_cli`).
"""
from __future__ import annotations

import logging
from pathlib import Path

from spokes_lightning.utils.errors import UserError, require_package
from spokes_lightning.evaluation.tasks import (
    ALL_TASKS,
    TASK_SPECS,
    build_lm_eval_task,
    chance_level,
    check_task_names,
    lm_eval_task_name,
    load_cloze_items,
    shots_for,
)

ENGINES = ("lm_eval", "olmes")


def check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"model directory {path} has no config.json (expected a save_pretrained folder)")
    return path


def load_hflm(model_dir: str | Path, batch_size: int = 8, device: str = "cpu", max_length: int | None = None):
    """lm-eval ``HFLM`` over a local model folder, in float32."""
    require_package("lm_eval", "lm-eval")
    from lm_eval.models.huggingface import HFLM

    path = str(check_model_dir(model_dir))
    return HFLM(pretrained=path, tokenizer=path, device=device, batch_size=batch_size,
                dtype="float32", max_length=max_length, trust_remote_code=False)


def run_lm_eval(lm, tasks, split: str = "test", limit: int | None = None,
                eval_dir: str | Path | None = None, log_samples: bool = False,
                num_fewshot: int | None = None) -> dict:
    """Run ``lm_eval.simple_evaluate`` on our local tasks; returns lm-eval's raw result dict."""
    require_package("lm_eval", "lm-eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    task_objects = [build_lm_eval_task(t, split, eval_dir, num_fewshot) for t in check_task_names(tasks)]
    return lm_eval.simple_evaluate(
        model=lm, tasks=task_objects, limit=limit, log_samples=log_samples,
        task_manager=TaskManager(include_defaults=False), bootstrap_iters=1000,
    )


def summarize(raw: dict, tasks, split: str = "test", limit: int | None = None,
              eval_dir: str | Path | None = None, num_fewshot: int | None = None) -> dict:
    """Per-task OLMES metric in percent (+ stderr, chance, n) and the 10-task average."""
    summary: dict = {}
    for task in check_task_names(tasks):
        spec = TASK_SPECS[task]
        metrics = raw["results"][lm_eval_task_name(task)]
        items = load_cloze_items(task, split, eval_dir, num_fewshot)[: limit or None]
        stderr = metrics.get(f"{spec.metric}_stderr,none")
        summary[task] = {
            "acc": 100.0 * float(metrics[f"{spec.metric},none"]),
            "stderr": 100.0 * float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
            "chance": chance_level(items),
            "metric": spec.metric,
            "normalization": spec.normalization,
            "n": int(raw["n-samples"][lm_eval_task_name(task)]["effective"]),
            "num_fewshot": len(shots_for(task, num_fewshot, eval_dir)) if task != "mmlu"
            else (spec.num_fewshot if num_fewshot is None else int(num_fewshot)),
        }
    accs = [summary[t]["acc"] for t in check_task_names(tasks)]
    summary["avg"] = sum(accs) / len(accs)
    return summary


def evaluate_model(model_dir: str | Path, tasks=ALL_TASKS, split: str = "test", limit: int | None = None,
                   batch_size: int = 8, device: str = "cpu", engine: str = "lm_eval",
                   eval_dir: str | Path | None = None, output_dir: str | Path | None = None,
                   num_fewshot: int | None = None) -> dict:
    """Evaluate ``model_dir`` on ``tasks``; see module docstring for the returned dict.

    ``limit`` keeps the first ``limit`` items of each task (smoke tests only).
    ``num_fewshot``: fixed solved examples before every item (None: 0, MMLU 5; 5 = OLMES).
    ``engine="olmes"`` runs the official OLMES CLI (full original test sets from the hub,
    needs network) and writes to ``output_dir``.
    """
    if engine not in ENGINES:
        raise UserError(f"unknown evaluation engine {engine!r}; use one of {', '.join(ENGINES)}")
    tasks = check_task_names(tasks)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be a positive item count, got {limit}")
    if engine == "olmes":
        from spokes_lightning.evaluation.olmes_cli import run_olmes_cli

        return run_olmes_cli(check_model_dir(model_dir), tasks, output_dir=output_dir,
                             limit=limit, batch_size=batch_size, device=device)
    summary, _ = evaluate_with_items(model_dir, tasks, split=split, limit=limit, batch_size=batch_size,
                                     device=device, eval_dir=eval_dir, num_fewshot=num_fewshot, items=False)
    return summary


def evaluate_with_items(model_dir: str | Path, tasks=ALL_TASKS, split: str = "test", limit: int | None = None,
                        batch_size: int = 8, device: str = "cpu", eval_dir: str | Path | None = None,
                        num_fewshot: int | None = None, items: bool = True) -> tuple[dict, dict | None]:
    """:func:`evaluate_model` (lm-eval engine) plus each item's 0/1 score under its task's metric,
    ``{task: array(items)}`` in item order: what paired comparisons resample."""
    tasks = check_task_names(tasks)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be a positive item count, got {limit}")
    lm = load_hflm(model_dir, batch_size=batch_size, device=device)
    raw = run_lm_eval(lm, tasks, split=split, limit=limit, eval_dir=eval_dir, num_fewshot=num_fewshot,
                      log_samples=items)
    summary = summarize(raw, tasks, split=split, limit=limit, eval_dir=eval_dir, num_fewshot=num_fewshot)
    if not items:
        return summary, None
    from spokes_lightning.evaluation.item_scores import item_correct

    return summary, item_correct(raw, tasks)
