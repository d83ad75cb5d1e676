"""Which rounding turns SPOKES's relaxed weights into the best k-subset? G-Vendi, clusters, seconds.

    python bench/bench_rounding.py [--run-dir runs/demo] [--budgets 0.01 0.05 0.1 0.25 0.5] [--out table.md]

For each data set and budget: random (mean of 5 seeds), SPOKES with each rounding rule
(default settings otherwise), and a greedy reference that ignores w: starting from the empty
set, add ceil(k / 100) rows at a time with the largest first-order gain in ln Vendi of the
set, scored over every remaining row (about 100 d x d eighs and 100 full scoring passes: the
quality the default's 64 sampled rounds approximate at a fraction of the cost). Cells are
``G-Vendi (clusters covered)`` where the data has planted clusters, and the SPOKES seconds.

Data sets: planted Gaussian clusters (40 clusters, N = 4,016, d = 128) at three spreads and
two size profiles (geometric 0.9^i and Dirichlet(0.5)), a low-rank Gaussian mixture (10
components of rank 16 in d = 128), and, when ``--run-dir`` holds a finished demo features
stage, the demo corpus's real gradient features and its MiniLM embeddings.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spokes_lightning.core.rounding import ROUNDING_RULES  # noqa: E402
from spokes_lightning.core.spokes import run_spokes  # noqa: E402
from spokes_lightning.core.vendi import EIGEN_FLOOR, vendi_score  # noqa: E402


def planted(spread: float, profile: str, seed: int, n=4016, d=128, clusters=40):
    rng = np.random.default_rng(seed)
    p = 0.9 ** np.arange(clusters) if profile == "geometric" else rng.dirichlet(np.full(clusters, 0.5))
    p = p / p.sum()
    sizes = np.floor(p * (n - clusters)).astype(int) + 1
    sizes[0] += n - sizes.sum()
    labels = np.repeat(np.arange(clusters), sizes)
    x = rng.standard_normal((clusters, d))[labels] + spread * rng.standard_normal((n, d))
    perm = rng.permutation(n)
    return x[perm].astype(np.float32), labels[perm]


def low_rank_mixture(seed: int, n=4000, d=128, rank=16, components=10):
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((components, rank, d))
    labels = rng.integers(0, components, n)
    z = rng.standard_normal((n, rank)) * np.linspace(2.0, 0.2, rank)
    x = 0.5 * rng.standard_normal((components, d))[labels] + np.einsum("nr,nrd->nd", z, basis[labels])
    return (x + 0.05 * rng.standard_normal((n, d))).astype(np.float32), labels


def reference_greedy(x: np.ndarray, k: int) -> np.ndarray:
    """Empty start; blocks of ceil(k/100) rows by first-order gain of ln Vendi over all rows."""
    unit = x.astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    chosen = np.zeros(len(x), dtype=bool)
    gram = np.zeros((x.shape[1], x.shape[1]))
    block = max(1, math.ceil(k / 100))
    while chosen.sum() < k:
        sigma, u = np.linalg.eigh(gram)
        sigma = np.clip(sigma, 0.0, None)
        lam = sigma / sigma.sum() if sigma.sum() > 0 else np.zeros_like(sigma)
        gain = -((unit @ u) ** 2) @ np.log(np.maximum(lam, EIGEN_FLOOR))
        gain[chosen] = -np.inf
        pick = np.lexsort((np.arange(len(x)), -gain))[: min(block, k - int(chosen.sum()))]
        chosen[pick] = True
        gram += unit[pick].T @ unit[pick]
    return np.flatnonzero(chosen)


def cell(x, labels, idx, seconds=None) -> str:
    text = f"{vendi_score(x[np.sort(idx)]):.1f}"
    if labels is not None:
        text += f" ({len(set(labels[idx].tolist()))})"
    return text + (f", {seconds:.1f}s" if seconds is not None else "")


def bench_dataset(name, x, labels, budgets) -> list[str]:
    rows = []
    n = len(x)
    for budget in budgets:
        k = max(1, int(round(budget * n)))
        rng = np.random.default_rng(0)
        rand = [rng.choice(n, k, replace=False) for _ in range(5)]
        gv = np.mean([vendi_score(x[np.sort(r)]) for r in rand])
        cov = np.mean([len(set(labels[r].tolist())) for r in rand]) if labels is not None else None
        cells = [f"{gv:.1f}" + (f" ({cov:.1f})" if cov is not None else "")]
        for rule in ROUNDING_RULES:
            t = time.perf_counter()
            res = run_spokes(x, k=k, rounding=rule, log=lambda m: None)
            cells.append(cell(x, labels, res.indices, time.perf_counter() - t))
        t = time.perf_counter()
        ref = reference_greedy(x, k)
        cells.append(cell(x, labels, ref, time.perf_counter() - t))
        rows.append(f"| {name} | {budget:g} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "demo"))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.25, 0.5])
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args()
    header = ("| data | budget | random | " + " | ".join(f"SPOKES {r}" for r in ROUNDING_RULES)
              + " | greedy reference |\n|---|---|---|" + "---|" * (len(ROUNDING_RULES) + 1))
    print(header, flush=True)
    rows = []
    for profile in ("geometric", "dirichlet"):
        for spread in (0.3, 1.0, 2.0):
            x, labels = planted(spread, profile, seed=11)
            rows += bench_dataset(f"planted {profile}, spread {spread}", x, labels, args.budgets)
    x, labels = low_rank_mixture(seed=3)
    rows += bench_dataset("low-rank mixture", x, labels, args.budgets)
    features = Path(args.run_dir) / "features"
    for name, sub in (("demo gradients", "gradients"), ("demo MiniLM embeddings", "embeddings")):
        path = features / sub / "features.npy"
        if path.is_file():
            rows += bench_dataset(name, np.load(path).astype(np.float32), None, args.budgets)
        else:
            print(f"(skipped {name}: {path} not found; run `make demo` or pass --run-dir)", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(header + "\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
