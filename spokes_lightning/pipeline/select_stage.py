"""Stage 4: run every configured selection method on one selection pool (the shared driver).

The selectable pool is the set of documents that have gradient features, embeddings and a
finite quality score (documents the proxy skipped, e.g. empty ones, are counted, not
selected); each document also brings its token count and its domain (``selection.domains``:
a record field, default ``source``, or k-means clusters of the embeddings). Budgets are in
documents or in tokens of the export tokenizer (paper section 4.3: SPOKES favours long
documents, so a token budget is the fair comparison). The work itself is
:func:`spokes_lightning.selection.driver.select_methods`; this stage only builds the pool from
the earlier stages' files and records what it wrote.
"""
from __future__ import annotations


import numpy as np

from spokes_lightning.utils.atomic import write_json_atomic
from spokes_lightning.utils.errors import UserError
from spokes_lightning.pipeline.feature_registry import pool_id_array, read_ids
from spokes_lightning.features.store import open_feature_store
from spokes_lightning.selection.budget import budget_to_count, parse_budget
from spokes_lightning.selection.driver import BUDGET_UNITS, Budget, check_spec, select_methods
from spokes_lightning.selection.pool import Lazy, SelectionPool
from spokes_lightning.selectors import load_plugins, selector_class
from spokes_lightning.selectors.spokes import SpokesSelector, alpha_sweep
from spokes_lightning.pipeline.data_stages import documents_by_ids, export_tokenizer, pool_documents, validation_documents
from spokes_lightning.pipeline.outputs import FeaturesOutput, SelectedMethod, SelectOutput, TokenizerOutput
from spokes_lightning.pipeline.stage import RunContext, Stage, log, to_plain


def selection_pool(ctx: RunContext) -> SelectionPool:
    """The pool of this run (built once per process from the features and tokenizer stages)."""
    if ctx.selection_pool is not None:
        return ctx.selection_pool
    feats = ctx.output(FeaturesOutput)
    grads = open_feature_store(ctx.run_dir / feats.gradients)
    emb = open_feature_store(ctx.run_dir / feats.embeddings)
    quality = np.load(ctx.run_dir / feats.quality)
    q_ids = read_ids(ctx.run_dir / feats.quality_ids)
    docs = pool_documents(ctx)
    doc_ids = pool_id_array(docs)
    lengths = np.load(ctx.run_dir / ctx.output(TokenizerOutput).lengths)
    sources = {"features": (grads.ids, grads.matrix), "embeddings": (emb.ids, emb.matrix),
               "quality": (q_ids, quality), "lengths": (doc_ids, lengths)}
    rule = domain_rule(ctx.cfg)
    labels = document_domains(docs, rule["field"]) if "field" in rule else None
    if labels is not None:
        sources["domains"] = (doc_ids, labels)
    named = {str(ctx.cfg.quality.source): (q_ids, quality)}
    extras = {}
    for name, scores in feats.quality_scores.items():  # named per-document scores of the feature families
        named[name] = (read_ids(ctx.run_dir / scores.ids), np.load(ctx.run_dir / scores.scores))
    for name, extra in feats.extras.items():  # their arrays for selectors: per document with ids, else global
        array = np.load(ctx.run_dir / extra.array)
        if extra.ids:
            sources[f"extras.{name}"] = (read_ids(ctx.run_dir / extra.ids), array)
        else:
            extras[name] = array
    pool = SelectionPool.join(sources, quality_scores=named, n_total=len(docs))
    if extras:
        pool.inputs.extras = {**(pool.inputs.extras or {}), **extras}
    if "kmeans" in rule:
        pool.providers["domains"] = lambda p: embedding_clusters(p, int(rule["kmeans"]), int(ctx.cfg.seed))
    pool.context.update(texts=Lazy(lambda: [d.text for d in documents_by_ids(ctx, pool.ids)]), seed=int(ctx.cfg.seed),
                        validation_texts=Lazy(lambda: [d.text for d in validation_documents(ctx)]),
                        tokenizer=Lazy(lambda: export_tokenizer(ctx)), work_dir=ctx.run_dir / "select" / "work")
    ctx.selection_pool = pool
    return pool


def domain_rule(cfg) -> dict:
    """``selection.domains``: ``{field: NAME}`` (a record field) or ``{kmeans: K}`` (clusters; wins)."""
    rule = to_plain(cfg.selection.get("domains")) or {"field": "source"}
    if not isinstance(rule, dict) or set(rule) - {"field", "kmeans"}:
        raise UserError(f"selection.domains takes the keys field and kmeans, got {rule!r}")
    k = rule.get("kmeans")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"selection.domains.kmeans must be an integer >= 1 or null, got {k!r}")
        return {"kmeans": k}
    if not isinstance(rule.get("field"), str) or not rule["field"]:
        raise UserError(f"selection.domains.field must name a record field, got {rule.get('field')!r}")
    return {"field": rule["field"]}


def document_domains(docs, name: str) -> list[str] | None:
    """Each document's ``name`` field (``source`` or a record field); None when no document has it."""
    if name == "source" and hasattr(docs, "column_array"):  # a document store: one column, no texts, S<n> bytes
        from spokes_lightning.data.id_arrays import encode_ids

        blocks = [encode_ids(docs.column_array("source", s, s + 65536)) for s in range(0, len(docs), 65536)]
        values = np.concatenate(blocks) if blocks else encode_ids([])
        return None if not (values != b"").any() else values
    else:
        values = [d.source if name == "source" else d.meta.get(name) for d in docs]
    if all(v in (None, "") for v in values):
        return None
    return ["" if v is None else str(v) for v in values]


def embedding_clusters(pool: SelectionPool, k: int, seed: int):
    """Domains as seeded spherical k-means clusters of the embeddings: (labels, names)."""
    from spokes_lightning.selectors.semdedup import normalize_embeddings, spherical_kmeans

    if pool.inputs.embeddings is None:
        raise UserError("selection.domains.kmeans needs embeddings")
    labels, _ = spherical_kmeans(normalize_embeddings(pool.inputs.embeddings), min(k, pool.n), seed)
    return labels, [f"cluster{c}" for c in range(min(k, pool.n))]


def ordered_methods(cfg, methods) -> list[str]:
    """The methods of ``methods`` (a dict or list) in selection.methods order, whether they were
    selected in this process or read back from run_dir (where markers keep keys sorted)."""
    configured = [str(m) for m in cfg.selection.methods]
    return [m for m in configured if m in methods] + sorted(m for m in methods if m not in configured)


def selection_plugins(cfg) -> list[str]:
    """``selection.plugins``: a list of selector files or modules (one line for anything else)."""
    plugins = to_plain(cfg.selection.get("plugins"))
    if plugins is None:
        return []
    if not isinstance(plugins, list):
        raise UserError(f"selection.plugins must be a list of selector files or modules, "
                        f"e.g. selection.plugins=[my_selector.py], got {plugins!r}")
    return [str(p) for p in plugins]


def resolve_method_specs(specs: dict | None, methods, plugins=()) -> dict[str, dict]:
    """``{method: spec}`` for ``methods``, in that order, after loading ``plugins``.

    A method with an entry in ``specs`` uses it; a method without one that names a registered
    selector (built in, installed, or from ``plugins``) runs that selector with its defaults,
    ``{selector: name}``. A spec without a ``selector`` key whose method names a registered
    selector runs that selector with the spec's parameters (``+selection.specs.NAME.PARAM=V``
    overrides one default). Any other name is one line."""
    from spokes_lightning.selectors import available_methods

    load_plugins(plugins)
    specs = specs or {}
    out = {}
    for method in methods:
        method = str(method)
        if method in specs:
            spec = specs[method]
            if not isinstance(spec, dict):
                raise UserError(f"selection.specs.{method} must be a mapping such as {{selector: NAME}}, got {spec!r}")
            out[method] = dict(spec)
            if "selector" not in spec and method in available_methods():
                out[method] = {"selector": method, **spec}
        elif method in available_methods():
            out[method] = {"selector": method}
        else:
            raise UserError(f"unknown method '{method}' in selection.methods: no selection.specs.{method} and no "
                            f"selector of that name (load a plugin's file with selection.plugins=[FILE]); "
                            f"specs: {', '.join(sorted(specs))}; selectors: {', '.join(available_methods())}")
    return out


def method_specs(cfg) -> dict[str, dict]:
    """``{method: spec}`` for selection.methods, in that order (see :func:`resolve_method_specs`)."""
    return resolve_method_specs(to_plain(cfg.selection.specs), cfg.selection.methods, selection_plugins(cfg))


def alpha_unused(cfg) -> list[str]:
    """The run-wide alpha settings that have nothing to act on: ``selection.alpha=auto`` and
    ``selection.alpha_sweep`` when no method of selection.methods uses the SPOKES selector."""
    sel = cfg.selection
    on = [name for name, value in (("selection.alpha=auto", sel.alpha == "auto"),
                                   ("selection.alpha_sweep", bool(sel.alpha_sweep))) if value]
    return on if on and spokes_method(cfg) is None else []


def spokes_method(cfg) -> tuple[str, dict] | None:
    """(name, settings without alpha) of the run's diversity SPOKES method: the first method using
    the SPOKES selector, one with alpha = 0 preferred. The alpha sweep runs with these settings and
    the report's Figs 3-4 show this method."""
    found = [(m, spec) for m, spec in method_specs(cfg).items()
             if issubclass(selector_class(spec["selector"]), SpokesSelector)]
    if not found:
        return None
    name, spec = next(((m, s) for m, s in found if s.get("alpha", 0.0) in (0, 0.0)), found[0])
    return name, {k: v for k, v in spec.items() if k not in ("selector", "alpha")}


def check_method_specs(specs: dict, methods, plugins=()) -> None:
    """Every method of ``methods`` has a spec (its own, or ``{selector: name}`` for a selector's
    name, see :func:`resolve_method_specs`) naming a known selector with declared,
    valid parameters."""

    for m, spec in resolve_method_specs(specs, methods, plugins).items():
        check_spec(m, spec)


def check_alpha_settings(cfg) -> None:
    """selection.alpha / alpha_sweep / alpha_grid, so that the select stage cannot fail on them
    after the corpus, proxy and features stages have run."""
    sel = cfg.selection
    alpha = sel.alpha
    if alpha != "auto" and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                            or not 0 <= float(alpha) <= 1):
        raise UserError(f"selection.alpha must be a number in [0, 1] or 'auto', got {alpha!r}")
    if not isinstance(sel.alpha_sweep, bool):
        raise UserError(f"selection.alpha_sweep must be true or false, got {sel.alpha_sweep!r}")
    grid = to_plain(sel.alpha_grid)
    if not isinstance(grid, list) or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1 for a in grid):
        raise UserError(f"selection.alpha_grid must be a list of numbers in [0, 1], got {grid!r}")
    if spokes_method(cfg) is None:
        return  # alpha=auto and the sweep do not apply (the select stage says so in a note)
    if (alpha == "auto" or sel.alpha_sweep) and not any(0 < a < 1 for a in grid):
        raise UserError("the alpha sweep (selection.alpha=auto or selection.alpha_sweep=true) needs a value "
                        f"strictly between 0 and 1 in selection.alpha_grid, got {grid}")


class SelectStage(Stage):
    name = "select"
    output_type = SelectOutput
    all_ranks = True  # collective selectors (SPOKES) shard the pool's rows over the ranks
    volatile = ("manifest.json",)  # selection manifests hold a creation time and the selector's timings
    needs = ("corpus", "tokenizer", "features")

    def settings(self, cfg):
        return {"selection": cfg.selection, "seed": cfg.seed}

    def check(self, cfg):
        check_method_specs(to_plain(cfg.selection.specs), cfg.selection.methods, selection_plugins(cfg))
        budget = parse_budget(str(cfg.selection.budget))
        if isinstance(budget, float):
            budget_to_count(budget, 10**9)  # range check of the fraction
        elif budget <= 0:
            raise UserError(f"selection.budget must be positive, got {budget}")
        if cfg.selection.budget_unit not in BUDGET_UNITS:
            raise UserError(f"selection.budget_unit must be {' or '.join(map(repr, BUDGET_UNITS))}, "
                            f"got {cfg.selection.budget_unit!r}")
        domain_rule(cfg)
        check_alpha_settings(cfg)

    def handed_on(self, outputs):
        return [v.selection for v in outputs.methods.values()] + [
            path for path in (outputs.alpha_sweep, outputs.auto_params) if path]

    def run(self, ctx):
        cfg = ctx.cfg
        sel = cfg.selection
        seed = int(cfg.seed)
        specs = method_specs(cfg)  # loads selection.plugins
        pool = selection_pool(ctx)
        budget = Budget.resolve(str(sel.budget), str(sel.budget_unit), pool)
        grid = [float(a) for a in sel.alpha_grid]
        sweep = None
        unused = alpha_unused(cfg)
        if unused:  # e.g. dataset=demo (alpha: auto) with method=random: nothing to tune, nothing to sweep
            log(f"note: {' and '.join(unused)} unused: no SPOKES method in selection.methods ({', '.join(specs)})")
        elif sel.alpha == "auto" or sel.alpha_sweep:
            sweep = alpha_sweep(pool, spokes_method(cfg)[1], budget.k, seed, grid, log=log)
            write_json_atomic(ctx.path("select", "alpha_sweep.json"), sweep)
        if sel.alpha == "auto":
            alpha = sweep["auto_alpha"] if sweep else None  # None: no SPOKES method, so no alpha chosen
        else:
            alpha = float(sel.alpha)
        records: dict = {}
        written = select_methods(pool, specs, str(sel.budget), str(sel.budget_unit), seed, ctx.run_dir / "selections",
                                 fixed={"alpha": alpha, "alpha_grid": grid}, records=records, log=log)
        if records:  # how each "auto" parameter was resolved (e.g. QuaDMix's search)
            write_json_atomic(ctx.path("select", "auto_params.json"), records)
        return SelectOutput(
            n_pool=pool.n, n_unselectable=pool.n_unselectable, alpha=alpha,
            methods={method: SelectedMethod(selection=ctx.rel(info["path"]), n_selected=info["n_selected"],
                                            n_copies=info["n_copies"], n_tokens=info["n_tokens"])
                     for method, info in written.items()},
            alpha_sweep="select/alpha_sweep.json" if sweep else None,
            auto_params="select/auto_params.json" if records else None)
