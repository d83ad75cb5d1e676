"""report.md sections read from what the stages wrote: the evaluated item count in the OLMES departures
(from the evaluate stage's item files, not a fixed 300) and the online stage's comparison (random vs
static vs online SPOKES), made by OnlineStage.run itself on a tiny pool and a tiny LLaMA."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from word_docs import make_docs, make_tokenizer  # noqa: E402

from spokes_lightning.pipeline.outputs import EvaluateOutput, FeaturesOutput, OnlineOutput, SelectedMethod, SelectOutput  # noqa: E402
from spokes_lightning.pipeline.stage import RunContext  # noqa: E402

TASKS = ["arc_easy", "mmlu", "winogrande"]


def evaluated(tmp_path, n_items: int) -> RunContext:
    """A run whose evaluate stage scored ``n_items`` items per task (its item files, as it writes them)."""
    from spokes_lightning.evaluation.item_scores import save_item_scores

    rng = np.random.default_rng(0)
    items = {}
    for m in ("random", "spokes"):
        path = tmp_path / "evaluate" / f"{m}_items.npz"
        save_item_scores(path, {t: (rng.random((1, n_items)) < 0.4).astype(np.uint8) for t in TASKS})
        items[m] = f"evaluate/{m}_items.npz"
    return RunContext(cfg=OmegaConf.create({"seed": 0}), run_dir=tmp_path, results={"evaluate": EvaluateOutput(items=items)})


def test_departures_state_the_items_this_run_evaluated(tmp_path):
    from spokes_lightning.evaluation import OLMES_DEPARTURES
    from spokes_lightning.pipeline.report_stage import item_scores_by_method
    from spokes_lightning.pipeline.report_tables import departures_markdown, table2_data

    ctx = evaluated(tmp_path, 100)
    n_items = table2_data(item_scores_by_method(ctx), TASKS, B=200)["n_items"]
    text = departures_markdown(OLMES_DEPARTURES, n_items, "test", 100)
    lines = text.splitlines()
    assert len(lines) == len(OLMES_DEPARTURES) and all(line.startswith("- ") for line in lines)
    (items,) = [line for line in lines if "Items" in line]
    assert items.startswith("- Items in this run: 100 items per task (split `test`; `evaluate.limit` = 100")
    assert "300 test items per task" not in items.split("Shipped files:")[0]  # 300: the shipped files only
    (mmlu,) = [line for line in lines if line.startswith("- MMLU is scored as one task")]
    assert "over 100 items" in mmlu and "300" not in mmlu
    # unequal counts (a task with fewer items than the limit) and no evaluation at all
    text = departures_markdown(OLMES_DEPARTURES, {"arc_easy": 100, "mmlu": 57}, "val", None)
    assert "Items in this run: 57-100 items per task (split `val`; every shipped item)" in text
    assert "over 57 items" in text
    text = departures_markdown(OLMES_DEPARTURES, None, "test", 100)
    assert "Items in this run: none evaluated" in text and "over 300 items" in text


def test_the_report_runs_after_the_online_stage_and_depends_on_it():
    from spokes_lightning.pipeline.report_stage import ReportStage
    from spokes_lightning.pipeline.stages import STAGE_NAMES

    assert STAGE_NAMES.index("online") < STAGE_NAMES.index("report")
    assert "online" in ReportStage.needs


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    """OnlineStage.run on 150 tiny documents: 16 steps of 2 x 16 tokens, a tiny LLaMA per arm.

    Stand-ins: the run's tokenizer / pool / validation documents, the static selection's ids and the
    task evaluation (a fixed OLMES average per arm); training, scoring and the writers are the stage's."""
    import torch

    from spokes_lightning import evaluation
    from spokes_lightning.pipeline import online_stage, report_stage  # noqa: F401 (imported before the patches)
    from spokes_lightning.data import selection_artifact as artifact

    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("online_run")
    docs = [SimpleNamespace(id=i, text=t) for i, t in make_docs(150, seed=4)]
    static_ids = [d.id for d in docs if d.text][:90]
    olmes = {"random": 31.25, "static": 33.5, "online": 36.75}
    cfg = OmegaConf.create({
        "seed": 0,
        "online": {"enabled": True, "arms": ["random", "static", "online"], "every_n_steps": 2, "window": 9,
                   "alpha": 0.0, "fallback": "random", "static_method": "spokes", "rounds": 2,
                   "sketch": {"n_layers": 1, "k": 16, "max_length": 16, "batch_size": 8},
                   "score": {"k": 16, "max_length": 16}},
        "pretrain": {"token_budget": 512, "batch_size": 2, "seq_length": 16, "n_layers": 2, "hidden": 16,
                     "heads": 2, "lr": 1e-3},
        "evaluate": {"tasks": ["arc_easy"], "split": "test", "limit": 4, "batch_size": 4}})
    ctx = RunContext(cfg=cfg, run_dir=run_dir, results={
        "select": SelectOutput(n_pool=len(docs), n_unselectable=0, alpha=None, methods={
            "spokes": SelectedMethod(selection="selections/spokes", n_selected=len(static_ids), n_copies=len(static_ids),
                                     n_tokens=0)}),
        "features": FeaturesOutput()})
    patch = pytest.MonkeyPatch()
    tok = make_tokenizer()
    patch.setattr(online_stage, "export_tokenizer", lambda ctx: tok)
    patch.setattr(online_stage, "pool_documents", lambda ctx: docs)
    patch.setattr(online_stage, "validation_documents", lambda ctx: docs[-20:])
    patch.setattr(artifact, "read_selection", lambda path: SimpleNamespace(ids=static_ids))
    patch.setattr(evaluation, "evaluate_model", lambda model_dir, **kw: {"avg": olmes[Path(model_dir).parent.name]})
    try:
        # as the runner stores and reads them back
        outputs = OnlineOutput.from_json(json.loads(json.dumps(online_stage.OnlineStage().run(ctx).to_json())))
    finally:
        patch.undo()
    return run_dir, cfg, outputs


def test_online_section_from_the_online_stage_outputs(online_run):
    from spokes_lightning.pipeline.report_online import online_markdown

    run_dir, cfg, outputs = online_run
    arms = json.loads((run_dir / outputs.comparison).read_text())
    assert sorted(arms) == ["online", "random", "static"]
    text = online_markdown(outputs, run_dir, cfg.online)
    assert text.startswith("\n## Online reselection (stage `online`)\n")
    assert "16 steps (512 tokens)" in text
    for arm, r in arms.items():
        row = [line for line in text.splitlines() if line.startswith(f"| {arm} |")]
        assert len(row) == 1
        for value in (str(r["n_trained_on"]), f"{r['val_loss']:.3f}", f"{r['gvendi_random_final_model']:.1f}",
                      f"{r['olmes_avg']:.2f}"):
            assert f"| {value} |" in row[0]
    assert "static SPOKES" in text and "online SPOKES" in text
    assert f"online SPOKES {arms['online']['val_loss']:.3f}" in text
    assert f"online SPOKES {arms['online']['gvendi_random_final_model']:.1f}" in text


@pytest.mark.parametrize("outputs", [None, OnlineOutput()])
def test_no_online_section_without_the_stage(tmp_path, outputs):
    from spokes_lightning.pipeline.report_online import online_markdown

    assert online_markdown(outputs, tmp_path, OmegaConf.create({"window": 9})) == ""
