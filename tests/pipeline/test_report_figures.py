"""The report's figures, read back from the matplotlib objects (Agg): Fig. 1's alpha labels do not overlap
and the chosen alpha has a legend entry, Fig. 4 has one panel per representation named by its
dimension, and the training curves are drawn raw (faint) under an EMA."""
import numpy as np
import pytest
from matplotlib.text import Text

from spokes_lightning.pipeline import plots


@pytest.fixture
def drawn(monkeypatch, tmp_path):
    """Calls a plots function and returns its figure, drawn (instead of saved and closed)."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))

    def draw(fn, *args):
        fn(tmp_path / "fig.png", *args)
        (fig,) = figures[-1:]
        fig.canvas.draw()
        return fig

    yield draw
    plots._figure().close("all")


def close_alpha_rows():
    """alpha 0, 0.001 and 0.01 give nearly the same selection (as on the demo pool): their points coincide."""
    points = {0.0: (0.5000, 30.00), 0.001: (0.5001, 30.01), 0.01: (0.5003, 30.02), 0.1: (0.56, 27.0),
              0.3: (0.63, 22.0), 1.0: (0.71, 12.0)}
    return [{"alpha": a, "mean_quality": q, "gvendi": g} for a, (q, g) in points.items()]


@pytest.mark.parametrize("chosen", [0.01, 0.0])
def test_fig1_alpha_labels_apart_and_chosen_alpha_in_the_legend(drawn, chosen):
    rows = close_alpha_rows()
    fig = drawn(plots.alpha_tradeoff, rows, chosen)
    (ax,) = fig.axes
    renderer = fig.canvas.get_renderer()
    labels = {t.get_text(): t for t in ax.texts}
    assert sorted(labels) == sorted(f"{r['alpha']:g}" for r in rows)  # every alpha labelled once
    boxes = {k: Text.get_window_extent(t, renderer) for k, t in labels.items()}  # the text alone
    for a in boxes:
        for b in boxes:
            assert a == b or not boxes[a].overlaps(boxes[b]), f"labels {a} and {b} overlap"
    for r in rows:  # no label covers a point
        x, y = ax.transData.transform((r["mean_quality"], r["gvendi"]))
        assert not any(box.contains(x, y) for box in boxes.values())
    assert labels[f"{chosen:g}"].get_color() == "red"
    assert all(t.get_color() == "black" for k, t in labels.items() if k != f"{chosen:g}")
    legend = ax.get_legend()
    assert legend is not None
    entries = [t.get_text() for t in legend.get_texts()]
    assert f"chosen alpha = {chosen:g}" in entries


def test_fig4_one_panel_per_space_with_its_dimension(drawn):
    rows = [{"representation": "gradients", "dim": 1024, "k": 350, "random": 40.0, "spokes": 90.0},
            {"representation": "embeddings", "dim": 384, "k": 350, "random": 20.0, "spokes": 24.0}]
    fig = drawn(plots.representation_bars, rows)
    axes = [ax for ax in fig.axes if ax.patches]
    assert len(axes) == 2  # no shared Vendi axis across spaces of different dimension
    for ax, (name, dim) in zip(axes, [("gradients", "1024"), ("embeddings", "384")]):
        assert name in ax.get_ylabel() and dim in ax.get_ylabel() and dim in ax.get_title()
        other = "384" if dim == "1024" else "1024"
        assert other not in ax.get_ylabel() + ax.get_title()
        assert [round(p.get_height(), 6) for p in ax.patches] == [r[k] for r in rows
                                                                  if r["representation"] == name for k in ("random", "spokes")]


def test_representation_rows_carry_their_dimension():
    from spokes_lightning.pipeline.figure_data import representation_table
    from spokes_lightning.pipeline.report_stage import representation_markdown

    rng = np.random.default_rng(0)
    feats, emb = rng.standard_normal((40, 16)), rng.standard_normal((40, 6))
    rows = representation_table(feats, emb, np.arange(0, 40, 4), {"steps": 20}, seed=0, random_seeds=2)
    assert [(r["representation"], r["dim"]) for r in rows] == [("gradients", 16), ("embeddings", 6)]
    table = representation_markdown({"representations": rows})
    assert "| representation | dimension |" in table and "| gradients | 16 |" in table and "| embeddings | 6 |" in table


def test_ema_on_a_known_series():
    # a = 2 / (2 + 1) = 2/3: s = 4, 4, 4, 4/3 + 20/3 = 8, 8/3 + 8/3 = 16/3
    assert plots.ema([4, 4, 4, 10, 4], span=2) == pytest.approx([4, 4, 4, 8, 16 / 3])
    assert plots.ema([3.0] * 7, span=5) == pytest.approx([3.0] * 7)
    assert plots.ema_span(20) == 2 and plots.ema_span(300) == 30 and plots.ema_span(3) == 2


def test_training_curves_raw_faint_under_an_ema(drawn):
    loss = {"random": [6.0 - 0.1 * i for i in range(30)], "spokes": [6.2 - 0.12 * i for i in range(30)]}
    loss["spokes"][12] = 9.0  # a one-batch spike
    curves = {m: [{"step": i + 1, "tokens_seen": 512 * (i + 1), "loss": v, "lr": 1e-3} for i, v in enumerate(ls)]
              for m, ls in loss.items()}
    fig = drawn(plots.training_curves, curves)
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert len(lines) == 2 * len(curves)  # two lines per method
    span = plots.ema_span(30)
    for m, values in loss.items():
        mine = [ln for ln in lines if m in ln.get_label()]
        raw = [ln for ln in mine if ln.get_alpha() is not None and ln.get_alpha() < 0.5]
        smooth = [ln for ln in mine if ln.get_alpha() is None or ln.get_alpha() >= 0.5]
        assert len(raw) == len(smooth) == 1
        assert list(raw[0].get_ydata()) == pytest.approx(values)
        assert list(smooth[0].get_ydata()) == pytest.approx(plots.ema(values, span))
        assert list(raw[0].get_xdata()) == list(smooth[0].get_xdata()) == [r["tokens_seen"] for r in curves[m]]
        assert raw[0].get_color() == smooth[0].get_color()
    spiked = [ln for ln in lines if "spokes" in ln.get_label() and ln.get_alpha() is None][0]
    assert max(spiked.get_ydata()[10:15]) < 9.0 - 1.0  # the spike is damped in the smoothed curve
    entries = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"random (EMA, span {span} steps)" in entries and any("raw" in e for e in entries)
    assert "EMA" in plots.CAPTIONS["curves"] and "raw" in plots.CAPTIONS["curves"]
