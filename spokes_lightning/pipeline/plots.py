"""The report's figures (matplotlib, Agg): paper Fig 1 (alpha trade-off), Fig 2 (overlaps),
Fig 3 (G-Vendi vs k, one curve per rounding rule beside random), Fig 4 (Vendi under gradient
features and embeddings, random vs SPOKES run on each), and the pretraining curves.
Fig 5 (subset overlap vs JL dimension k, beside the paper's published point), and the pretraining
curves. The numbers behind Figs 3-5 come from :mod:`.figure_data`; the paper's own from
``paper_figures.json``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    _figure().close(fig)


def gvendi_vs_k(path: Path, ks, curves: dict[str, list[float]], random_gv) -> None:
    """Fig 3: G-Vendi of the k-subset each rounding rule makes from the SPOKES weights, and random k."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for (rule, values), marker in zip(curves.items(), "o^vD"):
        ax.plot(ks, values, marker + "-", label=f"SPOKES, {rule} rounding")
    ax.plot(ks, random_gv, "s--", color="gray", label="random k")
    ax.set_xlabel("k (documents)")
    ax.set_ylabel("G-Vendi")
    ax.set_title("G-Vendi vs k (paper Fig. 3)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def representation_bars(path: Path, rows: list[dict]) -> None:
    """Fig 4: Vendi under each representation, for random and for SPOKES run on that representation."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    reps = [r["representation"] for r in rows]
    x = np.arange(len(reps))
    ax.bar(x - 0.2, [r["random"] for r in rows], 0.4, label="random", color="gray")
    ax.bar(x + 0.2, [r["spokes"] for r in rows], 0.4, label="SPOKES (run on this representation)")
    ax.set_xticks(x, reps)
    ax.set_ylabel("Vendi score")
    ax.set_title("Vendi by representation (paper Fig. 4)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def alpha_tradeoff(path: Path, rows: list[dict], chosen: float) -> None:
    """Fig 1: mean quality vs G-Vendi of the selection as alpha grows."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    q = [r["mean_quality"] for r in rows]
    g = [r["gvendi"] for r in rows]
    ax.plot(q, g, "o-")
    for r in rows:
        ax.annotate(f"{r['alpha']:g}", (r["mean_quality"], r["gvendi"]), fontsize=7,
                    color="red" if r["alpha"] == chosen else "black")
    ax.set_xlabel("mean quality of the selection")
    ax.set_ylabel("G-Vendi of the selection")
    ax.set_title("Quality-diversity trade-off over alpha (paper Fig. 1)")
    ax.grid(alpha=0.3)
    _save(fig, path)


def alpha_overlaps(path: Path, rows: list[dict], chosen: float, paper: list[dict] | None = None) -> None:
    """Fig 2: overlap of the joint subset with the quality-only and diversity-only subsets; ``paper``:
    the paper's chosen-alpha overlaps (hollow markers, same shape per overlap)."""
    plt = _figure()
    inner = [r for r in rows if 0 < r["alpha"] < 1]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    a = [r["alpha"] for r in inner]
    line_q, = ax.semilogx(a, [r["overlap_quality"] for r in inner], "o-", label="with quality-only")
    line_d, = ax.semilogx(a, [r["overlap_diversity"] for r in inner], "s-", label="with diversity-only")
    for i, p in enumerate(paper or []):
        ax.plot([p["alpha"]], [p["overlap_quality"]], "o", mfc="none", color=line_q.get_color(),
                label="paper, its chosen alpha (hollow)" if i == 0 else None)
        ax.plot([p["alpha"]], [p["overlap_diversity"]], "s", mfc="none", color=line_d.get_color())
        ax.annotate(f"paper {p['dataset']}", (p["alpha"], max(p["overlap_quality"], p["overlap_diversity"])),
                    fontsize=7, textcoords="offset points", xytext=(4, 4))
    ax.axvline(chosen, color="gray", ls=":", label=f"chosen alpha = {chosen:g}")
    ax.set_xlabel("alpha")
    ax.set_ylabel("overlap (%)")
    ax.set_title("Joint vs single-objective subsets (paper Fig. 2)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def jl_overlap(path: Path, rows: list[dict], k_ref: int, paper: dict | None = None) -> None:
    """Fig 5: overlap (%) of SPOKES subsets at JL dimension k with the subset at ``k_ref``, one curve
    per selection fraction; ``paper``: its published point(s) as stars (reference k in the label)."""
    from ..calibration_outputs import plot_k

    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    plot_k(ax, rows)
    for p in (paper or {}).get("points", []):
        ax.plot([p["k"]], [p["overlap_pct"]], "*", ms=12, mfc="white", mec="black",
                label=f"paper: fraction {p['fraction']:g} vs k = {paper['reference_k']:,}")
    ax.set_ylabel(f"overlap with k = {k_ref} subset (%)")
    ax.set_ylim(top=100)
    ax.set_title("Subset overlap vs JL dimension (paper Fig. 5)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def training_curves(path: Path, curves: dict[str, list[dict]]) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, rows in curves.items():
        if rows:
            x = [r.get("tokens_seen", r.get("step")) for r in rows]
            ax.plot(x, [r["loss"] for r in rows], label=method, lw=1)
    ax.set_xlabel("tokens")
    ax.set_ylabel("training loss")
    ax.set_title("Local pretraining curves (same model, budget, seed)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
