"""SPOKES step cost vs the bare float32 matmuls it needs, rounding cost, memory on disk.

    python bench/bench_spokes.py [--n 60000] [--d 512] [--steps 20] [--disk-n 1000000] [--disk-d 1024] [--disk-steps 3]

Part 1 (in memory): seconds per SPOKES step (default backtracking rule, tol = 0 so every step
runs) and, in the same run, the bare float32 matmuls one step needs, done the fastest way
numpy does them here: the Gram (sqrt(w) X)^T (sqrt(w) X) (numpy's symmetric rank-k kernel)
and the quadratic forms (X U)^2 ln(lambda), in the same chunks. The float64 matmuls are
printed for comparison (SPOKES used them before it moved to float32). Goal: step <= 1.5x bare.
Part 2 (on disk): N x d float16 .npy opened with mmap_mode='r', k = N / 2: seconds per step,
the same bare float32 matmuls over the memmap, the default (greedy) rounding's seconds in
units of one step (goal: within about 5 steps), and anonymous memory (RssAnon, file-backed
pages not counted) sampled during the run (goal <= 1.5 GiB at N = 1M, d = 1024).
"""
import argparse
import math
import os
import tempfile
import threading
import time

import numpy as np

from spokes_lightning.core.spokes import run_spokes
from spokes_lightning.core.vendi import DEFAULT_CHUNK_ROWS


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


def bare_matmuls(x, chunk_rows=DEFAULT_CHUNK_ROWS, dtype=np.float32):
    """Gram + quadratic forms in ``dtype`` chunks, nothing else: the floor for one SPOKES step."""
    d = x.shape[1]
    w = np.full(x.shape[0], 1.0 / x.shape[0])
    u = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))[0].astype(dtype)
    log_lambda = np.full(d, -math.log(d), dtype=dtype)
    t = time.perf_counter()
    g = np.zeros((d, d))
    for s in range(0, len(x), chunk_rows):
        b = np.asarray(x[s : s + chunk_rows], dtype=dtype) * np.sqrt(w[s : s + chunk_rows]).astype(dtype)[:, None]
        g += b.T @ b
    for s in range(0, len(x), chunk_rows):
        p = np.asarray(x[s : s + chunk_rows], dtype=dtype) @ u
        np.square(p, out=p)
        p @ log_lambda
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--disk-n", type=int, default=1_000_000)
    ap.add_argument("--disk-d", type=int, default=1024)
    ap.add_argument("--disk-steps", type=int, default=3)
    args = ap.parse_args()

    x = make_features(args.n, args.d)
    bare = min(bare_matmuls(x) for _ in range(2))
    bare64 = bare_matmuls(x, dtype=np.float64)
    t = time.perf_counter()
    res = run_spokes(x, k=args.n // 10, steps=args.steps, tol=0.0, log=lambda m: None)
    total = time.perf_counter() - t
    per_step = float(np.mean(res.stats["step_seconds"]))
    print(f"in-memory N={args.n} d={args.d} T={args.steps}: {per_step:.2f} s/step "
          f"(total {total:.1f} s incl. setup and rounding, {res.backtracks} backtracks); bare float32 matmuls "
          f"{bare:.2f} s (float64 {bare64:.2f} s); ratio {per_step / bare:.2f}x float32 (goal <= 1.5x)", flush=True)
    del x

    if args.disk_n <= 0:
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        path = os.path.join(tmp, "features.npy")
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(args.disk_n, args.disk_d))
        make_features(args.disk_n, args.disk_d, seed=1, out=mm)
        mm.flush()
        del mm
        size = os.path.getsize(path) / 2**30
        feats = np.load(path, mmap_mode="r")
        bare = bare_matmuls(feats)
        base = rss_anon_bytes()
        sampler = PeakSampler()
        sampler.start()
        t = time.perf_counter()
        res = run_spokes(feats, k=args.disk_n // 2, steps=args.disk_steps, tol=0.0, log=lambda m: None)
        total = time.perf_counter() - t
        sampler.stop_flag = True
        sampler.join()
        step = float(np.mean(res.stats["step_seconds"]))
        rounding = res.stats["rounding_seconds"]
        print(f"on-disk N={args.disk_n} d={args.disk_d} float16 ({size:.2f} GiB), k = N/2: {args.disk_steps} steps, "
              f"{step:.1f} s/step vs bare float32 matmuls {bare:.1f} s ({step / bare:.2f}x); "
              f"{res.stats['rounding']} rounding {rounding:.1f} s = {rounding / step:.1f} steps (goal <= ~5); "
              f"total {total:.0f} s; peak RssAnon {sampler.peak / 2**30:.2f} GiB "
              f"(baseline {base / 2**30:.2f} GiB; goal <= 1.5 GiB)", flush=True)


if __name__ == "__main__":
    main()
