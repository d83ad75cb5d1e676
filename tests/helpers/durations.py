"""Seconds per test module, for ordering the suite longest first (tests/conftest.py).

``make test`` runs the modules longest first, so both pytest-xdist workers start on the long ones
and the short ones fill in at the end; without it, one worker ends up alone on a long module.
Refresh the figures after adding slow tests:

    .venv/bin/python -m pytest -n 2 --dist loadgroup --no-loadscope-reorder tests --junitxml=/tmp/junit.xml
    .venv/bin/python tests/helpers/durations.py /tmp/junit.xml      # writes tests/durations.json
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILE = ROOT / "tests" / "durations.json"


def module_seconds(junit_xml: str | Path) -> dict[str, float]:
    """{"tests/pkg/test_x.py": seconds (setup + call + teardown of its tests)} from a JUnit report."""
    total: Counter = Counter()
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        parts = case.attrib["classname"].split(".")  # tests.pkg.test_x[.TestClass]
        module = next((m for n in range(len(parts), 0, -1) if (ROOT / (m := "/".join(parts[:n]) + ".py")).exists()),
                      None)
        if module is not None:
            total[module] += float(case.attrib["time"])
    return {module: round(seconds, 1) for module, seconds in sorted(total.items())}


def load() -> dict[str, float]:
    return json.loads(FILE.read_text()) if FILE.exists() else {}


if __name__ == "__main__":
    FILE.write_text(json.dumps(module_seconds(sys.argv[1]), indent=1) + "\n")
    print(f"wrote {FILE}")
