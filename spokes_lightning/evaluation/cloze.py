"""Convert the shipped evaluation rows into OLMES "cloze" (RC) items.

OLMES (Gu et al., 2024, "OLMES: A Standard for Language Model Evaluations", Sec. 3)
evaluates small models with the *cloze formulation* (RC): the model scores each answer
*text* as a continuation of the question prompt, instead of the answer *letter* of a
multiple-choice (MC) prompt. The demo files keep each source's original fields
(``data/demo/eval/<task>.jsonl.gz``), so this module maps every source format to one
uniform item:

* ``contexts``: the prompt(s). One prompt for ordinary tasks; one per answer option for
  WinoGrande, whose options live in the context (OLMES "partial scoring").
* ``continuations``: the scored text(s), without the leading space (lm-eval adds the
  ``" "`` target delimiter). One per answer option, or one shared continuation for
  WinoGrande.
* ``gold``: index of the correct option.

Prompt templates follow OLMES Table 4 (``Question: ...\\nAnswer:`` + ``" <answer text>"``;
HellaSwag ``<activity>: <ctx>`` + ``" <ending>"``; BoolQ ``<passage>\\nQuestion: ...\\n
Answer:`` + ``" yes"/" no"``). CommonsenseQA and SIQA are shipped in MosaicML's MC letter
format (``Choices:\\nA. ...\\nB. ...\\nAnswer:`` with letter choices); they are converted
back to cloze by reading the answer texts out of the ``Choices:`` block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from spokes_lightning.utils.errors import UserError

_CHOICE_LINE = re.compile(r"^([A-Z])\.\s?(.*)$")

#: the context of the unconditioned PMI term (OLMES "rc" formulation): P(answer | "Answer:")
PMI_UNCONDITIONED_CONTEXT = "Answer:"


@dataclass(frozen=True)
class ClozeItem:
    """One evaluation item in cloze form (see module docstring)."""

    id: str
    split: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int

    @property
    def num_choices(self) -> int:
        return max(len(self.contexts), len(self.continuations))

    @property
    def is_partial(self) -> bool:
        """True for WinoGrande-style items: options in the context, shared continuation."""
        return len(self.contexts) > 1

    def gold_text(self) -> str:
        """The item's own question/context and gold answer, without the prompt's
        ``Question:``/``Answer:`` scaffolding (for decontamination)."""
        if self.is_partial:
            return f"{self.contexts[self.gold]} {self.continuations[0]}"
        return f"{strip_prompt_scaffolding(self.contexts[0])} {self.continuations[self.gold]}"

    def to_doc(self) -> dict:
        """Plain dict stored in the lm-eval dataset."""
        return {"id": self.id, "split": self.split, "contexts": list(self.contexts),
                "continuations": list(self.continuations), "gold": int(self.gold)}


def strip_prompt_scaffolding(context: str) -> str:
    """Drop the ``Question:`` label(s) and the trailing ``Answer:`` cue from a cloze prompt."""
    if context.endswith("\nAnswer:"):
        context = context[: -len("\nAnswer:")]
    if context.startswith("Question: "):
        context = context[len("Question: "):]
    return context.replace("\nQuestion: ", "\n")


def split_mc_letter_query(query: str, n_choices: int) -> tuple[str, list[str]]:
    """Split a MosaicML MC query into (text before ``Choices:``, answer texts A, B, ...).

    The MC query looks like ``Question: q\\nChoices:\\nA. x\\nB. y\\nAnswer:``; the letters
    must run A, B, C, ... and there must be exactly ``n_choices`` of them.
    """
    head, sep, tail = query.partition("\nChoices:\n")
    if not sep:
        raise UserError(f"MC query has no 'Choices:' block: {query[:80]!r}")
    answers: list[str] = []
    for line in tail.split("\n"):
        if line.strip() == "Answer:":
            break
        match = _CHOICE_LINE.match(line)
        if match is None or match.group(1) != chr(ord("A") + len(answers)):
            raise UserError(f"MC query has a malformed choice line {line!r}")
        answers.append(match.group(2).strip())
    if len(answers) != n_choices:
        raise UserError(f"MC query lists {len(answers)} choices, row has {n_choices}")
    return head, answers


def _strip_label(text: str, label: str) -> str:
    text = text.strip()
    return text[len(label):].strip() if text.startswith(label) else text


def _question_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _plain_qa(row: dict) -> tuple[str, list[str], int]:
    """ARC-style rows: ``query`` = ``Question: q`` (or a bare stem), text ``choices``."""
    return _question_prompt(_strip_label(row["query"], "Question:")), list(row["choices"]), int(row["gold"])


def _boolq(row: dict) -> tuple[str, list[str], int]:
    passage, sep, question = row["query"].rpartition("\nQuestion:")
    if not sep:
        raise UserError("boolq row has no '\\nQuestion:' line")
    context = f"{_strip_label(passage, 'Passage:')}\nQuestion: {question.strip()}\nAnswer:"
    return context, list(row["choices"]), int(row["gold"])


def _commonsense_qa(row: dict) -> tuple[str, list[str], int]:
    head, answers = split_mc_letter_query(row["query"], len(row["choices"]))
    return _question_prompt(_strip_label(head, "Question:")), answers, int(row["gold"])


def _siqa(row: dict) -> tuple[str, list[str], int]:
    head, answers = split_mc_letter_query(row["query"], len(row["choices"]))
    context_part, sep, question = head.partition("\nQuestion:")
    if not sep:
        raise UserError("siqa row has no '\\nQuestion:' line")
    prompt = _question_prompt(f"{_strip_label(context_part, 'Context:')} {question.strip()}")
    return prompt, answers, int(row["gold"])


def _hellaswag(row: dict) -> tuple[str, list[str], int]:
    return row["query"].strip(), [e.strip() for e in row["endings"]], int(row["label"])


def mmlu_subject_title(subject: str) -> str:
    return subject.replace("_", " ")


def mmlu_question_prompt(question: str) -> str:
    return _question_prompt(question.strip())


def _mmlu(row: dict) -> tuple[str, list[str], int]:
    return mmlu_question_prompt(row["question"]), [str(c) for c in row["choices"]], int(row["answer"])


_SINGLE_CONTEXT = {
    "arc_challenge": _plain_qa,
    "arc_easy": _plain_qa,
    "openbookqa": _plain_qa,
    "piqa": _plain_qa,
    "boolq": _boolq,
    "commonsense_qa": _commonsense_qa,
    "siqa": _siqa,
    "hellaswag": _hellaswag,
    "mmlu": _mmlu,
}

CLOZE_TASKS = tuple(_SINGLE_CONTEXT) + ("winogrande",)


def to_cloze(task: str, row: dict) -> ClozeItem:
    """Convert one shipped row of ``task`` into a :class:`ClozeItem`."""
    try:
        if task == "winogrande":
            contexts = tuple(c.strip() for c in row["context_options"])
            gold = int(row["gold"])
            continuations: tuple[str, ...] = (row["continuation"].strip(),)
        elif task in _SINGLE_CONTEXT:
            context, answers, gold = _SINGLE_CONTEXT[task](row)
            contexts, continuations = (context,), tuple(a.strip() for a in answers)
        else:
            raise UserError(f"unknown evaluation task {task!r}; known: {', '.join(CLOZE_TASKS)}")
        item = ClozeItem(id=str(row["id"]), split=str(row["split"]), contexts=contexts,
                         continuations=continuations, gold=gold)
    except KeyError as exc:
        raise UserError(f"{task} row {row.get('id', '?')} lacks field {exc}") from exc
    if not 0 <= item.gold < item.num_choices or item.num_choices < 2:
        raise UserError(f"{task} row {item.id}: gold {item.gold} out of range for {item.num_choices} choices")
    return item
