"""Benchmark: blocked SemDeDup vs a plain full-matrix reference on the same clusters.

50k x 384 float32 unit embeddings (all-MiniLM-L6-v2 size) drawn around 60 topics of very
unequal size (three big tight ones that k-means keeps whole), with 6k planted near-duplicates.
Both implementations get the SAME ordered clusters (one seeded spherical k-means); we time the
dedup stage of each (best of ``--repeats``) and measure its peak numpy allocation with
tracemalloc (a separate run), check the kept sets are identical at several eps, and print
both figures and the ratios. Goals: peak memory <= 1/4 of the reference, time <= 1.25x.

    python bench/bench_semdedup.py [--n 50000] [--dim 384] [--clusters 12] [--repeats 2]

The default 12 clusters give clusters of ~4-9k documents, close to the reference's scale
(Abbas et al. cluster 440M documents into 50k clusters, ~8.8k each); that is where the
full matrix hurts. With ~500-document clusters both fit in one 16 MB block and cost the same.
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc

import numpy as np

from spokes_lightning.selectors.semdedup import (
    keep_for_eps,
    normalize_embeddings,
    order_clusters,
    semdedup_scores,
    spherical_kmeans,
)


def make_embeddings(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Three big tight topics (~45% of rows), 57 small loose ones, ~12% planted near-duplicates."""
    rng = np.random.default_rng(seed)
    n_topics = 60
    weights = np.concatenate([[18.0, 15.0, 12.0], rng.uniform(0.5, 1.5, n_topics - 3)])
    topic = rng.choice(n_topics, size=n, p=weights / weights.sum())
    centers = rng.normal(size=(n_topics, dim)).astype(np.float32)
    spread = np.where(np.arange(n_topics) < 3, 0.25, 1.5).astype(np.float32)  # big = tight
    x = centers[topic] + spread[topic, None] * rng.normal(size=(n, dim)).astype(np.float32)
    n_dup = int(0.12 * n)
    sources = rng.choice(n - n_dup, size=n_dup)
    x[n - n_dup :] = x[sources] + 0.02 * rng.normal(size=(n_dup, dim)).astype(np.float32)
    return x.astype(np.float32)


def reference_scores(x: np.ndarray, clusters: list[np.ndarray]) -> np.ndarray:
    """Plain SemDeDup: per cluster the full similarity matrix, then the triu column max."""
    m = np.zeros(len(x), dtype=np.float32)
    for members in clusters:
        reps = x[members]
        sims = reps @ reps.T
        m[members] = np.triu(sims, 1).max(axis=0)
    return m


def blocked_scores(x: np.ndarray, clusters: list[np.ndarray]) -> np.ndarray:
    return semdedup_scores(x, clusters, progress=False)


def timed(fn, *args, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def peak_bytes(fn, *args) -> int:
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--clusters", type=int, default=12,
                    help="k-means clusters (12: several thousand docs per cluster, as in the\n"
                         "reference setting of ~8.8k per cluster)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    x = normalize_embeddings(make_embeddings(args.n, args.dim, args.seed))
    labels, centroids = spherical_kmeans(x, args.clusters, args.seed)
    clusters = order_clusters(x, labels, centroids, "hard", args.seed)
    sizes = sorted((len(c) for c in clusters), reverse=True)
    print(f"data + k-means: {time.perf_counter() - t0:.1f}s; {args.n} x {args.dim}, "
          f"{len(clusters)} clusters, largest {sizes[:4]}, median {int(np.median(sizes))}")

    t_ref, m_ref = timed(reference_scores, x, clusters, repeats=args.repeats)
    t_new, m_new = timed(blocked_scores, x, clusters, repeats=args.repeats)
    mem_ref = peak_bytes(reference_scores, x, clusters)
    mem_new = peak_bytes(blocked_scores, x, clusters)

    print(f"max |M_blocked - M_reference| = {np.abs(m_new - m_ref).max():.2e}")
    for eps in (0.01, 0.03, 0.05, 0.1):
        kept_new, kept_ref = keep_for_eps(m_new, eps), keep_for_eps(m_ref, eps)
        assert np.array_equal(kept_new, kept_ref), f"kept sets differ at eps={eps}"
        print(f"eps={eps:<5} kept {len(kept_new):6d} / {args.n} (identical in both)")

    mib = 2**20
    print(f"{'':10s} {'time (s)':>10s} {'peak (MiB)':>11s}")
    print(f"{'reference':10s} {t_ref:10.2f} {mem_ref / mib:11.1f}")
    print(f"{'blocked':10s} {t_new:10.2f} {mem_new / mib:11.1f}")
    time_ratio, mem_ratio = t_new / t_ref, mem_new / mem_ref
    print(f"ratios blocked/reference: time {time_ratio:.2f}x (goal <= 1.25), "
          f"peak memory {mem_ratio:.3f}x (goal <= 0.25)")
    ok = time_ratio <= 1.25 and mem_ratio <= 0.25
    print("goals met" if ok else "GOALS NOT MET", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
