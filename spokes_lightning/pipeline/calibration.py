"""Calibration studies of the SPOKES feature pipeline (paper section 4.1, 4.2, appendix A).

One command each, writing ``<name>.md``, ``<name>.csv``, ``<name>.json`` and ``<name>.png``
into ``--run-dir``, or ``all`` for the three on one loaded model and one read of the documents::

    python -m spokes_lightning.pipeline.calibration layers --model DIR --documents web.jsonl.gz --run-dir RUN
    python -m spokes_lightning.pipeline.calibration k ...
    python -m spokes_lightning.pipeline.calibration projection ...
    python -m spokes_lightning.pipeline.calibration all ...

* ``layers`` (Table 1): cosine kernels of gradients of the last n decoder blocks (+ head) vs the
  gradient of all blocks (+ head), compared by average row-wise Spearman correlation with the
  diagonal excluded. ``--method exact`` (default) uses un-projected per-document gradients: one
  backward per document, the Gram matrix accumulated per block, so every n comes from the same
  gradients; ``--method dense`` uses :class:`ProxyGradients` with a dense Rademacher
  projection of dimension ``--k`` (for models too large to keep exact gradients);
  ``--exclude-head`` compares the decoder blocks alone.
* ``k`` (appendix A, Fig. 5): SPOKES subsets (alpha = 0) at several JL dimensions vs a reference
  dimension, overlap (%) at several selection fractions. The reference rows are the proxy
  gradient sketch at ``--k-ref``; each smaller k is a Rademacher JL map of them (so the whole
  sweep needs one gradient pass).
* ``projection``: overlap of the 50% SPOKES subsets from dense vs Kronecker sketches, beside the
  overlap of two dense sketches with different seeds (the noise floor of the comparison).

The pipeline's report stage runs ``layers`` and ``k`` on the run's own proxy and pool documents
(``report.table1``, ``report.fig5``; :mod:`spokes_lightning.pipeline.figure_data`) through
:meth:`ProxyContext.from_texts`, :func:`layers_study`, :func:`reference_sketch` and
:func:`k_overlap_rows`.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from spokes_lightning.pipeline.calibration_outputs import plot_k, plot_layers, plot_projection, write_outputs
from spokes_lightning.utils.arguments import OneLineParser, fraction, positive_int
from spokes_lightning.utils.errors import UserError, user_errors_exit
from spokes_lightning.utils.progress import progress
from spokes_lightning.core.overlap import subset_overlap_pct

DEFAULT_K_VALUES = (256, 512, 1024, 2048, 4096)
DEFAULT_FRACTIONS = (0.1, 0.25, 0.5)
#: exact_block_grams converts gradients to float64 this many columns at a time
GRAM_COLUMNS = 1 << 18


# --------------------------------------------------------------------------- math


def cosine_kernel(features: np.ndarray) -> np.ndarray:
    """``K_ij = z_i . z_j / (|z_i| |z_j|)`` (paper Algorithm 1, step 3, with w uniform)."""
    x = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    return x @ x.T


def cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.clip(np.diag(gram), 1e-300, None))
    return gram / np.outer(d, d)


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows i of Spearman(a[i, j != i], b[i, j != i]) (section 4.1, Table 1)."""
    from scipy.stats import rankdata

    n = a.shape[0]
    if n < 3:
        raise UserError("need at least 3 documents for row-wise Spearman correlations")
    off = ~np.eye(n, dtype=bool)
    ra = rankdata(a[off].reshape(n, n - 1), axis=1)
    rb = rankdata(b[off].reshape(n, n - 1), axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    rho = np.where(denom > 0, (ra * rb).sum(1) / np.where(denom > 0, denom, 1.0), 0.0)
    return float(np.clip(rho.mean(), -1.0, 1.0))


def jl_project(rows: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``rows @ R^T / sqrt(k)`` with a Rademacher ``R`` (k x d), section 4.2 eq. 4."""
    import torch

    from spokes_lightning.features.projection import rademacher

    r = rademacher(seed, f"calibration-jl-{k}", 0, k, rows.shape[1])
    return (torch.from_numpy(np.asarray(rows, np.float32)) @ r.T / math.sqrt(k)).numpy()


def kernel_preserving_rows(features: np.ndarray) -> np.ndarray:
    """Rows with the same Gram matrix in min(n, d) dims: ``U S`` of the thin SVD ``Z = U S V^T``.

    SPOKES only sees the rows through their inner products (the kernel of Algorithm 1, step 3),
    so for n < d this gives the same selection while the optimiser works on n x n matrices.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.shape[0] >= x.shape[1]:
        return x.astype(np.float32)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return (u * s).astype(np.float32)


def spokes_subset(features: np.ndarray, fraction: float, log=None) -> np.ndarray:
    """Diversity-only SPOKES (alpha = 0) top ``fraction`` of the rows (``log``: SPOKES's progress lines)."""
    from spokes_lightning.core.spokes import run_spokes

    count = max(1, int(round(fraction * len(features))))
    return np.asarray(run_spokes(kernel_preserving_rows(features), None, alpha=0.0, k=count, log=log).indices)


# --------------------------------------------------------------------------- gradients


class ProxyContext:
    """The proxy model, tokenizer and documents shared by one calibration command.

    ``ProxyContext(model, tokenizer, documents, ...)`` reads the first ``n_docs`` non-empty
    documents of a corpus file (the command line); :meth:`from_texts` takes documents already in
    memory (the pipeline's report stage, on its own pool).
    """

    def __init__(self, model: str, tokenizer: str | None, documents: str, n_docs: int,
                 text_field: str, max_length: int):
        from spokes_lightning.data.corpus import read_documents

        if n_docs < 3:
            raise UserError(f"--n-docs must be at least 3, got {n_docs}")
        self._load(model, tokenizer, max_length, "--max-length")
        docs = [d for d in read_documents([documents], text_field) if d.text.strip()][:n_docs]
        if len(docs) < 3:
            raise UserError(f"{documents}: fewer than 3 non-empty documents")
        self.ids = [d.id for d in docs]
        self.texts = [d.text for d in docs]

    @classmethod
    def from_texts(cls, model: str, tokenizer: str | None, ids: Sequence[str], texts: Sequence[str],
                   max_length: int, setting: str = "max_length") -> "ProxyContext":
        """A context over the given documents (at least 3 non-empty ones), in their order."""
        kept = [(i, t) for i, t in zip(ids, texts) if t.strip()]
        if len(kept) < 3:
            raise UserError(f"calibration needs at least 3 non-empty documents, got {len(kept)}")
        ctx = cls.__new__(cls)
        ctx._load(model, tokenizer, max_length, setting)
        ctx.ids = [i for i, _ in kept]
        ctx.texts = [t for _, t in kept]
        return ctx

    def _load(self, model: str, tokenizer: str | None, max_length: int, setting: str) -> None:
        from spokes_lightning.models.llama import load_causal_lm
        from spokes_lightning.models.tokenizer import load_tokenizer

        if max_length < 2:
            raise UserError(f"{setting} must be at least 2, got {max_length}")
        self.model_ref = model
        self.model = load_causal_lm(model, dtype="float32")
        self.tokenizer = load_tokenizer(tokenizer or model, setting="--tokenizer")
        self.max_length = max_length

    def with_documents(self, ids: Sequence[str], texts: Sequence[str], max_length: int | None = None) -> "ProxyContext":
        """The same loaded model and tokenizer over other documents (and, optionally, truncation)."""
        other = copy.copy(self)
        other.ids, other.texts = list(ids), list(texts)
        if max_length is not None:
            if max_length < 2:
                raise UserError(f"max_length must be at least 2, got {max_length}")
            other.max_length = max_length
        return other

    def module(self, **kwargs):
        from spokes_lightning.features.gradients import ProxyGradients

        return ProxyGradients(self.model, tokenizer=self.tokenizer, max_length=self.max_length,
                                   dtype="float32", **kwargs)

    @property
    def n_model_layers(self) -> int:
        from spokes_lightning.features.gradients import find_decoder_layers

        return len(find_decoder_layers(self.model))

    def sketch(self, batch_size: int = 8, **kwargs) -> tuple[list[str], np.ndarray]:
        """Gradient sketch rows of the documents (rows of skipped documents are dropped)."""
        module = self.module(**kwargs)
        ids, rows = [], []
        desc = f"gradients ({kwargs.get('projection')}, k={kwargs.get('k')})"
        for start in progress(range(0, len(self.ids), batch_size), desc):
            out = module.rows_for(self.ids[start : start + batch_size], self.texts[start : start + batch_size])
            if out["ids"]:
                ids.extend(out["ids"])
                rows.append(out["rows"].numpy())
        return ids, np.concatenate(rows)


def exact_block_grams(ctx: ProxyContext) -> tuple[list[str], dict[str, np.ndarray]]:
    """Per-block Gram matrices of exact per-document gradients ("head" = output head).

    Uses :class:`ProxyGradients`'s loss (mean next-token cross-entropy, truncated) with
    every decoder block + head selected; the gradient of block l of all documents is held at
    once, so memory is ``n_docs x largest_block_params`` floats.
    """
    import torch

    module = ctx.module(n_layers=ctx.n_model_layers, projection="dense", k=1)
    owner = {}
    for index, layer in enumerate(module.layers):
        for p in layer.parameters():
            owner[id(p)] = f"layer{index}"
    names = list(module.grad_params)
    params = [module.grad_params[n] for n in names]
    groups = [owner.get(id(p), "head") for p in params]
    kept, token_lists, _ = module.tokenize(ctx.ids, ctx.texts)
    per_group: dict[str, list[np.ndarray]] = {g: [] for g in dict.fromkeys(groups)}
    for toks in progress(token_lists, "exact gradients"):
        with torch.enable_grad():
            loss = module.document_losses(*module.pad([toks])).sum()
            grads = torch.autograd.grad(loss, params)
        flat: dict[str, list[torch.Tensor]] = {g: [] for g in per_group}
        for group, grad in zip(groups, grads):
            flat[group].append(grad.reshape(-1))
        for group, pieces in flat.items():
            per_group[group].append(torch.cat(pieces).numpy().astype(np.float32))
    grams = {}
    for group in list(per_group):
        stacked = np.stack(per_group.pop(group))
        grams[group] = np.zeros((len(stacked), len(stacked)))
        for start in range(0, stacked.shape[1], GRAM_COLUMNS):  # float64, one column slice at a time
            part = stacked[:, start : start + GRAM_COLUMNS].astype(np.float64)
            grams[group] += part @ part.T
        del stacked
    return kept, grams


# --------------------------------------------------------------------------- studies


def layers_study(ctx: ProxyContext, max_layers: int, method: str, k: int, seed: int,
                 include_head: bool = True) -> list[dict]:
    """Table 1: Spearman(kernel(last n blocks [+ head]), kernel(all blocks [+ head])), n = 1..max."""
    total = ctx.n_model_layers
    if not 1 <= max_layers <= total:
        raise UserError(f"--max-layers={max_layers} but the model has {total} decoder layers")
    if method == "exact":
        _, grams = exact_block_grams(ctx)
        def kernel(n: int) -> np.ndarray:
            blocks = sum(grams[f"layer{l}"] for l in range(total - n, total))
            return cosine_from_gram(blocks + grams["head"] if include_head else blocks)
    else:
        def kernel(n: int) -> np.ndarray:
            return cosine_kernel(ctx.sketch(n_layers=n, projection="dense", k=k, seed=seed,
                                            include_head=include_head)[1])
    full = kernel(total)
    rows = []
    for n in range(1, max_layers + 1):
        rho = rowwise_spearman(kernel(n), full)
        rows.append({"last_n_layers": n, "spearman_vs_full": round(rho, 6)})
    return rows


def k_study(ctx: ProxyContext, k_values: Sequence[int], k_ref: int, fractions: Sequence[float],
            n_layers: int, projection: str, seed: int) -> list[dict]:
    """Appendix A: overlap (%) of SPOKES subsets at each k with the subset at ``k_ref``."""
    return k_overlap_rows(reference_sketch(ctx, n_layers, projection, k_ref, seed), k_values, fractions, seed)


def reference_sketch(ctx: ProxyContext, n_layers: int, projection: str, k_ref: int, seed: int,
                     **kwargs) -> np.ndarray:
    """The proxy gradient sketch at ``k_ref`` (a Kronecker one sized to about ``k_ref`` columns first)."""
    kron_side = _kron_side_for(ctx, n_layers, k_ref) if projection == "kronecker" else None
    return ctx.sketch(n_layers=n_layers, projection=projection, k=k_ref, seed=seed, kron_side=kron_side,
                      **kwargs)[1]


def k_overlap_rows(reference: np.ndarray, k_values: Sequence[int], fractions: Sequence[float],
                   seed: int, log=None) -> list[dict]:
    """Overlap (%) of the SPOKES subset of each Rademacher JL map of ``reference`` to k dims
    with the subset of ``reference`` itself, per selection fraction (appendix A, Fig. 5)."""
    ref_subsets = {f: spokes_subset(reference, f, log) for f in fractions}
    rows = []
    for k in k_values:
        sketch = jl_project(reference, k, seed + 1)
        for f in fractions:
            rows.append({"k": int(k), "fraction": f,
                         "overlap_pct": round(subset_overlap_pct(spokes_subset(sketch, f, log), ref_subsets[f]), 2)})
    return rows


def _kron_side_for(ctx: ProxyContext, n_layers: int, k_ref: int) -> int:
    """Kronecker side so the concatenated sketch has about ``k_ref`` columns (bounded memory)."""
    probe = ctx.module(n_layers=n_layers, projection="kronecker", k=1)
    return max(4, math.ceil(math.sqrt(k_ref / max(1, len(probe.linear_names)))))


def projection_study(ctx: ProxyContext, k: int, n_layers: int, fraction: float, seed: int) -> list[dict]:
    """Dense vs Kronecker 50% subsets, beside dense(seed) vs dense(seed + 1) (noise floor)."""
    # dense: R is generated once per batch, so larger batches amortise it (memory: batch x D floats)
    dense_a = ctx.sketch(batch_size=32, n_layers=n_layers, projection="dense", k=k, seed=seed)[1]
    dense_b = ctx.sketch(batch_size=32, n_layers=n_layers, projection="dense", k=k, seed=seed + 1)[1]
    kron = ctx.sketch(n_layers=n_layers, projection="kronecker", k=k, seed=seed)[1]
    subsets = {name: spokes_subset(x, fraction) for name, x in
               [("dense", dense_a), ("dense_seed2", dense_b), ("kronecker", kron)]}
    return [
        {"comparison": "dense vs kronecker", "fraction": fraction,
         "overlap_pct": round(subset_overlap_pct(subsets["dense"], subsets["kronecker"]), 2),
         "kernel_spearman": round(rowwise_spearman(cosine_kernel(dense_a), cosine_kernel(kron)), 6)},
        {"comparison": "dense seed A vs dense seed B (noise floor)", "fraction": fraction,
         "overlap_pct": round(subset_overlap_pct(subsets["dense"], subsets["dense_seed2"]), 2),
         "kernel_spearman": round(rowwise_spearman(cosine_kernel(dense_a), cosine_kernel(dense_b)), 6)},
    ]


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m spokes_lightning.pipeline.calibration", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="study", required=True, parser_class=OneLineParser)
    for name, help_text in [("layers", "Table 1: last-n-layer vs full-gradient kernels"),
                            ("k", "appendix A: SPOKES subset overlap across JL dimensions k"),
                            ("projection", "dense vs Kronecker sketch subset overlap"),
                            ("all", "the three studies, on one loaded model and one read of the documents")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", required=True, help="proxy model directory (or reachable hub id)")
        p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
        p.add_argument("--documents", required=True, help=".jsonl/.jsonl.gz/.parquet corpus")
        p.add_argument("--text-field", default="text")
        p.add_argument("--run-dir", required=True, type=Path)
        p.add_argument("--n-docs", type=positive_int, default=100 if name == "layers" else 200)
        p.add_argument("--max-length", type=positive_int, default=256)
        p.add_argument("--seed", type=int, default=0)
        if name in ("layers", "all"):
            p.add_argument("--max-layers", type=positive_int, default=4)
        if name == "layers":
            p.add_argument("--method", choices=("exact", "dense"), default="exact")
            p.add_argument("--k", type=positive_int, default=8192, help="dense projection dim (--method dense)")
            p.add_argument("--exclude-head", action="store_true",
                           help="compare decoder blocks only (default: blocks + output head, as extracted)")
        else:
            p.add_argument("--n-layers", type=positive_int, default=2)
        if name in ("k", "all"):
            p.add_argument("--k-values", type=positive_int, nargs="+", default=list(DEFAULT_K_VALUES))
            p.add_argument("--k-ref", type=positive_int, default=8192)
            p.add_argument("--fractions", type=fraction, nargs="+", default=list(DEFAULT_FRACTIONS))
            p.add_argument("--projection", choices=("kronecker", "dense"), default="kronecker")
        if name in ("projection", "all"):
            p.add_argument("--k", type=positive_int, default=1024,
                           help="sketch dimension of the projection study" + (" (the other studies: k-values, k-ref)"
                                                                              if name == "all" else ""))
            p.add_argument("--fraction", type=fraction, default=0.5)
    return parser


def _check_layers(ctx: ProxyContext, n: int, flag: str) -> None:
    if n > ctx.n_model_layers:
        raise UserError(f"{flag}={n} but the model has {ctx.n_model_layers} decoder layers")


def run_studies(args: argparse.Namespace) -> dict[str, dict[str, Path]]:
    """Run one study (or ``all``) from parsed arguments and write the outputs: ``{study: paths}``."""
    for name in ("model", "tokenizer"):
        ref = getattr(args, name)
        if ref is not None and not Path(ref).expanduser().is_dir() and Path(ref).expanduser().exists():
            raise UserError(f"--{name} {ref} is a file, expected a directory")
    if args.study in ("k", "all") and max(args.k_values) > args.k_ref:
        raise UserError(f"--k-values must not exceed --k-ref ({args.k_ref})")
    ctx = ProxyContext(args.model, args.tokenizer, args.documents, args.n_docs, args.text_field,
                       args.max_length)
    if args.study != "all":
        return {args.study: _run_one(args, ctx)}
    _check_layers(ctx, args.max_layers, "--max-layers")  # both checked before the first study runs
    _check_layers(ctx, args.n_layers, "--n-layers")
    out = {}
    for study in ("layers", "k", "projection"):
        # the study's own defaults, then what `all` was given; `all`'s --k is the projection's sketch
        own = vars(build_parser().parse_args([study, "--model", args.model, "--documents", args.documents,
                                              "--run-dir", str(args.run_dir)]))
        given = {k: v for k, v in vars(args).items() if k in own and k != "study" and (k != "k" or study != "layers")}
        out[study] = _run_one(argparse.Namespace(**{**own, **given}), ctx)
    return out


def _run_one(args: argparse.Namespace, ctx: ProxyContext) -> dict[str, Path]:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["n_docs_used"] = len(ctx.ids)
    if args.study == "layers":
        _check_layers(ctx, args.max_layers, "--max-layers")
        rows = layers_study(ctx, args.max_layers, args.method, args.k, args.seed, not args.exclude_head)
        how = ("exact un-projected per-document gradients" if args.method == "exact"
               else f"dense Rademacher sketches with k={args.k}")
        head = "" if args.exclude_head else " + output head"
        notes = (f"Average row-wise Spearman correlation (diagonal excluded) between the cosine kernel of "
                 f"the last n decoder blocks{head} and that of all {ctx.n_model_layers} blocks{head}, "
                 f"over {len(ctx.ids)} documents; gradients: {how}.")
        return write_outputs(args.run_dir, "layers", rows, "Last-n-layer vs full gradient kernels",
                             notes, settings, plot_layers)
    _check_layers(ctx, args.n_layers, "--n-layers")
    if args.study == "k":
        rows = k_study(ctx, args.k_values, args.k_ref, args.fractions, args.n_layers, args.projection, args.seed)
        notes = (f"Overlap (%) between diversity-only SPOKES subsets at JL dimension k and at the reference "
                 f"k={args.k_ref} ({args.projection} sketch of the last {args.n_layers} blocks + head); each k is a "
                 f"Rademacher JL map of the reference rows; {len(ctx.ids)} documents.")
        return write_outputs(args.run_dir, "k", rows, f"Subset overlap vs k (reference k={args.k_ref})",
                             notes, settings, plot_k)
    rows = projection_study(ctx, args.k, args.n_layers, args.fraction, args.seed)
    notes = (f"Overlap (%) of the top-{args.fraction:g} diversity-only SPOKES subsets from dense vs Kronecker "
             f"gradient sketches (k={args.k}, last {args.n_layers} blocks + head), beside two dense sketches "
             f"with different seeds (noise floor); {len(ctx.ids)} documents.")
    return write_outputs(args.run_dir, "projection", rows, "Dense vs Kronecker sketches", notes, settings,
                         plot_projection)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr keeps our own bars and, on bad input, one line
    with user_errors_exit():
        written = run_studies(args)
    for paths in written.values():
        print(paths["md"].read_text())
        for ext, path in paths.items():
            print(f"{ext}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
