"""Quad (arXiv 2409.16986, section 3.2): clusters as bandit arms, influence as the reward.

1. Seeded spherical k-means (faiss, the SemDeDup helpers) on the L2-normalised embeddings,
   ``n_clusters`` (default about N / 100, at most 10,000; the paper used 10,000 for 600M docs).
2. Each round every live cluster gets ``CS_i = mean_I_i + alpha sqrt(2 ln(sum_j T_j) / T_i)``
   (UCB); a cluster never sampled has ``CS = inf`` (UCB1's initial pull; ties go to the lower
   cluster index). The ``top_clusters`` highest (default ceil(n_clusters / 10)) are sampled: a
   proportion ``gamma`` of each cluster's size (at least 1) of its not-yet-scored documents, in
   a seeded per-cluster order. Each document is scored at most once.
3. Score of document z: ``s(z) = <u, f_z>`` with ``u = extras["quad_reference"]`` (the sketched
   ``(H + lambda I)^-1 grad L(D_r)``, see ``features/kfac.py``) and ``f_z`` its gradient feature.
   SIGN: the paper prints ``I(D_r, z) = -grad L(D_r)^T (H + lambda I)^-1 grad L(z)`` (Koh &
   Liang: negative = upweighting z lowers the reference loss) yet "selects high scoring
   samples"; the released code ranks by the positive dot product. So ``s(z) = -I(D_r, z)``,
   higher = more helpful. ``normalize="cosine"`` (default, as the released code L2-normalises
   the gradients) divides by ``|u| |f_z|`` so ``alpha`` and ``tau`` are scale-free;
   ``normalize="none"`` keeps the raw inner product.
4. Scored documents with ``s > tau`` join the selection (in scoring order; when more pass than
   the budget has room for, the highest first). ``R_i += sum s`` and ``T_i += |B_i|``: T counts
   scored DOCUMENTS (the paper's text calls T "the frequency of instances sampled" and
   ``mean_I_i = R_i / T_i`` "the average influence"; its literal ``T += 1`` per round would make
   R/T a batch sum that grows with gamma |C_i|). Defaults alpha = 0.002, gamma = 0.05,
   tau = 0.0025 are the paper's (section 4.1).
5. Until k documents are selected or every document is scored. If the threshold starves the
   budget (all scored, fewer than k above tau): ``fill=true`` (default) tops up with the
   best-scoring remaining documents (``stats.filled_below_tau``); ``fill=false`` is an error.

Result: ``indices`` in the order the bandit took them (fill-ins last, by score), so a token
budget's prefix is what a smaller budget would have taken; ``scores`` = s for every scored
document and NaN for those never scored; ``stats.evaluations`` counts influence evaluations.

Parameters ``reference``, ``hessian``, ``damping``, ``damping_split``, ``qkv``,
``kfac_documents``, ``max_factor_dim`` and ``reference_documents`` are read by the
``quad_reference`` feature family (the pipeline computes ``extras.<extra>`` from them); the
selector only records them.
"""
from __future__ import annotations

import math

import numpy as np

from spokes_lightning.utils.errors import UserError
from spokes_lightning.features.kfac_options import DAMPING_SPLITS, DEFAULT_DAMPING, DEFAULT_MAX_FACTOR_DIM, HESSIANS, QKV_MODES
from spokes_lightning.selectors.base import Param, SelectionInputs, SelectionResult, Selector, register
from spokes_lightning.selectors.semdedup import default_n_clusters, normalize_embeddings, spherical_kmeans

DEFAULT_REFERENCE = "data/demo/reference/lambada_openai.jsonl.gz"
DEFAULT_EXTRA = "quad_reference"
#: spec parameters that shape the reference direction (the quad_reference feature family)
REFERENCE_PARAMS = ("reference", "reference_documents", "hessian", "damping", "damping_split", "qkv",
                    "kfac_documents", "max_factor_dim")


def cluster_scores(rewards: np.ndarray, counts: np.ndarray, alpha: float) -> np.ndarray:
    """UCB: ``R/T + alpha sqrt(2 ln(sum T) / T)``; ``inf`` where ``T == 0``."""
    rewards, counts = np.asarray(rewards, np.float64), np.asarray(counts, np.float64)
    total = counts.sum()
    out = np.full(len(counts), np.inf)
    seen = counts > 0
    bonus = np.sqrt(2.0 * math.log(max(total, 1.0)) / counts[seen])
    out[seen] = rewards[seen] / counts[seen] + alpha * bonus
    return out


@register
class QuadSelector(Selector):
    name = "quad"
    requires = ("features", "embeddings", "extras")
    summary = "UCB bandit over embedding clusters, reward = K-FAC influence on a reference set (Quad)"
    params_spec = {
        "n_clusters": Param(int, None, lambda v: v >= 1, ">= 1"),
        "alpha": Param(float, 0.002, lambda v: v >= 0, ">= 0"),
        "gamma": Param(float, 0.05, lambda v: 0 < v <= 1, "in (0, 1]"),
        "tau": Param(float, 0.0025),
        "top_clusters": Param(int, None, lambda v: v >= 1, ">= 1"),
        "normalize": Param(str, "cosine", choices=("cosine", "none")),
        "fill": Param(bool, True),
        "kmeans_iter": Param(int, 20, lambda v: v >= 1, ">= 1"),
        "extra": Param(str, DEFAULT_EXTRA),
        # read by the quad_reference feature family
        "reference": Param(str, DEFAULT_REFERENCE),
        "reference_documents": Param(int, 500, lambda v: v >= 1, ">= 1"),
        "hessian": Param(str, "kfac", choices=HESSIANS),
        "damping": Param(float, DEFAULT_DAMPING, lambda v: v > 0, "> 0"),
        "damping_split": Param(str, "pi", choices=DAMPING_SPLITS),
        "qkv": Param(str, "joint", choices=QKV_MODES),
        "kfac_documents": Param(int, 256, lambda v: v >= 1, ">= 1"),
        "max_factor_dim": Param(int, DEFAULT_MAX_FACTOR_DIM, lambda v: v >= 1, ">= 1"),
    }

    def check_inputs(self, inputs: SelectionInputs) -> None:
        key = self.params["extra"]
        for name in ("features", "embeddings"):
            if getattr(inputs, name) is None:
                super().check_inputs(inputs)
        if inputs.extras is None or key not in inputs.extras:
            raise UserError(f"method '{self.name}' needs extras.{key}: the projected reference direction "
                            f"(the quad_reference feature family, or --extra {key}=FILE)")
        u = np.asarray(inputs.extras[key])
        d = inputs.features.shape[1]
        if u.reshape(-1).shape != (d,):
            raise UserError(f"method '{self.name}': extras.{key} must be a vector of {d} numbers (the feature "
                            f"width), got shape {u.shape}")
        if not np.isfinite(u).all():
            raise UserError(f"method '{self.name}': extras.{key} contains NaN or inf")
        if len(inputs.embeddings) != len(inputs.features):
            raise UserError(f"method '{self.name}': embeddings and features have different row counts")

    def select(self, inputs: SelectionInputs, k: int, seed: int = 0) -> SelectionResult:
        self.check_inputs(inputs)
        p = self.params
        n = inputs.n
        if not 1 <= k <= n:
            raise UserError(f"method '{self.name}': budget {k} must be in [1, {n}]")
        u = np.asarray(inputs.extras[p["extra"]], dtype=np.float64).reshape(-1)
        u_norm = float(np.linalg.norm(u))
        if p["normalize"] == "cosine":
            if u_norm == 0:
                raise UserError(f"method '{self.name}': extras.{p['extra']} is all zeros")
            u = u / u_norm
        n_clusters = min(p["n_clusters"] or default_n_clusters(n), n)
        labels, _ = spherical_kmeans(normalize_embeddings(inputs.embeddings), n_clusters, seed, p["kmeans_iter"])
        rng = np.random.default_rng(seed)
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(n_clusters + 1))
        queues = [order[bounds[c] : bounds[c + 1]] for c in range(n_clusters)]
        queues = [q[rng.permutation(len(q))] for q in queues]
        sizes = np.array([len(q) for q in queues])
        taken = np.zeros(n_clusters, dtype=np.int64)  # how many of each queue are scored
        per_round = np.maximum(1, np.ceil(p["gamma"] * sizes)).astype(np.int64)
        top = min(p["top_clusters"] or max(1, math.ceil(n_clusters / 10)), n_clusters)
        rewards, counts = np.zeros(n_clusters), np.zeros(n_clusters, dtype=np.int64)
        scores = np.full(n, np.nan)
        chosen: list[int] = []
        rounds = 0
        features = inputs.features
        while len(chosen) < k:
            live = taken < sizes
            if not live.any():
                break
            cs = cluster_scores(rewards, counts, p["alpha"])
            cs[~live] = -np.inf
            arms = np.lexsort((np.arange(n_clusters), -cs))[: min(top, int(live.sum()))]
            rounds += 1
            for c in arms:
                if len(chosen) >= k:
                    break
                batch = queues[c][taken[c] : taken[c] + per_round[c]]
                taken[c] += len(batch)
                rows = np.sort(batch)
                f = np.asarray(features[rows], dtype=np.float64)
                s = f @ u
                if p["normalize"] == "cosine":
                    norms = np.linalg.norm(f, axis=1)
                    s = np.divide(s, norms, out=np.zeros_like(s), where=norms > 0)
                scores[rows] = s
                rewards[c] += float(s.sum())
                counts[c] += len(rows)
                passed = rows[s > p["tau"]]
                room = k - len(chosen)
                if len(passed) > room:
                    best = np.lexsort((passed, -scores[passed]))[:room]
                    passed = passed[np.sort(best)]
                chosen.extend(int(i) for i in passed)
        filled = 0
        if len(chosen) < k:
            if not p["fill"]:
                raise UserError(f"method '{self.name}': only {len(chosen)} of {k} documents score above "
                                f"tau={p['tau']:g}; lower tau or set fill=true")
            rest = np.setdiff1d(np.flatnonzero(~np.isnan(scores)), np.asarray(chosen, dtype=np.int64))
            extra = rest[np.lexsort((rest, -scores[rest]))][: k - len(chosen)]
            filled = len(extra)
            chosen.extend(int(i) for i in extra)
        indices = np.asarray(chosen, dtype=np.int64)
        evaluated = int((~np.isnan(scores)).sum())
        stats = {"n_clusters": int(n_clusters), "top_clusters": int(top), "rounds": rounds,
                 "evaluations": evaluated, "evaluated_fraction": evaluated / n,
                 "clusters_visited": int((counts > 0).sum()), "filled_below_tau": int(filled),
                 "mean_score_selected": float(np.nanmean(scores[indices])), "reference_norm": u_norm,
                 "cluster_counts": counts.tolist(), "cluster_sizes": sizes.tolist(),
                 "selected_per_cluster": np.bincount(labels[indices], minlength=n_clusters).tolist(),
                 **{key: p[key] for key in ("alpha", "gamma", "tau", "normalize", "hessian")}}
        return SelectionResult(indices=indices, scores=scores, stats=stats)
