"""Entry point in a source checkout: the same command as the installed ``spokes-run``.

    python launch/run.py                                   # dataset=demo method=all (offline, shipped data)
    python launch/run.py recipe=dclm_spokes                # the paper's DCLM setting (needs the hub or local copies)
    python launch/run.py dataset=fineweb method=semdedup   # any dataset x method(s) pick, no recipe file needed
    python launch/run.py -m dataset=demo method=random,spokes   # one run and run_dir per combination
    python launch/run.py recipe=demo selection.budget=0.3 stages=[corpus,tokenizer,proxy,features,select]

See spokes_lightning/cli/run.py (``spokes-run --help``).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without an install too

from spokes_lightning.cli.run import compose, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
