"""The report's paper sections: Table 1 and Fig. 5 on the run's own proxy and pool, the paper's
numbers beside them (paper_figures.json), Figs. 2 and 3 as tables, deterministic outputs.

A tiny random-init proxy (tests/scripts/tiny_proxy.py) stands in for the run's proxy; the run
context is a stand-in holding only what the report's calibration code reads.
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from tiny_proxy import build_tiny_proxy, tiny_documents  # noqa: E402

from spokes_lightning.pipeline.outputs import FeaturesOutput, ProxyOutput  # noqa: E402
from spokes_lightning.pipeline.stage import RunContext  # noqa: E402
from spokes_lightning.pipeline import data_stages, plots  # noqa: E402
from spokes_lightning.pipeline import figure_data  # noqa: E402
from spokes_lightning.pipeline.figure_data import calibration_draw, calibration_studies, paper_figures  # noqa: E402
from spokes_lightning.pipeline.report_stage import (alpha_overlap_markdown, fig5_markdown,  # noqa: E402
                                                    gvendi_vs_k_markdown, table1_markdown)

N_DOCS = 48


def config(**report):
    base = {"table1": {"enabled": True, "documents": 12, "max_layers": 4, "max_length": 24, "method": "exact",
                       "k": 64, "max_gradient_gb": 4},
            "fig5": {"enabled": True, "k_values": [16, 32, 64, 256], "k_ref": 64, "fractions": [0.25, 0.5],
                     "documents": 40, "max_length": 24}}
    for name, changes in report.items():
        base[name].update(changes)
    return OmegaConf.create({"seed": 0, "report": base,
                             "features": {"gradients": {"n_layers": 2, "include_head": True,
                                                        "projection": "kronecker"}}})


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_proxy(tmp_path_factory.mktemp("proxy"), hidden=32, layers=3)


@pytest.fixture
def run(proxy_dir, tmp_path, monkeypatch):
    """(make_ctx, pool): a stand-in run context over a pool of tiny documents with stored gradient rows."""
    docs = [SimpleNamespace(id=i, text=t) for i, t in tiny_documents(N_DOCS + 8, seed=5) if len(t.split()) > 2]
    docs = docs[:N_DOCS]
    by_id = {d.id: d for d in docs}
    monkeypatch.setattr(data_stages, "documents_by_ids", lambda ctx, ids: [by_id[i] for i in ids])
    features = np.random.default_rng(0).standard_normal((len(docs), 48)).astype(np.float32)
    pool = SimpleNamespace(n=len(docs), ids=[d.id for d in docs], inputs=SimpleNamespace(features=features))

    def make_ctx(cfg, imported=False):
        features = FeaturesOutput(gradients="features/gradients",
                                  gradients_imported_from="/elsewhere/gradients" if imported else None)
        return RunContext(cfg=cfg, run_dir=tmp_path,
                          results={"features": features, "proxy": ProxyOutput(model=str(proxy_dir), trained=False)})

    return make_ctx, pool


def test_paper_numbers_and_sources():
    paper = paper_figures()
    assert set(paper) >= {"table1", "fig2", "fig3", "fig5"}
    assert all(entry["source"].startswith("SPOKES paper section") for entry in paper.values())
    assert paper["table1"]["models"]["Qwen3-0.6B-Base"] == {"2": 0.9308, "3": 0.9310, "4": 0.9312}
    assert paper["table1"]["models"]["Qwen2.5-0.5B-Instruct"] == {"2": 0.2612, "3": 0.9232, "4": 0.9236}
    assert paper["fig5"]["points"] == [{"k": 1024, "fraction": 0.5, "overlap_pct": 95.5}]
    assert paper["fig5"]["reference_k"] == 17920
    assert [(r["alpha"], r["overlap_quality"], r["overlap_diversity"]) for r in paper["fig2"]["rows"]] == [
        (0.001, 68.8, 64.8), (0.0005, 87.0, 70.0)]
    assert "rows" not in paper["fig3"] and "monotonically" in paper["fig3"]["claim"]  # no numbers invented


def test_calibration_draw_is_seeded_and_capped():
    big, again = calibration_draw(1000, 50, 3), calibration_draw(1000, 50, 3)
    assert np.array_equal(big, again) and len(set(big.tolist())) == 50
    assert len(calibration_draw(20, 50, 3)) == 20


def test_table1_and_fig5_on_the_proxy(run, tmp_path):
    make_ctx, pool = run
    ctx = make_ctx(config())
    out = calibration_studies(ctx, pool)
    t1, f5 = out["table1"], out["fig5"]
    # the proxy has 3 layers: n = 1..3, and n = all is the full kernel
    assert [r["last_n_layers"] for r in t1["rows"]] == [1, 2, 3] and t1["n_model_layers"] == 3
    assert t1["rows"][-1]["spearman_vs_full"] == pytest.approx(1.0)
    assert all(-1 <= r["spearman_vs_full"] <= 1 for r in t1["rows"]) and t1["documents"] == 12
    assert f5["reference"] == "proxy_sketch" and f5["k_ref"] == 64 and f5["k_values"] == [16, 32, 64]  # 256 > k_ref
    assert f5["documents"] == 40 and len(f5["rows"]) == 6
    assert all(0 <= r["overlap_pct"] <= 100 for r in f5["rows"])
    assert calibration_studies(ctx, pool) == out  # deterministic: a re-run writes the same report
    paper = paper_figures()
    md = table1_markdown(t1, paper["table1"], 2) + fig5_markdown(f5, paper["fig5"])
    assert "## Kernel calibration (paper Table 1)" in md and "## JL dimension vs overlap (paper Fig. 5)" in md
    assert "| 2 | " in md and "0.9308" in md and "0.2612" in md and "this run's proxy (3 layers)" in md
    assert "| 4 | – | 0.9312 | 0.9236 |" in md  # a paper row beyond the proxy's depth
    assert "95.5" in md and "17,920" in md and "SPOKES paper section 4.2" in md
    json.dumps(out)  # summary.json keys
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for path in (a, b):
        plots.jl_overlap(path, f5["rows"], f5["k_ref"], paper["fig5"])
    assert a.read_bytes()[:4] == b"\x89PNG" and a.read_bytes() == b.read_bytes()


def test_a_report_made_again_takes_the_studies_from_the_run(run, monkeypatch):
    """The studies are recorded with their key; the same inputs read the record back without the
    proxy, while another setting, other stored rows or another proxy compute them again."""
    make_ctx, pool = run
    ctx = make_ctx(config(fig5={"enabled": False}))
    ctx.keys.update(proxy="p1", corpus="c1")
    first = figure_data.cached_calibration_studies(ctx, pool)
    assert first == json.loads(json.dumps(calibration_studies(ctx, pool)))
    calls = []
    real = figure_data.calibration_studies
    monkeypatch.setattr(figure_data, "calibration_studies", lambda *a: calls.append(1) or real(*a))
    assert figure_data.cached_calibration_studies(ctx, pool) == first and not calls
    other_proxy = make_ctx(config(fig5={"enabled": False}))
    other_proxy.keys.update(proxy="p2", corpus="c1")
    other_rows = SimpleNamespace(n=pool.n, ids=pool.ids, inputs=SimpleNamespace(features=pool.inputs.features * 2))
    for again, rows in ((make_ctx(config(table1={"max_layers": 2}, fig5={"enabled": False})), pool),
                        (other_proxy, pool), (ctx, other_rows)):
        again.keys.setdefault("proxy", "p1")
        again.keys.setdefault("corpus", "c1")
        figure_data.cached_calibration_studies(ctx, pool)  # the record holds ctx's key again
        before = len(calls)
        figure_data.cached_calibration_studies(again, rows)
        assert len(calls) == before + 1


def test_imported_gradients_skip_table1_and_use_the_stored_rows(run):
    make_ctx, pool = run
    out = calibration_studies(make_ctx(config(), imported=True), pool)
    assert "imported" in out["table1"]["skipped"]
    f5 = out["fig5"]
    assert f5["reference"] == "gradient_features" and f5["k_ref"] == 48 and f5["k_values"] == [16, 32]
    assert "k_ref = 64 needs the proxy" in f5["note"]
    paper = paper_figures()
    md = table1_markdown(out["table1"], paper["table1"], 2)
    assert md.count("\n") <= 4 and "Not computed: the gradient features were imported" in md
    assert "this run's gradient features (k = 48" in fig5_markdown(f5, paper["fig5"])
    from_store = calibration_studies(make_ctx(config(fig5={"k_ref": None})), pool)["fig5"]
    assert from_store["reference"] == "gradient_features" and "note" not in from_store


def test_disabled_and_too_large(run):
    make_ctx, pool = run
    off = calibration_studies(make_ctx(config(table1={"enabled": False}, fig5={"enabled": False})), pool)
    assert off == {"table1": {"skipped": "report.table1.enabled is false"},
                   "fig5": {"skipped": "report.fig5.enabled is false"}}
    big = calibration_studies(make_ctx(config(table1={"max_gradient_gb": 1e-6}, fig5={"enabled": False})), pool)
    assert "max_gradient_gb" in big["table1"]["skipped"] and "method: dense" in big["table1"]["skipped"]


def test_fig2_and_fig3_tables_beside_the_paper():
    paper = paper_figures()
    sweep = {"k": 10, "rows": [{"alpha": a, "overlap_quality": q, "overlap_diversity": d, "gvendi": 5.0,
                                "mean_quality": 0.5} for a, q, d in ((0.0, 40, 100), (0.01, 60, 70), (1.0, 100, 40))]}
    md = alpha_overlap_markdown(sweep, 0.01, paper["fig2"])
    assert "| 0.01 (chosen) | 60.0 | 70.0 |" in md and "| paper, DCLM: 0.001 | 68.8 | 64.8 |" in md
    assert "| paper, FineWeb: 0.0005 | 87.0 | 70.0 |" in md
    curves = {"k": [5, 10, 20], "random": [3.0, 4.0, 6.0], "greedy": [4.0, 5.0, 6.0], "topk": [4.5, 4.2, 6.0]}
    md = gvendi_vs_k_markdown({"rounding_curves": curves}, paper["fig3"])
    assert "| 5 | 4.0 | 4.5 | 3.0 |" in md and "no numbers for Fig. 3" in md
    assert "rises with k for greedy;" in md and "above random at every k for greedy, topk" in md
