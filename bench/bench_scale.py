"""Benchmark: the pipeline's data path at 100k and 1M documents, and its extrapolation to the paper's pool.

A corpus of real words (the demo corpus's vocabulary, drawn by its word frequencies) is generated
in plain jsonl shards, with documents of three length classes. Each stage then runs as its own
process through the real entry point (``launch/run.py``), so its peak RSS is its own:

    corpus (streaming ingest) -> tokenizer (a given one: token lengths only) -> features (imported
    with ``spokes import-features``; random rows, no proxy) -> select (random, SPOKES) -> export

Printed: wall time, documents/s and peak RSS per stage at each size; peak-RSS growth per document
from 100k to 1M (goal <= 100 bytes); export tokens/s beside bare batch tokenization of the same
texts with the same tokenizer (goal <= 1.5x); then an extrapolation to 173M documents.

usage: python bench/bench_scale.py [--sizes 100000 1000000] [--k 128] [--work DIR] [--keep]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPER_DOCS, PAPER_TOKENS = 173_000_000, 200e9
LENGTH_CLASSES = ((0.5, 20, 80), (0.4, 80, 300), (0.1, 300, 1200))  # (share, min words, max words)
STAGES = ("corpus", "tokenizer", "features", "select", "export")


def word_distribution() -> tuple[np.ndarray, np.ndarray]:
    counts: Counter = Counter()
    with gzip.open(ROOT / "data" / "demo" / "web.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            counts.update(json.loads(line)["text"].split())
    words, freq = zip(*counts.most_common(50_000))
    p = np.asarray(freq, dtype=np.float64)
    return np.asarray(words, dtype=object), p / p.sum()


def write_corpus(directory: Path, n: int, files: int = 8, seed: int = 0) -> list[str]:
    """``files`` jsonl shards of ``n`` documents: id, text, source, a quality column ``score``."""
    directory.mkdir(parents=True, exist_ok=True)
    words, p = word_distribution()
    rng = np.random.default_rng(seed)
    shares = np.array([c[0] for c in LENGTH_CLASSES])
    paths = [directory / f"part-{f:03d}.jsonl" for f in range(files)]
    handles = [open(path, "w", encoding="utf-8") for path in paths]
    block = 10_000
    for start in range(0, n, block):
        m = min(block, n - start)
        cls = rng.choice(len(LENGTH_CLASSES), size=m, p=shares)
        lengths = np.array([rng.integers(LENGTH_CLASSES[c][1], LENGTH_CLASSES[c][2]) for c in cls])
        drawn = words[rng.choice(len(words), size=int(lengths.sum()), p=p)]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        scores = rng.random(m)
        for i in range(m):
            doc = start + i
            record = {"id": f"gen-{doc:09d}", "text": " ".join(drawn[offsets[i]:offsets[i + 1]]),
                      "source": f"crawl{doc % 5}", "score": round(float(scores[i]), 6)}
            handles[doc % files].write(json.dumps(record) + "\n")
    for h in handles:
        h.close()
    return [str(p) for p in paths]


def given_tokenizer(directory: Path) -> Path:
    """A byte-level BPE (vocab 8192) trained on the demo corpus: the 'given' export tokenizer."""
    from spokes_lightning.data.corpus import demo_web_paths, read_documents
    from spokes_lightning.models.tokenizer import train_tokenizer

    train_tokenizer([d.text for d in read_documents(demo_web_paths())], vocab_size=8192, out_dir=directory)
    return directory


def _rss_anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith("RssAnon:")), 0)
    except OSError:
        return 0


def run_measured(cmd: list[str], log: Path) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, peak anonymous RSS MiB) of one child process.

    Peak RSS is the kernel's (wait4's rusage) and counts the file pages of memory-mapped inputs
    (Arrow shards, feature matrices) that the page cache can drop; the anonymous part is what
    the process itself holds, sampled every 20 ms from /proc."""
    t = time.perf_counter()
    peak_anon = 0
    with open(log, "a") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # this child's own rusage when it ends
            if pid:
                break
            peak_anon = max(peak_anon, _rss_anon_kib(proc.pid))
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return wall, usage.ru_maxrss / 1024, peak_anon / 1024


def import_features(work: Path, run_dir: Path, k: int, log: Path, kind: str) -> tuple[Path, float, float]:
    """Random k-dim float16 rows for every pool id (+ 1% ids the pool lacks), as an imported store."""
    from spokes_lightning.data.document_store import DocumentStore

    pool = DocumentStore(run_dir / "corpus" / "pool")
    ids_path = work / "ids.txt"
    with open(ids_path, "w") as fh:
        for start in range(0, len(pool), 65536):
            fh.writelines(i + "\n" for i in pool.column_array("id", start, start + 65536))
        extra = max(1, len(pool) // 100)
        fh.writelines(f"elsewhere-{i}\n" for i in range(extra))
    n = len(pool) + extra
    features = np.lib.format.open_memmap(work / "features.npy", mode="w+", dtype=np.float16, shape=(n, k))
    rng = np.random.default_rng(1)
    for start in range(0, n, 65536):
        stop = min(n, start + 65536)
        features[start:stop] = rng.standard_normal((stop - start, k)).astype(np.float16)
    features.flush()
    del features
    store = work / f"{kind}_store"
    shutil.rmtree(store, ignore_errors=True)
    wall, rss, anon = run_measured([sys.executable, "-m", "spokes_lightning", "import-features",
                                    str(work / "features.npy"), "--ids", str(ids_path), "--out", str(store), "--kind", kind], log)
    return store, wall, rss, anon


def bare_tokenization(run_dir: Path) -> tuple[float, int]:
    """Seconds and tokens to batch-tokenize the random selection's texts, texts already in memory."""
    from spokes_lightning.data.document_store import DocumentStore
    from spokes_lightning.models.tokenizer import load_tokenizer
    from spokes_lightning.data.selection_artifact import read_selection

    pool = DocumentStore(run_dir / "corpus" / "pool")
    sel = read_selection(run_dir / "selections" / "random")
    rows = np.sort(np.asarray(sel.indices))  # pool rows of the selection (selection pool = store order here)
    tok = load_tokenizer(run_dir / "tokenizer")
    texts = [d.text for d in pool.take(rows)]
    t = time.perf_counter()
    n = 0
    for start in range(0, len(texts), 1024):
        n += sum(len(x) for x in tok(texts[start:start + 1024], add_special_tokens=False)["input_ids"])
    return time.perf_counter() - t, n


def one_size(n: int, work: Path, k: int, log: Path) -> dict:
    corpus = write_corpus(work / "corpus", n)
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    common = [f"run_dir={run_dir}", "dataset=demo", "method=random", f"data.paths=[{','.join(corpus)}]",
              "data.limit=null", "data.interleave_by=null", "data.validation_documents=1000",
              f"tokenizer.path={work / 'tokenizer'}", "quality.source=column", "quality.column=score",
              "selection.methods=[random,spokes]", "selection.alpha=0.0", "selection.alpha_sweep=false",
              "pretrain.enabled=false", "evaluate.tasks=[]", "wandb.enabled=false", "report.gvendi_independent=false"]
    out: dict = {"n": n, "stages": {}}
    stores = [f"features.gradients.store={work / 'gradients_store'}", f"embeddings.store={work / 'embeddings_store'}"]
    for stage in STAGES:
        if stage == "features":
            _, wall, rss, anon = import_features(work, run_dir, k, log, "gradients")
            out["stages"]["import-features"] = {"seconds": wall, "rss_mib": rss, "anon_mib": anon}
            import_features(work, run_dir, k, log, "embeddings")  # select's pool reads an embeddings store too
        cmd = [sys.executable, "launch/run.py", *common, *(stores if stage in ("features", "select", "export") else []),
               f"stages=[{stage}]"]
        wall, rss, anon = run_measured(cmd, log)
        seconds = json.loads((run_dir / "stages" / f"{stage}.json").read_text())["seconds"]  # the stage's own time
        out["stages"][stage] = {"seconds": seconds, "wall": wall, "rss_mib": rss, "anon_mib": anon}
        print(f"  n={n:>9,} {stage:<10} {seconds:8.1f} s ({wall:6.1f} s with start-up) {n / seconds:10,.0f} docs/s  "
              f"peak RSS {rss:8.1f} MiB (anonymous {anon:8.1f} MiB)", flush=True)
    marker = json.loads((run_dir / "stages" / "export.json").read_text())
    exported = marker["outputs"]["random"]
    out["export_timings"] = exported.get("timings", {})
    bare_s, bare_tokens = bare_tokenization(run_dir)
    out["export_tokens"] = exported["n_tokens"]
    out["bare_tokenize"] = {"seconds": bare_s, "tokens": bare_tokens}
    out["pool_bytes"] = sum(p.stat().st_size for p in (run_dir / "corpus" / "pool").glob("*.arrow"))
    out["pool_tokens"] = json.loads((run_dir / "stages" / "tokenizer.json").read_text())["outputs"]["pool_tokens"]
    out["export_seconds_per_method"] = marker["seconds"] / 2
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--k", type=int, default=128, help="imported feature width (the paper's is 1024)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    print(f"bench_scale: work dir {work} (stage logs in {log}); k = {args.k}", flush=True)
    given_tokenizer(work / "tokenizer")
    results = [one_size(n, work, args.k, log) for n in args.sizes]
    (work / "results.json").write_text(json.dumps(results, indent=2))
    report(results, args.k)
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def report(results: list[dict], k: int) -> None:
    small, big = results[0], results[-1]
    print("\n| stage | " + " | ".join(f"{r['n']:,} docs: s / docs/s / peak RSS (anon.) MiB" for r in results)
          + " | growth, bytes/doc: RSS (anon.) |")
    print("|---" * (len(results) + 2) + "|")
    for stage in ("corpus", "tokenizer", "import-features", "features", "select", "export"):
        cells = [f"{r['stages'][stage]['seconds']:.1f} / {r['n'] / r['stages'][stage]['seconds']:,.0f} / "
                 f"{r['stages'][stage]['rss_mib']:.0f} ({r['stages'][stage].get('anon_mib', 0):.0f})" for r in results]
        per_doc = lambda key: ((big["stages"][stage].get(key, 0) - small["stages"][stage].get(key, 0)) * 2**20  # noqa: E731
                               / max(1, big["n"] - small["n"]))
        print(f"| {stage} | " + " | ".join(cells) + f" | {per_doc('rss_mib'):.0f} ({per_doc('anon_mib'):.0f}) |")
    for r in results:
        t = r["export_timings"]
        bare_tps = r["bare_tokenize"]["tokens"] / r["bare_tokenize"]["seconds"]
        megatron_s = t["tokenize_s"] + t["merge_s"]
        print(f"\nexport of the random selection at {r['n']:,} docs ({r['export_tokens']:,} tokens): Megatron data "
              f"(read from the pool, tokenize, .bin/.idx) {r['export_tokens'] / megatron_s:,.0f} tokens/s vs bare batch "
              f"tokenization of the same texts {bare_tps:,.0f} tokens/s: ratio {bare_tps * megatron_s / r['export_tokens']:.2f}x;"
              f" the text copies (jsonl.gz + parquet) add {t['text_s']:.1f} s, the whole method "
              f"{t['total_s']:.1f} s ({r['export_tokens'] / t['total_s']:,.0f} tokens/s, "
              f"{bare_tps * t['total_s'] / r['export_tokens']:.2f}x)")
    extrapolate(big, k)


def extrapolate(r: dict, k: int) -> None:
    """Each stage at 173M documents from the measured per-core-pair rates (assumptions printed)."""
    scale = PAPER_DOCS / r["n"]
    tokens_per_doc = PAPER_TOKENS / PAPER_DOCS
    print(f"\nExtrapolation to {PAPER_DOCS / 1e6:.0f}M documents ({PAPER_TOKENS / 1e9:.0f}B tokens, "
          f"{tokens_per_doc:,.0f} tokens/doc; this bench's documents average "
          f"{r['pool_tokens'] / r['n']:,.0f} tokens, so text-bound stages are scaled by tokens):")
    token_scale = PAPER_TOKENS / r["pool_tokens"]
    rows = []
    for stage, scaler in (("corpus", token_scale), ("tokenizer", token_scale), ("select", scale),
                          ("export", token_scale / 2)):
        seconds = r["stages"][stage]["seconds"] * scaler
        rows.append((stage, seconds))
    print("| stage | 1 node of 2 cores, h | 8 CPU nodes x 32 cores, h | 64 CPU nodes x 32 cores, h |")
    print("|---|---|---|---|")
    for stage, seconds in rows:
        per_core = seconds * 2  # measured on 2 cores; the stages split by files/shards, so they scale by cores
        print(f"| {stage} | {seconds / 3600:,.1f} | {per_core / (8 * 32) / 3600:,.2f} | {per_core / (64 * 32) / 3600:,.3f} |")
    pool_gb = r["pool_bytes"] / r["pool_tokens"] * PAPER_TOKENS / 1e9
    feat_gb = PAPER_DOCS * 1024 * 2 / 1e9
    print(f"\ndisk: pool {pool_gb:,.0f} GB (zstd Arrow, {r['pool_bytes'] / r['n']:,.0f} B/doc here, scaled by tokens); "
          f"gradient sketches k=1024 float16 {feat_gb:,.0f} GB (+ the same again for the independent projection); "
          f"Megatron data of a 50% selection ~{PAPER_TOKENS / 2 * 4 / 1e9:,.0f} GB (int32 tokens, vocab > 65500)")
    print(f"memory per rank: the select stage's SPOKES holds its row shard of the k={k} features here; at k=1024 "
          f"float16 that is {PAPER_DOCS * 2048 / 1e9:,.0f} GB / ranks (e.g. {PAPER_DOCS * 2048 / 64 / 1e9:,.1f} GB on 64), "
          "plus the per-document arrays above")
    print("features (proxy gradients) are GPU-bound: see bench/bench_features.py for the CPU rate; on GPUs "
          "multiply the bench's documents/s by the GPU count (chunks are independent, chunk c on rank c % world)")


if __name__ == "__main__":
    main()
