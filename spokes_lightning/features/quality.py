"""Per-document quality scores q_i for the quality term alpha * ln Q(w) of SPOKES (section 3.1).

Three sources, all returning scores >= 0 (SPOKES takes ln of the weighted mean quality):

* a column already in the data (FineWeb-Edu ``score``, a DCLM fastText score):
  :func:`quality_from_column`;
* a Hugging Face sequence-classification model, e.g. ``HuggingFaceTB/fineweb-edu-classifier``
  (the paper's quality filter, section 5.2):
  :class:`~spokes_lightning.features.quality_modules.ClassifierQualityModule`, whose score is
  the regression logit clipped at 0 (the classifier's 0-5 educational scale);
* offline default: a classifier trained here on the shipped DCLM human quality labels
  (:func:`train_quality_classifier`) over MiniLM embeddings. Its score is the predicted
  probability that a document is "high quality", clipped to [``MIN_PROBABILITY``, 1] so that
  ln q stays finite. :class:`~spokes_lightning.features.quality_modules.EmbeddingQualityModule`
  applies it through the extraction runner.

This module needs no Lightning: the two feature modules (LightningModules for the extraction
runner) live in :mod:`spokes_lightning.features.quality_modules`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from spokes_lightning.utils.atomic import atomic_path, write_json_atomic
from spokes_lightning.utils.errors import UserError
from spokes_lightning.data.hub import load_pretrained

MIN_PROBABILITY = 1e-4
CLASSIFIER_FILE = "quality_classifier.joblib"
METRICS_FILE = "metrics.json"
QUALITY_FORMAT = 1
DEFAULT_CLASSIFIER = "HuggingFaceTB/fineweb-edu-classifier"


# --------------------------------------------------------------------------- from a column


def quality_from_column(documents: Sequence, field: str) -> np.ndarray:
    """Scores from a metadata field of every document (``Document.meta[field]``), float64.

    Raises one :class:`UserError` line listing the available fields if ``field`` is missing,
    and for values that are not finite numbers or are negative.
    """
    scores = np.empty(len(documents), dtype=np.float64)
    for i, doc in enumerate(documents):
        meta = doc.meta if hasattr(doc, "meta") else doc
        if field not in meta:
            fields = ", ".join(sorted(meta)) or "(none)"
            raise UserError(
                f"quality field '{field}' is missing in document {getattr(doc, 'id', i)!r}; "
                f"available fields: {fields}"
            )
        try:
            value = float(meta[field])
        except (TypeError, ValueError):
            raise UserError(f"quality field '{field}' of document {getattr(doc, 'id', i)!r} is not "
                            f"a number: {meta[field]!r}") from None
        if not math.isfinite(value) or value < 0:
            raise UserError(f"quality field '{field}' of document {getattr(doc, 'id', i)!r} must be a "
                            f"finite number >= 0 (SPOKES uses ln Q), got {value}")
        scores[i] = value
    return scores


# --------------------------------------------------------------------------- HF classifier


def load_sequence_classifier(ref: str | os.PathLike = DEFAULT_CLASSIFIER):
    """(model, tokenizer) of a HF sequence classifier; one clear line when offline."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    def loader(name: str, local_files_only: bool):
        model = AutoModelForSequenceClassification.from_pretrained(name, local_files_only=local_files_only)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
        return model.eval(), tokenizer

    return load_pretrained(ref, loader, what="quality classifier", setting="quality.model",
                           example="fineweb-edu-classifier")


# --------------------------------------------------------------------------- trained offline


def labels_hash(labeled: Sequence) -> str:
    digest = hashlib.sha256()
    for doc in labeled:
        digest.update(f"{doc.id}\0{int(doc.label)}\0".encode())
        digest.update(hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).digest())
    return digest.hexdigest()


def candidate_classifiers(seed: int) -> dict[str, Any]:
    """The model families compared by cross-validation (both see the same embeddings)."""
    from sklearn.linear_model import LogisticRegression

    candidates = {"logistic_regression": LogisticRegression(C=1.0, max_iter=2000)}
    try:
        import lightgbm

        candidates["lightgbm"] = lightgbm.LGBMClassifier(
            n_estimators=200, learning_rate=0.05, num_leaves=15, min_child_samples=10,
            subsample=0.8, subsample_freq=1, colsample_bytree=0.5, random_state=seed,
            n_jobs=1, verbose=-1, deterministic=True, force_row_wise=True,
        )
    except ImportError:  # pragma: no cover - lightgbm is a declared dependency
        pass
    return candidates


class QualityClassifier:
    """A fitted binary classifier over embeddings; ``score`` = P(high quality), clipped."""

    def __init__(self, estimator, name: str, embedding_model: str):
        self.estimator, self.name, self.embedding_model = estimator, name, embedding_model

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        if len(embeddings) == 0:
            return np.zeros(0, dtype=np.float64)
        proba = self.estimator.predict_proba(np.asarray(embeddings, dtype=np.float32))[:, 1]
        return np.clip(proba.astype(np.float64), MIN_PROBABILITY, 1.0)


def _fit_and_evaluate(embeddings: np.ndarray, labels: np.ndarray, seed: int, test_size: float,
                      folds: int) -> tuple[str, dict[str, Any]]:
    """Pick a model family by stratified CV on the train split; score it on the held-out split."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_val_score, train_test_split

    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_size,
                                           stratify=labels, random_state=seed)
    x_train, y_train = embeddings[idx_train], labels[idx_train]
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    cv_accuracy = {name: float(cross_val_score(clone(est), x_train, y_train, cv=cv).mean())
                   for name, est in candidate_classifiers(seed).items()}
    best = max(cv_accuracy, key=lambda n: (cv_accuracy[n], n == "logistic_regression"))
    fitted = clone(candidate_classifiers(seed)[best]).fit(x_train, y_train)
    majority = int(np.bincount(y_train).argmax())
    metrics = {
        "cv_accuracy": cv_accuracy, "chosen": best, "cv_folds": folds,
        "n_train": int(len(idx_train)), "n_test": int(len(idx_test)),
        "heldout_accuracy": float((fitted.predict(embeddings[idx_test]) == labels[idx_test]).mean()),
        "majority_class": majority,
        "majority_baseline_accuracy": float((labels[idx_test] == majority).mean()),
    }
    return best, metrics


def train_quality_classifier(
    labeled_docs: Sequence, embeddings: np.ndarray | Callable[[list[str]], np.ndarray],
    out_dir: str | os.PathLike, seed: int = 0, *, embedding_model: str = "all-MiniLM-L6-v2",
    test_size: float = 0.2, folds: int = 5, shared_cache: str | os.PathLike | None = None,
    embedding_max_length: int | None = None,
) -> tuple[QualityClassifier, dict[str, Any]]:
    """Train the offline quality classifier on human labels (1 = high quality).

    ``embeddings`` is an ``[n, d]`` array aligned with ``labeled_docs`` or a function mapping
    texts to one. Logistic regression and LightGBM are compared by stratified ``folds``-fold
    CV accuracy on a fixed stratified train split (``seed``); the winner's accuracy on the
    held-out ``test_size`` split is reported next to the majority-class baseline, then it is
    refit on all labels and saved to ``out_dir`` (joblib + ``metrics.json``). A directory
    trained on the same labels/settings is reused; with ``shared_cache`` (a directory many runs
    share), a classifier trained there by another run on the same labels/settings is copied in
    instead of embedding the labels again, and a newly trained one is left there for the next run.
    ``embedding_max_length`` (the tokens of each text the embeddings read), when given, is part of
    the classifier's identity, as ``embedding_model`` is.
    """
    import joblib
    from sklearn.base import clone

    if len(labeled_docs) < 4 * folds:
        raise UserError(f"need at least {4 * folds} labelled documents, got {len(labeled_docs)}")
    labels = np.asarray([int(d.label) for d in labeled_docs], dtype=np.int64)
    if set(np.unique(labels)) != {0, 1}:
        raise UserError("quality labels must be binary 0/1 with both classes present")
    out_dir = Path(out_dir)
    identity = {"format": QUALITY_FORMAT, "labels_sha256": labels_hash(labeled_docs), "seed": int(seed),
                "embedding_model": embedding_model, "test_size": test_size, "folds": folds}
    if embedding_max_length is not None:  # how much of each label text the embeddings read
        identity["embedding_max_length"] = int(embedding_max_length)
    cached = load_quality_classifier(out_dir, expect=identity, missing_ok=True)
    if cached is not None:
        return cached
    entry = Path(shared_cache) / hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16] \
        if shared_cache is not None else None
    if entry is not None and load_quality_classifier(entry, expect=identity, missing_ok=True) is not None:
        _copy_classifier(entry, out_dir)
        return load_quality_classifier(out_dir, expect=identity)

    x = embeddings([d.text for d in labeled_docs]) if callable(embeddings) else embeddings
    x = np.asarray(x, dtype=np.float32)
    if x.shape[0] != len(labels):
        raise UserError(f"{x.shape[0]} embedding rows for {len(labels)} labelled documents")
    best, metrics = _fit_and_evaluate(x, labels, seed, test_size, folds)
    final = clone(candidate_classifiers(seed)[best]).fit(x, labels)
    metrics.update(identity)
    metrics.update({"n_labels": int(len(labels)), "n_positive": int(labels.sum()),
                    "score": f"P(high quality) clipped to [{MIN_PROBABILITY}, 1]",
                    "final_fit": "refit on all labels after held-out evaluation"})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / METRICS_FILE).unlink(missing_ok=True)
    with atomic_path(out_dir / CLASSIFIER_FILE) as tmp:
        joblib.dump({"estimator": final, "name": best, "embedding_model": embedding_model}, tmp)
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    if entry is not None:
        _copy_classifier(out_dir, entry)
    return QualityClassifier(final, best, embedding_model), metrics


def _copy_classifier(src: Path, dst: Path) -> None:
    """Copy a saved classifier: the model first, its metrics (what a reader checks) last, both atomic."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / METRICS_FILE).unlink(missing_ok=True)
    for name in (CLASSIFIER_FILE, METRICS_FILE):
        with atomic_path(dst / name) as tmp:
            Path(tmp).write_bytes((src / name).read_bytes())


def load_quality_classifier(out_dir: str | os.PathLike, expect: dict | None = None,
                            missing_ok: bool = False):
    """(classifier, metrics) saved by :func:`train_quality_classifier`.

    With ``expect``, a directory whose metrics differ in any of those keys counts as missing.
    """
    import joblib

    out_dir = Path(out_dir)
    try:
        metrics = json.loads((out_dir / METRICS_FILE).read_text())
        blob = joblib.load(out_dir / CLASSIFIER_FILE) if (out_dir / CLASSIFIER_FILE).exists() else None
    except (FileNotFoundError, json.JSONDecodeError):
        metrics, blob = None, None
    if blob is None or (expect is not None and any(metrics.get(k) != v for k, v in expect.items())):
        if missing_ok:
            return None
        raise UserError(f"no trained quality classifier in {out_dir} (train it first)")
    return QualityClassifier(blob["estimator"], blob["name"], blob["embedding_model"]), metrics
