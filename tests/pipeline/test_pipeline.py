"""End to end: launch/run.py on a tiny slice of the shipped corpus, then a cached re-run."""
import json
import subprocess
import sys
import time

import pytest

from spokes_lightning.data.selection_artifact import read_selection
from spokes_lightning.pipeline.outputs import PretrainOutput
from spokes_lightning.pipeline.stage import read_stage_output
from tiny_run import METHODS, launch


@pytest.fixture(scope="module")
def demo_run(tiny_run):
    """The session's tiny run (tests/conftest.py): (run_dir, launch result, wall seconds)."""
    return tiny_run


def test_summary_contract(demo_run):
    run_dir, r, wall = demo_run
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["recipe"] == "demo_peers" and s["n_documents"] > 100
    assert s["batch_gvendi"] == {"batch_size": 16, "batches": 3}
    stages = ["corpus", "tokenizer", "proxy", "features", "select", "export", "pretrain", "evaluate", "report"]
    # every stage, the report's own included; online (off here) runs before the report, in no time
    assert sorted(s["stage_seconds"]) == sorted(stages + ["online"])
    assert all(s["stage_seconds"][stage] > 0 for stage in stages)
    assert sum(s["stage_seconds"].values()) < wall  # measured inside the run: less than its wall time
    marker = json.loads((run_dir / "stages" / "proxy.json").read_text())
    assert s["stage_seconds"]["proxy"] == marker["seconds"]
    assert sorted(s["methods"]) == sorted(METHODS)
    for m, v in s["methods"].items():
        if m == "quadmix":  # a sample with copies: the budget counts copies
            assert v["n_copies"] == int(0.5 * s["n_documents"]) and v["n_selected"] <= v["n_copies"]
        else:
            assert v["n_selected"] == v["n_copies"] == int(0.5 * s["n_documents"])
        assert v["n_tokens"] > 0 and v["epochs"] > 0 and v["val_loss"] > 0
        assert 1 <= v["gvendi"] <= 64 and 1 <= v["gvendi_independent"] <= 64 and 1 <= v["batch_gvendi"] <= 16
        assert v["mean_length"] > 0 and v["mean_quality"] is not None
        assert set(v["eval"]) == {"arc_easy", "winogrande", "avg"}
        for t in ("arc_easy", "winogrande"):
            assert 0 <= v["eval"][t]["acc"] <= 100 and v["eval"][t]["chance"] == pytest.approx(100 / (4 if t == "arc_easy" else 2))
        assert (run_dir / v["selection"] / "manifest.json").exists()
        assert (run_dir / (v["megatron_prefix"] + ".bin")).stat().st_size > 0
        assert (run_dir / (v["megatron_prefix"] + ".idx")).exists()
    # the independent copy: same documents, every projection matrix redrawn (seed + 1000)
    from spokes_lightning.features.store import open_feature_store

    grads = open_feature_store(run_dir / "features" / "gradients")
    indep = open_feature_store(run_dir / "features" / "gradients_independent")
    assert grads.ids == indep.ids and grads.matrix.shape == indep.matrix.shape == (len(grads.ids), 64)
    assert indep.manifest["seed"] == grads.manifest["seed"] + 1000
    assert not (grads.matrix == indep.matrix).all()
    # SPOKES optimizes G-Vendi on these very features: it must beat random there
    assert s["methods"]["spokes"]["gvendi"] > s["methods"]["random"]["gvendi"]
    assert s["methods"]["quality"]["mean_quality"] >= s["methods"]["random"]["mean_quality"]


def test_report_and_figures(demo_run):
    run_dir, r, _ = demo_run
    report = (run_dir / "report.md").read_text()
    for needle in ["ARC-E", "WinoGrande", "_chance_", "Published (paper Table 2)", "Departures from OLMES",
                   "Decontamination", "G-Vendi (indep. proj.)"]:
        assert needle in report
    for fig in ["fig1_alpha_tradeoff.png", "fig2_overlaps.png", "fig3_gvendi_vs_k.png", "fig4_representations.png",
                "training_curves.png"]:
        assert (run_dir / "figures" / fig).read_bytes()[:4] == b"\x89PNG"
    s = json.loads((run_dir / "summary.json").read_text())
    curves = s["rounding_curves"]  # paper Fig. 3: one curve per rounding rule beside random, on this run's pool
    assert set(curves) == {"k", "random", "greedy", "topk", "systematic"}
    assert all(len(curves[r]) == len(curves["k"]) for r in ("random", "greedy", "topk", "systematic"))
    assert [r["representation"] for r in s["representations"]] == ["gradients", "embeddings"]  # paper Fig. 4
    assert "Representations (paper Fig. 4)" in report
    manifest = json.loads((run_dir / s["methods"]["spokes"]["selection"] / "manifest.json").read_text())
    assert manifest["stats"]["rounding"] == "greedy" and manifest["stats"]["rounding_seed"] == manifest["seed"]
    assert 1 <= manifest["stats"]["steps_run"] <= manifest["stats"]["max_steps"]
    assert (run_dir / "megatron" / "pretrain_spokes.sh").exists()
    assert "Report:" in r.stdout
    runs = sorted((run_dir.parent / "pristine" / "wandb" / "wandb").glob("offline-run-*"))  # as first written
    assert len(runs) == len(s["methods"]) + 1 and all(list(r.glob("*.wandb")) for r in runs)  # + the comparison
    assert len([r for r in runs if (r / "files" / "requirements.txt").exists()]) == 1  # the package list, once


def test_per_document_files_share_the_pools_ids(demo_run, tmp_path):
    """F, Q and L of a run (gradient features, quality, token lengths) and the embeddings hold the
    pool's documents in the pool's order, so the CLI can take them by row as they are."""
    import numpy as np

    from spokes_lightning.data.document_store import DocumentStore
    from spokes_lightning.data.id_arrays import decode_ids
    from spokes_lightning.features.store import open_feature_store

    run_dir, _, _ = demo_run
    pool_ids = [d.id for d in DocumentStore(run_dir / "corpus" / "pool")]
    corpus = json.loads((run_dir / "stages" / "corpus.json").read_text())["outputs"]
    assert "empty_texts" in corpus and corpus["n_pool"] == len(pool_ids)
    assert len(np.load(run_dir / "corpus" / "lengths.npy")) == len(pool_ids)
    assert len(np.load(run_dir / "features" / "quality.npy")) == len(pool_ids)
    assert decode_ids(np.load(run_dir / "features" / "quality_ids.npy")) == pool_ids
    for family in ("gradients", "embeddings"):
        store = open_feature_store(run_dir / "features" / family)
        assert store.ids == pool_ids and not store.skipped, family
    out = tmp_path / "sel.npy"
    r = subprocess.run([sys.executable, "-m", "spokes_lightning", "select", "--method", "spokes",
                        "--features", run_dir / "features" / "gradients" / "features.npy",
                        "--quality", run_dir / "features" / "quality.npy", "--lengths", run_dir / "corpus" / "lengths.npy",
                        "--budget", "0.25", "--out", out], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == len(pool_ids) and len(np.load(out)) == len(pool_ids) // 4


def test_rerun_is_cached(demo_run):
    run_dir, _, first = demo_run
    t = time.perf_counter()
    r = launch(run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("cached") == 10, r.stderr  # every stage (online: disabled here)
    assert "running" not in r.stderr
    assert time.perf_counter() - t < first / 3


def test_changed_selection_reruns_only_downstream(demo_run, tmp_path):
    run_dir, _, _ = demo_run
    r = launch(run_dir, "selection.methods=[random,spokes,quad,quadmix]", "stages=[corpus,tokenizer,proxy,features,select]")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "features: cached" in r.stderr and "select: running" in r.stderr


#: the online comparison (issue 14) at test size, on the tiny run's cached stages
ONLINE = ["online=demo", "selection.budget=0.5", "selection.budget_unit=documents", "online.every_n_steps=4",
          "online.window=12", "online.sketch.k=32", "online.sketch.max_length=32", "online.sketch.batch_size=8",
          "online.score.k=64", "online.score.max_length=64",
          "wandb.enabled=false"]  # the tiny run logs to wandb (test_report_and_figures); re-runs need not


def test_online_comparison_stage(demo_run):
    run_dir, _, _ = demo_run
    r = launch(run_dir, *ONLINE)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "features: cached" in r.stderr and "online: running" in r.stderr
    arms = json.loads((run_dir / "online" / "comparison.json").read_text())
    assert sorted(arms) == ["online", "random", "static"]
    steps = 8192 // (8 * 64)
    for arm, v in arms.items():
        assert v["steps"] == steps and v["tokens_trained"] == steps * 8 * 64
        assert v["n_trained_on"] > 0 and v["val_loss"] > 0 and 0 <= v["olmes_avg"] <= 100
        assert 1 <= v["gvendi_random_final_model"] <= 64 and 1 <= v["gvendi_proxy_independent"] <= 64
    assert arms["random"]["sketch_seconds"] == 0 and arms["random"]["reselect_seconds"] < 0.1 * arms["online"]["reselect_seconds"]
    assert 0 < arms["online"]["overhead_share"] and arms["online"]["sketch_seconds"] > 0
    online = json.loads((run_dir / "online" / "online" / "result.json").read_text())
    assert [s["rule"] for s in online["segments"]] == ["random"] * 2 + ["online"] * (steps // 4 - 2)
    static = json.loads((run_dir / "online" / "static" / "result.json").read_text())
    chosen = set(read_selection(run_dir / "selections" / "spokes").ids)
    assert set(static["trained_on"]) <= chosen  # the static arm trains only on the static selection
    table = (run_dir / "online" / "comparison.md").read_text()
    assert table.count("\n") == 5 and "| online |" in table
    again = launch(run_dir, *ONLINE)
    assert again.returncode == 0 and "online: cached" in again.stderr


@pytest.mark.parametrize("bad,message", [
    (["online.every_n_steps=0"], "online.every_n_steps must be a whole number >= 1"),
    (["online.arms=[random,greedy]"], "online.arms must list some of"),
    (["online.static_method=quality"], "online.static_method 'quality' is not in selection.methods"),
    (["online.every_n_steps=16", "online.window=1"], "online.window = 1 is smaller than"),
])
def test_online_bad_settings_exit_2(demo_run, tmp_path, bad, message):
    run_dir, _, _ = demo_run
    target = run_dir if "online.window=1" in bad else tmp_path / "bad"
    before = sorted(p.name for p in (run_dir / "online").iterdir()) if (run_dir / "online").exists() else []
    r = launch(target, *ONLINE, *bad, *(["method=spokes"] if "static_method" in bad[0] else []))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr
    after = sorted(p.name for p in (run_dir / "online").iterdir()) if (run_dir / "online").exists() else []
    assert after == before  # nothing half-written


def test_table2_from_checkpoints_trained_elsewhere(demo_run):
    """evaluate.checkpoints: Megatron-LM checkpoints (here the run's own) come back as Table 2, equal to the local one."""
    run_dir, _, _ = demo_run
    before = json.loads((run_dir / "summary.json").read_text())["methods"]
    ckpt = {m: run_dir / "pretrain" / m / "seed_0" / "megatron" for m in ("random", "spokes")}
    assert all((c / "latest_checkpointed_iteration.txt").exists() for c in ckpt.values())
    r = launch(run_dir, "selection.methods=[random,spokes]", "wandb.enabled=false",
               "evaluate.checkpoints={" + ",".join(f"{m}:'{c}'" for m, c in ckpt.items()) + "}")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert sorted(s["methods"]) == ["random", "spokes"]
    for m in ckpt:
        assert list((run_dir / "evaluate" / "converted" / m / "0").glob("iter_*/config.json"))
        assert s["methods"][m]["eval"]["avg"] == pytest.approx(before[m]["eval"]["avg"])
    assert s["table2"]["baseline"] == "random" and s["table2"]["methods"]["random"]["vs_baseline"] is None
    assert s["table2"]["methods"]["spokes"]["vs_baseline"]["lo"] <= s["table2"]["methods"]["spokes"]["vs_baseline"]["hi"]


def test_several_pretraining_seeds_give_intervals(demo_run):
    run_dir, _, _ = demo_run
    r = launch(run_dir, "selection.methods=[random,spokes]", "pretrain.seeds=[0,1]", "wandb.enabled=false")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert all(v["n_seeds"] == 2 for v in s["table2"]["methods"].values())
    pre = read_stage_output(run_dir, PretrainOutput).methods["spokes"]
    losses = [run.val_loss for run in pre.runs]
    assert [run.seed for run in pre.runs] == [0, 1] and losses[0] != losses[1]
    assert pre.epochs > 0 and pre.tokens_seen == 8192
    report = (run_dir / "report.md").read_text()
    assert "val loss [95% CI]" in report and "2 pretraining seeds per method" in report
    assert "<u>" not in report  # no best / second ranks
