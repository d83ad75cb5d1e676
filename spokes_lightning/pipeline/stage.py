"""Stages and the runner: cached, resumable, timed.

A stage declares the config keys that determine its outputs (:meth:`Stage.settings`) and does
its work in :meth:`Stage.run`, returning its typed output (:mod:`.outputs`; paths relative to
run_dir), which later stages read with ``ctx.output(SomeOutput)``. The runner hashes the settings together with the keys of every upstream stage; a
stage whose marker ``<run_dir>/stages/<name>.json`` holds the same key, and whose recorded output
files are intact (:mod:`.output_check`), is skipped with a log line. Stages resume inside
themselves too (feature chunks, per-method pretraining).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from spokes_lightning.utils.atomic import json_round_trip, write_json_atomic
from spokes_lightning.utils.errors import UserError
from spokes_lightning.utils.output_check import first_problem, record_outputs, remove_outputs
from spokes_lightning.utils.settings_hash import settings_hash
from spokes_lightning.pipeline.outputs import OutputFormatError, StageOutput

O = TypeVar("O", bound=StageOutput)


def log(message: str) -> None:
    """One ``[spokes]`` line on stderr (rank 0 alone under a process group)."""
    from spokes_lightning.core.distributed import world

    if world()[0] == 0:
        print(f"[spokes] {message}", file=sys.stderr, flush=True)


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    results: dict[str, StageOutput] = field(default_factory=dict)  # stage name -> its outputs
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time of every stage so far
    # objects read once per process from the stages' files (see data_stages / select_stage)
    documents: dict[str, list] = field(default_factory=dict)  # "pool" / "validation" -> Documents
    selection_pool: Any = None  # spokes_lightning.selection.pool.SelectionPool
    keys: dict[str, str] = field(default_factory=dict)  # stage name -> its cache key in this run
    ran: list[str] = field(default_factory=list)  # stages run by this process
    cached: list[str] = field(default_factory=list)  # stages taken from run_dir
    unusable: dict[str, str] = field(default_factory=dict)  # stage -> why its cached outputs cannot be used

    def path(self, *parts: str) -> Path:
        p = self.run_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def rel(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.run_dir.resolve()))

    def output(self, kind: type[O]) -> O:
        """What the stage making ``kind`` handed on (one line if it has not run or cannot be used)."""
        stage = kind.stage
        if stage not in self.results:
            if stage in self.unusable:
                raise UserError(f"stage '{stage}' in {self.run_dir} cannot be used: {self.unusable[stage]}; "
                                f"add {stage} to stages=[...] to make it again")
            raise UserError(f"stage '{stage}' has not run in {self.run_dir}: add it to stages=[...]")
        out = self.results[stage]
        assert isinstance(out, kind), f"stage '{stage}' handed on {type(out).__name__}, not {kind.__name__}"
        return out

    def optional(self, kind: type[O]) -> O | None:
        """Like :meth:`output`, or None when that stage is not part of this run."""
        return self.output(kind) if kind.stage in self.results else None


class Stage:
    name: str = ""
    #: stages whose outputs this one reads
    needs: tuple[str, ...] = ()
    #: names of handed-on files that record timings: checked for damage, but a change in them
    #: alone does not make dependants run again
    volatile: tuple[str, ...] = ()
    #: under a process group (``torchrun``): True = every rank runs the stage, each on its shard
    #: (corpus, features, select, export); False = rank 0 runs it while the others wait
    all_ranks: bool = False
    #: what :meth:`run` returns and later stages read
    output_type: type[StageOutput] = StageOutput

    def settings(self, cfg: DictConfig) -> Any:
        """The part of the config that determines this stage's outputs."""
        return {}

    def check(self, cfg: DictConfig) -> None:
        """Preflight: raise a one-line :class:`UserError` for a bad setting of this stage, before any
        stage runs (cheap: no model, no corpus pass). Run for every stage by
        :func:`spokes_lightning.pipeline.stages.check_config`."""

    def run(self, ctx: RunContext) -> StageOutput:
        raise NotImplementedError

    def handed_on(self, outputs: Any) -> list[str]:
        """Paths (relative to run_dir; a directory means all its files) that later stages read."""
        return []

    def outdated(self, cfg: DictConfig, run_dir: Path, outputs: Any) -> str | None:
        """Why cached outputs written by an older version cannot serve ``cfg`` (None: they can)."""
        return None


def _key(settings: Any, upstream: list[str]) -> str:
    return settings_hash({"settings": settings, "upstream": upstream})


def to_plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_list(node) else node


def read_marker(path: Path, output_type: type[StageOutput] = StageOutput) -> dict | None:
    """A stage's marker with its ``outputs`` read as ``output_type``, or None when there is none or
    it cannot be read (the stage then runs)."""
    if not path.exists():
        return None
    why = "is unreadable"
    try:
        marker = json.loads(path.read_text())
        if isinstance(marker, dict) and {"key", "seconds", "outputs"} <= set(marker):
            if output_type is not StageOutput:
                marker["outputs"] = output_type.from_json(marker["outputs"])
            return marker
    except OutputFormatError as err:
        why = f"holds outputs this version cannot read ({err})"
    except (OSError, ValueError):
        pass
    log(f"{path.stem}: marker {path} {why}; the stage will run again")
    return None


def read_stage_output(run_dir: Path | str, kind: type[O]) -> O:
    """What the stage making ``kind`` handed on in ``run_dir`` (its marker), typed; one line if none."""
    path = Path(run_dir) / "stages" / f"{kind.stage}.json"
    marker = read_marker(path, kind)
    if marker is None:
        raise UserError(f"no usable {kind.stage} stage in {run_dir} ({path} is missing or unreadable)")
    return marker["outputs"]


STALE = "was made from an earlier version of"


def reuse_problem(stage: Stage, cfg: DictConfig, marker: dict, run_dir: Path, superseded: set[str]) -> str | None:
    """Why a marker with the right key cannot be used as it is (None: it can)."""
    stale = [n for n in stage.needs if n in superseded]
    if stale:
        return f"{STALE} {', '.join(stale)}"
    problem = first_problem(run_dir, marker.get("files", {}))
    if problem is not None:
        return f"cached output {problem}"
    return stage.outdated(cfg, run_dir, marker["outputs"])


def _content(files: dict | None, stage: Stage) -> dict | None:
    return None if files is None else {k: v for k, v in files.items() if Path(k).name not in stage.volatile}


def _follow_rank_zero(ctx: RunContext, stage: Stage, marker_path: Path, key: str, old: dict | None,
                      superseded: set[str]) -> None:
    """A rank > 0 takes a stage's outputs from the marker rank 0 just wrote (the same bookkeeping)."""
    marker = read_marker(marker_path, stage.output_type)
    if marker is None or marker["key"] != key:
        raise UserError(f"{stage.name}: rank 0 did not finish the stage (see its log)")
    ctx.results[stage.name] = marker["outputs"]
    ctx.stage_seconds[stage.name] = marker["seconds"]
    if old is not None and _content(old.get("files"), stage) != _content(marker.get("files"), stage):
        superseded.add(stage.name)
    ctx.ran.append(stage.name)


def run_pipeline(stages: list[Stage], cfg: DictConfig, selected: list[str] | None = None) -> RunContext:
    """Run (or take from run_dir) every stage; ``selected`` limits what may run.

    A cached stage is used only when its recorded output files are intact; otherwise it runs
    again (or, outside ``selected``, it is marked unusable). A stage made again under an
    unchanged key whose outputs came out different makes its dependants run again too.
    """
    from spokes_lightning.data.ranks import barrier
    from spokes_lightning.core.distributed import world

    rank, world_size = world()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(cfg=cfg, run_dir=run_dir)
    seconds = ctx.stage_seconds
    names = [s.name for s in stages]
    for name in selected or []:
        if name not in names:
            raise UserError(f"unknown stage '{name}'; stages are: {', '.join(names)}")
    superseded: set[str] = set()  # stages whose outputs differ from what their dependants were made from
    for stage in stages:
        barrier()  # every rank sees the markers rank 0 has written so far
        key = _key(to_plain(stage.settings(cfg)), [ctx.keys.get(n, "") for n in stage.needs])
        ctx.keys[stage.name] = key
        marker_path = run_dir / "stages" / f"{stage.name}.json"
        old = read_marker(marker_path, stage.output_type)
        wanted = selected is None or stage.name in selected
        same_key = old is not None and old["key"] == key
        problem = reuse_problem(stage, cfg, old, run_dir, superseded) if same_key else None
        if same_key and problem is None:
            ctx.results[stage.name] = old["outputs"]
            seconds[stage.name] = old["seconds"]
            ctx.cached.append(stage.name)
            if wanted:
                log(f"{stage.name}: cached ({old['seconds']:.1f} s when it ran), skipping")
            continue
        if not wanted:
            if problem:
                ctx.unusable[stage.name] = problem
                log(f"{stage.name}: {problem}; not made again here (it is not in stages=[...])")
                if problem.startswith(STALE):
                    superseded.add(stage.name)
            continue
        if problem and rank == 0:
            log(f"{stage.name}: {problem}; making it again")
            remove_outputs(run_dir, old.get("files", {}))
        barrier()
        if world_size > 1 and not stage.all_ranks and rank != 0:
            barrier()  # rank 0 runs the stage and writes its marker
            _follow_rank_zero(ctx, stage, marker_path, key, old if same_key else None, superseded)
            continue
        log(f"{stage.name}: running" + (f" on {world_size} ranks" if world_size > 1 and stage.all_ranks else ""))
        t = time.perf_counter()
        made = stage.run(ctx)
        if not isinstance(made, stage.output_type):
            raise TypeError(f"stage {stage.name} returned {type(made).__name__}, not {stage.output_type.__name__}")
        # the same values whether used now or read back later
        outputs = stage.output_type.from_json(json_round_trip(made.to_json()))
        seconds[stage.name] = time.perf_counter() - t
        ctx.results[stage.name] = outputs
        if rank != 0:
            barrier()  # rank 0 records the outputs and writes the marker
            _follow_rank_zero(ctx, stage, marker_path, key, old if same_key else None, superseded)
            continue
        files = record_outputs(run_dir, stage.handed_on(outputs))
        if same_key and _content(old.get("files"), stage) != _content(files, stage):
            superseded.add(stage.name)
        write_json_atomic(marker_path, {"key": key, "seconds": seconds[stage.name], "outputs": outputs.to_json(),
                                        "files": files})
        if world_size > 1:
            barrier()
        ctx.ran.append(stage.name)
        log(f"{stage.name}: done in {seconds[stage.name]:.1f} s")
    return ctx
