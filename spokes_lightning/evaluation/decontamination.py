"""13-gram overlap between selected training documents and the evaluation items.

Following the GPT-3 / OLMo-style n-gram decontamination check (Brown et al., 2020,
App. C; n = 13), a training document counts as *contaminated* when it shares at least
one n-gram of word tokens with any evaluation item.

Tokenization: the text is lowercased and split into maximal runs of Unicode word
characters (regex ``\\w+``); punctuation and whitespace only separate tokens. An
evaluation item's text is its own cloze prompt (question/context; for MMLU without the
few-shot prefix) followed by its gold answer text, for every item of all 10 tasks and
every shipped split (test, val, and MMLU's dev shots). Items shorter than ``n`` tokens
contribute no n-gram.

N-grams are stored as Python's 64-bit hash of the token tuple in a set (hashes are only
compared within one process, so hash randomization does not matter); a document is
scanned window by window and stops at its first hit. A false positive needs a 64-bit
hash collision.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from spokes_lightning.utils.errors import UserError

_WORD = re.compile(r"\w+")
DEFAULT_N = 13


def word_tokens(text: str) -> list[str]:
    """Lowercased ``\\w+`` word tokens of ``text``."""
    return _WORD.findall(text.lower())


def ngram_hashes(text: str, n: int = DEFAULT_N) -> set[int]:
    """Hashes of every contiguous ``n``-token window of ``text``."""
    tokens = word_tokens(text)
    return {hash(tuple(tokens[i:i + n])) for i in range(len(tokens) - n + 1)}


class EvalNgramIndex:
    """Set of n-gram hashes of the evaluation items, queried per document."""

    def __init__(self, eval_texts, n: int = DEFAULT_N):
        if n < 1:
            raise UserError(f"n-gram length must be >= 1, got {n}")
        self.n = n
        self.hashes: set[int] = set()
        for text in eval_texts:
            self.hashes |= ngram_hashes(text, n)

    def shares_ngram(self, text: str) -> bool:
        """True if ``text`` shares at least one n-gram with an evaluation item."""
        tokens, n, hashes = word_tokens(text), self.n, self.hashes
        return any(hash(tuple(tokens[i:i + n])) in hashes for i in range(len(tokens) - n + 1))


def eval_item_texts(eval_dir: str | Path | None = None, tasks=None) -> list[str]:
    """Question/context + gold answer of every item of ``tasks`` (default: all 10), all splits."""
    from spokes_lightning.evaluation.cloze import to_cloze
    from spokes_lightning.evaluation.tasks import ALL_TASKS, check_task_names, read_task_rows

    texts = []
    for task in check_task_names(tasks or ALL_TASKS):
        texts += [to_cloze(task, row).gold_text() for row in read_task_rows(task, eval_dir)]
    return texts


@dataclass
class ContaminationResult:
    """How many of the checked documents overlap the evaluation items, and which."""

    n_documents: int
    contaminated_ids: list = field(default_factory=list)

    @property
    def n_contaminated(self) -> int:
        return len(self.contaminated_ids)

    @property
    def fraction(self) -> float:
        return self.n_contaminated / self.n_documents if self.n_documents else 0.0

    def to_dict(self) -> dict:
        return {"n_documents": self.n_documents, "n_contaminated": self.n_contaminated,
                "fraction": self.fraction, "contaminated_ids": list(self.contaminated_ids)}


def _id_text_pairs(documents):
    """Accept a mapping id -> text, (id, text) pairs, dicts with id/text, or bare texts."""
    if isinstance(documents, dict):
        return list(documents.items())
    pairs = []
    for position, doc in enumerate(documents):
        if isinstance(doc, str):
            pairs.append((position, doc))
        elif isinstance(doc, dict):
            pairs.append((doc.get("id", position), doc["text"]))
        else:
            pairs.append((doc[0], doc[1]))
    return pairs


def contaminated_documents(documents, eval_texts=None, n: int = DEFAULT_N,
                           index: EvalNgramIndex | None = None) -> ContaminationResult:
    """Which ``documents`` share an ``n``-gram with ``eval_texts`` (default: all local eval items)."""
    from spokes_lightning.utils.progress import progress

    if index is None:
        index = EvalNgramIndex(eval_item_texts() if eval_texts is None else eval_texts, n)
    pairs = _id_text_pairs(documents)
    flagged = [doc_id for doc_id, text in progress(pairs, "decontamination")
               if index.shares_ngram(text)]
    return ContaminationResult(n_documents=len(pairs), contaminated_ids=flagged)


def contamination_by_selection(selections: dict, documents, eval_texts=None,
                               n: int = DEFAULT_N) -> dict[str, dict]:
    """Per named selection (a list of document ids), its contamination counts and ids."""
    pairs = dict(_id_text_pairs(documents))
    index = EvalNgramIndex(eval_item_texts() if eval_texts is None else eval_texts, n)
    report = {}
    for name, ids in selections.items():
        missing = [i for i in ids if i not in pairs]
        if missing:
            raise UserError(f"selection {name!r} names unknown document ids, e.g. {missing[0]!r}")
        report[name] = contaminated_documents([(i, pairs[i]) for i in ids], index=index).to_dict()
    return report
