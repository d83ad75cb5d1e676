"""Recipes are picks of a dataset (recipes/dataset/) and method(s) (recipes/method/), not copies.

Every ``recipe=<name>`` composes to the same configuration as its ``dataset=... method=...`` pick,
and to what the copied recipe files composed to before they became picks (pinned below as each
recipe's departures from the default run). Bad group options and keys fail in one line, exit 2.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from spokes_lightning.utils.errors import UserError
from spokes_lightning.cli.run import combinations, compose, compose_multirun, run_name

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
ABSENT = "<absent>"

GROUP_NAMES = ("dataset", "method", "online", "recipe")


def options(group: str) -> list[str]:
    """The options of a config group: the .yaml files of its folder (adding a file adds a test)."""
    return sorted(p.stem for p in (RECIPES / group).glob("*.yaml"))


def _as_overrides(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out += _as_overrides(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out


def pick_of(name: str) -> list[str]:
    """``recipe=<name>`` spelled as its group picks plus the keys its file sets, read from the file."""
    body = yaml.safe_load((RECIPES / "recipe" / f"{name}.yaml").read_text())
    picks = [f"{next(iter(p))[len('override /'):]}={next(iter(p.values()))}" for p in body.pop("defaults")]
    return picks + _as_overrides(body)


ALL_METHODS = ["random", "quality", "semdedup", "spokes", "spokes_quality"]
PEER_METHODS = ["quadmix", "quad", "datamask"]  # issue 13: the other published selectors
#: QuaDMix's search at the paper's scale (section 3.3), set by dataset/dclm.yaml (fineweb builds on it)
QUADMIX_PAPER = {f"selection.specs.quadmix.{k}": v for k, v in {
    "proxy_runs": 3000, "proxy_layers": 4, "proxy_hidden": 128, "proxy_heads": 4, "proxy_seq_length": 1024,
    "proxy_batch_size": 64, "proxy_steps": 15000, "proxy_lr": 1.0e-3, "proxy_val_tokens": 0,
    "search_candidates": 100000, "search_top": 10}.items()}

# What the copied recipe files composed to before recipes became picks (captured then), as
# departures from the default run (recipe=demo), so that unrelated new keys do not break this.
DEMO_FROM_CONFIG_YAML = {
    "data.interleave_by": "source", "data.limit": 800, "data.paths": ["data/demo/web.jsonl.gz"],
    "evaluate.limit": 100, "features.batch_size": 16, "features.chunk_size": 256,
    "features.gradients.max_length": 256, "recipe_name": "demo", "evaluate.num_fewshot": None,
    "pretrain.n_layers": 2, "pretrain.hidden": 128, "pretrain.batch_size": 16,
    "run_dir": "runs/demo", "selection.alpha": "auto", "selection.alpha_grid": [0.001, 0.01, 0.1, 0.3],
    "wandb.group": "demo", "selection.methods": ALL_METHODS,
}
PAPER = {
    "data.hub": ABSENT, "data.hub.split": "train", "data.interleave_by": None, "data.limit": None,
    "data.paths": [], "data.validation_documents": 10000, "evaluate.limit": None, "evaluate.num_fewshot": 5,
    "features.chunk_size": 1024, "features.gradients.max_length": 768, "pretrain.enabled": False,
    "pretrain.n_layers": 4, "pretrain.hidden": 256, "pretrain.batch_size": 8, "report.fig5.k_ref": None, "proxy.model": "Qwen/Qwen3-0.6B-Base", "quality.source": "classifier",
    "selection.alpha_grid": [0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3], "selection.alpha_sweep": False,
    "tokenizer.path": "meta-llama/Llama-3.2-1B", **QUADMIX_PAPER,
}
# the paper's pools (SPOKES section 6.1): 173M DCLM documents; FineWeb's 200B tokens in about twice as many
DCLM = {**PAPER, "data.hub.config": "dclm", "data.hub.name": "allenai/dolmino-mix-1124", "data.limit": 173_000_000,
        "selection.alpha": 0.001, "selection.specs.semdedup.n_clusters": 10000}
FINEWEB = {**PAPER, "data.hub.config": None, "data.hub.name": "HuggingFaceFW/fineweb", "data.limit": 340_000_000,
           "selection.alpha": 0.0005, "selection.specs.semdedup.n_clusters": 20000}


def named(name: str) -> dict:
    return {"recipe_name": name, "run_dir": f"runs/{name}", "wandb.group": name}


BEFORE = {
    "demo": {},
    "demo_online": {"selection.methods": ["spokes"], "online.enabled": True, "selection.budget": 240000,
                    "selection.budget_unit": "tokens",
                    "stages": ["corpus", "tokenizer", "proxy", "features", "select", "online"],
                    "pretrain.token_budget": 120000, "pretrain.n_layers": 4, "pretrain.hidden": 256,
                    "pretrain.batch_size": 8, **named("demo_online")},
    "demo_full": {"data.limit": None, "evaluate.limit": None, "pretrain.token_budget": 300000, **named("demo_full")},
    "dclm_base": {**DCLM, **named("dclm")},
    "fineweb_base": {**FINEWEB, **named("fineweb")},
    # the sweep stays on (as in the default run), so it is no departure
    "paper_tables": {**{k: v for k, v in DCLM.items() if k != "selection.alpha_sweep"}, **named("paper_tables")},
    **{f"{d}_{m}": {**base, "selection.methods": [m], **named(f"{d}_{m}")}
       for d, base in (("dclm", DCLM), ("fineweb", FINEWEB))
       for m in ("random", "quality", "semdedup", "spokes", "spokes_quality")},
}


def flat(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def plain(cfg) -> dict:
    return flat(OmegaConf.to_container(cfg, resolve=True))


def departures(base: dict, other: dict) -> dict:
    return {k: other.get(k, ABSENT) for k in set(base) | set(other) if base.get(k, ABSENT) != other.get(k, ABSENT)}


@pytest.fixture(scope="module")
def default():
    return plain(compose([]))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUP_NAMES for o in options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    assert cfg.selection.methods and cfg.run_dir


def test_every_method_of_the_toolkit_has_a_method_option():
    assert set(ALL_METHODS) | set(PEER_METHODS) | {"all", "peers"} <= set(options("method"))
    assert set(BEFORE) <= set(options("recipe"))  # the pinned recipes still exist


@pytest.mark.parametrize("name", options("recipe"))
def test_recipe_is_its_pick(name):
    by_recipe = compose([f"recipe={name}"])
    by_groups = compose(pick_of(name))
    assert OmegaConf.to_yaml(by_recipe) == OmegaConf.to_yaml(by_groups)
    assert OmegaConf.to_yaml(by_recipe, resolve=True) == OmegaConf.to_yaml(by_groups, resolve=True)


@pytest.mark.parametrize("name", sorted(BEFORE))  # what the copied recipe files composed to (a regression pin)
def test_recipe_composes_as_before(name, default):
    assert departures(default, plain(compose([f"recipe={name}"]))) == BEFORE[name]


def test_default_run_is_the_demo(default):
    raw = OmegaConf.load(RECIPES / "config.yaml")
    del raw["defaults"]
    base = {k: v for k, v in flat(OmegaConf.to_container(raw)).items() if k not in ("recipe_name", "run_dir", "wandb.group")}
    assert departures(base, default) == DEMO_FROM_CONFIG_YAML
    assert default == plain(compose(["recipe=demo"])) == plain(compose(["dataset=demo", "method=all"]))


def test_recipe_files_only_pick_groups():
    """No recipe copies settings: a defaults list of group overrides (paper_tables adds its name and one key)."""
    for path in (RECIPES / "recipe").glob("*.yaml"):
        body = yaml.safe_load(path.read_text())
        picks = body.pop("defaults")
        assert all(isinstance(p, dict) and len(p) == 1 and next(iter(p)).startswith("override /") for p in picks), path
        if path.stem == "paper_tables":
            assert body == {"recipe_name": "paper_tables", "selection": {"alpha_sweep": True}}
        else:
            assert body == {}, path


def test_any_pick_needs_no_file():
    cfg = compose(["dataset=fineweb", "method=semdedup"])
    assert cfg.recipe_name == "fineweb_semdedup" and cfg.run_dir == "runs/fineweb_semdedup"
    assert list(cfg.selection.methods) == ["semdedup"] and cfg.selection.specs.semdedup.n_clusters == 20000
    assert compose(["dataset=demo_full", "method=spokes"]).recipe_name == "demo_full_spokes"
    # a recipe with a group changed is named by its groups; an explicit name wins
    assert compose(["recipe=dclm_spokes", "method=random"]).recipe_name == "dclm_random"
    assert compose(["method=random", "recipe_name=mine"]).run_dir == "runs/mine"
    assert run_name({"dataset": "demo", "method": "all"}) == "demo"


def test_multirun_combinations_and_run_dirs():
    assert combinations(["dataset=demo", "method=random,spokes", "seed=range(0,2)"]) == [
        ["dataset=demo", "method=random", "seed=0"], ["dataset=demo", "method=random", "seed=1"],
        ["dataset=demo", "method=spokes", "seed=0"], ["dataset=demo", "method=spokes", "seed=1"]]
    assert combinations(["method=glob(spokes*)"]) == [["method=spokes"], ["method=spokes_quality"]]
    runs = compose_multirun(["dataset=demo", "method=random,spokes"])
    assert [str(cfg.run_dir) for _, cfg in runs] == ["runs/demo_random", "runs/demo_spokes"]
    # combinations that share a name get a sub-folder named by what they sweep
    runs = compose_multirun(["method=spokes", "selection.budget=0.3,0.5"])
    assert [str(cfg.run_dir) for _, cfg in runs] == ["runs/demo_spokes/selection.budget=0.3",
                                                     "runs/demo_spokes/selection.budget=0.5"]
    with pytest.raises(UserError, match="method/nope"):
        compose_multirun(["method=random,nope"])


@pytest.mark.parametrize("override, expected", [
    ("dataset=nope", "Could not find 'dataset/nope'; options: dclm, demo, demo_full, fineweb"),
    ("recipe=nope", "Could not find 'recipe/nope'"),
    ("method=nope", "Could not find 'method/nope'"),
    ("selection.bogus=1", "Could not override 'selection.bogus': no such key"),
    ("nokey=1", "Could not override 'nokey': no such key"),
    ("method=random,spokes", "add -m to run each value"),
    ("selection.methods.x=1", "bad configuration"),
    ("~method", "no value for selection.methods"),
])
def test_bad_pick_or_key_is_one_line(override, expected):
    with pytest.raises(UserError) as err:
        compose([override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def run_launcher(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def one_error_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_cli_bad_group_option_and_key_exit_2(tmp_path):
    assert "options: dclm, demo, demo_full, fineweb" in one_error_line(run_launcher("dataset=nope"))
    assert "no such key" in one_error_line(run_launcher("selection.nokey=3"))
    assert "unknown option -z" in one_error_line(run_launcher("-z"))


def test_cli_multirun_checks_every_combination_first(tmp_path):
    """The second combination's bad budget stops the multirun before the first one runs."""
    line = one_error_line(run_launcher("-m", f"run_dir={tmp_path / 'run'}", "method=random",
                                       "selection.budget=0.5,7.5", "stages=[corpus]"))
    assert "7.5" in line and not (tmp_path / "run").exists()


def test_cli_multirun_runs_each_combination(tmp_path):
    """From another folder: the recipe's data/demo/ path reads the shipped file; one run_dir each."""
    r = run_launcher("-m", "dataset=demo", "method=random,spokes", "stages=[corpus]", "data.limit=40",
                     "data.validation_documents=10", "data.interleave_by=null", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "multirun 1/2: dataset=demo method=random" in r.stderr and "multirun 2/2" in r.stderr
    for name in ("demo_random", "demo_spokes"):
        assert (tmp_path / "runs" / name / "stages" / "corpus.json").is_file(), name


def test_cli_cfg_prints_without_running():
    r = run_launcher("--cfg", "dataset=fineweb", "method=semdedup")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = yaml.safe_load(r.stdout)
    assert cfg["recipe_name"] == "fineweb_semdedup" and cfg["selection"]["methods"] == ["semdedup"]
