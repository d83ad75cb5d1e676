"""OLMES-style lm-eval tasks over data/demo/eval, checked against a direct HF computation."""
from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from spokes_lightning.utils.errors import UserError
from spokes_lightning.evaluation import OLMES_DEPARTURES, evaluate_model, validation_loss
from spokes_lightning.evaluation.cloze import split_mc_letter_query
from spokes_lightning.evaluation.run import load_hflm, run_lm_eval, summarize
from spokes_lightning.evaluation.tasks import (
    ALL_TASKS,
    PMI_UNCONDITIONED_CONTEXT,
    TASK_SPECS,
    build_lm_eval_task,
    chance_level,
    lm_eval_task_name,
    load_cloze_items,
    read_task_rows,
)

EXPECTED_CHOICES = {"hellaswag": 4, "mmlu": 4, "arc_challenge": 4, "arc_easy": 4, "piqa": 2, "siqa": 2,
                    "boolq": 2, "winogrande": 2, "openbookqa": 4, "commonsense_qa": 4}
LIMIT = 6


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """Random-init 2-layer Llama + a 300-token byte-level BPE trained on eval val texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(1)
    texts = [item.gold_text() for task in ("arc_easy", "winogrande")
             for item in load_cloze_items(task, "val")]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="</s>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class DirectScorer:
    """Our own loglikelihood: sum of log-probs of the continuation's tokens after the context."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def loglikelihood(self, context: str, continuation: str) -> float:
        context_ids = self.tokenizer(context)["input_ids"]
        whole_ids = self.tokenizer(context + continuation)["input_ids"]
        assert whole_ids[:len(context_ids)] == context_ids
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([whole_ids])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        return float(sum(logprobs[pos - 1, whole_ids[pos]] for pos in range(len(context_ids), len(whole_ids))))


def expected_scores(task, item, scorer):
    """Per-choice (score used for the argmax, raw conditional lls) under the task's OLMES normalization."""
    if item.is_partial:  # WinoGrande partial scoring: shared continuation after each option
        lls = [scorer.loglikelihood(ctx, " " + item.continuations[0]) for ctx in item.contexts]
        return np.array(lls), lls
    lls = [scorer.loglikelihood(item.contexts[0], " " + c) for c in item.continuations]
    norm = TASK_SPECS[task].normalization
    if norm == "char":
        return np.array(lls) / np.array([len(c) for c in item.continuations]), lls
    if norm == "pmi":
        uncond = [scorer.loglikelihood(PMI_UNCONDITIONED_CONTEXT, " " + c) for c in item.continuations]
        return np.array(lls) - np.array(uncond), lls + uncond
    return np.array(lls), lls


def test_lm_eval_loglikelihoods_and_accuracy_match_direct_hf(tiny_model_dir):
    tasks = ["arc_easy", "arc_challenge", "winogrande"]  # char, pmi (+ "Answer:" context), partial
    lm = load_hflm(tiny_model_dir, batch_size=4)
    raw = run_lm_eval(lm, tasks, limit=LIMIT, log_samples=True)
    summary = summarize(raw, tasks, limit=LIMIT)
    scorer = DirectScorer(tiny_model_dir)
    for task in tasks:
        items = load_cloze_items(task, "test")[:LIMIT]
        samples = sorted(raw["samples"][lm_eval_task_name(task)], key=lambda s: s["doc_id"])
        assert [s["doc"]["id"] for s in samples] == [i.id for i in items]
        correct = []
        for item, sample in zip(items, samples):
            scores, lls = expected_scores(task, item, scorer)
            harness_lls = [resp[0] for resp in sample["filtered_resps"]]
            assert np.allclose(harness_lls, lls, atol=1e-4, rtol=0), (task, item.id)
            correct.append(float(np.argmax(scores) == item.gold))
        assert summary[task]["acc"] == pytest.approx(100.0 * np.mean(correct))
        assert summary[task]["n"] == LIMIT
        assert summary[task]["metric"] == TASK_SPECS[task].metric
    assert summary["avg"] == pytest.approx(np.mean([summary[t]["acc"] for t in tasks]))
    assert summary["winogrande"]["chance"] == 50.0 and summary["arc_easy"]["chance"] == 25.0


def test_evaluate_model_returns_percent_metrics(tiny_model_dir):
    result = evaluate_model(tiny_model_dir, tasks=["siqa", "boolq"], limit=4, batch_size=8)
    for task in ("siqa", "boolq"):
        assert set(result[task]) >= {"acc", "stderr", "chance", "metric", "n"}
        assert 0.0 <= result[task]["acc"] <= 100.0 and result[task]["n"] == 4
        assert result[task]["chance"] == 50.0
    assert result["siqa"]["metric"] == "acc_norm" and result["boolq"]["metric"] == "acc"
    assert result["avg"] == pytest.approx((result["siqa"]["acc"] + result["boolq"]["acc"]) / 2)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_every_task_loads_offline_with_expected_choices(task):
    lm_task = build_lm_eval_task(task, "test")
    docs = list(lm_task.test_docs())
    assert len(docs) == 300
    assert all(len(lm_task.doc_to_choice(d)) == EXPECTED_CHOICES[task] for d in docs)
    items = load_cloze_items(task, "test")
    assert chance_level(items) == pytest.approx(100.0 / EXPECTED_CHOICES[task])
    assert len(load_cloze_items(task, "val")) == 100
    if task in ("commonsense_qa", "siqa"):  # shipped as MC letters, scored as answer texts
        assert all(len(c) > 1 for i in items for c in i.continuations)
    if task not in ("hellaswag", "winogrande"):
        assert all(i.contexts[0].endswith("\nAnswer:") for i in items)


def test_letter_format_tasks_are_converted_back_to_answer_texts():
    row = next(r for r in read_task_rows("commonsense_qa") if r["split"] == "test")
    head, answers = split_mc_letter_query(row["query"], 4)
    item = load_cloze_items("commonsense_qa", "test")[0]
    assert item.continuations == tuple(answers) and "Choices:" not in item.contexts[0]
    assert f"A. {answers[0]}" in row["query"] and row["choices"] == ["A", "B", "C", "D"]
    with pytest.raises(UserError, match="choices"):
        split_mc_letter_query(row["query"], 5)


def test_mmlu_is_five_shot_from_same_subject_dev():
    rows = read_task_rows("mmlu")
    item = load_cloze_items("mmlu", "test")[0]
    subject = next(r["subject"] for r in rows if r["id"] == item.id)
    dev = [r for r in rows if r["split"] == "dev" and r["subject"] == subject]
    context = item.contexts[0]
    assert context.count("\nAnswer:") == 6
    assert subject.replace("_", " ") in context.split("\n")[0]
    for shot in dev[:5]:
        assert f"{shot['question'].strip()}\nAnswer: {shot['choices'][shot['answer']]}" in context


def test_validation_loss_matches_hf_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["The cat sat on the mat because it was warm.", "Plants need sunlight and water to grow tall."]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    totals, counts = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            n_pred = ids.shape[1] - 1
            totals += float(model(input_ids=ids, labels=ids).loss) * n_pred
            counts += n_pred
    assert validation_loss(tiny_model_dir, texts, max_length=512) == pytest.approx(totals / counts, rel=1e-5)
    # shorter windows drop each window's first-token prediction -> a different (still finite) value
    short = validation_loss(tiny_model_dir, texts, max_length=8, batch_size=3)
    assert np.isfinite(short) and short != pytest.approx(totals / counts, rel=1e-6)


def test_bad_inputs_are_one_line_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown evaluation task"):
        evaluate_model(tmp_path, tasks=["nope"])
    with pytest.raises(UserError, match="config.json"):
        evaluate_model(tmp_path, tasks=["piqa"])
    with pytest.raises(UserError, match="evaluation file not found"):
        load_cloze_items("piqa", "test", eval_dir=tmp_path)
    monkeypatch.setattr("shutil.which", lambda name: None)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not on PyPI"):
        evaluate_model(tmp_path, tasks=["piqa"], engine="olmes", output_dir=tmp_path / "o")


def test_olmes_command_and_departures():
    from pathlib import Path

    from spokes_lightning.evaluation.olmes_cli import olmes_command, olmes_task_ids

    ids = olmes_task_ids(["siqa", "mmlu"], mmlu_subjects=["anatomy", "virology", "anatomy"])
    assert ids == ["socialiqa:rc::olmes", "mmlu_anatomy:rc::olmes", "mmlu_virology:rc::olmes"]
    command = olmes_command("olmes", Path("m"), ids, Path("out"), limit=5)
    assert command[:3] == ["olmes", "--model", "m"] and command[command.index("--limit") + 1] == "5"
    text = " ".join(OLMES_DEPARTURES)
    assert "SIQA has 2" in text and "CommonsenseQA has 4" in text and "300" in text
