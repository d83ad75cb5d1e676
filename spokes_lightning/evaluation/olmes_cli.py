"""Optional path through the official OLMES CLI (``pip install`` from github.com/allenai/olmes).

The ``olmes`` package is not on PyPI, so it is only used when its ``olmes`` executable is
on ``PATH``. It evaluates the *full original* test sets fetched from the Hugging Face hub
(network needed), with the OLMES-curated 5-shot prompts, so its numbers are not directly
comparable to the local 0-shot, 300-item lm-eval path (see ``OLMES_DEPARTURES``).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from spokes_lightning.utils.errors import UserError
from spokes_lightning.evaluation.tasks import TASK_SPECS, read_task_rows

OLMES_MISSING = ("the 'olmes' CLI is not installed (it is not on PyPI): "
                 "pip install git+https://github.com/allenai/olmes.git, or use engine='lm_eval'")


def olmes_task_ids(tasks, mmlu_subjects=()) -> list[str]:
    """OLMES CLI task ids of our tasks (``TaskSpec.olmes_id``); MMLU expands to its subject tasks."""
    ids: list[str] = []
    for task in tasks:
        olmes_id = TASK_SPECS[task].olmes_id
        if "{subject}" in olmes_id:
            if not mmlu_subjects:
                raise UserError("olmes engine: MMLU needs its subject list (read from the local mmlu file)")
            ids += [olmes_id.format(subject=subject) for subject in sorted(set(mmlu_subjects))]
        else:
            ids.append(olmes_id)
    return ids


def olmes_command(executable: str, model_dir: Path, task_ids, output_dir: Path,
                  limit: int | None = None, batch_size: int = 8, device: str = "cpu") -> list[str]:
    """Argument vector for one ``olmes`` run over ``task_ids``."""
    command = [executable, "--model", str(model_dir), "--task", *task_ids,
               "--output-dir", str(output_dir), "--batch-size", str(batch_size)]
    if limit is not None:
        command += ["--limit", str(limit)]
    if device == "cpu":
        command += ["--gpus", "0"]
    return command


def read_olmes_metrics(output_dir: Path) -> dict:
    """``primary_score`` of every task in the run's ``metrics-all.jsonl`` (0-1 scale)."""
    path = output_dir / "metrics-all.jsonl"
    if not path.is_file():
        raise UserError(f"olmes run finished but wrote no {path}")
    scores = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            scores[row["task_name"]] = row.get("metrics", {}).get("primary_score")
    return scores


def run_olmes_cli(model_dir: Path, tasks, output_dir=None, limit=None, batch_size=8, device="cpu") -> dict:
    """Run the OLMES CLI on ``model_dir``; returns {"command", "output_dir", "scores"}."""
    executable = shutil.which("olmes")
    if executable is None:
        raise UserError(OLMES_MISSING)
    if output_dir is None:
        raise UserError("olmes engine needs output_dir (where the CLI writes its metrics)")
    subjects = ()
    if "mmlu" in tasks:
        subjects = [row["subject"] for row in read_task_rows("mmlu") if row.get("split") == "test"]
    output_dir = Path(output_dir)
    command = olmes_command(executable, model_dir, olmes_task_ids(tasks, subjects), output_dir,
                            limit=limit, batch_size=batch_size, device=device)
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise UserError(f"olmes exited with code {completed.returncode}: {' '.join(command)}")
    return {"command": command, "output_dir": str(output_dir), "scores": read_olmes_metrics(output_dir)}
