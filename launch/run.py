"""Entry point: compose a Hydra recipe and run the pipeline's stages.

    python launch/run.py                          # recipe=demo (offline, shipped data)
    python launch/run.py recipe=dclm_spokes       # the paper's DCLM setting (needs the hub or local copies)
    python launch/run.py recipe=demo selection.budget=0.3 stages=[corpus,tokenizer,proxy,features,select]
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spokes_lightning.errors import UserError, user_errors_exit  # noqa: E402


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(f"bad configuration: {str(exc).splitlines()[0]}") from None


def main(argv: list[str]) -> int:
    with user_errors_exit():
        cfg = compose(argv)
        from spokes_lightning.pipeline.preflight import check_config
        from spokes_lightning.pipeline.stages import STAGES, run_and_report

        check_config(cfg)
        run_and_report(STAGES, cfg)
    return 0


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
