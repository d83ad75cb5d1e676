"""``spokes-run``: compose a Hydra configuration and run the pipeline's stages.

    spokes-run                                        # dataset=demo method=all (offline, shipped data)
    spokes-run dataset=fineweb method=semdedup        # any dataset (recipes/dataset/) x method(s) (recipes/method/)
    spokes-run recipe=dclm_spokes                     # a named pick of the two (recipes/recipe/)
    spokes-run -m dataset=demo method=random,spokes   # multirun: one run, in its own run_dir, per combination
    spokes-run recipe=demo selection.budget=0.3 stages=[corpus,tokenizer,proxy,features,select]
    spokes-run --cfg method=spokes                    # print the composed configuration(s); run nothing

In a source checkout ``python launch/run.py ...`` is the same command. A run is named (recipe_name,
and so run_dir=runs/<name>) by its recipe, else <dataset> for method=all and <dataset>_<method>
otherwise. Every combination of a multirun is composed and checked before the first one runs;
combinations that would share a run_dir get a sub-folder named by their swept values.
"""
from __future__ import annotations

import itertools
import sys

from spokes_lightning.utils.errors import UserError, user_errors_exit
from spokes_lightning.utils.resources import shipped_data_path, shipped_dir

#: the config groups a run picks (recipes/<group>/<option>.yaml)
GROUPS = ("dataset", "method", "online", "recipe")
MULTIRUN_FLAGS = ("-m", "--multirun")


def run_name(choices: dict) -> str:
    """<dataset> for method=all, else <dataset>_<method>; <dataset>_online with an online comparison."""
    dataset, method = choices.get("dataset"), choices.get("method")
    if choices.get("online"):
        return f"{dataset or 'run'}_online"
    if method in (None, "all"):
        return dataset or "run"
    return f"{dataset}_{method}" if dataset else str(method)


def _first_line(exc: Exception) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def compose(overrides: list[str]):
    """The configuration for ``overrides``; a bad override, group option or key raises one line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(shipped_dir("recipes")), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    except MissingConfigException as exc:
        options = f"; options: {', '.join(sorted(exc.options))}" if getattr(exc, "options", None) else ""
        raise UserError(f"bad configuration: {_first_line(exc)}{options}") from None
    except (HydraException, OmegaConfBaseException, ValueError, TypeError, KeyError, IndexError) as exc:
        line, text = _first_line(exc), str(exc)
        if "not in struct" in str(exc.__cause__):  # an unknown key
            add = next((x.strip() for x in text.splitlines() if "+" in x), "")
            line = f"{line.rstrip('.')}: no such key" + (f" ({add[0].lower()}{add[1:]})" if add else "")
        elif "multirun" in text.lower():
            line += " (add -m to run each value)"
        raise UserError(f"bad configuration: {line}") from None
    choices = {g: cfg.hydra.runtime.choices.get(g) for g in GROUPS}
    with open_dict(cfg):
        del cfg["hydra"]
    if OmegaConf.is_missing(cfg, "recipe_name"):
        cfg.recipe_name = run_name(choices)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"bad configuration: no value for {', '.join(missing)} (pick a method=... / set it)")
    if cfg.data.paths:
        cfg.data.paths = [shipped_data_path(str(p)) for p in cfg.data.paths]
    return cfg


def combinations(overrides: list[str]) -> list[list[str]]:
    """Every combination of the sweeps in ``overrides`` (``a=x,y``, ``choice``, ``range``, ``glob``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise UserError(f"bad override: {_first_line(exc)}") from None
    axes = []
    for o in parsed:
        if not o.is_sweep_override():
            axes.append([o.input_line])
            continue
        key = o.get_key_element()
        if o.value_type.name == "GLOB_CHOICE_SWEEP":
            group = key.lstrip("+~")
            if group not in GROUPS:
                raise UserError(f"bad override {o.input_line}: glob(...) sweeps only the groups {', '.join(GROUPS)}")
            values = o.value().filter(sorted(p.stem for p in (shipped_dir("recipes") / group).glob("*.yaml")))
        elif o.is_discrete_sweep():
            values = list(o.sweep_string_iterator())
        else:
            raise UserError(f"bad override {o.input_line}: only lists, choice(...), range(...) and glob(...) sweep")
        if not values:
            raise UserError(f"bad override {o.input_line}: sweeps no values")
        axes.append([f"{key}={v}" for v in values])
    return [list(c) for c in itertools.product(*axes)]


def _swept_suffix(combo: list[str], swept: set[int]) -> str:
    return ",".join(combo[i].replace("/", "_") for i in sorted(swept))


def compose_multirun(overrides: list[str]) -> list[tuple[list[str], object]]:
    """(overrides, config) per combination; each gets its own run_dir."""
    combos = combinations(overrides)
    swept = {i for i in range(len(overrides)) if len({c[i] for c in combos}) > 1} if combos else set()
    runs = [(c, compose(c)) for c in combos]
    by_dir: dict[str, int] = {}
    for _, cfg in runs:
        by_dir[str(cfg.run_dir)] = by_dir.get(str(cfg.run_dir), 0) + 1
    for combo, cfg in runs:
        if by_dir[str(cfg.run_dir)] > 1:  # e.g. -m selection.budget=0.3,0.5: the name alone is not enough
            cfg.run_dir = f"{cfg.run_dir}/{_swept_suffix(combo, swept)}"
    return runs


def _parse_flags(argv: list[str]) -> tuple[set[str], list[str]]:
    flags, overrides = set(), []
    for a in argv:
        if a in MULTIRUN_FLAGS:
            flags.add("multirun")
        elif a in ("-h", "--help"):
            flags.add("help")
        elif a == "--cfg":
            flags.add("cfg")
        elif a.startswith("-"):
            raise UserError(f"unknown option {a}; options: -m/--multirun, --cfg, -h/--help (the rest are key=value)")
        else:
            overrides.append(a)
    return flags, overrides


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with user_errors_exit():
        flags, overrides = _parse_flags(argv)
        if "help" in flags:
            print(__doc__)
            return 0
        runs = compose_multirun(overrides) if "multirun" in flags else [(overrides, compose(overrides))]
        if "cfg" in flags:
            from omegaconf import OmegaConf

            for combo, cfg in runs:
                if len(runs) > 1:
                    print(f"# {' '.join(combo)}")
                print(OmegaConf.to_yaml(cfg), end="")
            return 0
        from spokes_lightning.data.ranks import init_from_environment
        from spokes_lightning.core.distributed import world
        from spokes_lightning.pipeline.cluster_launch import write_launch_scripts
        from spokes_lightning.pipeline.stages import check_config
        from spokes_lightning.pipeline.stage import log
        from spokes_lightning.pipeline.stages import STAGES, run_and_report

        init_from_environment()  # under torchrun: one process group for every stage (gloo; NCCL for GPUs in Lightning)

        for _, cfg in runs:  # every combination is checked before any heavy work
            check_config(cfg)
        for i, (combo, cfg) in enumerate(runs, 1):
            if len(runs) > 1 or "multirun" in flags:
                log(f"multirun {i}/{len(runs)}: {' '.join(combo) or '(defaults)'} -> {cfg.run_dir}")
            if world()[0] == 0:
                pinned = [o for o in combo if not o.startswith("run_dir=")] + [f"run_dir={cfg.run_dir}"]
                write_launch_scripts(cfg.run_dir, pinned, cfg.cluster)
            run_and_report(STAGES, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
