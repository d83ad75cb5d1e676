"""Bootstrap intervals, paired differences, Table 2 rendering and per-item lm-eval scores."""
from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re

import numpy as np
import pytest

from spokes_lightning.utils.atomic import json_round_trip
from spokes_lightning.evaluation.item_scores import (
    item_correct,
    load_item_scores,
    save_item_scores,
    stack_seeds,
)
from spokes_lightning.evaluation.stats import (
    mean_ci,
    paired_difference,
    t_quantile,
    validation_loss_ci,
)
from spokes_lightning.pipeline.report_tables import (
    table2_data,
    table2_markdown,
    val_loss_data,
    val_loss_markdown,
)

TASKS = [f"t{i}" for i in range(10)]


def draw(rng, probs, seeds=1, seed_sd=0.0):
    """{task: 0/1 (seeds, items)} with P(correct) = probs[task] (+ a per-seed offset)."""
    out = {}
    for task, p in probs.items():
        offsets = rng.normal(0.0, seed_sd, size=(seeds, 1))
        out[task] = (rng.random((seeds, len(p))) < np.clip(p + offsets, 0, 1)).astype(np.uint8)
    return out


def difficulties(rng, n, tasks=TASKS):
    return {t: rng.beta(2, 2, size=n) for t in tasks}


@pytest.mark.parametrize("seeds,n_items", [(1, 100), (3, 100), (1, 300)])
def test_same_accuracy_paired_interval_covers_zero(seeds, n_items):
    rng = np.random.default_rng(seeds * 1000 + n_items)
    covered, reps = 0, 40
    seed_sd = 0.02 if seeds > 1 else 0.0  # with one seed an offset would be a real difference
    for rep in range(reps):
        probs = difficulties(rng, n_items)
        a = draw(rng, probs, seeds, seed_sd=seed_sd)
        b = draw(rng, probs, seeds, seed_sd=seed_sd)
        d = paired_difference(a, b, seed=rep)
        covered += d["lo"] <= 0.0 <= d["hi"]
        assert d["excludes_zero"] == (not d["lo"] <= 0.0 <= d["hi"])
        assert 0.0 <= d["p"] <= 1.0
    assert covered / reps >= 0.85


def test_ten_point_gap_at_1000_items_excludes_zero():
    rng = np.random.default_rng(7)
    probs = {t: np.full(1000, 0.5) for t in TASKS[:3]}
    better = draw(rng, {t: p + 0.10 for t, p in probs.items()})
    base = draw(rng, probs)
    d = paired_difference(better, base, seed=0)
    assert d["excludes_zero"] and d["lo"] > 0.0 and 5.0 < d["diff"] < 15.0
    assert d["p"] < 0.01
    assert all(cell["excludes_zero"] for cell in d["per_task"].values())
    reverse = paired_difference(base, better, seed=0)
    assert reverse["hi"] < 0.0 and reverse["diff"] == pytest.approx(-d["diff"])


def test_paired_interval_narrower_than_unpaired_when_items_correlate():
    rng = np.random.default_rng(3)
    # items are mostly easy or hard for both methods: correctness is strongly correlated
    probs = {t: np.where(rng.random(200) < 0.5, 0.05, 0.95) for t in TASKS}
    a, b = draw(rng, probs), draw(rng, probs)
    paired = paired_difference(a, b, seed=0)
    unpaired = paired_difference(a, b, seed=0, paired=False)
    assert paired["diff"] == pytest.approx(unpaired["diff"])
    assert (paired["hi"] - paired["lo"]) < 0.6 * (unpaired["hi"] - unpaired["lo"])


def test_deterministic_given_seed():
    rng = np.random.default_rng(0)
    a = draw(rng, difficulties(rng, 100), seeds=2)
    b = draw(rng, difficulties(rng, 100), seeds=2)
    assert mean_ci(a, seed=5) == mean_ci(a, seed=5)
    assert paired_difference(a, b, seed=5) == paired_difference(a, b, seed=5)
    assert mean_ci(a, seed=5)["lo"] != mean_ci(a, seed=6)["lo"]
    assert mean_ci(a, seed=5)["mean"] == mean_ci(a, seed=6)["mean"]


def test_point_estimate_is_unweighted_task_average():
    a = {"x": np.array([[1, 1, 0, 0]]), "y": np.array([1, 1, 1, 1, 1, 1, 1, 0])}
    ci = mean_ci(a, B=500)
    assert ci["per_task"]["x"]["mean"] == 50.0 and ci["per_task"]["y"]["mean"] == 87.5
    assert ci["mean"] == pytest.approx(68.75) and ci["lo"] <= ci["mean"] <= ci["hi"]
    assert ci["n_seeds"] == 1 and ci["B"] == 500


def test_differing_seeds_widen_the_interval():
    rng = np.random.default_rng(11)
    probs = {t: np.full(300, 0.5) for t in TASKS[:4]}
    runs = [draw(rng, {t: p + shift for t, p in probs.items()}) for shift in (-0.12, 0.0, 0.12)]
    seeds = stack_seeds(runs)
    assert seeds["t0"].shape == (3, 300)
    hier = mean_ci(seeds, seed=0)
    items_only = mean_ci({t: x.mean(axis=0, keepdims=True) for t, x in seeds.items()}, seed=0)
    assert hier["mean"] == pytest.approx(items_only["mean"])
    assert (hier["hi"] - hier["lo"]) > 1.5 * (items_only["hi"] - items_only["lo"])
    copies = {t: np.repeat(x[:1], 3, axis=0) for t, x in seeds.items()}  # identical seeds add nothing
    single = {t: x[:1] for t, x in seeds.items()}
    w_copies, w_single = (mean_ci(c, seed=0) for c in (copies, single))
    assert w_copies["hi"] - w_copies["lo"] == pytest.approx(w_single["hi"] - w_single["lo"], rel=0.15)


def test_bad_inputs_raise():
    a = {"x": np.ones((1, 10))}
    with pytest.raises(ValueError, match="item counts differ"):
        paired_difference(a, {"x": np.ones((1, 9))})
    with pytest.raises(ValueError, match="different tasks"):
        paired_difference(a, {"y": np.ones((1, 10))})
    with pytest.raises(ValueError, match="seed counts"):
        mean_ci({"x": np.ones((1, 10)), "y": np.ones((2, 10))})
    with pytest.raises(ValueError, match="B must be"):
        mean_ci(a, B=10)


def test_validation_loss_ci():
    assert t_quantile(0.95, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.95, 2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(0.95, 9) == pytest.approx(2.2622, abs=1e-4)
    assert t_quantile(0.99, 5) == pytest.approx(4.0321, abs=1e-4)
    one = validation_loss_ci([3.2])
    assert one["mean"] == 3.2 and one["lo"] is None and one["hi"] is None and "one" in one["note"]
    three = validation_loss_ci([3.0, 3.2, 3.4])
    half = 4.30265 * 0.2 / np.sqrt(3)
    assert three["mean"] == pytest.approx(3.2)
    assert three["lo"] == pytest.approx(3.2 - half, abs=1e-4) and three["hi"] == pytest.approx(3.2 + half, abs=1e-4)
    md = val_loss_markdown({"random": [3.0, 3.2, 3.4], "spokes": [3.1]})
    assert "| spokes | 3.1000 | n/a (one seed) | 1 |" in md and "Student-t" in md
    assert val_loss_data({"r": [1.0, 2.0]})["r"]["n_seeds"] == 2


def _cells(markdown: str, method: str) -> list[str]:
    line = next(ln for ln in markdown.splitlines() if ln.startswith(f"| {method} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_table2_marks_only_intervals_excluding_zero():
    rng = np.random.default_rng(2024)
    probs = difficulties(rng, 300)
    items = {
        "random": draw(rng, probs, seeds=2),
        "better": draw(rng, {t: p + 0.15 for t, p in probs.items()}, seeds=2),
        "same": draw(rng, probs, seeds=2),
    }
    data = table2_data(items, TASKS, seed=0)
    assert json_round_trip(data) == data  # goes into summary.json as is
    md = table2_markdown(items, TASKS, labels={t: t.upper() for t in TASKS}, seed=0,
                         chance={t: 50.0 for t in TASKS})
    assert md == table2_markdown(items, TASKS, labels={t: t.upper() for t in TASKS}, seed=0,
                                 chance={t: 50.0 for t in TASKS}, data=data)
    assert "<u>" not in md and "best" not in md.lower() and "second" not in md.lower()
    assert "B = 2000" in md and "300 items per task" in md and "2 pretraining seeds" in md
    assert "| Method | T0 |" in md and "Δ vs random [95% CI]" in md and "| _chance_ |" in md
    better, same = data["methods"]["better"]["vs_baseline"], data["methods"]["same"]["vs_baseline"]
    assert better["excludes_zero"] and not same["excludes_zero"]
    assert data["methods"]["random"]["vs_baseline"] is None
    n_marked = 0
    for method in items:
        cells = _cells(md, method)
        diff = data["methods"][method]["vs_baseline"]
        for task, cell in zip(TASKS, cells):
            marked = diff is not None and diff["per_task"][task]["excludes_zero"]
            assert cell.startswith("**") == marked, (method, task, cell)
            if marked:
                assert cell.endswith("↑**" if diff["per_task"][task]["diff"] > 0 else "↓**")
            n_marked += marked
        assert "**" not in cells[len(TASKS)]  # the average itself is never marked
        if diff is not None:
            assert cells[-1].startswith("**") == diff["excludes_zero"]
            assert re.fullmatch(r"\**[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]\**", cells[-1])
            n_marked += diff["excludes_zero"]
        else:
            assert cells[-1] == "(baseline)"
    assert md.count("**") == 2 * n_marked + 2  # + the legend's "**Bold**"
    avg = data["methods"]["better"]["avg"]
    assert cells and f"{avg['mean']:.1f} [{avg['lo']:.1f}, {avg['hi']:.1f}]" in md
    no_base = table2_markdown({"spokes": items["better"]}, TASKS, seed=0)
    assert "**" not in no_base and "Δ" not in no_base and "No `random` baseline" in no_base


# --- per-item scores from a real (tiny) lm-eval run -----------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """Random-init 2-layer Llama + a 300-token byte-level BPE (as in test_evaluation.py)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from spokes_lightning.evaluation.tasks import load_cloze_items

    torch.set_num_threads(1)
    texts = [item.gold_text() for task in ("arc_easy", "winogrande") for item in load_cloze_items(task, "val")]
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
    out = tmp_path_factory.mktemp("tiny_llama_stats")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_item_correct_matches_lm_eval_aggregate(tiny_model_dir, tmp_path):
    from spokes_lightning.evaluation.run import load_hflm, run_lm_eval, summarize
    from spokes_lightning.evaluation.tasks import TASK_SPECS, lm_eval_task_name

    tasks = ["arc_challenge", "piqa", "boolq", "winogrande"]  # pmi, char, none, partial scoring
    limit = 12
    raw = run_lm_eval(load_hflm(tiny_model_dir, batch_size=8), tasks, limit=limit, log_samples=True)
    scores = item_correct(raw, tasks)
    summary = summarize(raw, tasks, limit=limit)
    for task in tasks:
        metric = TASK_SPECS[task].metric
        assert scores[task].shape == (limit,) and scores[task].dtype == np.uint8
        assert float(np.mean(scores[task])) == raw["results"][lm_eval_task_name(task)][f"{metric},none"]
        assert 100.0 * float(np.mean(scores[task])) == pytest.approx(summary[task]["acc"], abs=1e-12)
    # order comes from doc_id, not from the list order
    shuffled = {**raw, "samples": {k: list(reversed(v)) for k, v in raw["samples"].items()}}
    assert all(np.array_equal(item_correct(shuffled, tasks)[t], scores[t]) for t in tasks)
    path = tmp_path / "items" / "scores.npz"
    save_item_scores(path, scores)
    loaded = load_item_scores(path)
    assert list(loaded) == tasks and all(np.array_equal(loaded[t], scores[t]) for t in tasks)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    stacked = stack_seeds([scores, scores])
    save_item_scores(path, stacked)
    assert load_item_scores(path)["piqa"].shape == (2, limit)
    with pytest.raises(ValueError, match="log_samples"):
        item_correct({**raw, "samples": None}, tasks)
    broken = {**raw, "results": {**raw["results"], lm_eval_task_name("piqa"): {"acc_norm,none": 2.0}}}
    with pytest.raises(ValueError, match="lm-eval's"):
        item_correct(broken, ["piqa"])
