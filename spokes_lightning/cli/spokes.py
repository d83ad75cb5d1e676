"""The ``spokes`` command line (also ``python -m spokes_lightning``).

    spokes select --method spokes --features F.npy [--quality Q.npy] --budget B --out OUT.npy
                  [--embeddings E.npy --domains D.npy|D.json --lengths L.npy --plugin my_selector.py]
    spokes gvendi --features F.npy [--indices I.npy] [--batch-size B --batches M --seed S]
    spokes import-features F.npy --ids IDS.txt|IDS.npy --out STORE [--kind gradients|embeddings]
                  [--projection NAME --k K --seed S --model NAME --meta KEY=VALUE]
    spokes convert-megatron CKPT_DIR --tokenizer TOK_DIR --out HF_DIR [--iteration N]
    spokes evaluate --model DIR --tasks arc_easy,piqa,...|all --out results.json
                  [--tokenizer TOK_DIR --limit N --num-fewshot K --split test|val --batch-size B]

Stdout carries exactly one JSON line; logs and progress go to stderr. Bad input: one line
on stderr, exit code 2, and OUT is not created.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from spokes_lightning.utils.atomic import save_npy_atomic
from spokes_lightning.utils.errors import UserError, user_errors_exit
from spokes_lightning.data.selection_artifact import check_multiplicity
from spokes_lightning.selection.driver import BUDGET_UNITS, Budget, resolve_auto, select_method
from spokes_lightning.selection.pool import SelectionPool
from spokes_lightning.selectors import available_methods, get_selector, load_plugins, selector_class
from spokes_lightning.core.spokes import selection_scores


def describe_load_error(exc: Exception) -> str:
    """What np.load's error means for a user (it calls any non-.npy file 'pickled data')."""
    text = str(exc)
    if "pickled" in text or "allow_pickle" in text:
        return "not a .npy array file (text, pickle or another format); save it with numpy.save"
    return f"{exc.__class__.__name__}: {text}"


def load_matrix(path: str, what: str = "features") -> np.ndarray:
    """N x d float matrix from .npy, memory-mapped (never read whole into RAM)."""
    arr = open_array(path, what, mmap_mode="r")
    if arr.ndim != 2:
        raise UserError(f"{what} must be a 2-d N x d matrix, {path} has shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise UserError(f"{what} must be float16/float32/float64, {path} is {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UserError(f"{what} file {path} is empty (shape {arr.shape})")
    check_finite(arr, what)
    return arr


def check_finite(arr: np.ndarray, what: str, chunk_rows: int = 65536) -> None:
    for start in range(0, arr.shape[0], chunk_rows):
        block = np.asarray(arr[start : start + chunk_rows])
        ok = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        if not ok.all():
            raise UserError(f"{what} contain NaN or Inf (first bad row: {start + int(np.flatnonzero(~ok)[0])})")


def open_array(path: str, what: str, mmap_mode: str | None = None) -> np.ndarray:
    """np.load of a user's file: a missing, pickled, truncated or non-.npy file is one line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        return np.load(p, mmap_mode=mmap_mode, allow_pickle=False)
    except Exception as exc:
        raise UserError(f"cannot read {what} file {path}: {describe_load_error(exc)}") from None


def load_vector(path: str, n: int, what: str = "quality") -> np.ndarray:
    arr = open_array(path, what)
    arr = np.asarray(arr, dtype=np.float64).reshape(-1) if arr.ndim == 2 and 1 in arr.shape else arr
    if arr.ndim != 1 or arr.shape[0] != n:
        raise UserError(f"{what} has shape {tuple(arr.shape)} but features have N = {n} rows")
    if not np.isfinite(arr).all():
        raise UserError(f"{what} contains NaN or Inf (first bad row: {int(np.flatnonzero(~np.isfinite(arr))[0])})")
    return np.asarray(arr, dtype=np.float64)


def parse_params(items: list[str]) -> dict:
    params = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--param expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def check_output_path(out: str, inputs: list[str]) -> None:
    """Refuse an --out that is an input, a directory, or not writable: before any work is done."""
    path = Path(out)
    if path.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {path / 'indices.npy'}")
    for given in inputs:
        if given and path.resolve() == Path(given).resolve():
            raise UserError(f"--out {out} is also an input file; choose another output path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"output directory does not exist: {parent}")
    try:  # os.access says yes to root on a read-only mount: try a real file
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".probe")
        probe.close()
    except OSError as exc:
        raise UserError(f"cannot write to {parent}: {exc.strerror or exc}") from None


#: the select flags that set a method parameter of the same name (when the method has it)
PARAM_FLAGS = {"alpha": "--alpha", "steps": "--steps", "step_rule": "--step-rule", "lr": "--lr",
               "drop_zero_rows": "--drop-zero-rows"}


def flag_params(args, selector_cls) -> dict:
    """The parameter flags given on the command line, for a method that declares them.

    A flag the method does not have is ignored with a note on stderr (``--alpha`` with
    ``--method random`` has always been accepted)."""
    params = {}
    for key, flag in PARAM_FLAGS.items():
        value = getattr(args, key)
        if value is None or value is False:
            continue
        if key in selector_cls.params_spec:
            params[key] = value
        else:
            print(f"[spokes] note: {flag} ignored: method '{args.method}' has no parameter {key}", file=sys.stderr)
    return params


def parse_alpha(text: str | None):
    """``--alpha``: a number, or ``auto`` (paper section 3.2, resolved on these features)."""
    if text is None or text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"alpha must be a number in [0, 1] or auto, got {text!r}") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise UserError(f"alpha must be in [0, 1], got {text}")
    return value


def cli_pool(args, selector_cls) -> tuple[SelectionPool, np.ndarray]:
    """The pool of the command line's files (ids are row numbers) and the --features matrix."""
    features = load_matrix(args.features, "features")
    n = features.shape[0]
    ids = [str(i) for i in range(n)]
    sources = {selector_cls.feature_field: (ids, features)}
    primary, named = None, {}
    for item in args.quality or []:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        vector = load_vector(path, n, f"quality {name}".strip())
        named[name or "quality"] = (ids, vector)
        primary = vector if primary is None else primary
    if primary is not None:
        sources["quality"] = (ids, primary)
    if args.embeddings and selector_cls.feature_field != "embeddings":
        sources["embeddings"] = (ids, load_matrix(args.embeddings, "embeddings"))
    if args.lengths:
        lengths = load_vector(args.lengths, n, "lengths")
        if (lengths < 0).any() or not np.equal(np.round(lengths), lengths).all():
            raise UserError(f"lengths in {args.lengths} must be non-negative integers")
        sources["lengths"] = (ids, lengths.astype(np.int64))
    if args.domains:
        sources["domains"] = (ids, load_domains(args.domains, n))
    extras = {}
    for item in args.extra or []:
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise UserError(f"--extra expects NAME=FILE, got {item!r}")
        array = open_array(path, f"extra {name}")
        if array.ndim and array.shape[0] == n:
            sources[f"extras.{name}"] = (ids, array)  # per document
        else:
            extras[name] = array  # global (e.g. a reference direction)
    pool = SelectionPool.join(sources, named if len(named) > 1 or "quality" not in named else None)
    if extras:
        pool.inputs.extras = {**(pool.inputs.extras or {}), **extras}
    return pool, features


def load_domains(path: str, n: int) -> list:
    """Domain labels: a .npy of N integers or a .json list of N strings."""
    if path.endswith(".json"):
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read domains file {path}: {exc}") from None
    else:
        values = open_array(path, "domains").reshape(-1).tolist()
    if not isinstance(values, list) or len(values) != n:
        raise UserError(f"domains in {path} must list {n} labels (one per features row)")
    return values


def cmd_select(args) -> dict:
    load_plugins(args.plugin)
    cls = selector_class(args.method)
    params = {**flag_params(args, cls), **parse_params(args.param)}
    get_selector(args.method, **{k: v for k, v in params.items() if v != "auto"})  # parameter errors first
    check_output_path(args.out, [args.features, *[q.rpartition("=")[2] for q in args.quality or []]])
    pool, features = cli_pool(args, cls)
    budget = Budget.resolve(args.budget, args.budget_unit, pool)
    spec = resolve_auto(pool, args.method, {"selector": args.method, **params}, budget.k, args.seed, {}, {})
    chosen = {key: spec[key] for key, value in params.items() if value == "auto"}
    for key, value in chosen.items():  # say what "auto" became (e.g. --alpha auto: section 3.2's alpha)
        shown = f"{value:g}" if isinstance(value, float) else json.dumps(value, default=str)
        print(f"[spokes] {args.method}: {key}=auto chose {key}={shown}", file=sys.stderr, flush=True)
    result = select_method(pool, spec, budget, args.seed)
    indices = np.asarray(result.indices, dtype=np.int64)
    copies = check_multiplicity(args.method, result, len(indices))
    gvendi, mean_q = selection_scores(features, pool.inputs.quality, indices)
    out = {"method": args.method, "n": pool.n, "selected": int(len(indices)), "gvendi": gvendi,
           "mean_quality": mean_q}
    if "alpha" in chosen:
        out["alpha"] = float(chosen["alpha"])
    if (copies != 1).any():  # the copies go next to the indices: OUT.multiplicity.npy
        multiplicity_path = str(Path(args.out).with_suffix("")) + ".multiplicity.npy"
        save_npy_atomic(multiplicity_path, copies)
        out.update(copies=int(copies.sum()), multiplicity=multiplicity_path)
    save_npy_atomic(args.out, indices)
    return out


def load_indices(path: str, n: int) -> np.ndarray:
    """Row indices from .npy: integers, in [0, n), unique, non-empty; one line for anything else."""
    arr = open_array(path, "indices")
    if arr.dtype.kind not in "iu":
        raise UserError(f"indices in {path} must be integers, got {arr.dtype}")
    arr = arr.astype(np.int64).reshape(-1)
    if len(arr) == 0 or arr.min() < 0 or arr.max() >= n:
        raise UserError(f"indices in {path} must be non-empty and in [0, {n})")
    if len(np.unique(arr)) != len(arr):
        raise UserError(f"indices in {path} contain {len(arr) - len(np.unique(arr))} duplicates")
    return arr


def cmd_gvendi(args) -> dict:
    from spokes_lightning.core.vendi import batch_vendi_score, vendi_score

    features = load_matrix(args.features, "features")
    indices = load_indices(args.indices, features.shape[0]) if args.indices else None
    rows = features if indices is None else features[np.sort(indices)]
    score = vendi_score(rows, drop_zero_rows=args.drop_zero_rows)
    batch = None
    if args.batch_size or args.batches:
        if not (args.batch_size and args.batches):
            raise UserError("batch G-Vendi needs both --batch-size and --batches")
        batch = batch_vendi_score(features, args.batch_size, args.batches, seed=args.seed, indices=indices)
    return {"gvendi": score, "batch_gvendi": batch}


def cmd_import_features(args) -> dict:
    from spokes_lightning.pipeline.import_store import RESERVED, import_features

    meta = parse_params(args.meta)
    taken = sorted(set(meta) & set(RESERVED))
    if taken:
        raise UserError(f"--meta cannot set {', '.join(taken)} (use the flags of that name)")
    settings = {"projection": args.projection, "k": args.k, "seed": args.seed, "model": args.model, **meta}
    return import_features(args.features, args.ids, args.out, args.kind, settings)


def cmd_convert_megatron(args) -> dict:
    from spokes_lightning.megatron.convert import convert_megatron_checkpoint

    res = convert_megatron_checkpoint(args.checkpoint, args.tokenizer, args.out, iteration=args.iteration)
    return {k: res[k] for k in ("out", "iteration", "layers", "vocab", "tp", "pp", "tied")}


def cmd_evaluate(args) -> dict:
    from spokes_lightning.evaluation.checkpoint_eval import evaluate_checkpoint, parse_tasks

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be a positive item count, got {args.limit}")
    return evaluate_checkpoint(args.model, parse_tasks(args.tasks), args.out, tokenizer=args.tokenizer,
                               limit=args.limit, num_fewshot=args.num_fewshot, split=args.split,
                               batch_size=args.batch_size)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spokes", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)
    from spokes_lightning.selectors import SELECTORS

    available_methods()
    methods = "\n".join(f"  {n:10s} {SELECTORS[n].summary}" for n in sorted(SELECTORS))
    s = sub.add_parser("select", help="select a subset", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=f"available methods:\n{methods}")
    s.add_argument("--method", required=True, help="one of: " + ", ".join(sorted(SELECTORS)))
    s.add_argument("--features", required=True, help="N x d .npy (gradients; embeddings for semdedup)")
    s.add_argument("--quality", action="append", metavar="[NAME=]FILE",
                   help="N quality scores .npy; repeat with NAME=FILE for named scores (the first is primary)")
    s.add_argument("--embeddings", help="N x e sentence embeddings .npy (methods that read them)")
    s.add_argument("--domains", help="N domain labels: .npy of integers or .json list of strings")
    s.add_argument("--lengths", help="N token counts .npy (needed by --budget-unit tokens)")
    s.add_argument("--extra", action="append", metavar="NAME=FILE",
                   help="a method-specific .npy (N rows: per document; otherwise global), repeatable")
    s.add_argument("--budget", required=True, help="count (400) or fraction with a point (0.1)")
    s.add_argument("--budget-unit", default="documents", choices=BUDGET_UNITS)
    s.add_argument("--alpha", type=parse_alpha, default=None, help="quality weight in [0, 1] or auto (spokes)")
    s.add_argument("--steps", type=int, default=None, help="exponentiated-gradient steps T (spokes; default 20)")
    s.add_argument("--step-rule", default=None, choices=["backtracking", "fixed"])
    s.add_argument("--lr", type=float, default=None, help="eta (fixed rule) / initial eta (backtracking)")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method-specific setting")
    s.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="load a selector from a .py file or module first (repeatable)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--drop-zero-rows", action="store_true", help="drop zero-norm rows instead of failing")
    s.add_argument("--out", required=True, help="output .npy of selected row indices (int64)")
    g = sub.add_parser("gvendi", help="G-Vendi of a feature matrix (optionally a subset)")
    g.add_argument("--features", required=True)
    g.add_argument("--indices")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--batches", type=int)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--drop-zero-rows", action="store_true")
    i = sub.add_parser("import-features", help="make a feature store from an N x d .npy computed elsewhere",
                       description="Copy F (N x d float16/float32 .npy) and its N document ids into a feature "
                                   "store the pipeline reads (features.gradients.store=STORE or "
                                   "embeddings.store=STORE).")
    i.add_argument("features", metavar="F.npy")
    i.add_argument("--ids", required=True, help="the ids of F's rows: a text file, one per line, or an .npy "
                                                "of strings or integers")
    i.add_argument("--out", required=True, help="the store directory (absent or empty)")
    i.add_argument("--kind", default="gradients", choices=["gradients", "embeddings"])
    i.add_argument("--projection", help="provenance: the projection that made F (e.g. kronecker, rademacher)")
    i.add_argument("--k", type=int, help="provenance: the sketch dimension (checked against F's columns)")
    i.add_argument("--seed", type=int, help="provenance: the projection seed")
    i.add_argument("--model", help="provenance: the model whose gradients / embeddings F holds")
    i.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="more provenance for the manifest (repeatable)")
    m = sub.add_parser("convert-megatron", help="Megatron-LM checkpoint -> Hugging Face LlamaForCausalLM dir",
                       description="Convert a Megatron-LM GPT checkpoint (LLaMA architecture; torch_dist or "
                                   "legacy mp_rank_XX format, any TP/PP) into a Hugging Face model directory "
                                   "with the tokenizer saved beside it.")
    m.add_argument("checkpoint", metavar="CKPT_DIR", help="the --save directory, or one iter_XXXXXXX directory")
    m.add_argument("--tokenizer", metavar="TOK_DIR",
                   help="Hugging Face tokenizer directory (default: the checkpoint's --tokenizer-model)")
    m.add_argument("--out", required=True, metavar="HF_DIR", help="output directory (absent or empty)")
    m.add_argument("--iteration", type=int, help="iteration to convert (default: latest_checkpointed_iteration.txt)")
    e = sub.add_parser("evaluate", help="OLMES-style evaluation of a Hugging Face or Megatron-LM checkpoint",
                       description="The pipeline's evaluation (lm-eval over the shipped task files) on any "
                                   "checkpoint; a Megatron-LM --save directory is converted first.")
    e.add_argument("--model", required=True, help="a Hugging Face model dir or a Megatron-LM checkpoint dir")
    e.add_argument("--tokenizer", help="tokenizer dir, for a Megatron checkpoint whose --tokenizer-model is elsewhere")
    e.add_argument("--tasks", default="all", help="comma-separated task names, or all (the 10 OLMES tasks)")
    e.add_argument("--limit", type=int, help="first N items of each task (quick checks)")
    e.add_argument("--num-fewshot", type=int, help="fixed solved examples per task (OLMES: 5; default 0, MMLU 5)")
    e.add_argument("--split", default="test", choices=["test", "val"])
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--out", required=True, help="results .json (per-task scores, per-item scores, shots)")
    return parser


def plugin_args(argv: list[str]) -> list[str]:
    """The ``--plugin`` values, read before the parser is built so ``--help`` lists their methods."""
    found = []
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            found.append(arg.split("=", 1)[1])
    return found


def main(argv: list[str] | None = None) -> int:
    with user_errors_exit():
        argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
        load_plugins(plugin_args(argv))
        args = build_parser().parse_args(argv)
        commands = {"select": cmd_select, "gvendi": cmd_gvendi, "import-features": cmd_import_features,
                    "convert-megatron": cmd_convert_megatron, "evaluate": cmd_evaluate}
        out = commands[args.command](args)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
