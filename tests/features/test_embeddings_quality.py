"""Sentence embeddings (real MiniLM) and the three quality sources, through extract_features."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from spokes_lightning.data.corpus import Document, load_quality_labels
from spokes_lightning.utils.errors import UserError
from spokes_lightning.features.embeddings import EmbeddingModule, embed_texts
from spokes_lightning.features.extract import extract_features
from spokes_lightning.features.quality_modules import ClassifierQualityModule, EmbeddingQualityModule
from spokes_lightning.features.quality import (
    MIN_PROBABILITY, load_quality_classifier,
    quality_from_column, train_quality_classifier,
)

SENTENCES = [
    ("a", "A man is playing a guitar on the stage."),
    ("b", "Someone performs music with a guitar in front of an audience."),
    ("c", "The quarterly tax filing deadline was moved to next month."),
]


@pytest.fixture(scope="module")
def embedder():
    torch.set_num_threads(1)
    return EmbeddingModule(max_length=64)


@pytest.fixture(scope="module")
def labels():
    return load_quality_labels()


@pytest.fixture(scope="module")
def label_embeddings(embedder, labels):
    return embed_texts([d.text for d in labels], embedder, batch_size=64, progress=False)


@pytest.fixture(scope="module")
def classifier_dir(labels, label_embeddings, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    train_quality_classifier(labels, label_embeddings, out, seed=0)
    return out


def test_minilm_embeddings_unit_norm_and_paraphrase_closer(embedder):
    emb = embedder.embed([t for _, t in SENTENCES]).numpy()
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3


def test_embeddings_through_extract_features(embedder, tmp_path):
    docs = [Document(i, t, "test") for i, t in SENTENCES] + [Document("empty", "   ", "test")]
    store = extract_features(embedder, docs, tmp_path / "emb", chunk_size=2, batch_size=2, progress=False)
    assert store.ids == ["a", "b", "c"] and store.skipped == {"empty": "empty text"}
    direct = embedder.embed([t for _, t in SENTENCES]).numpy()
    np.testing.assert_allclose(np.asarray(store.matrix), direct, atol=1e-6)
    assert store.manifest["model"] == "all-MiniLM-L6-v2" and store.manifest["dim"] == 384


def test_quality_classifier_beats_majority_and_is_cached(classifier_dir, labels, label_embeddings):
    metrics = json.loads((classifier_dir / "metrics.json").read_text())
    assert metrics["n_test"] == 100 and metrics["n_labels"] == 499
    assert metrics["heldout_accuracy"] > metrics["majority_baseline_accuracy"] + 0.05
    assert metrics["chosen"] in metrics["cv_accuracy"]
    start = time.perf_counter()
    clf, again = train_quality_classifier(labels, label_embeddings, classifier_dir, seed=0)
    assert time.perf_counter() - start < 3 and again == metrics


def test_shared_cache_serves_a_new_run_the_same_classifier_without_embedding(labels, label_embeddings, tmp_path):
    cache = tmp_path / "machine_cache"
    first, metrics = train_quality_classifier(labels, label_embeddings, tmp_path / "run_a", seed=0, shared_cache=cache)
    assert len(list(cache.iterdir())) == 1  # one entry, keyed by labels + settings

    def no_embedding(texts):
        raise AssertionError("the labels were embedded again")

    second, again = train_quality_classifier(labels, no_embedding, tmp_path / "run_b", seed=0, shared_cache=cache)
    assert again == metrics
    for name in ("quality_classifier.joblib", "metrics.json"):
        assert (tmp_path / "run_b" / name).read_bytes() == (tmp_path / "run_a" / name).read_bytes()
    np.testing.assert_array_equal(second.score(label_embeddings[:50]), first.score(label_embeddings[:50]))
    # another seed is another classifier: it is trained (and embeds), not taken from the cache
    with pytest.raises(AssertionError, match="embedded again"):
        train_quality_classifier(labels, no_embedding, tmp_path / "run_c", seed=1, shared_cache=cache)


def test_quality_scores_in_range_and_deterministic(classifier_dir, label_embeddings):
    clf, _ = load_quality_classifier(classifier_dir)
    a, b = clf.score(label_embeddings), clf.score(label_embeddings.copy())
    assert a.shape == (499,) and np.array_equal(a, b)
    assert (a >= MIN_PROBABILITY).all() and (a <= 1).all() and a.std() > 0.05


def test_quality_module_through_extract_features(classifier_dir, tmp_path):
    module = EmbeddingQualityModule(classifier_dir, max_length=64)
    docs = [Document(i, t, "test") for i, t in SENTENCES]
    store = extract_features(module, docs, tmp_path / "q", chunk_size=8, batch_size=2, progress=False)
    scores = np.asarray(store.matrix)[:, 0]
    assert scores.shape == (3,) and (scores > 0).all() and (scores <= 1).all()
    expected = module.classifier.score(module.embedder.embed([t for _, t in SENTENCES]).numpy())
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_quality_from_column():
    docs = [Document("x", "t", "s", {"score": 3.5}), Document("y", "t", "s", {"score": "1"})]
    np.testing.assert_array_equal(quality_from_column(docs, "score"), [3.5, 1.0])
    with pytest.raises(UserError, match="available fields: score"):
        quality_from_column(docs, "int_score")
    with pytest.raises(UserError, match=">= 0"):
        quality_from_column([Document("z", "t", "s", {"score": -1})], "score")


def test_hf_classifier_module_runs_and_offline_hub_id_fails_fast(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from spokes_lightning.features.embeddings import default_embedding_model_path

    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-classifier"
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(default_embedding_model_path()).save_pretrained(model_dir)
    module = ClassifierQualityModule(model_dir, max_length=32)
    docs = [Document(i, t, "test") for i, t in SENTENCES]
    store = extract_features(module, docs, tmp_path / "clf", chunk_size=8, batch_size=3, progress=False)
    rows = np.asarray(store.matrix)
    assert rows.shape == (3, 1) and (rows >= 0).all() and store.manifest["source"] == "hf_classifier"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(UserError, match="unreachable.*quality.model="):
        ClassifierQualityModule("HuggingFaceTB/fineweb-edu-classifier")
    with pytest.raises(UserError, match="unreachable.*embeddings.model="):
        EmbeddingModule("sentence-transformers/all-mpnet-base-v2")
    assert time.perf_counter() - start < 10
