"""Family ``quality_heuristics``: cheap rule-based quality criteria, handed on as named quality scores.

QuaDMix (``selector: quadmix``) merges several quality criteria per domain (paper Eq. 1); besides
the quality source's score, these are computed from each pool document's text, every one oriented
as the toolkit's scores are (higher = better; QuaDMix flips them to its smaller-is-better ranks):

* ``heuristic_length``: ``log(1 + words)`` (whitespace-separated words);
* ``heuristic_unique_lines``: 1 - the share of characters in lines repeating an earlier line of the
  document (Gopher's duplicate-line fraction; blank lines ignored);
* ``heuristic_unique_ngrams``: 1 - the share of word 5-gram occurrences (lowercased) repeating an
  earlier 5-gram of the document (1 for documents under 5 words);
* ``heuristic_alpha``: the share of alphabetic characters among the non-whitespace characters.

Each goes to ``features/quality_heuristics/<name>.npy`` with ``ids.npy`` and is handed on as the
stage output ``quality_scores.<name>`` = ``{"scores": ..., "ids": ...}``. The family is enabled only
when a configured method uses the ``quadmix`` selector; otherwise its settings are ``{}``, so runs
without QuaDMix keep the features stage's cache key.
"""
from __future__ import annotations

import math

import numpy as np

from spokes_lightning.pipeline.feature_registry import FeatureFamily, pool_id_array, register

HEURISTICS = ("heuristic_length", "heuristic_unique_lines", "heuristic_unique_ngrams", "heuristic_alpha")
NGRAM = 5
FORMAT = 1
DIRECTORY = "features/quality_heuristics"


def heuristic_scores(text: str) -> dict[str, float]:
    """The four criteria of one text (see the module doc)."""
    words = text.split()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    seen, repeated, total = set(), 0, 0
    for line in lines:
        total += len(line)
        if line in seen:
            repeated += len(line)
        seen.add(line)
    lowered = [w.lower() for w in words]
    grams = [tuple(lowered[i:i + NGRAM]) for i in range(len(lowered) - NGRAM + 1)]
    dup_grams = len(grams) - len(set(grams))
    visible = [c for c in text if not c.isspace()]
    return {
        "heuristic_length": math.log1p(len(words)),
        "heuristic_unique_lines": 1.0 - (repeated / total if total else 0.0),
        "heuristic_unique_ngrams": 1.0 - (dup_grams / len(grams) if grams else 0.0),
        "heuristic_alpha": sum(c.isalpha() for c in visible) / len(visible) if visible else 0.0,
    }


def uses_quadmix(cfg) -> bool:
    """True when a method of ``selection.methods`` has ``selector: quadmix`` in ``selection.specs``."""
    try:
        specs = cfg.selection.specs
        return any(str((specs.get(str(m)) or {}).get("selector")) == "quadmix" for m in cfg.selection.methods)
    except Exception:  # no selection section yet, or methods still unset (???): QuaDMix is not configured
        return False


@register
class QualityHeuristics(FeatureFamily):
    name = "quality_heuristics"
    computes = "heuristic quality criteria (length, duplicate lines / 5-grams, alphabetic share) for QuaDMix"
    order = 400

    def enabled(self, cfg) -> bool:
        return uses_quadmix(cfg)

    def settings(self, cfg) -> dict:
        return {"quality_heuristics": {"criteria": list(HEURISTICS), "ngram": NGRAM, "format": FORMAT}} \
            if self.enabled(cfg) else {}

    def run(self, ctx) -> dict:
        from spokes_lightning.utils.atomic import save_npy_atomic
        from spokes_lightning.pipeline.data_stages import pool_documents
        from spokes_lightning.pipeline.stage import log

        docs = pool_documents(ctx)
        rows = [heuristic_scores(d.text or "") for d in docs]
        ids_path = f"{DIRECTORY}/ids.npy"
        save_npy_atomic(ctx.path(*ids_path.split("/")), pool_id_array(docs))
        out = {}
        for name in HEURISTICS:
            path = f"{DIRECTORY}/{name}.npy"
            save_npy_atomic(ctx.path(*path.split("/")), np.array([r[name] for r in rows], dtype=np.float64))
            out[f"quality_scores.{name}"] = {"scores": path, "ids": ids_path}
        log(f"features: quality heuristics ({', '.join(HEURISTICS)}) for {len(docs)} documents")
        return out

    def handed_on(self, outputs) -> list[str]:
        files = []
        for name in HEURISTICS:
            value = outputs.quality_scores.get(name)
            if value is not None:
                files += [value.scores, value.ids]
        return sorted(set(files))
