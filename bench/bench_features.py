"""Benchmark: kronecker vs dense gradient features (throughput, SPOKES overlap, 1 vs 2 ranks).

Proxy: LLaMA architecture, hidden 256, 4 layers, vocab 32,000, random init (throughput does not
depend on training); documents: real web text (data/demo/web.jsonl.gz, or any jsonl[.gz] with a
``text`` field given as ``--documents FILE``) truncated to 256 tokens; gradients of the last 2
layers + the (tied) head, k = 1024.

* docs/s of ``projection="kronecker"`` (one forward/backward per batch) vs ``"dense"`` (per-document
  backward, exact eq. 4 with every block of R generated once per batch).
* SPOKES 50% selection overlap: kronecker vs dense(seed 0), against dense(seed 0) vs dense(seed 1)
  (the gradients are computed once and projected with both seeds).
* wall time of ``extract_features`` with 1 rank vs 2 DDP ranks (gloo, CPU).
* floor: the kronecker extraction beside a bare forward + backward on the same model and the same
  tokenized batches (same docs, max_length, batch size, dtype, threads). The bare step is what a
  plain training step of the same parameters costs: only the last 2 blocks + the head require
  grad, the loss is the mean next-token cross-entropy over the batch's real tokens, then
  ``backward()``; no hooks, no projection, no per-document loss. Like the module (which runs the
  blocks before the selected ones under ``no_grad``), the bare step sends no gradient into the
  input-embedding lookup (its output is detached): with tied embeddings that lookup shares the
  head's weight, and a gradient through it would backpropagate through every frozen block.
  Tokenization and padding are excluded for both; one warm-up batch each (the warm-up builds the
  sketch matrices), then every batch is timed for both, alternating; medians per batch.

``--proxy qwen3-0.6b`` (floor section only) swaps the LLaMA proxy for a Qwen3-0.6B-shaped model
(hidden 1024, 28 layers, 16 heads, 8 kv heads, head_dim 128, intermediate 3072, vocab 151,936,
tied head, rope_theta 1e6), random init, saved with ``save_pretrained`` and loaded back by
``ProxyGradientModule`` from that directory, in bfloat16 on CUDA (CPU only with ``--allow-cpu``).
Its tokenizer is the bench's BPE (ids < 32,000; the model's head still has 151,936 rows).

usage: python bench/bench_features.py [--n-throughput 64] [--n-overlap 512] [--n-extract 256]
       [--threads 1] [--dense-batch 32] [--save overlap.npz]
       [--only throughput overlap extract floor] [--n-floor 64] [--floor-batch 16]
       [--floor-max-length 256] [--proxy llama|qwen3-0.6b] [--allow-cpu]
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

from spokes_lightning.features.fused_head import IGNORE, next_token_targets  # noqa: E402
from spokes_lightning.features.extract import ProxyGradientModule  # noqa: E402
from spokes_lightning.features.projection import DenseRademacherProjector  # noqa: E402

VOCAB, HIDDEN, LAYERS, MAX_LEN, K = 32000, 256, 4, 256, 1024
SECTIONS = ("throughput", "overlap", "extract", "floor")
# Qwen3-0.6B's shape (random init; only the shape matters for throughput)
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                  rope_theta=1e6, max_position_embeddings=40960)


DEMO_WEB = ROOT / "data" / "demo" / "web.jsonl.gz"


def web_documents(limit: int, documents: Path = DEMO_WEB) -> list[tuple[str, str]]:
    if not documents.is_file():
        sys.exit(f"bench_features: documents file not found: {documents} "
                 "(pass --documents FILE, a jsonl or jsonl.gz with a `text` field per line)")
    paths = [documents]
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


def build_proxy(directory: Path, docs, proxy: str = "llama", device: str = "cpu", max_len: int = MAX_LEN) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([t for _, t in docs], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>").save_pretrained(directory)
    torch.manual_seed(0)
    if proxy == "qwen3-0.6b":
        with torch.device(device):  # random init of 0.6B parameters: on the GPU when there is one
            model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_0_6B)).to(torch.bfloat16)
        model.save_pretrained(directory)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return directory
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=max(MAX_LEN, max_len) + 8, tie_word_embeddings=True)
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
    from spokes_lightning.core.spokes import run_spokes

    return set(run_spokes(features.astype(np.float32), k=len(features) // 2, log=lambda m: None).indices.tolist())


def extract_wall_time(proxy: Path, n_docs: int, devices: int, documents: Path = DEMO_WEB) -> float:
    with tempfile.TemporaryDirectory() as store:
        cmd = [sys.executable, __file__, "--extract-worker", str(proxy), store, str(n_docs), str(devices),
               "--documents", str(documents)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


def extract_worker(proxy: str, store: str, n_docs: int, devices: int, documents: Path = DEMO_WEB) -> None:
    from spokes_lightning.features.extract import extract_features

    torch.set_num_threads(1)
    module = ProxyGradientModule(proxy, n_layers=2, k=K, max_length=MAX_LEN)
    extract_features(module, web_documents(n_docs, documents), store, chunk_size=32, batch_size=16, devices=devices,
                     strategy="ddp" if devices > 1 else "auto", accelerator="cpu", progress=False)


def floor_batches(module, docs, batch_size):
    """Tokenized, padded batches exactly as ``rows_for`` builds them (its ``tokenize`` + ``pad``)."""
    batches = []
    for start in range(0, len(docs), batch_size):
        part = docs[start : start + batch_size]
        _, toks, _ = module.tokenize([i for i, _ in part], [t for _, t in part])
        if toks:
            batches.append(module.pad(toks))
    return batches


def synced_seconds(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bare_step(model, input_ids, mask) -> None:
    """A plain training step's forward + backward: mean next-token loss over the batch's tokens."""
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    targets = next_token_targets(input_ids, mask)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             ignore_index=IGNORE)
    loss.backward()


def floor_comparison(module, docs, batch_size):
    """Median seconds per batch of ``kronecker_rows`` and of :func:`bare_step` on the same batches.

    Both run on ``module.model`` (same weights, dtype, device, ``requires_grad`` set by the module:
    last ``n_layers`` blocks + head). Returns (kronecker s, bare s, docs per batch, real tokens per batch).
    """
    model, device = module.model, module.device
    batches = floor_batches(module, docs, batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in module.grad_params.values()}
    embedding = model.get_input_embeddings()

    def kronecker(ids, mask):
        with torch.enable_grad():
            module.kronecker_rows(ids, mask).detach().float()

    def bare(ids, mask):
        # the module's no-grad prefix ends at the first selected block; a plain training step builds the
        # same graph when the input-embedding output carries no grad (it would, through the tied head)
        detach = embedding.register_forward_hook(lambda _m, _a, out: out.detach())
        try:
            with torch.enable_grad():
                bare_step(model, ids, mask)
        finally:
            detach.remove()

    def clear():
        for p in params:
            p.grad = None

    k_times, b_times = [], []
    try:
        kronecker(*batches[0])  # warm-up: builds the sketch matrices and the final projector
        bare(*batches[0])
        assert all(p.grad is not None for p in params), "the bare backward missed a selected parameter"
        clear()
        for n, (ids, mask) in enumerate(batches):
            k_times.append(synced_seconds(lambda: kronecker(ids, mask), device))
            b_times.append(synced_seconds(lambda: bare(ids, mask), device))
            clear()
            print(f"  floor batch {n + 1}/{len(batches)}: kronecker {k_times[-1]:.3f} s, bare {b_times[-1]:.3f} s",
                  file=sys.stderr, flush=True)
    finally:
        clear()
    docs_per_batch = sum(len(ids) for ids, _ in batches) / len(batches)
    tokens_per_batch = sum(int(mask.sum()) for _, mask in batches) / len(batches)
    return float(np.median(k_times)), float(np.median(b_times)), docs_per_batch, tokens_per_batch


def floor_section(proxy_dir: Path, docs, args, device: str, dtype) -> None:
    module = ProxyGradientModule(str(proxy_dir), n_layers=2, k=K, max_length=args.floor_max_length,
                                 projection="kronecker")
    module.to(device=device, dtype=dtype)
    n_batches = max(1, args.n_floor // args.floor_batch)  # whole batches only: every timed batch is alike
    sample = docs[1 : 1 + n_batches * args.floor_batch]
    t_kron, t_bare, per_batch, tokens = floor_comparison(module, sample, args.floor_batch)
    cfg = module.model.config
    where = f"{device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else f", {args.threads} thread")
    print(f"floor ({args.proxy} proxy: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab "
          f"{cfg.vocab_size}; {str(dtype).removeprefix('torch.')} on {where}; {len(sample)} docs in {n_batches} "
          f"batches of {args.floor_batch}, {args.floor_max_length}-token max, {tokens / per_batch:.0f} real "
          f"tokens/doc; median s/batch after 1 warm-up, tokenization excluded)")
    for label, t in (("kronecker (k = %d, side %d)" % (K, module.kron_side), t_kron),
                     ("bare fwd+bwd (last 2 blocks + head)", t_bare)):
        print(f"  {label}: {t:.3f} s/batch, {per_batch / t:.2f} docs/s, {tokens / t:,.0f} tokens/s")
    print(f"  kronecker / bare time: {t_kron / t_bare:.2f}x (goal <= 1.3x)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-throughput", type=int, default=64)
    ap.add_argument("--n-overlap", type=int, default=512)
    ap.add_argument("--n-extract", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dense-batch", type=int, default=32, help="documents per dense projection batch")
    ap.add_argument("--save", type=Path, help="also save the overlap features (npz) here")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                    help=f"run only these sections ({', '.join(SECTIONS)}; default: all)")
    ap.add_argument("--n-floor", type=int, default=64, help="documents timed by the floor section (0 skips it)")
    ap.add_argument("--floor-batch", type=int, default=16, help="documents per batch in the floor section")
    ap.add_argument("--floor-max-length", type=int, default=MAX_LEN, help="token truncation in the floor section")
    ap.add_argument("--proxy", choices=("llama", "qwen3-0.6b"), default="llama",
                    help="qwen3-0.6b: Qwen3-0.6B-shaped model, bf16 on CUDA, floor section only")
    ap.add_argument("--allow-cpu", action="store_true", help="let --proxy qwen3-0.6b run without CUDA")
    ap.add_argument("--documents", type=Path, default=DEMO_WEB,
                    help="jsonl or jsonl.gz file of documents with a `text` field (default: data/demo/web.jsonl.gz)")
    ap.add_argument("--extract-worker", nargs=4, metavar=("PROXY", "STORE", "N", "DEVICES"))
    args = ap.parse_args()
    if args.extract_worker:
        proxy, store, n, devices = args.extract_worker
        return extract_worker(proxy, store, int(n), int(devices), args.documents)
    sections = set(args.only or SECTIONS)
    device, dtype = "cpu", torch.float32
    if args.proxy == "qwen3-0.6b":
        if args.only and sections != {"floor"}:
            ap.error("--proxy qwen3-0.6b runs the floor section only (use --only floor)")
        sections = {"floor"}
        device, dtype = ("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16
        if device == "cpu" and not args.allow_cpu:
            sys.exit("bench_features: --proxy qwen3-0.6b is meant for a CUDA GPU and none is visible; "
                     "pass --allow-cpu to run it on the CPU anyway (slow)")
    if args.floor_batch < 1 or args.floor_max_length < 2:
        ap.error("--floor-batch must be >= 1 and --floor-max-length >= 2")
    torch.set_num_threads(args.threads)
    # the proxy's tokenizer is trained on the same documents whichever sections run
    docs = web_documents(max(args.n_throughput, args.n_overlap, args.n_extract, args.n_floor, args.floor_batch) + 1,
                         args.documents)
    with tempfile.TemporaryDirectory() as tmp:
        proxy = build_proxy(Path(tmp) / "proxy", docs, args.proxy, device, args.floor_max_length)
        if sections & {"throughput", "overlap"}:
            kron = ProxyGradientModule(str(proxy), n_layers=2, k=K, max_length=MAX_LEN, projection="kronecker")
            dense = ProxyGradientModule(str(proxy), n_layers=2, k=K, max_length=MAX_LEN, projection="dense")
            print(f"proxy: hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}; kronecker side {kron.kron_side}; D = "
                  f"{dense.n_selected_parameters:,} (last 2 layers + tied head); k = {K}; {MAX_LEN}-token docs")

        if "throughput" in sections and args.n_throughput:  # 0 skips the throughput part
            sample = docs[1 : 1 + args.n_throughput]
            k_rate = docs_per_second(kron, sample, 16)
            d_rate = docs_per_second(dense, sample, 32)
            print(f"throughput ({len(sample)} docs, {args.threads} thread): kronecker {k_rate:.2f} docs/s, "
                  f"dense {d_rate:.3f} docs/s, speed-up {k_rate / d_rate:.1f}x")

        if "overlap" in sections and args.n_overlap:  # 0 skips the overlap part
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

        if "extract" in sections and args.n_extract:  # 0 skips the 1-vs-2-rank part
            t1 = extract_wall_time(proxy, args.n_extract, 1, args.documents)
            t2 = extract_wall_time(proxy, args.n_extract, 2, args.documents)
            print(f"extract_features on {args.n_extract} docs (kronecker, process start-up included): "
                  f"1 rank {t1:.1f} s, 2 DDP ranks {t2:.1f} s, speed-up {t1 / t2:.2f}x")

        if "floor" in sections and args.n_floor:  # 0 skips the kronecker-vs-bare part
            if sections & {"throughput", "overlap"}:
                del kron, dense  # free their final projectors (~1 GB each) before timing
            floor_section(proxy, docs, args, device, dtype)

if __name__ == "__main__":
    main()
