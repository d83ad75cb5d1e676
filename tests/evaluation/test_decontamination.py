"""13-gram decontamination against the local evaluation items (data/demo/eval)."""
from __future__ import annotations

import pytest

from spokes_lightning.utils.errors import UserError
from spokes_lightning.evaluation.decontamination import (
    EvalNgramIndex,
    contaminated_documents,
    contamination_by_selection,
    eval_item_texts,
    word_tokens,
)
from spokes_lightning.evaluation.tasks import ALL_TASKS, load_cloze_items

FILLER_BEFORE = "qwzx vbnm plok"
FILLER_AFTER = "zzyq kjhx wqpo"


@pytest.fixture(scope="module")
def eval_texts():
    return eval_item_texts()


@pytest.fixture(scope="module")
def item_words():
    """Word tokens of one real test item (ARC-Easy question + gold answer)."""
    words = word_tokens(load_cloze_items("arc_easy", "test")[3].gold_text())
    assert len(words) >= 16
    return words


def test_eval_texts_cover_all_tasks_and_splits(eval_texts):
    expected = sum(len(load_cloze_items(t, s)) for t in ALL_TASKS for s in ("test", "val")) + 285
    assert len(eval_texts) == expected


def test_13_word_copy_is_flagged_12_is_not(eval_texts, item_words):
    span13 = " ".join(item_words[2:15]).upper() + "!"  # case and punctuation do not matter
    span12 = " ".join(item_words[2:14])
    docs = {"copied13": f"{FILLER_BEFORE}, {span13} {FILLER_AFTER}",
            "copied12": f"{FILLER_BEFORE} {span12}. {FILLER_AFTER}",
            "clean": "An unrelated page about gardening tools and soil."}
    result = contaminated_documents(docs, eval_texts, n=13)
    assert result.contaminated_ids == ["copied13"]
    assert result.n_documents == 3 and result.n_contaminated == 1
    assert result.fraction == pytest.approx(1 / 3)
    # the same 12-word span does count with a 12-gram index
    assert contaminated_documents(docs, eval_texts, n=12).n_contaminated == 2


def test_gold_answer_text_is_part_of_the_item_ngrams(item_words):
    item = load_cloze_items("arc_easy", "test")[3]
    answer_words = word_tokens(item.continuations[item.gold])
    question_words = word_tokens(item.contexts[0])
    assert question_words[0] == "question" and question_words[-1] == "answer"  # prompt scaffolding
    question_tail = question_words[1:-1][-(13 - len(answer_words)):]
    doc = f"{FILLER_BEFORE} {' '.join(question_tail + answer_words)} {FILLER_AFTER}"
    index = EvalNgramIndex([item.gold_text()], n=13)
    assert index.shares_ngram(doc)
    wrong = [c for i, c in enumerate(item.continuations) if i != item.gold][0]
    assert not index.shares_ngram(f"{' '.join(question_tail)} {wrong} zzz")


def test_contamination_by_selection_counts_per_selection(eval_texts, item_words):
    documents = [{"id": f"d{i}", "text": f"{FILLER_BEFORE} doc {i} {FILLER_AFTER}"} for i in range(5)]
    documents[3]["text"] = " ".join(item_words[:13])
    report = contamination_by_selection({"a": ["d0", "d3"], "b": ["d1", "d2", "d4"]}, documents, eval_texts)
    assert report["a"]["n_contaminated"] == 1 and report["a"]["contaminated_ids"] == ["d3"]
    assert report["b"]["n_contaminated"] == 0 and report["b"]["n_documents"] == 3
    with pytest.raises(UserError, match="unknown document ids"):
        contamination_by_selection({"c": ["missing"]}, documents, eval_texts)
