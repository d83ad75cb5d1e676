"""SPOKES step cost vs the bare matmuls it needs, and memory on an on-disk float16 matrix.

    python bench/bench_spokes.py [--n 200000] [--d 1024] [--steps 20] [--disk-n 1000000] [--disk-steps 3]

Part 1 (in memory): seconds per SPOKES step (default backtracking rule) and, in the same run,
the time of the bare float64 matmuls one step needs (Gram X^T D X and X U: 2 N d^2
multiply-adds, same chunking). Goal: step <= 1.5x bare.
Part 2 (on disk): N x d float16 .npy opened with mmap_mode='r'; anonymous memory (RssAnon,
file-backed pages not counted) sampled during the run. Goal <= 1.5 GiB at N = 1M, d = 1024.
"""
import argparse
import os
import tempfile
import threading
import time

import numpy as np

from spokes_lightning.spokes import run_spokes
from spokes_lightning.vendi import DEFAULT_CHUNK_ROWS


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler(threading.Thread):
    def __init__(self, every=0.05):
        super().__init__(daemon=True)
        self.every, self.peak, self.stop_flag = every, 0, False

    def run(self):
        while not self.stop_flag:
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(self.every)


def make_features(n, d, seed=0, out=None):
    """Clustered Gaussian features, written in blocks (never all in RAM when out is a memmap)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, d)).astype(np.float32)
    x = out if out is not None else np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        x[s : s + m] = centres[rng.integers(0, 256, m)] + rng.standard_normal((m, d), dtype=np.float32)
    return x


def bare_matmuls(x, chunk_rows=DEFAULT_CHUNK_ROWS):
    """Gram + quadratic forms, float64 chunks, nothing else: the floor for one SPOKES step."""
    d = x.shape[1]
    w = np.full(x.shape[0], 1.0 / x.shape[0])
    u = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))[0]
    t = time.perf_counter()
    g = np.zeros((d, d))
    for s in range(0, len(x), chunk_rows):
        b = np.asarray(x[s : s + chunk_rows], dtype=np.float64)
        g += (b * w[s : s + chunk_rows, None]).T @ b
    for s in range(0, len(x), chunk_rows):
        b = np.asarray(x[s : s + chunk_rows], dtype=np.float64)
        (b @ u) ** 2
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--disk-n", type=int, default=1_000_000)
    ap.add_argument("--disk-steps", type=int, default=3)
    args = ap.parse_args()

    x = make_features(args.n, args.d)
    bare = min(bare_matmuls(x) for _ in range(2))
    t = time.perf_counter()
    res = run_spokes(x, k=args.n // 10, steps=args.steps, log=lambda m: None)
    total = time.perf_counter() - t
    per_step = float(np.mean(res.stats["step_seconds"]))
    print(f"in-memory N={args.n} d={args.d} T={args.steps}: {per_step:.2f} s/step "
          f"(total {total:.1f} s incl. setup, {res.backtracks} backtracks); bare matmuls {bare:.2f} s; "
          f"ratio {per_step / bare:.2f}x (goal <= 1.5x)", flush=True)
    del x

    if args.disk_n <= 0:
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        path = os.path.join(tmp, "features.npy")
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(args.disk_n, args.d))
        make_features(args.disk_n, args.d, seed=1, out=mm)
        mm.flush()
        del mm
        size = os.path.getsize(path) / 2**30
        feats = np.load(path, mmap_mode="r")
        base = rss_anon_bytes()
        sampler = PeakSampler()
        sampler.start()
        t = time.perf_counter()
        res = run_spokes(feats, k=args.disk_n // 10, steps=args.disk_steps, log=lambda m: None)
        total = time.perf_counter() - t
        sampler.stop_flag = True
        sampler.join()
        print(f"on-disk N={args.disk_n} d={args.d} float16 ({size:.2f} GiB): {args.disk_steps} steps, "
              f"{np.mean(res.stats['step_seconds']):.1f} s/step; peak RssAnon {sampler.peak / 2**30:.2f} GiB "
              f"(baseline {base / 2**30:.2f} GiB; goal <= 1.5 GiB)", flush=True)


if __name__ == "__main__":
    main()
