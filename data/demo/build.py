"""Build the shipped demo corpus under ``data/demo/`` from a directory of raw public dumps.

The raw dumps (web text, DCLM quality labels, evaluation sets; provenance in
``data/demo/README.md``) are kept by the maintainers outside the repository. Run from the
repository root, naming that directory::

    python data/demo/build.py --raw DIR

The build is deterministic: splits are chosen by sorting row indices on a SHA-256 of
``"<seed>:<task>:<index>"`` (no library RNG, so the choice does not depend on the Python
or NumPy version), JSON is written with a fixed key order and the gzip header carries
``mtime=0`` and no file name. Rebuilding with the same zlib gives byte-identical files.

Outputs (see ``data/demo/README.md``):

* ``web.jsonl.gz`` -- every web document (the selection pool), fields id/text/source[/url]
  and ``legal_score`` for FineWeb rows;
* ``quality/dclm_human_labels.jsonl.gz`` -- the 499 DCLM human quality labels;
* ``eval/<task>.jsonl.gz`` -- 300 ``test`` + 100 ``val`` items per OLMES task (+ MMLU ``dev``);
* ``reference/lambada_openai.jsonl.gz`` -- 500 LAMBADA (OpenAI) items, Quad's reference set;
* ``manifest.json`` -- counts and sha256 of every output.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # the script is run by path, not as a module
    sys.path.insert(0, str(REPO_ROOT))

from spokes_lightning.utils.atomic import atomic_path, write_json_atomic  # noqa: E402
from spokes_lightning.utils.errors import UserError, fail, user_errors_exit  # noqa: E402

SEED = 1234
TEST_SIZE = 300
VAL_SIZE = 100

#: (path under the raw directory, value of the ``source`` field) in output order.
WEB_FILES = [
    ("web/c4_en_train_first1000.jsonl", "c4"),
    ("web/dolma_cc_warc_CC-MAIN-20190717_00140.jsonl", "dolma_cc"),
    ("web/dolma_cc_en_head_sample.jsonl", "dolma_cc_head"),
    ("web/dolma_provided_documents_000.jsonl", "dolma_provided"),
    ("web/olmo_c4_sample.jsonl", "olmo_c4"),
    ("web/olmo_c4_100_domains_theguardian.jsonl", "paloma_c4_100_domains"),
    ("quality/fineweb_legal_mistral_annotations.dedup.jsonl", "fineweb"),
]
DCLM_MAJORITY = "quality/dclm_human_labels_majority.jsonl"
DCLM_AGREEMENT = "quality/dclm_human_labels_agreement.jsonl"

#: OLMES task name -> source file under <raw>/eval.
EVAL_FILES = {
    "hellaswag": "hellaswag/hellaswag_val.jsonl",
    "mmlu": "mmlu/mmlu_test.jsonl",
    "arc_challenge": "llm_foundry/arc_challenge.jsonl",
    "arc_easy": "llm_foundry/arc_easy.jsonl",
    "piqa": "llm_foundry/piqa.jsonl",
    "siqa": "llm_foundry/siqa.jsonl",
    "boolq": "llm_foundry/boolq.jsonl",
    "winogrande": "llm_foundry/winogrande.jsonl",
    "openbookqa": "llm_foundry/openbook_qa.jsonl",
    "commonsense_qa": "llm_foundry/commonsense_qa.jsonl",
}
MMLU_DEV = "mmlu/mmlu_dev.jsonl"

#: reference sets (Quad's D_r): name -> (source file under <raw>/eval, items shipped)
REFERENCE_FILES = {"lambada_openai": ("llm_foundry/lambada_openai.jsonl", 500)}


def read_jsonl(path: Path) -> list[dict]:
    """All rows of a UTF-8 jsonl file (the raw dumps are clean)."""
    if not path.is_file():
        raise UserError(f"demo build: source file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl_gz(path: Path, rows: list[dict]) -> str:
    """Write rows as gzip'd jsonl with a reproducible header; return the sha256."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=6) as gz:
        gz.write(payload)
    data = buffer.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def source_url(row: dict) -> str | None:
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    return row.get("url") or meta.get("warc_url") or meta.get("url")


def build_web(raw: Path) -> tuple[list[dict], dict]:
    """Every web document, in WEB_FILES order; nothing is dropped (empty texts included)."""
    rows = [(source, n, row) for rel, source in WEB_FILES
            for n, row in enumerate(read_jsonl(raw / rel))]
    id_counts = Counter(row.get("id") for _, _, row in rows if row.get("id"))
    docs = []
    for source, n, row in rows:
        keep_id = row.get("id") and id_counts[row["id"]] == 1
        doc = {"id": str(row["id"]) if keep_id else f"{source}-{n}",
               "text": row.get("text") or "", "source": source}
        url = source_url(row)
        if url:
            doc["url"] = url
        if source == "fineweb":
            doc["legal_score"] = int(row["score"])
        docs.append(doc)
    ids = Counter(d["id"] for d in docs)
    duplicates = [i for i, c in ids.items() if c > 1]
    if duplicates:
        raise UserError(f"demo build: duplicate web ids after renaming: {duplicates[:3]}")
    texts = Counter(d["text"] for d in docs)
    stats = {
        "total": len(docs),
        "by_source": dict(Counter(d["source"] for d in docs)),
        "empty_texts": texts.get("", 0),
        "exact_duplicate_nonempty_texts": sum(c - 1 for t, c in texts.items() if t and c > 1),
        "legal_score_histogram": {str(k): v for k, v in sorted(
            Counter(d["legal_score"] for d in docs if "legal_score" in d).items())},
    }
    return docs, stats


def build_quality_labels(raw: Path, web_texts: set[str]) -> tuple[list[dict], dict]:
    """DCLM majority-vote labels, flagged when the doc is also in the agreement file."""
    majority = read_jsonl(raw / DCLM_MAJORITY)
    agreement = {r["text"] for r in read_jsonl(raw / DCLM_AGREEMENT)}
    rows = [{"id": f"dclm-{n}", "text": r["text"], "label": int(r["label"]),
             "agreement": r["text"] in agreement} for n, r in enumerate(majority)]
    leaked = sum(r["text"] in web_texts for r in rows)
    if leaked:
        raise UserError(f"demo build: {leaked} DCLM label docs also occur in the web pool")
    stats = {"total": len(rows), "positive": sum(r["label"] for r in rows),
             "agreement": sum(r["agreement"] for r in rows)}
    return rows, stats


def hash_order(task: str, n: int) -> list[int]:
    """Row indices 0..n-1 in a seeded, platform-independent pseudo-random order."""
    def key(i: int) -> bytes:
        return hashlib.sha256(f"{SEED}:{task}:{i}".encode()).digest()
    return sorted(range(n), key=key)


def build_eval_task(raw: Path, task: str) -> list[dict]:
    """300 test + 100 val rows (disjoint), original fields plus ``id`` and ``split``."""
    rows = read_jsonl(raw / "eval" / EVAL_FILES[task])
    order = hash_order(task, len(rows))
    splits = {"test": sorted(order[:TEST_SIZE]),
              "val": sorted(order[TEST_SIZE:TEST_SIZE + VAL_SIZE])}
    out = [{**rows[i], "id": f"{task}-{i}", "split": split}
           for split, indices in splits.items() for i in indices]
    if task == "mmlu":
        dev = read_jsonl(raw / "eval" / MMLU_DEV)
        out += [{**r, "id": f"mmlu-dev-{i}", "split": "dev"} for i, r in enumerate(dev)]
    return out


def build_reference(raw: Path, name: str) -> list[dict]:
    """A hash-ordered sample of a reference set, source order, original fields plus ``id``."""
    source, size = REFERENCE_FILES[name]
    rows = read_jsonl(raw / "eval" / source)
    return [{**rows[i], "id": f"{name}-{i}"} for i in sorted(hash_order(name, len(rows))[:size])]


def build(raw: Path, out: Path) -> dict:
    """Write every demo file under ``out`` from the raw dumps in ``raw``; return the manifest."""
    if not (raw / "README.md").is_file():
        raise UserError(f"demo build: {raw} does not look like the raw demo directory "
                        "(no README.md beside web/, quality/ and eval/)")
    files: dict[str, dict] = {}

    web, web_stats = build_web(raw)
    files["web.jsonl.gz"] = {"rows": len(web), "by_source": web_stats["by_source"],
                             "sha256": write_jsonl_gz(out / "web.jsonl.gz", web)}

    labels, label_stats = build_quality_labels(raw, {d["text"] for d in web})
    rel = "quality/dclm_human_labels.jsonl.gz"
    files[rel] = {"rows": len(labels), "sha256": write_jsonl_gz(out / rel, labels)}

    for task in EVAL_FILES:
        rows = build_eval_task(raw, task)
        rel = f"eval/{task}.jsonl.gz"
        files[rel] = {"rows": len(rows), "by_split": dict(Counter(r["split"] for r in rows)),
                      "source": f"eval/{EVAL_FILES[task]}",
                      "sha256": write_jsonl_gz(out / rel, rows)}

    for name, (source, _) in REFERENCE_FILES.items():
        rows = build_reference(raw, name)
        rel = f"reference/{name}.jsonl.gz"
        files[rel] = {"rows": len(rows), "source": f"eval/{source}",
                      "sha256": write_jsonl_gz(out / rel, rows)}

    for rel, entry in files.items():
        entry["bytes"] = (out / rel).stat().st_size
    manifest = {"seed": SEED, "test_size": TEST_SIZE, "val_size": VAL_SIZE,
                "web": web_stats, "quality_labels": label_stats, "files": files,
                "total_bytes": sum(e["bytes"] for e in files.values())}
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", type=Path, metavar="DIR",
                        help="the directory of raw public dumps (web/, quality/, eval/); required")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "demo",
                        help="output directory (default: data/demo)")
    args = parser.parse_args(argv)
    if args.raw is None:
        fail("demo build: --raw DIR is required: the directory of raw public dumps "
             "(web/, quality/, eval/) that data/demo/README.md describes")
    with user_errors_exit():
        manifest = build(args.raw, args.out)
    print(f"wrote {len(manifest['files'])} files, {manifest['web']['total']} web docs, "
          f"{manifest['total_bytes'] / 1e6:.2f} MB to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
