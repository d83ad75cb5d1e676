"""G-Vendi: the d x d Gram route vs the n x n kernel eigvalsh, same data, same run.

    python bench/bench_vendi.py [--d 1024] [--n 4096 8192]

Prints both values (they must agree) and the speed ratio. Goal: >= 40x at n = 8192, d = 1024.
"""
import argparse
import time

import numpy as np

from spokes_lightning.core.vendi import vendi_score, vendi_score_kernel


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 8192])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'n':>6} {'d':>5} {'gram_vendi':>12} {'kernel_vendi':>12} {'gram_s':>8} {'kernel_s':>9} {'speedup':>8}")
    for n in args.n:
        x = rng.standard_normal((n, args.d)).astype(np.float32)
        x[: n // 2] += 2.0 * rng.standard_normal(args.d).astype(np.float32)  # a dominant direction
        g, tg = timed(vendi_score, x)
        k, tk = timed(vendi_score_kernel, x)
        assert abs(g - k) <= 1e-6 * k, (g, k)
        print(f"{n:>6} {args.d:>5} {g:>12.4f} {k:>12.4f} {tg:>8.2f} {tk:>9.2f} {tk / tg:>7.1f}x", flush=True)


if __name__ == "__main__":
    main()
