"""What the wheel holds (pyproject.toml has the rest of the metadata).

All packages under spokes_lightning/, plus three top-level folders of the checkout mapped into it:

* ``callbacks/``  -> ``spokes_lightning.callbacks`` (no global ``callbacks`` package is installed)
* ``recipes/``    -> ``spokes_lightning.recipes``   (the Hydra configs ``spokes-run`` composes)
* ``data/demo/``  -> ``spokes_lightning.demo_data`` (the shipped demo corpus and eval tasks)

:mod:`spokes_lightning.utils.resources` finds the last two in an installed package and in a checkout.
Every sub-folder of a data folder is a package of its own here, so setuptools ships its files
(and does not warn that it "would be ignored").
"""
from pathlib import Path

from setuptools import find_namespace_packages, setup

HERE = Path(__file__).resolve().parent
CODE = {"spokes_lightning.callbacks": "callbacks"}
#: package -> (checkout folder, the files of each of its folders that ship)
DATA = {
    "spokes_lightning.recipes": ("recipes", ["*.yaml"]),
    "spokes_lightning.demo_data": ("data/demo", ["README.md", "manifest.json", "*.jsonl.gz"]),
}

# namespace discovery: a code folder without an __init__.py still ships
packages = find_namespace_packages(include=["spokes_lightning", "spokes_lightning.*"],
                                   exclude=["*.__pycache__"]) + list(CODE)
package_dir = dict(CODE)
package_data = {"spokes_lightning.pipeline": ["paper_table2.json", "paper_figures.json"]}
for package, (folder, patterns) in DATA.items():
    package_dir[package] = folder
    for sub in [HERE / folder, *sorted(p for p in (HERE / folder).rglob("*") if p.is_dir())]:
        if "__pycache__" in sub.parts:
            continue
        name = ".".join([package, *sub.relative_to(HERE / folder).parts])
        packages.append(name)
        package_data[name] = patterns

setup(packages=packages, package_dir=package_dir, package_data=package_data)
