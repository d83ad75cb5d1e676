"""DATAMASK against greedy on the same objective: objective values and seconds, side by side.

    python bench/bench_datamask.py [--n 3000] [--budget 0.1] [--diversity gvendi cosine facility]
                                   [--run-dir runs/demo] [--steps 300] [--out table.md]

The abstract of DATAMASK (arXiv 2512.24265) reports 98.9% less selection time than a greedy
algorithm. Here, for each diversity term of f = lam * quality + (1 - lam) * diversity:

* random: mean (and best) objective of 10 random masks of the budget size;
* greedy: :func:`greedy_objective_selection`, the exact f(S + i) of every remaining
  candidate at each of the k steps (the baseline the abstract compares against);
* DATAMASK: the selector with its defaults (whole pool per step), and with
  ``block_size = N / 4`` and ``prune = 0.5`` (the practical settings);

each timed end to end from the inputs (quality normalisation, unit rows, the learning or the
greedy passes), in one run so the ratios compare like with like. "saved" is
1 - DATAMASK seconds / greedy seconds; "of greedy" is the share of the random-to-greedy
objective gap that DATAMASK closes.

Data: planted Gaussian clusters (``--n`` rows, d = 64 features, 32-dim embeddings, quality
partly tied to a quarter of the clusters), and, when ``--run-dir`` holds a finished demo
features stage, the demo corpus's gradient sketches, MiniLM embeddings and quality scores
(``--run-dir ''`` skips it).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spokes_lightning.selectors import SelectionInputs, get_selector  # noqa: E402
from spokes_lightning.selectors.datamask import (  # noqa: E402
    DIVERSITY,
    build_objective,
    greedy_objective_selection,
)

HEADER = ("| data | diversity | N | k | random (best of 10) | greedy | greedy s | DATAMASK | DATAMASK s | saved "
          "| of greedy | DATAMASK block+prune | block s | saved |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def planted(n: int, seed: int, d: int = 64, e: int = 32, clusters: int = 40) -> SelectionInputs:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, clusters, n)
    x = rng.standard_normal((clusters, d))[labels] + 0.7 * rng.standard_normal((n, d))
    emb = rng.standard_normal((clusters, e))[labels] + 0.5 * rng.standard_normal((n, e))
    q = rng.random(n) + 0.5 * (labels < clusters // 4)
    return SelectionInputs(features=x.astype(np.float32), embeddings=emb.astype(np.float32), quality=q)


def demo_inputs(run_dir: Path) -> SelectionInputs | None:
    from spokes_lightning.features.store import open_feature_store
    from spokes_lightning.selection.pool import SelectionPool

    feats = run_dir / "features"
    needed = [feats / "gradients" / "features.npy", feats / "embeddings" / "features.npy", feats / "quality.npy",
              feats / "quality_ids.npy"]
    if not all(p.is_file() for p in needed):
        return None
    grads, emb = open_feature_store(feats / "gradients"), open_feature_store(feats / "embeddings")
    q_ids = [i.decode() for i in np.load(feats / "quality_ids.npy").tolist()]
    pool = SelectionPool.join({"features": (grads.ids, grads.matrix), "embeddings": (emb.ids, emb.matrix),
                               "quality": (q_ids, np.load(feats / "quality.npy"))})
    return pool.inputs


def bench(name: str, inputs: SelectionInputs, budget: float, diversities, steps: int, lam: float) -> list[str]:
    n = len(inputs.quality)
    k = max(2, int(round(budget * n)))
    rows = []
    for diversity in diversities:
        obj = build_objective(inputs, k, lam=lam, diversity=diversity)[0]
        rng = np.random.default_rng(0)
        rand = [obj.value(rng.choice(n, k, replace=False)) for _ in range(10)]
        t = time.perf_counter()
        greedy_obj = build_objective(inputs, k, lam=lam, diversity=diversity)[0]
        greedy = greedy_obj.value(greedy_objective_selection(greedy_obj, k))
        t_greedy = time.perf_counter() - t
        t = time.perf_counter()
        res = get_selector("datamask", diversity=diversity, lam=lam, steps=steps).select(inputs, k, 0)
        t_dm = time.perf_counter() - t
        t = time.perf_counter()
        blk = get_selector("datamask", diversity=diversity, lam=lam, steps=steps, block_size=max(2, n // 4),
                           prune=0.5).select(inputs, k, 0)
        t_blk = time.perf_counter() - t
        dm, bl = obj.value(res.indices), obj.value(blk.indices)
        gap = greedy - float(np.mean(rand))
        closed = f"{100 * (dm - np.mean(rand)) / gap:.0f}%" if gap > 0 else "-"
        rows.append(f"| {name} | {diversity} | {n} | {k} | {np.mean(rand):.4f} ({max(rand):.4f}) | {greedy:.4f} "
                    f"| {t_greedy:.2f} | {dm:.4f} | {t_dm:.2f} | {100 * (1 - t_dm / t_greedy):.1f}% | {closed} "
                    f"| {bl:.4f} | {t_blk:.2f} | {100 * (1 - t_blk / t_greedy):.1f}% |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000, help="rows of the planted data set")
    ap.add_argument("--budget", type=float, default=0.1, help="share of the pool to select")
    ap.add_argument("--diversity", nargs="+", default=list(DIVERSITY), choices=DIVERSITY)
    ap.add_argument("--steps", type=int, default=300, help="DATAMASK policy-gradient steps")
    ap.add_argument("--lam", type=float, default=0.5, help="quality weight lambda")
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "demo"), help="a finished demo run ('' skips)")
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args()
    warm = planted(200, seed=0)  # imports and first calls (tqdm, LAPACK) outside the timings
    for diversity in args.diversity:
        greedy_objective_selection(build_objective(warm, 5, diversity=diversity)[0], 5)
        get_selector("datamask", diversity=diversity, steps=2).select(warm, 5, 0)
    print(HEADER, flush=True)
    rows = bench("planted clusters", planted(args.n, seed=11), args.budget, args.diversity, args.steps, args.lam)
    if args.run_dir:
        inputs = demo_inputs(Path(args.run_dir))
        if inputs is None:
            print(f"(skipped the demo run: no finished features stage under {args.run_dir}; run `make demo` "
                  "or pass --run-dir)", file=sys.stderr)
        else:
            rows += bench("demo run", inputs, args.budget, args.diversity, args.steps, args.lam)
    if args.out:
        Path(args.out).write_text(HEADER + "\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
