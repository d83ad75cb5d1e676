"""Issue 21: method picks that work as the README writes them, and recipes that cannot work
failing before any stage runs.

* ``-m dataset=demo method=random,spokes``: demo sets ``alpha: auto`` and config.yaml
  ``alpha_sweep: true`` for every pick; with no SPOKES method they do not apply (a note, no error).
* A bad pick (an unknown method, an alpha grid the sweep cannot use, ...) is one line, exit 2,
  before the corpus stage writes anything.
* A selector's name (a built-in one, or a plugin's from ``selection.plugins``) is a method
  by itself: ``{selector: name}`` with its defaults, no ``+selection.specs.<name>=...`` needed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spokes_lightning.utils.errors import UserError
from spokes_lightning.cli.run import compose, compose_multirun
from spokes_lightning.pipeline.outputs import SelectOutput
from spokes_lightning.pipeline.stages import check_config
from spokes_lightning.pipeline.select_stage import SelectStage, method_specs
from spokes_lightning.pipeline.stage import RunContext
from spokes_lightning.data.selection_artifact import read_selection
from spokes_lightning.selection.pool import SelectionPool
from spokes_lightning.selectors import SELECTORS

ROOT = Path(__file__).resolve().parents[2]


def synthetic_pool(seed: int = 3, n: int = 60, d: int = 16) -> SelectionPool:
    rng = np.random.default_rng(seed)
    ids = [f"doc{i}" for i in range(n)]
    return SelectionPool.join({"features": (ids, rng.standard_normal((n, d)).astype(np.float32)),
                               "quality": (ids, rng.random(n) + 0.1), "lengths": (ids, rng.integers(5, 50, n))})


def run_select(cfg, run_dir: Path, pool: SelectionPool) -> SelectOutput:
    """The select stage on ``pool`` (standing in for the corpus, tokenizer and features stages)."""
    ctx = RunContext(cfg=cfg, run_dir=run_dir)
    ctx.selection_pool = pool
    return SelectStage().run(ctx)


# ----------------------------------------------------------------------------- (a) the README's multirun


def test_readme_multirun_picks_pass_preflight_and_select(tmp_path, capsys):
    runs = compose_multirun(["dataset=demo", "method=random,spokes", f"run_dir={tmp_path / 'runs'}"])
    assert [list(cfg.selection.methods) for _, cfg in runs] == [["random"], ["spokes"]]
    for _, cfg in runs:  # what launch.main does first, for every combination
        assert cfg.selection.alpha == "auto" and cfg.selection.alpha_sweep is True
        check_config(cfg)
    capsys.readouterr()

    (_, random_cfg), (_, spokes_cfg) = runs
    pool = synthetic_pool()
    out = run_select(random_cfg, Path(random_cfg.run_dir), pool)
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 1, notes
    assert "selection.alpha=auto and selection.alpha_sweep unused" in notes[0] and "(random)" in notes[0]
    assert out.alpha is None and out.alpha_sweep is None
    assert not (Path(random_cfg.run_dir) / "select" / "alpha_sweep.json").exists()
    assert out.methods["random"].n_selected == 30  # budget 0.5 of 60
    assert len(read_selection(Path(random_cfg.run_dir) / out.methods["random"].selection).ids) == 30

    # with a SPOKES method, alpha=auto is the sweep's choice, as before (and no note)
    out = run_select(spokes_cfg, Path(spokes_cfg.run_dir), pool)
    assert "note:" not in capsys.readouterr().err
    assert out.alpha_sweep == "select/alpha_sweep.json"
    assert out.alpha in [float(a) for a in spokes_cfg.selection.alpha_grid]
    assert (Path(spokes_cfg.run_dir) / "select" / "alpha_sweep.json").is_file()


def test_numeric_alpha_without_spokes_is_kept_and_no_sweep_note_when_off(tmp_path, capsys):
    cfg = compose(["dataset=demo", "method=random", "selection.alpha=0.01", "selection.alpha_sweep=false",
                   f"run_dir={tmp_path / 'run'}"])
    check_config(cfg)
    capsys.readouterr()
    out = run_select(cfg, tmp_path / "run", synthetic_pool())
    assert "note:" not in capsys.readouterr().err and out.alpha == 0.01 and out.alpha_sweep is None


# ----------------------------------------------------------------------------- (b) fail before any stage


def launcher(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("overrides, message", [
    (["method=spokes", "selection.alpha_grid=[0.0,1.0]"], "strictly between 0 and 1 in selection.alpha_grid"),
    (["method=random", "selection.alpha_grid=[abc]"], "selection.alpha_grid must be a list of numbers"),
    (["method=spokes", "selection.alpha_sweep=maybe"], "selection.alpha_sweep must be true or false"),
    (["selection.methods=[random,nope]"], "unknown method 'nope' in selection.methods"),
    (["method=random", "selection.plugins=my_selector.py"], "selection.plugins must be a list"),
])
def test_a_recipe_that_cannot_work_fails_before_the_corpus_stage(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    r = launcher("-m", "dataset=demo", *overrides, f"run_dir={run_dir}", "stages=[corpus,select]",
                 "data.limit=40", "data.validation_documents=10")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in errors[0], errors[0]
    assert not run_dir.exists()  # nothing ran: no corpus output, no launch scripts


# ----------------------------------------------------------------------------- (2) a selector's name is a method

PLUGIN = '''
import numpy as np

from spokes_lightning.selectors import Param, SelectionResult, Selector, register


@register
class LowestQuality(Selector):
    name = "lowest_quality_issue21"
    requires = ("quality",)
    summary = "the k lowest-quality documents, every stride-th (test plugin)"
    params_spec = {"stride": Param(int, 2, lambda v: v >= 1, ">= 1")}

    def select(self, inputs, k, seed=0):
        self.check_inputs(inputs)
        order = np.argsort(np.asarray(inputs.quality), kind="stable")[::self.params["stride"]]
        return SelectionResult(indices=order[:k].astype(np.int64))
'''


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "lowest_quality.py"
    path.write_text(PLUGIN)
    yield path
    SELECTORS.pop("lowest_quality_issue21", None)  # other tests list every registered method


def test_a_plugin_selector_is_a_method_by_its_name(tmp_path, plugin_file):
    run_dir = tmp_path / "run"
    cfg = compose(["dataset=demo", "method=random", "selection.methods=[random,lowest_quality_issue21]",
                   f"selection.plugins=[{plugin_file}]", "selection.alpha=0.01", f"run_dir={run_dir}"])
    check_config(cfg)
    assert method_specs(cfg) == {"random": {"selector": "random"},
                                 "lowest_quality_issue21": {"selector": "lowest_quality_issue21"}}
    pool = synthetic_pool(seed=7)
    out = run_select(cfg, run_dir, pool)
    sel = read_selection(run_dir / out.methods["lowest_quality_issue21"].selection)
    quality = np.asarray(pool.inputs.quality)
    expected = [pool.ids[i] for i in np.argsort(quality, kind="stable")[::2][:30]]  # the default stride 2
    assert list(sel.ids) == expected
    assert sel.manifest["params"]["selector"] == "lowest_quality_issue21"


def test_a_spec_still_wins_and_builtin_names_need_no_spec(tmp_path, plugin_file):
    cfg = compose(["method=random", "selection.methods=[lowest_quality_issue21]",
                   f"selection.plugins=[{plugin_file}]", "+selection.specs.lowest_quality_issue21.stride=3",
                   "+selection.specs.lowest_quality_issue21.selector=lowest_quality_issue21",
                   f"run_dir={tmp_path / 'run'}"])
    assert method_specs(cfg) == {"lowest_quality_issue21": {"selector": "lowest_quality_issue21", "stride": 3}}
    # a built-in selector whose spec is removed runs with its defaults
    cfg = compose(["method=random", "selection.methods=[quality]", "~selection.specs.quality",
                   f"run_dir={tmp_path / 'run'}"])
    assert "quality" not in cfg.selection.specs
    check_config(cfg)
    assert method_specs(cfg) == {"quality": {"selector": "quality"}}


def test_a_plugin_name_without_its_plugin_is_one_line(tmp_path):
    cfg = compose(["method=random", "selection.methods=[lowest_quality_issue21]", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="unknown method 'lowest_quality_issue21'.*selection.plugins") as err:
        check_config(cfg)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- (3) spokes select --alpha auto


def spokes_cli(*args):
    return subprocess.run([sys.executable, "-m", "spokes_lightning", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cli_alpha_auto_says_which_alpha_it_chose(tmp_path):
    from spokes_lightning.selectors.spokes import alpha_sweep

    rng = np.random.default_rng(21)
    n, k = 120, 30
    x = rng.standard_normal((n, 12)).astype(np.float32)
    q = rng.random(n) + 0.1
    np.save(tmp_path / "f.npy", x)
    np.save(tmp_path / "q.npy", q)
    common = ["select", "--method", "spokes", "--features", tmp_path / "f.npy", "--quality", tmp_path / "q.npy",
              "--budget", k]
    r = spokes_cli(*common, "--alpha", "auto", "--out", tmp_path / "auto.npy")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    # the section 3.2 sweep computed here, on the same inputs, picks the same alpha
    ids = [str(i) for i in range(n)]
    expected = alpha_sweep(SelectionPool.join({"features": (ids, x), "quality": (ids, q)}), {}, k, 0)["auto_alpha"]
    assert 0 < rec["alpha"] < 1 and rec["alpha"] == expected
    said = [line for line in r.stderr.splitlines() if "alpha=auto chose" in line]
    assert len(said) == 1 and f"alpha={expected:g}" in said[0], r.stderr
    # and it is the alpha the subset was selected with
    fixed = spokes_cli(*common, "--alpha", repr(rec["alpha"]), "--out", tmp_path / "fixed.npy")
    assert fixed.returncode == 0, fixed.stderr
    assert np.load(tmp_path / "auto.npy").tolist() == np.load(tmp_path / "fixed.npy").tolist()
    assert "alpha" not in json.loads(fixed.stdout) and "chose" not in fixed.stderr
