"""Benchmark: kronecker vs dense gradient features (throughput, SPOKES overlap, 1 vs 2 ranks).

Proxy: LLaMA architecture, hidden 256, 4 layers, vocab 32,000, random init (throughput does not
depend on training); documents: real web text (data/demo/web.jsonl.gz, else /work/shared/data/web)
truncated to 256 tokens; gradients of the last 2 layers + the (tied) head, k = 1024.

* docs/s of ``projection="kronecker"`` (one forward/backward per batch) vs ``"dense"`` (per-document
  backward, exact eq. 4 with every block of R generated once per batch).
* SPOKES 50% selection overlap: kronecker vs dense(seed 0), against dense(seed 0) vs dense(seed 1)
  (the gradients are computed once and projected with both seeds).
* wall time of ``extract_features`` with 1 rank vs 2 DDP ranks (gloo, CPU).

usage: python bench/bench_features.py [--n-throughput 64] [--n-overlap 512] [--n-extract 256]
       [--threads 1] [--dense-batch 32] [--save overlap.npz]
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spokes_lightning.features.gradients import ProxyGradientModule  # noqa: E402
from spokes_lightning.features.projection import DenseRademacherProjector  # noqa: E402

VOCAB, HIDDEN, LAYERS, MAX_LEN, K = 32000, 256, 4, 256, 1024


def web_documents(limit: int) -> list[tuple[str, str]]:
    demo = ROOT / "data" / "demo" / "web.jsonl.gz"
    paths = [demo] if demo.exists() else sorted(Path("/work/shared/data/web").glob("*.jsonl"))
    docs = []
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for n, line in enumerate(fh):
                text = json.loads(line).get("text") or ""
                if len(text.split()) >= 20:
                    docs.append((f"{path.stem}:{n}", text))
    print(f"documents: {len(docs)} usable web docs from {', '.join(p.name for p in paths)}", flush=True)
    return docs[:limit]


def build_proxy(directory: Path, docs) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([t for _, t in docs], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>").save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=MAX_LEN + 8, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def rows_in_batches(module, docs, batch_size):
    ids, rows = [], []
    for start in range(0, len(docs), batch_size):
        part = docs[start : start + batch_size]
        out = module.rows_for([i for i, _ in part], [t for _, t in part])
        ids += out["ids"]
        if out["rows"] is not None:
            rows.append(out["rows"].numpy())
    return ids, np.concatenate(rows)


def docs_per_second(module, docs, batch_size):
    module.rows_for([docs[0][0]], [docs[0][1]])  # warm-up (builds the sketch matrices)
    start = time.perf_counter()
    rows_in_batches(module, docs, batch_size)
    return len(docs) / (time.perf_counter() - start)


def dense_two_seeds(module, docs, batch_size, seeds=(0, 1)):
    """Exact eq. 4 rows for two seeds from ONE per-document gradient pass (overlap baseline).

    Gradients go straight into one preallocated [batch, D] buffer per parameter, so memory is
    ``batch_size * D * 4`` bytes; larger batches amortise the generation of every block of R.
    """
    names = list(module.grad_params)
    params = [module.grad_params[n] for n in names]
    sizes = {n: p.numel() for n, p in zip(names, params)}
    projectors = [DenseRademacherProjector(K, sizes, s, module.dense_block_cols) for s in seeds]
    outs = [[] for _ in seeds]
    start_time = time.perf_counter()
    for start in range(0, len(docs), batch_size):
        part = docs[start : start + batch_size]
        _, toks, _ = module.tokenize([i for i, _ in part], [t for _, t in part])
        stacked = {n: torch.empty(len(toks), sizes[n]) for n in names}
        with torch.enable_grad():
            for row, t in enumerate(toks):
                loss = module.document_losses(*module.pad([t])).sum()
                for n, g in zip(names, torch.autograd.grad(loss, params)):
                    stacked[n][row] = g.reshape(-1)
        for out, proj in zip(outs, projectors):
            out.append(proj.project(stacked).numpy())
        del stacked
        done = min(start + batch_size, len(docs))
        print(f"  dense gradients: {done}/{len(docs)} ({time.perf_counter() - start_time:.0f} s)",
              file=sys.stderr, flush=True)
    return [np.concatenate(o) for o in outs]


def spokes_top_half(features: np.ndarray) -> set[int]:
    from spokes_lightning.spokes import run_spokes

    return set(run_spokes(features.astype(np.float32), k=len(features) // 2, log=lambda m: None).indices.tolist())


def extract_wall_time(proxy: Path, n_docs: int, devices: int) -> float:
    with tempfile.TemporaryDirectory() as store:
        cmd = [sys.executable, __file__, "--extract-worker", str(proxy), store, str(n_docs), str(devices)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


def extract_worker(proxy: str, store: str, n_docs: int, devices: int) -> None:
    from spokes_lightning.features.extract import extract_features

    torch.set_num_threads(1)
    module = ProxyGradientModule(proxy, n_layers=2, k=K, max_length=MAX_LEN)
    extract_features(module, web_documents(n_docs), store, chunk_size=32, batch_size=16, devices=devices,
                     strategy="ddp" if devices > 1 else "auto", accelerator="cpu", progress=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-throughput", type=int, default=64)
    ap.add_argument("--n-overlap", type=int, default=512)
    ap.add_argument("--n-extract", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dense-batch", type=int, default=32, help="documents per dense projection batch")
    ap.add_argument("--save", type=Path, help="also save the overlap features (npz) here")
    ap.add_argument("--extract-worker", nargs=4, metavar=("PROXY", "STORE", "N", "DEVICES"))
    args = ap.parse_args()
    if args.extract_worker:
        proxy, store, n, devices = args.extract_worker
        return extract_worker(proxy, store, int(n), int(devices))
    torch.set_num_threads(args.threads)
    docs = web_documents(max(args.n_throughput, args.n_overlap, args.n_extract) + 1)
    with tempfile.TemporaryDirectory() as tmp:
        proxy = build_proxy(Path(tmp) / "proxy", docs)
        kron = ProxyGradientModule(str(proxy), n_layers=2, k=K, max_length=MAX_LEN, projection="kronecker")
        dense = ProxyGradientModule(str(proxy), n_layers=2, k=K, max_length=MAX_LEN, projection="dense")
        print(f"proxy: hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}; kronecker side {kron.kron_side}; D = "
              f"{dense.n_selected_parameters:,} (last 2 layers + tied head); k = {K}; {MAX_LEN}-token docs")
        sample = docs[1 : 1 + args.n_throughput]
        k_rate = docs_per_second(kron, sample, 16)
        d_rate = docs_per_second(dense, sample, 32)
        print(f"throughput ({len(sample)} docs, {args.threads} thread): kronecker {k_rate:.2f} docs/s, "
              f"dense {d_rate:.3f} docs/s, speed-up {k_rate / d_rate:.1f}x")

        if args.n_overlap:  # 0 skips the overlap part
            over = docs[: args.n_overlap]
            ids_k, z_kron = rows_in_batches(kron, over, 16)
            z_d0, z_d1 = dense_two_seeds(dense, over, args.dense_batch)
            assert len(ids_k) == len(z_d0)
            if args.save:
                np.savez(args.save, kronecker=z_kron, dense0=z_d0, dense1=z_d1)
            sel_k, sel_0, sel_1 = spokes_top_half(z_kron), spokes_top_half(z_d0), spokes_top_half(z_d1)
            half = len(z_d0) // 2
            ov_kd, ov_dd = len(sel_k & sel_0) / half, len(sel_0 & sel_1) / half
            print(f"SPOKES 50% overlap on {len(z_d0)} docs: kronecker vs dense(seed 0) {100 * ov_kd:.1f}%, "
                  f"dense(seed 0) vs dense(seed 1) {100 * ov_dd:.1f}%, gap {100 * (ov_dd - ov_kd):+.1f} points")

        if args.n_extract:  # 0 skips the 1-vs-2-rank part
            t1 = extract_wall_time(proxy, args.n_extract, 1)
            t2 = extract_wall_time(proxy, args.n_extract, 2)
            print(f"extract_features on {args.n_extract} docs (kronecker, process start-up included): "
                  f"1 rank {t1:.1f} s, 2 DDP ranks {t2:.1f} s, speed-up {t1 / t2:.2f}x")


if __name__ == "__main__":
    main()
