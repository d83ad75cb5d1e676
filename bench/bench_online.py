"""Random vs static SPOKES vs online SPOKES on the demo corpus, at the same token budget.

    python bench/bench_online.py [--run-dir runs/demo_online] [--keep] [--out table.md] [-- overrides...]

Runs ``launch/run.py recipe=demo_online`` (stages corpus .. select are cached in the run
directory; the three arms are retrained unless ``--keep``, so their wall times are measured in
this run, one after another, with nothing else running), then prints the stage's comparison
table and, per reselection of the online arm, what the time went to:

* ``sketch``: the forward + backward of the window (and, at the first reselection, of the two
  fallback segments) through the model being trained, plus the projections;
* ``choose``: the greedy picks on the d x d Gram (one eigh per block).

"overhead" = reselection seconds / (fit seconds - reselection seconds): the share reselection adds
to training. The goal in issue 14 is <= 25% on CPU at the demo size.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/demo_online")
    ap.add_argument("--keep", action="store_true", help="reuse trained arms (no fresh timings)")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    if not args.keep:
        for arm in ("random", "static", "online"):
            shutil.rmtree(run_dir / "online" / arm, ignore_errors=True)
        (run_dir / "stages" / "online.json").unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "launch" / "run.py"), "recipe=demo_online", f"run_dir={run_dir}",
           *args.overrides]
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode:
        sys.exit(proc.returncode)
    table = (run_dir / "online" / "comparison.md").read_text()
    summary = json.loads((run_dir / "online" / "comparison.json").read_text())
    lines = ["## Online reselection (bench/bench_online.py)", "", table]
    online = summary.get("online")
    if online:
        lines += ["", "| online reselection at step | picks | sketch s | choose s |", "|---|---|---|---|"]
        record = json.loads((run_dir / "online" / "online" / "result.json").read_text())
        for r in record["segments"]:
            if r["planned_at_step"] > 0:
                lines.append(f"| {r['planned_at_step']} | {r['n_picks']} | {r['sketch_seconds']:.2f} | "
                             f"{r['seconds'] - r['sketch_seconds']:.2f} |")
        share = online["sketch_seconds"] / max(online["reselect_seconds"], 1e-9)
        lines += ["", f"online: reselection {online['reselect_seconds']:.1f} s of {online['fit_seconds']:.1f} s fit "
                  f"({100 * online['overhead_share']:.1f}% over the rest of training); sketching is "
                  f"{100 * share:.0f}% of it"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
