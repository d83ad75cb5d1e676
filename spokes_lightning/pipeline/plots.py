"""The report's figures (matplotlib, Agg): paper Fig 1 (alpha trade-off, labels kept apart), Fig 2
(overlaps), Fig 3 (G-Vendi vs k, one curve per rounding rule beside random), Fig 4 (Vendi under
gradient features and embeddings, random vs SPOKES run on each, one panel per space), Fig 5 (subset
overlap vs JL dimension k, beside the paper's published point), and the pretraining curves (raw and
smoothed). The numbers behind Figs 3-5 come from :mod:`.figure_data`; the paper's own from
``paper_figures.json``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from spokes_lightning.utils.atomic import atomic_path


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
    """Fig 4: Vendi under each representation, for random and for SPOKES run on that representation.

    One panel per representation: the spaces differ in dimension (``dim``: gradient features vs
    embeddings) and a Vendi score is bounded by its space's dimension, so no axis is shared."""
    plt = _figure()
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows) + 0.8, 3.8), squeeze=False)
    for ax, r in zip(axes[0], rows):
        space = f"{r['dim']}-dim {r['representation']}" if r.get("dim") else r["representation"]
        ax.bar([0], [r["random"]], 0.6, label="random", color="gray")
        ax.bar([1], [r["spokes"]], 0.6, label="SPOKES (run on this space)", color="C0")
        ax.set_xticks([0, 1], ["random", "SPOKES"])
        ax.set_ylabel(f"Vendi score in the {space} space", fontsize=8)
        ax.set_title(f"{r['representation']} (d = {r['dim']})" if r.get("dim") else r["representation"], fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Vendi by representation, each subset scored in its own space (paper Fig. 4)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _text_extent(ann, renderer):
    """A label's own box (its text, not its leader line), in display pixels."""
    from matplotlib.text import Text

    ann.update_positions(renderer)  # the text's offset transform (as drawing does)
    return Text.get_window_extent(ann, renderer)


#: label offsets tried around a point (points): rings of growing radius, 8 directions each
_RADII = (5, 12, 20, 30, 42, 56, 72, 90)
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))


def label_points(ax, points, texts, colors, fontsize: float = 7) -> list:
    """Annotate ``points`` (data coordinates) with ``texts`` so that no two labels overlap and no label
    covers a point: each label takes the first free spot on rings of offsets around its point (extents
    from the Agg renderer), with a thin leader line when it sits away from its point."""
    ax.autoscale_view()
    renderer = ax.figure.canvas.get_renderer()
    marks = [ax.transData.transform(p) for p in points]
    placed, out = [], []
    for (x, y), text, color in zip(points, texts, colors):
        for radius, (dx, dy) in [(r, d) for r in _RADII for d in _DIRECTIONS]:
            ann = ax.annotate(text, (x, y), xytext=(radius * dx, radius * dy), textcoords="offset points",
                              ha={1: "left", -1: "right", 0: "center"}[dx], va={1: "bottom", -1: "top", 0: "center"}[dy],
                              fontsize=fontsize, color=color, arrowprops=None if radius == _RADII[0] else
                              {"arrowstyle": "-", "lw": 0.5, "color": "0.6", "shrinkA": 0, "shrinkB": 3})
            box = _text_extent(ann, renderer).expanded(1.05, 1.1)
            free = (not any(box.x0 <= mx <= box.x1 and box.y0 <= my <= box.y1 for mx, my in marks)
                    and not any(box.overlaps(b) for b in placed))
            if free:
                break
            ann.remove()
        else:  # no free spot (very many points): stack it above the rest, never drop it
            ann = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=fontsize, color=color,
                              va="bottom")
            top = max(b.y1 for b in placed)
            ann.xyann = (0, (top - ax.transData.transform((x, y))[1]) * 72 / ax.figure.dpi + 4)
            box = _text_extent(ann, renderer)
        placed.append(box)
        out.append(ann)
    return out


def alpha_tradeoff(path: Path, rows: list[dict], chosen: float | None) -> None:
    """Fig 1: mean quality vs G-Vendi of the selection as alpha grows: each point labelled with its alpha
    (labels kept apart, :func:`label_points`), the chosen alpha circled in red with a legend entry."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    q = [r["mean_quality"] for r in rows]
    g = [r["gvendi"] for r in rows]
    ax.plot(q, g, "o-", color="C0", ms=4, label="SPOKES selection per alpha (labels: alpha)")
    picked = [chosen is not None and bool(np.isclose(r["alpha"], chosen, rtol=1e-9, atol=0)) for r in rows]
    for r, c in zip(rows, picked):
        if c:
            ax.plot([r["mean_quality"]], [r["gvendi"]], "o", color="red", ms=9, mfc="none", mew=1.5,
                    label=f"chosen alpha = {chosen:g}")
    ax.set_xlabel("mean quality of the selection")
    ax.set_ylabel("G-Vendi of the selection")
    ax.set_title("Quality-diversity trade-off over alpha (paper Fig. 1)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)  # below: clear of the labels
    ax.grid(alpha=0.3)
    label_points(ax, list(zip(q, g)), [f"{r['alpha']:g}" for r in rows], ["red" if c else "black" for c in picked])
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
    from spokes_lightning.pipeline.calibration_outputs import plot_k

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


#: raw training-loss lines are drawn this faint, under their smoothed curve
RAW_ALPHA = 0.25


def ema_span(n_points: int) -> int:
    """The span of the curves' moving average: about a tenth of the logged steps, at least 2."""
    return max(2, round(n_points / 10))


def ema(values, span: int) -> np.ndarray:
    """Exponential moving average with factor ``a = 2 / (span + 1)``, started at the first value:
    ``s[0] = x[0]``, ``s[t] = (1 - a) s[t-1] + a x[t]`` (pandas ``ewm(span=span, adjust=False)``)."""
    a = 2.0 / (span + 1)
    out = np.asarray(values, dtype=float).copy()
    for t in range(1, len(out)):
        out[t] = (1 - a) * out[t - 1] + a * out[t]
    return out


def training_curves(path: Path, curves: dict[str, list[dict]]) -> None:
    """Per-step training loss of each method: raw (faint, ``RAW_ALPHA``) under its EMA (span in the legend):
    a single step's loss is noisy, and a spike of one batch is not a trend."""
    from matplotlib.lines import Line2D

    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    handles = []
    for i, (method, rows) in enumerate(curves.items()):
        if rows:
            x = [r.get("tokens_seen", r.get("step")) for r in rows]
            loss = [r["loss"] for r in rows]
            span = ema_span(len(loss))
            ax.plot(x, loss, color=f"C{i % 10}", lw=0.8, alpha=RAW_ALPHA, label=f"_{method} (raw)")
            handles += ax.plot(x, ema(loss, span), color=f"C{i % 10}", lw=1.5,
                               label=f"{method} (EMA, span {span} steps)")
    if handles:
        handles.append(Line2D([], [], color="gray", lw=0.8, alpha=RAW_ALPHA, label="faint: raw per-step loss"))
        ax.legend(handles=handles, fontsize=7)
    ax.set_xlabel("tokens")
    ax.set_ylabel("training loss")
    ax.set_title("Local pretraining curves (same model, budget, seed)")
    ax.grid(alpha=0.3)
    _save(fig, path)


#: a caption under each figure in report.md (keys: the report stage's figure names)
CAPTIONS = {
    "fig1": "Fig. 1: mean quality vs G-Vendi of the SPOKES selection at each alpha of the sweep (labels: alpha; "
            "circled in red: the alpha this run chose).",
    "fig4": "Fig. 4: Vendi of random and SPOKES subsets, one panel per representation, each subset scored in its "
            "own space; the spaces differ in dimension (in each panel's title), so the panels share no scale.",
    "curves": "Training loss per step: faint lines are the raw loss, solid lines its exponential moving average "
              "(EMA, span in the legend: about a tenth of the steps).",
}


def figures_markdown(figures: dict[str, str]) -> str:
    """The report's figures: each image, then its caption where it has one."""
    return "".join(f"![{k}]({v})\n\n" + (f"{CAPTIONS[k]}\n\n" if k in CAPTIONS else "") for k, v in figures.items())
