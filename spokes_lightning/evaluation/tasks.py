"""The 10 OLMES tasks as lm-eval tasks over the local files ``data/demo/eval/<task>.jsonl.gz``.

Each task is an lm-eval ``ConfigurableTask`` (``output_type: multiple_choice``) built in
Python from an inline config; its dataset comes from a ``custom_dataset`` callable that
reads the local gzip'd JSONL (no hub access, works offline) and converts rows to cloze
items (:mod:`spokes_lightning.evaluation.cloze`).

Scoring follows OLMES (Gu et al., 2024, Sec. 3.3 and Table 3, "normalization"): the
answer with the highest score wins, where the score of a continuation ``a`` after
context ``c`` is

* ``none``  (reported as lm-eval ``acc``):   ln P(a | c)                 -- BoolQ, WinoGrande
* ``char``  (``acc_norm``):                   ln P(a | c) / len(a)        -- ARC-Easy, HellaSwag,
  MMLU, PIQA, SIQA (``len`` = characters of the answer text, without the leading space,
  as lm-eval computes ``acc_norm``)
* ``pmi``   (``acc_mutual_info``):            ln P(a | c) - ln P(a | "Answer:") -- ARC-Challenge,
  CommonsenseQA, OpenBookQA. OLMES conditions the unconditional term on ``"Answer:"``;
  stock lm-eval uses an empty context, so :class:`OlmesClozeTask` swaps it in.

Shots (:func:`shots_for`): by default all tasks are 0-shot except MMLU, which is 5-shot
with the 5 ``dev`` rows of the item's own subject (in file order), prefixed by ``The
following are multiple choice questions (with answers) about <subject>.``. With
``num_fewshot=5`` every task gets 5 fixed solved examples, as OLMES does (Gu et al., 2024,
Sec. 3.4): the first 5 rows of the task's ``val`` split, which are then left out of ``val``.
"""
from __future__ import annotations

import gzip
import os
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from spokes_lightning.data.corpus import DEMO_DIR, ReadStats, jsonl_records, resolve_paths
from spokes_lightning.utils.errors import UserError, require_package
from spokes_lightning.evaluation.cloze import (
    PMI_UNCONDITIONED_CONTEXT,
    ClozeItem,
    mmlu_question_prompt,
    mmlu_subject_title,
    to_cloze,
)

SPLITS = ("test", "val")
TASK_PREFIX = "olmes_local_"

#: normalization name -> lm-eval metric that implements it.
NORMALIZATION_METRIC = {"none": "acc", "char": "acc_norm", "pmi": "acc_mutual_info"}


@dataclass(frozen=True)
class TaskSpec:
    """One task: OLMES settings (OLMES Table 3), report label and OLMES CLI task id."""

    name: str
    normalization: str  # "none" | "char" | "pmi"
    label: str  # column name in the report (paper Table 2)
    olmes_id: str  # cloze ("rc") task of the OLMES CLI; "{subject}" expands per MMLU subject
    num_fewshot: int = 0

    @property
    def metric(self) -> str:
        return NORMALIZATION_METRIC[self.normalization]


#: THE task list, in paper Table 2 order.
TASK_SPECS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("hellaswag", "char", "HellaSwag", "hellaswag:rc::olmes"),
    TaskSpec("mmlu", "char", "MMLU", "mmlu_{subject}:rc::olmes", num_fewshot=5),
    TaskSpec("arc_challenge", "pmi", "ARC-C", "arc_challenge:rc::olmes"),
    TaskSpec("arc_easy", "char", "ARC-E", "arc_easy:rc::olmes"),
    TaskSpec("piqa", "char", "PIQA", "piqa:rc::olmes"),
    TaskSpec("siqa", "char", "SIQA", "socialiqa:rc::olmes"),
    TaskSpec("boolq", "none", "BoolQ", "boolq:rc::olmes"),
    TaskSpec("winogrande", "none", "WinoGrande", "winogrande:rc::olmes"),
    TaskSpec("openbookqa", "pmi", "OBQA", "openbookqa:rc::olmes"),
    TaskSpec("commonsense_qa", "pmi", "CSQA", "csqa:rc::olmes"),
)}
ALL_TASKS = tuple(TASK_SPECS)
TASK_LABELS = {name: spec.label for name, spec in TASK_SPECS.items()}


def default_eval_dir() -> Path:
    """``data/demo/eval`` of a checkout, or the installed package's copy."""
    from spokes_lightning.utils.resources import shipped_dir

    return shipped_dir("demo_data") / "eval"


def check_task_names(tasks) -> tuple[str, ...]:
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    unknown = [t for t in tasks if t not in TASK_SPECS]
    if unknown or not tasks:
        raise UserError(f"unknown evaluation task(s) {unknown or '(none)'}; known: {', '.join(ALL_TASKS)}")
    return tasks


def read_task_rows(task: str, eval_dir: str | Path | None = None) -> list[dict]:
    """All rows (every split) of ``<eval_dir>/<task>.jsonl.gz`` as shipped."""
    path = Path(eval_dir or default_eval_dir()) / f"{task}.jsonl.gz"
    if not path.is_file():
        raise UserError(f"evaluation file not found: {path} (build the demo data first)")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def shot_text(item: ClozeItem) -> str:
    """One solved example: the prompt followed by its gold answer (the gold option's context for
    WinoGrande-style items)."""
    if item.is_partial:
        return f"{item.contexts[item.gold]} {item.continuations[0]}"
    return f"{item.contexts[0]} {item.continuations[item.gold]}"


def _with_prefix(item: ClozeItem, prefix: str) -> ClozeItem:
    return ClozeItem(item.id, item.split, tuple(prefix + c for c in item.contexts), item.continuations, item.gold)


def mmlu_fewshot_prefixes(dev_rows: list[dict], num_fewshot: int) -> dict[str, str]:
    """Per subject: description line + the first ``num_fewshot`` dev examples, answered."""
    by_subject: dict[str, list[dict]] = {}
    for row in dev_rows:
        by_subject.setdefault(row["subject"], []).append(row)
    prefixes = {}
    for subject, rows in by_subject.items():
        if len(rows) < num_fewshot:
            raise UserError(f"mmlu dev has {len(rows)} rows for {subject}, need {num_fewshot}")
        shots = [shot_text(to_cloze("mmlu", r)) for r in rows[:num_fewshot]]
        header = f"The following are multiple choice questions (with answers) about {mmlu_subject_title(subject)}."
        prefixes[subject] = "\n\n".join([header, *shots]) + "\n\n"
    return prefixes


def shots_for(task: str, num_fewshot: int | None = None, eval_dir: str | Path | None = None) -> list[ClozeItem]:
    """The fixed solved examples put before every item of ``task`` (OLMES: 5 per task).

    MMLU takes the first ``k`` ``dev`` rows of the item's own subject (all subjects returned
    here, in file order); every other task the first ``k`` rows of its ``val`` split, which
    are then left out when ``val`` itself is evaluated. ``None`` = the task's default
    (:class:`TaskSpec` ``num_fewshot``).
    """
    k = TASK_SPECS[check_task_names([task])[0]].num_fewshot if num_fewshot is None else int(num_fewshot)
    if k < 0:
        raise UserError(f"num_fewshot must be 0 or more, got {k}")
    if k == 0:
        return []
    rows = read_task_rows(task, eval_dir)
    if task == "mmlu":
        seen: dict[str, int] = {}
        shots = []
        for row in rows:
            if row.get("split") == "dev" and seen.get(row["subject"], 0) < k:
                seen[row["subject"]] = seen.get(row["subject"], 0) + 1
                shots.append(to_cloze(task, row))
        return shots
    val = [to_cloze(task, r) for r in rows if r.get("split") == "val"]
    if len(val) < k:
        raise UserError(f"{task}: {k} shots asked, its val split has {len(val)} rows")
    return val[:k]


def load_cloze_items(task: str, split: str = "test", eval_dir: str | Path | None = None,
                     num_fewshot: int | None = None) -> list[ClozeItem]:
    """Cloze items of one split, each context preceded by the task's fixed shots (:func:`shots_for`)."""
    check_task_names([task])
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    rows = read_task_rows(task, eval_dir)
    items = [to_cloze(task, row) for row in rows if row.get("split") == split]
    if not items:
        raise UserError(f"{task}: no rows with split={split!r}")
    k = TASK_SPECS[task].num_fewshot if num_fewshot is None else int(num_fewshot)
    if k < 0:
        raise UserError(f"num_fewshot must be 0 or more, got {k}")
    if k == 0:
        return items
    if task == "mmlu":
        prefixes = mmlu_fewshot_prefixes([r for r in rows if r.get("split") == "dev"], k)
        subjects = {str(r["id"]): r["subject"] for r in rows}
        missing = sorted({subjects[i.id] for i in items} - set(prefixes))
        if missing:
            raise UserError(f"mmlu dev split lacks subjects {missing[:3]}")
        return [_with_prefix(i, prefixes[subjects[i.id]]) for i in items]
    shots = shots_for(task, k, eval_dir)
    shot_ids = {s.id for s in shots}
    prefix = "\n\n".join(shot_text(s) for s in shots) + "\n\n"
    return [_with_prefix(i, prefix) for i in items if i.id not in shot_ids]


def chance_level(items: list[ClozeItem]) -> float:
    """Expected accuracy of uniform guessing, in percent: mean over items of 1/num_choices."""
    return 100.0 * sum(1.0 / item.num_choices for item in items) / len(items)


# --- lm-eval glue ---------------------------------------------------------------------

def _doc_to_text(doc: dict):
    # An int tells lm-eval the options are in the context (multiple_input, partial scoring).
    return int(doc["gold"]) if len(doc["contexts"]) > 1 else doc["contexts"][0]


def _doc_to_choice(doc: dict) -> list[str]:
    return list(doc["contexts"]) if len(doc["contexts"]) > 1 else list(doc["continuations"])


def _doc_to_target(doc: dict):
    return doc["continuations"][0] if len(doc["contexts"]) > 1 else int(doc["gold"])


def _local_dataset(task: str, split: str, eval_dir: str, num_fewshot: int | None = None, **_ignored) -> dict:
    datasets = require_package("datasets")
    docs = [item.to_doc() for item in load_cloze_items(task, split, eval_dir, num_fewshot)]
    return {split: datasets.Dataset.from_list(docs)}


def lm_eval_task_name(task: str) -> str:
    return f"{TASK_PREFIX}{task}"


def task_config(task: str, split: str = "test", eval_dir: str | Path | None = None,
                num_fewshot: int | None = None) -> dict:
    """Inline lm-eval task config for one task (metrics acc, acc_norm and, for pmi, acc_mutual_info)."""
    spec = TASK_SPECS[check_task_names([task])[0]]
    metrics = ["acc", "acc_norm"] + (["acc_mutual_info"] if spec.normalization == "pmi" else [])
    return {
        "task": lm_eval_task_name(task),
        "custom_dataset": partial(_local_dataset, task, split, str(eval_dir or default_eval_dir()), num_fewshot),
        "test_split": split,
        "output_type": "multiple_choice",
        "doc_to_text": _doc_to_text,
        "doc_to_choice": _doc_to_choice,
        "doc_to_target": _doc_to_target,
        "target_delimiter": " ",
        "num_fewshot": 0,  # the shots are already inside each context (shots_for)
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
        "metadata": {"version": 1.0, "olmes_normalization": spec.normalization},
    }


def build_lm_eval_task(task: str, split: str = "test", eval_dir: str | Path | None = None,
                       num_fewshot: int | None = None):
    """An instantiated lm-eval task reading the local file (needs ``lm_eval``)."""
    from spokes_lightning.evaluation.lm_eval_task import OlmesClozeTask

    return OlmesClozeTask(config=task_config(task, split, eval_dir, num_fewshot))


def load_eval_items(task: str, split: str = "test",
                    directory: str | os.PathLike | None = None) -> list[dict]:
    """Rows of ``eval/<task>.jsonl.gz`` with the given split (test, val; mmlu also dev).

    Rows keep their original MosaicML/llm-foundry fields plus ``id`` and ``split``.
    """
    if task not in ALL_TASKS:
        raise UserError(f"unknown eval task {task!r}; choose from {', '.join(ALL_TASKS)}")
    splits = ("test", "val", "dev") if task == "mmlu" else ("test", "val")
    if split not in splits:
        raise UserError(f"eval task {task!r} has no split {split!r}; choose from "
                        f"{', '.join(splits)}")
    path = Path(directory or DEMO_DIR / "eval") / f"{task}.jsonl.gz"
    (path,) = resolve_paths([path])
    return [row for _, row in jsonl_records(path, ReadStats()) if row.get("split") == split]
