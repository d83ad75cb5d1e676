"""Family ``quad_reference``: Quad's projected reference direction (``features/kfac.py``).

Runs only when a method of ``selection.methods`` uses the ``quad`` selector (otherwise
``settings`` is ``{}``, so runs without Quad keep their cache keys). For each distinct
``extra`` name among those methods' specs (default ``quad_reference``) it computes
``sketch((H + lambda I)^-1 grad L(D_r))`` with the run's proxy and EXACTLY the gradient
family's sketch (same layers, projection, k, max_length and primary seed), and hands it on as
``extras.<extra>`` = ``{"array": "features/<extra>.npy"}`` (a k-vector; the select stage gives
it to the selector as ``inputs.extras[<extra>]``).

Its settings are the quad specs' parameters ``reference`` (a .jsonl/.jsonl.gz file; default
the shipped 500-item LAMBADA slice ``data/demo/reference/lambada_openai.jsonl.gz``; a record's
``text``, else ``context + " " + continuation``), ``reference_documents`` (the first N items),
``hessian`` (kfac | none), ``damping``, ``damping_split``, ``qkv``, ``max_factor_dim`` and
``kfac_documents`` (pool documents for the K-FAC factors, a seeded sample). Two quad specs
with the same ``extra`` and different settings are an error (give one an ``extra`` of its own,
e.g. ``quad_plain: {selector: quad, hessian: none, extra: quad_reference_plain}``).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from spokes_lightning.utils.errors import UserError
from spokes_lightning.pipeline.feature_registry import FeatureFamily, register

INFO_KEY = "quad_reference_info"


def quad_methods(cfg) -> dict[str, dict]:
    """``{method: spec}`` of the configured methods whose selector is ``quad``."""
    from omegaconf import OmegaConf

    from spokes_lightning.pipeline.stage import to_plain

    selection = cfg.get("selection") if hasattr(cfg, "get") else None
    if selection is None or OmegaConf.is_missing(selection, "methods") or selection.get("methods") is None:
        return {}
    specs = to_plain(selection.get("specs")) or {}
    out = {}
    for method in selection.methods:
        spec = specs.get(str(method))
        if isinstance(spec, dict) and spec.get("selector") == "quad":
            out[str(method)] = dict(spec)
    return out


def reference_settings(cfg) -> dict[str, dict]:
    """``{extra name: the settings that shape it}`` over the quad methods (validated, defaults filled)."""
    from spokes_lightning.selectors.quad import REFERENCE_PARAMS, QuadSelector

    out: dict[str, dict] = {}
    owner: dict[str, str] = {}
    for method, spec in quad_methods(cfg).items():
        params = QuadSelector(**{k: v for k, v in spec.items() if k != "selector"}).params
        settings = {key: params[key] for key in REFERENCE_PARAMS}
        extra = params["extra"]
        if extra in out and out[extra] != settings:
            raise UserError(f"quad methods '{owner[extra]}' and '{method}' share extra '{extra}' with different "
                            f"reference settings; give one its own extra=NAME")
        out.setdefault(extra, settings)
        owner.setdefault(extra, method)
    return out


def read_reference(path: str, limit: int) -> list[str]:
    """The first ``limit`` texts of a reference file (``text``, else ``context + " " + continuation``)."""
    from spokes_lightning.utils.resources import shipped_data_path

    resolved = Path(shipped_data_path(path)).expanduser()
    if not resolved.is_file():
        raise UserError(f"Quad reference set not found: {path} (the quad spec parameter 'reference')")
    opener = gzip.open if resolved.name.endswith(".gz") else open
    texts = []
    with opener(resolved, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"Quad reference set {path}: line {n} is not JSON") from None
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                texts.append(row["text"])
            elif isinstance(row, dict) and isinstance(row.get("context"), str):
                texts.append(f"{row['context']} {row.get('continuation', '')}".rstrip())
            else:
                raise UserError(f"Quad reference set {path}: line {n} has neither 'text' nor 'context'")
            if len(texts) >= limit:
                break
    if not texts:
        raise UserError(f"Quad reference set {path} is empty")
    return texts


def factor_texts(docs, count: int, seed: int) -> list[str]:
    """A seeded sample of ``count`` non-empty pool texts for the K-FAC factors (pool order kept)."""
    texts = [d.text for d in docs if d.text and d.text.strip()]
    if len(texts) <= count:
        return texts
    rows = np.sort(np.random.default_rng(seed).choice(len(texts), size=count, replace=False))
    return [texts[i] for i in rows]


@register
class QuadReference(FeatureFamily):
    name = "quad_reference"
    computes = "Quad's K-FAC-preconditioned reference gradient, sketched like the gradient features"
    order = 150
    reads = ("gradients",)  # the gradient family's proxy and sketch

    def settings(self, cfg) -> dict:
        groups = reference_settings(cfg)
        return {"quad_reference": groups} if groups else {}

    def enabled(self, cfg) -> bool:
        return bool(quad_methods(cfg))

    def check(self, cfg) -> None:
        """Every quad method's reference set is readable, and the gradients are computed here, not
        imported (one line before any work otherwise)."""
        from spokes_lightning.pipeline.import_store import configured_store

        path = configured_store(cfg.features.gradients)
        quad = sorted(quad_methods(cfg))
        if quad and path is not None:
            raise UserError(f"method {quad[0]} sketches its reference direction with the proxy exactly as the "
                            f"gradient features were sketched; it cannot be used with features.gradients.store={path}")
        for settings in reference_settings(cfg).values():
            read_reference(settings["reference"], 1)

    def run(self, ctx) -> dict:
        import torch

        from spokes_lightning.utils.atomic import save_npy_atomic
        from spokes_lightning.pipeline.data_stages import pool_documents
        from spokes_lightning.pipeline.stage import log
        from spokes_lightning.features.kfac import reference_direction
        from spokes_lightning.pipeline.families.gradients import Gradients

        cfg = ctx.cfg
        seed = int(cfg.seed)
        module = Gradients().module(ctx, [seed])  # the gradient family's proxy and primary sketch
        module.to("cuda" if torch.cuda.is_available() else "cpu")
        docs = pool_documents(ctx)
        out: dict = {}
        info: dict = {}
        for extra, s in reference_settings(cfg).items():
            vector, record = reference_direction(
                module, read_reference(s["reference"], s["reference_documents"]),
                factor_texts(docs, s["kfac_documents"], seed) if s["hessian"] == "kfac" else (),
                hessian=s["hessian"], damping=s["damping"], damping_split=s["damping_split"], qkv=s["qkv"],
                max_factor_dim=s["max_factor_dim"], batch_size=int(cfg.features.batch_size))
            rel = f"features/{extra}.npy"
            save_npy_atomic(ctx.path(*rel.split("/")), vector)
            out[f"extras.{extra}"] = {"array": rel}
            info[extra] = {"reference": s["reference"], **record}
            log(f"features: {extra}: hessian {s['hessian']}, {record['reference_documents']} reference documents"
                + (f", K-FAC on {record['factor_documents']} pool documents" if s["hessian"] == "kfac" else "")
                + f", |u| {record['norm']:.3g}")
        out[INFO_KEY] = info
        return out

    def handed_on(self, outputs) -> list[str]:
        return [outputs.extras[extra].array for extra in outputs.quad_reference_info or {}
                if extra in outputs.extras]
