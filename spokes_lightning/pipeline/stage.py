"""Stages and the runner: cached, resumable, timed.

A stage declares the config keys that determine its outputs (:meth:`Stage.settings`) and does
its work in :meth:`Stage.run`, returning a JSON-able dict of outputs (paths relative to
run_dir). The runner hashes the settings together with the keys of every upstream stage; a
stage whose marker ``<run_dir>/stages/<name>.json`` holds the same key is skipped with a log
line. Stages resume inside themselves too (feature chunks, per-method pretraining).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..atomic import write_json_atomic
from ..errors import UserError


def log(message: str) -> None:
    print(f"[spokes] {message}", file=sys.stderr, flush=True)


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    results: dict[str, dict] = field(default_factory=dict)  # stage name -> its outputs
    cache: dict[str, Any] = field(default_factory=dict)  # in-process objects (documents, ...)

    def path(self, *parts: str) -> Path:
        p = self.run_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def rel(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.run_dir.resolve()))

    def output(self, stage: str) -> dict:
        if stage not in self.results:
            raise UserError(f"stage '{stage}' has not run in {self.run_dir}: add it to stages=[...]")
        return self.results[stage]


class Stage:
    name: str = ""
    #: stages whose outputs this one reads
    needs: tuple[str, ...] = ()

    def settings(self, cfg: DictConfig) -> Any:
        """The part of the config that determines this stage's outputs."""
        return {}

    def run(self, ctx: RunContext) -> dict:
        raise NotImplementedError


def _key(settings: Any, upstream: list[str]) -> str:
    blob = json.dumps({"settings": settings, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def to_plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_list(node) else node


def run_pipeline(stages: list[Stage], cfg: DictConfig, selected: list[str] | None = None) -> RunContext:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(cfg=cfg, run_dir=run_dir)
    keys: dict[str, str] = {}
    seconds: dict[str, float] = {}
    names = [s.name for s in stages]
    for name in selected or []:
        if name not in names:
            raise UserError(f"unknown stage '{name}'; stages are: {', '.join(names)}")
    for stage in stages:
        upstream = [keys.get(n, "") for n in stage.needs]
        key = _key(to_plain(stage.settings(cfg)), upstream)
        keys[stage.name] = key
        marker = run_dir / "stages" / f"{stage.name}.json"
        old = json.loads(marker.read_text()) if marker.exists() else None
        wanted = selected is None or stage.name in selected
        if old is not None and old.get("key") == key:
            ctx.results[stage.name] = old["outputs"]
            seconds[stage.name] = old["seconds"]
            if wanted:
                log(f"{stage.name}: cached ({old['seconds']:.1f} s when it ran), skipping")
            continue
        if not wanted:
            continue
        log(f"{stage.name}: running")
        t = time.perf_counter()
        outputs = stage.run(ctx)
        seconds[stage.name] = time.perf_counter() - t
        ctx.results[stage.name] = outputs
        write_json_atomic(marker, {"key": key, "seconds": seconds[stage.name], "outputs": outputs})
        log(f"{stage.name}: done in {seconds[stage.name]:.1f} s")
    ctx.cache["stage_seconds"] = seconds
    return ctx
