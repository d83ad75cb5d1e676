"""The layout the design promises: layers that import one way, no cycles, a small package root.

The contracts live in pyproject.toml (``[tool.importlinter]``); ``lint-imports`` checks them by
hand, this test with ``make test``. Function-level imports count, so a cycle cannot hide in one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "spokes_lightning"


def test_import_contracts_are_kept(monkeypatch, capsys):
    pytest.importorskip("importlinter", reason="pip install import-linter (a dev dependency)")
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    assert "4 kept, 0 broken" in out


def test_the_contracts_name_every_sub_package():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    named = {name.strip().rpartition(".")[2] for layer in layers for name in layer.split("|")}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == named, f"sub-packages outside the layers contract: {sorted(packages - named)}"


def test_the_package_root_holds_few_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= 6, loose


def test_no_module_is_far_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_no_module_imports_a_private_name_from_another_package():
    found = []
    for path in PACKAGE.rglob("*.py"):
        package = ".".join(path.relative_to(ROOT).parts[:2])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("spokes_lightning"):
                other = ".".join(node.module.split(".")[:2])
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if other != package and private:
                    found.append(f"{path.relative_to(ROOT)}: {node.module} {private}")
    assert not found, found


def test_the_accelerate_and_trainer_paths_import_no_lightning():
    """Accelerate and ``transformers.Trainer`` users need no Lightning: a forbidden contract says so for
    those paths (the feature modules, the online core and the shared training step they run on), with
    every function-level import counted; test_import_contracts_are_kept runs it."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    no_lightning = [c for c in contracts if c["type"] == "forbidden" and "lightning" in c["forbidden_modules"]]
    assert len(no_lightning) == 1 and "pytorch_lightning" in no_lightning[0]["forbidden_modules"]
    assert set(no_lightning[0]["source_modules"]) >= {
        "spokes_lightning.integrations.accelerate", "spokes_lightning.integrations.hf_trainer",
        "spokes_lightning.integrations.online_hf_trainer", "spokes_lightning.features.gradients",
        "spokes_lightning.online", "spokes_lightning.models.llama"}
