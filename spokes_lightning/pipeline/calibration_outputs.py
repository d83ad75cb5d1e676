"""Tables and plots of the calibration studies (:mod:`spokes_lightning.pipeline.calibration`).

Every study writes ``<name>.md`` (a markdown table), ``.csv``, ``.json`` (rows + settings) and
``.png`` into the run directory, each atomically.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from spokes_lightning.utils.atomic import atomic_path, write_json_atomic, write_text_atomic


def markdown_table(rows: list[dict], title: str, notes: str) -> str:
    cols = list(rows[0])
    lines = [f"# {title}", "", notes, "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_outputs(run_dir: Path, name: str, rows: list[dict], title: str, notes: str,
                  settings: dict, plot) -> dict[str, Path]:
    """``name``.md/.csv/.json/.png, each written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: run_dir / f"{name}.{ext}" for ext in ("md", "csv", "json", "png")}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    plot(ax, rows)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(paths["png"], suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    write_text_atomic(paths["csv"], buffer.getvalue())
    write_text_atomic(paths["md"], markdown_table(rows, title, notes))
    write_json_atomic(paths["json"], {"study": name, "settings": settings, "rows": rows})
    return paths


def plot_layers(ax, rows):
    ax.plot([r["last_n_layers"] for r in rows], [r["spearman_vs_full"] for r in rows], "o-")
    ax.set_xlabel("last n layers (+ head)")
    ax.set_ylabel("avg row-wise Spearman vs full")


def plot_k(ax, rows):
    for f in sorted({r["fraction"] for r in rows}):
        sub = [r for r in rows if r["fraction"] == f]
        ax.plot([r["k"] for r in sub], [r["overlap_pct"] for r in sub], "o-", label=f"fraction {f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("JL dimension k")
    ax.set_ylabel("overlap with reference (%)")
    ax.legend()


def plot_projection(ax, rows):
    ax.bar(range(len(rows)), [r["overlap_pct"] for r in rows])
    ax.set_xticks(range(len(rows)), [r["comparison"].split(" (")[0] for r in rows], fontsize=7)
    ax.set_ylabel("subset overlap (%)")
