"""Issue 21: the docs site builds strictly, every example in README.md and docs/ runs as written
(tests/helpers/docs_examples.py says how), and nothing in the project points outside it."""
from __future__ import annotations

import subprocess
import sys

import pytest

from docs_examples import ROOT, blocks, no_run_marks_without_reason, pages, run_page, syntax_error

PAGES = pages()
RUNNABLE = [p for p in PAGES if any(b.no_run is None for b in blocks(p))]


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists()


def test_every_page_is_in_the_nav():
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def files(entry):
        if isinstance(entry, str):
            yield entry
        elif isinstance(entry, list):
            for e in entry:
                yield from files(e)
        elif isinstance(entry, dict):
            for v in entry.values():
                yield from files(v)

    listed = set(files(nav))
    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk == listed


def test_readme_is_one_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)


def test_nothing_points_outside_the_project():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    bad = []
    for name in tracked:
        if name.startswith("tests/") or name.endswith((".arrow", ".npy", ".gz", ".png", ".parquet")):
            continue
        path = ROOT / name
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if "../shared" in line or "/work/" in line:
                bad.append(f"{name}:{n}: {line.strip()[:100]}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_are_well_formed(page):
    assert not no_run_marks_without_reason(page)
    problems = [e for b in blocks(page) if (e := syntax_error(b))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run_as_written(page, tiny_run, tmp_path):
    run_dir = tiny_run[0]
    results = run_page(page, run_dir.parent / "pristine", tmp_path / "sandbox")
    failed = [out for _, ok, out, _ in results if not ok]
    assert not failed, "\n\n".join(failed)
