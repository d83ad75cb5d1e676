"""Launch ``tests/scripts/spokes_sharded.py``: several SPOKES runs on 1 and on 2 gloo ranks, one
process group per world size for all of them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def run_on_one_and_two_ranks(jobs: dict[str, dict], folder: Path) -> dict[str, dict[int, dict]]:
    """``{name: {world: result arrays}}`` for each job (keys of :mod:`spokes_sharded`, no ``out``)."""
    results: dict[str, dict[int, dict]] = {name: {} for name in jobs}
    for world in (1, 2):
        listed = [{**job, "out": str(folder / f"{name}.w{world}.npz")} for name, job in jobs.items()]
        spec = folder / f"jobs.w{world}.json"
        spec.write_text(json.dumps(listed))
        subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "spokes_sharded.py"), str(spec), str(world)],
                       check=True, timeout=300, cwd=ROOT)
        for name in jobs:
            with np.load(folder / f"{name}.w{world}.npz") as arrays:
                results[name][world] = {key: arrays[key] for key in arrays.files}
    return results
