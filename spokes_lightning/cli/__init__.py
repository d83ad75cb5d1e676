"""Entry points: `spokes` (:mod:`.spokes`) and `spokes-run` / `launch/run.py` (:mod:`.run`). The top layer."""
