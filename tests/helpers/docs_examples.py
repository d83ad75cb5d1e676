"""Run the code blocks of README.md and docs/ as a user would, on a finished tiny run.

Conventions (docs/index.md says them to writers):

* Every fenced block tagged ``python`` or ``bash`` (also ``sh``, ``shell``) is an example and
  runs as written: python blocks as a script, bash blocks under ``bash -e -o pipefail``. Other
  tags (``yaml``, ``text``, ``console``, ...) are shown, not run.
* Each example runs in a sandbox whose working directory holds ``data/``, ``launch/`` and
  ``recipes/`` (links to the repository) and a copy of a finished test-size run at
  ``runs/demo`` (the layout of ``make demo``), with the interpreter's ``bin`` first on ``PATH``
  (``python``, ``spokes``). Examples of one page share one sandbox, in page order.
* ``python launch/run.py ...`` gets the test-size overrides (``tests/helpers/tiny_run.py``) inserted
  after ``launch/run.py``, so pages write the command a user types; the user's own overrides
  come later and win.
* ``<!-- example: no-run REASON -->`` on the line before a fence: the block is only checked
  for syntax (``compile`` / ``bash -n``), for what cannot run here (a cluster, a GPU, a hub).

Command line: ``python tests/helpers/docs_examples.py PAGE.md [...]`` runs the pages' examples and
prints one line per block (the sandbox and its tiny run are cached under ``/tmp/docs_sandbox``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN_LANGS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)")
_MARK = re.compile(r"^<!--\s*example:\s*no-run\b\s*(.*?)\s*-->\s*$")
_RUN_PY = re.compile(r"(\bpython3?\s+launch/run\.py)")
LINKED = ("data", "launch", "recipes")


@dataclass
class Block:
    page: str
    line: int  # the fence's line number (1-based)
    lang: str  # "python" or "bash"
    code: str
    no_run: str | None  # the reason, when the block is only syntax-checked

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The runnable blocks of a markdown file, with their no-run marks."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    page = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, tag = m.group(1), m.group(2).lower()
        start = i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        if tag not in RUN_LANGS:
            continue
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = _MARK.match(before)
        out.append(Block(page, start + 1, RUN_LANGS[tag], "\n".join(body) + "\n", mark.group(1) if mark else None))
    return out


def no_run_marks_without_reason(path: Path) -> list[str]:
    """``<!-- example: no-run -->`` lines that give no reason."""
    return [f"{path.name}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if _MARK.match(line.strip()) and not _MARK.match(line.strip()).group(1)]


def with_tiny_overrides(code: str) -> str:
    """Insert the test-size overrides after every ``python launch/run.py``."""
    from tiny_run import TINY

    return _RUN_PY.sub(lambda m: m.group(1) + " " + " ".join(f"'{o}'" for o in TINY), code)


def syntax_error(block: Block) -> str | None:
    if block.lang == "python":
        try:
            compile(block.code, block.where, "exec")
        except SyntaxError as exc:
            return f"{block.where}: python syntax error: {exc}"
        return None
    r = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
    return None if r.returncode == 0 else f"{block.where}: bash syntax error: {r.stderr.strip()}"


def make_sandbox(where: Path, run: Path) -> Path:
    """A fresh working directory: links to data/ launch/ recipes/, a copy of ``run`` at runs/demo."""
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    for name in LINKED:
        (where / name).symlink_to(ROOT / name)
    shutil.copytree(run, where / "runs" / "demo", symlinks=True)
    return where


def environment() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the example sees the installed package, as a user does
    return env


def run_block(block: Block, sandbox: Path, timeout: float = 600) -> tuple[bool, str, float]:
    """(passed, output tail, seconds) of one example in ``sandbox``."""
    problem = syntax_error(block)
    if problem or block.no_run is not None:
        return problem is None, problem or f"no-run: {block.no_run}", 0.0
    t = time.perf_counter()
    if block.lang == "python":
        script = sandbox / "_example.py"
        script.write_text(block.code)
        cmd = [sys.executable, str(script)]
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", with_tiny_overrides(block.code)]
    try:
        r = subprocess.run(cmd, cwd=sandbox, env=environment(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"{block.where}: timed out after {timeout:.0f} s", time.perf_counter() - t
    took = time.perf_counter() - t
    if r.returncode != 0:
        tail = (r.stdout[-1500:] + "\n" + r.stderr[-3000:]).strip()
        return False, f"{block.where}: exit {r.returncode}\n{tail}", took
    return True, "", took


def run_page(path: Path, run: Path, sandbox: Path) -> list[tuple[Block, bool, str, float]]:
    found = blocks(path)
    if not any(b.no_run is None for b in found):
        return [(b, *run_block(b, sandbox)) for b in found]
    make_sandbox(sandbox, run)
    return [(b, *run_block(b, sandbox)) for b in found]


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_run import build_tiny_run

    base = Path(os.environ.get("DOCS_SANDBOX", "/tmp/docs_sandbox"))
    pristine = base / "pristine"
    if not (pristine / "report.md").exists():
        print(f"building a tiny run in {base} (about a minute) ...", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)
        r = build_tiny_run(base / "run", pristine)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
    failed = 0
    for name in argv or [str(p) for p in pages()]:
        for block, ok, out, took in run_page(Path(name).resolve(), pristine, base / "sandbox"):
            status = "ok  " if ok else "FAIL"
            kind = "syntax only" if block.no_run is not None else f"{took:.1f} s"
            print(f"{status} {block.where} ({block.lang}, {kind})")
            if not ok:
                failed += 1
                print("     " + out.replace("\n", "\n     "))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
