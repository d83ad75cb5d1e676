"""SemDeDup baseline (Abbas et al. 2023; SPOKES paper section 5.3 and the cost discussion in 3.3).

Algorithm, following the reference semantics:

1. L2-normalise the sentence embeddings and cluster them with spherical k-means (faiss,
   ``spherical=True``, seeded). ``n_clusters`` defaults to round(N / 100), capped at 10,000.
2. Inside each cluster, order the members by cosine distance to their (unit) centroid,
   ``1 - <x, c>``. ``keep="hard"`` (the default, as in the reference's ``keep_hard=True``)
   puts the members FARTHEST from the centroid first, so among near-duplicates the most
   atypical one survives; ``keep="easy"`` puts the closest first; ``keep="random"`` uses a
   seeded permutation. Ties in distance go to the lower row index.
3. Each document j gets ``M_j = max(0, max_{i before j in its cluster} <x_i, x_j>)``: the
   largest cosine similarity to ANY earlier-ordered member, kept or not (the reference's
   column max of ``triu(S, 1)``, whose zeros make ``M_j >= 0`` and ``M_first = 0``).
4. A document is removed when ``M_j > 1 - eps``.

The similarities are computed in column blocks: for a block J of columns we form
``X[:end(J)] @ X[J].T`` and mask the entries with ``i >= j``, so the working memory is
O(cluster_size x block) (``block`` columns, chosen so a block holds about ``block_elems``
floats), never O(cluster_size^2) and never O(N^2). Only the strictly-earlier half is computed.

Budget mode (the normal ``select(inputs, k, seed)`` call, when no ``eps`` param is given):
``eps = 1 - t`` where ``t`` is the k-th smallest ``M_j``, so exactly the documents with
``M_j < t`` plus some of those with ``M_j == t`` are kept. Ties at ``t`` are broken by a
seeded random priority (``numpy.random.default_rng(seed).permutation(N)``, lower first).
With ``--param eps=...`` the budget is ignored and every document with ``M_j <= 1 - eps`` is kept.

Result: ``indices`` are the kept rows best first = lowest ``M_j`` first, ties by row index;
``scores = -M`` for every row; ``stats`` has eps, n_clusters, n_removed and cluster sizes.
"""
from __future__ import annotations


import numpy as np

from spokes_lightning.utils.errors import UserError, require_package
from spokes_lightning.selectors.base import Param, SelectionInputs, SelectionResult, Selector, register

KEEP_RULES = ("hard", "easy", "random")
DEFAULT_BLOCK_ELEMS = 4_000_000  # floats per similarity block (16 MB in float32)
MAX_DEFAULT_CLUSTERS = 10_000
_NORMALISE_ROWS = 65_536


def default_n_clusters(n: int) -> int:
    """About 100 documents per cluster, at least 1 and at most 10,000 clusters."""
    return int(min(max(1, round(n / 100)), MAX_DEFAULT_CLUSTERS))


def normalize_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """Float32 unit rows; NaN/inf or all-zero rows are a :class:`UserError` (memmap-friendly)."""
    emb = embeddings
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise UserError(f"embeddings must be a non-empty N x d matrix, got shape {emb.shape}")
    out = np.empty(emb.shape, dtype=np.float32)
    for start in range(0, emb.shape[0], _NORMALISE_ROWS):
        rows = np.asarray(emb[start : start + _NORMALISE_ROWS], dtype=np.float32)
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            bad = start + int(np.flatnonzero(~finite)[0])
            raise UserError(f"embeddings row {bad} contains NaN or inf")
        norms = np.linalg.norm(rows, axis=1)
        if (norms == 0).any():
            bad = start + int(np.flatnonzero(norms == 0)[0])
            raise UserError(f"embeddings row {bad} is all zeros (cannot be normalised)")
        out[start : start + len(rows)] = rows / norms[:, None]
    return out


def spherical_kmeans(x: np.ndarray, n_clusters: int, seed: int, niter: int = 20):
    """Seeded spherical k-means (faiss) on unit rows -> (labels int64 N, unit centroids)."""
    faiss = require_package("faiss", "faiss-cpu")
    n, d = x.shape
    if not 1 <= n_clusters <= n:
        raise UserError(f"n_clusters must be in [1, {n}] (the number of documents), "
                        f"got {n_clusters}")
    km = faiss.Kmeans(d, int(n_clusters), niter=int(niter), seed=int(seed), spherical=True,
                      verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    _, labels = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return labels[:, 0].astype(np.int64), np.asarray(km.centroids, dtype=np.float32)


def order_clusters(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray,
                   keep: str = "hard", seed: int = 0) -> list[np.ndarray]:
    """Member row indices of every cluster, in the SemDeDup processing order (see ``keep``)."""
    if keep not in KEEP_RULES:
        raise UserError(f"keep must be one of {', '.join(KEEP_RULES)}, got {keep!r}")
    rng = np.random.default_rng(seed)
    by_cluster = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[by_cluster], np.arange(len(centroids) + 1))
    clusters = []
    for c in range(len(centroids)):
        members = by_cluster[bounds[c] : bounds[c + 1]]  # ascending row index
        if len(members) == 0:
            continue
        if keep == "random":
            members = members[rng.permutation(len(members))]
        else:
            dist = 1.0 - x[members] @ centroids[c]
            key = -dist if keep == "hard" else dist
            members = members[np.argsort(key, kind="stable")]
        clusters.append(members.astype(np.int64))
    return clusters


def max_earlier_similarity(xc: np.ndarray, block: int | None = None,
                           block_elems: int = DEFAULT_BLOCK_ELEMS) -> np.ndarray:
    """``M_j = max(0, max_{i<j} <xc_i, xc_j>)`` for the rows of one ordered cluster.

    Column blocks of width ``block``: memory O(len(xc) * block), never len(xc)^2.
    """
    m = len(xc)
    out = np.zeros(m, dtype=np.float32)
    if m < 2:
        return out
    if block is None:
        block = max(64, block_elems // m)
    block = int(min(max(1, block), m))
    upper_tri = ~np.tri(block, dtype=bool)  # [i, j] True where i < j
    for start in range(0, m, block):
        end = min(start + block, m)
        sims = xc[:end] @ xc[start:end].T  # (end, b): rows = earlier candidates
        diag = sims[start:end]
        b = end - start
        diag[~upper_tri[:b, :b]] = -np.inf
        np.maximum(sims.max(axis=0), 0.0, out=out[start:end])
        del sims, diag
    return out


def semdedup_scores(x: np.ndarray, clusters: list[np.ndarray], block: int | None = None,
                    block_elems: int = DEFAULT_BLOCK_ELEMS, progress: bool = True) -> np.ndarray:
    """``M`` (float32, N) for unit rows ``x`` given the ordered clusters."""
    from spokes_lightning.utils.progress import progress as show_progress

    m_all = np.zeros(len(x), dtype=np.float32)
    biggest_first = sorted(range(len(clusters)), key=lambda c: -len(clusters[c]))
    for c in show_progress(biggest_first, "semdedup clusters", disable=not progress):
        members = clusters[c]
        m_all[members] = max_earlier_similarity(x[members], block, block_elems)
    return m_all


def keep_for_eps(m: np.ndarray, eps: float) -> np.ndarray:
    """Rows kept at threshold eps: ``M_j <= 1 - eps`` (ascending row indices)."""
    return np.flatnonzero(m.astype(np.float64) <= 1.0 - eps).astype(np.int64)


def keep_for_budget(m: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, float, int]:
    """Exactly ``k`` rows with the smallest M; ties at the threshold by a seeded priority.

    Returns (kept rows ascending, eps = 1 - t, number of rows tied at t).
    """
    n = len(m)
    if not 1 <= k <= n:
        raise UserError(f"semdedup budget must be in [1, {n}] documents, got {k}")
    m64 = m.astype(np.float64)
    priority = np.random.default_rng(seed).permutation(n)
    order = np.lexsort((priority, m64))
    t = float(m64[order[k - 1]])
    eps = 1.0 - t
    if eps >= 1.0:  # every kept row has no similar earlier member (M <= 0)
        floor = int((m64 <= 0.0).sum())
        if k < floor:
            raise UserError(
                f"semdedup budget {k} is impossible: {floor} documents have no similar earlier "
                f"cluster member and are kept at any eps in (0, 1); use a budget of at least {floor} "
                "or fewer clusters"
            )
        # k == floor: exactly those rows; any eps above 1 - (the next smallest M) keeps them
        eps = 1.0 - (float(m64[order[k]]) / 2 if k < n else 0.5)
    if eps <= 0.0:
        top = int((m64 < 1.0).sum())
        raise UserError(
            f"semdedup budget {k} is impossible: it would keep exact duplicates; at most {top} "
            "documents can be kept with eps in (0, 1)"
        )
    n_tied = int((m64 == t).sum())
    return np.sort(order[:k]).astype(np.int64), eps, n_tied


@register
class SemDeDupSelector(Selector):
    """SemDeDup: params n_clusters, eps, keep (hard|easy|random), niter, block."""

    name = "semdedup"
    requires = ("embeddings",)
    feature_field = "embeddings"
    summary = ("SemDeDup: spherical k-means, drop within-cluster near-duplicates "
               "(budget or --param eps=E)")
    params_spec = {
        "n_clusters": Param(int, None, lambda v: v >= 1, ">= 1"),  # None: default_n_clusters(N)
        "eps": Param(float, None, lambda v: 0.0 < v < 1.0, "in (0, 1)"),
        "keep": Param(str, "hard", choices=tuple(KEEP_RULES)),
        "niter": Param(int, 20, lambda v: v >= 1, ">= 1"),
        "block": Param(int, None, lambda v: v >= 1, ">= 1"),
        "progress": Param(bool, True),
    }

    def select(self, inputs: SelectionInputs, k: int, seed: int = 0) -> SelectionResult:
        self.check_inputs(inputs)
        p = self.params
        eps = p["eps"]
        n = len(inputs.embeddings)
        n_clusters = default_n_clusters(n) if p["n_clusters"] is None else p["n_clusters"]
        if not 1 <= n_clusters <= n:
            raise UserError(f"semdedup n_clusters must be in [1, {n}] (the number of documents), "
                            f"got {n_clusters}")
        if eps is None and not 1 <= k <= n:
            raise UserError(f"semdedup budget must be in [1, {n}] documents, got {k}")
        keep = p["keep"]

        x = normalize_embeddings(inputs.embeddings)
        labels, centroids = spherical_kmeans(x, n_clusters, seed, p["niter"])
        clusters = order_clusters(x, labels, centroids, keep, seed)
        m = semdedup_scores(x, clusters, p["block"], progress=p["progress"])

        n_tied = None
        if eps is not None:
            kept = keep_for_eps(m, eps)
            if len(kept) == 0:  # pragma: no cover - the first member of a cluster has M = 0
                raise UserError(f"semdedup eps={eps} removes every document")
        else:
            kept, eps, n_tied = keep_for_budget(m, k, seed)
        scores = -m.astype(np.float64)
        ranked = kept[np.lexsort((kept, -scores[kept]))]
        sizes = np.array([len(c) for c in clusters])
        stats = {
            "eps": float(eps),
            "budget_mode": n_tied is not None,
            "n_tied_at_threshold": n_tied,
            "keep": keep,
            "n_clusters": int(n_clusters),
            "n_nonempty_clusters": int(len(clusters)),
            "n_removed": int(n - len(kept)),
            "n_kept": int(len(kept)),
            "cluster_size_min": int(sizes.min()),
            "cluster_size_median": float(np.median(sizes)),
            "cluster_size_mean": float(sizes.mean()),
            "cluster_size_max": int(sizes.max()),
        }
        return SelectionResult(indices=ranked.astype(np.int64), scores=scores, stats=stats)
