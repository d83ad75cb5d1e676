"""The data path on 2 ranks: ``torchrun --nproc-per-node 2`` (gloo) runs corpus -> tokenizer (given) ->
features (imported) -> select (random, SPOKES) -> export and writes the same bytes as 1 process."""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("harbor lantern orchard copper meadow thunder velvet canyon ember glacier saffron willow "
         "quartz falcon prairie cobalt juniper marble tundra zephyr").split()


def make_inputs(tmp: Path, n: int = 2600, k: int = 24, seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    paths = []
    for f in range(3):  # three input files: ranks split them
        path = tmp / f"part{f}.jsonl"
        with open(path, "w") as fh:
            for i in range(f, n, 3):
                words = [rng.choice(WORDS) for _ in range(rng.choice([8, 30, 60, 120]))]
                fh.write(json.dumps({"id": f"doc{i:05d}", "text": " ".join(words), "source": f"s{i % 4}",
                                     "score": rng.random()}) + "\n")
        paths.append(str(path))
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_text import tiny_tokenizer

    tiny_tokenizer([" ".join(WORDS)] * 50, vocab_size=300).save_pretrained(str(tmp / "tok"))
    ids = [f"doc{i:05d}" for i in range(n) if i % 13] + [f"other{i}" for i in range(40)]
    np.save(tmp / "f.npy", np.random.default_rng(seed).standard_normal((len(ids), k)).astype(np.float16))
    (tmp / "ids.txt").write_text("\n".join(ids) + "\n")
    for kind in ("gradients", "embeddings"):
        r = subprocess.run([sys.executable, "-m", "spokes_lightning", "import-features", str(tmp / "f.npy"), "--ids",
                            str(tmp / "ids.txt"), "--out", str(tmp / kind), "--kind", kind],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
    return paths


def overrides(tmp: Path, paths: list[str], run_dir: Path) -> list[str]:
    return [f"run_dir={run_dir}", f"data.paths=[{','.join(paths)}]", "data.limit=null", "data.interleave_by=source",
            "data.validation_documents=50", "data.shard_documents=1024", f"tokenizer.path={tmp / 'tok'}",
            f"features.gradients.store={tmp / 'gradients'}", f"embeddings.store={tmp / 'embeddings'}", "quality.source=column",
            "quality.column=score", "selection.methods=[random,spokes]", "selection.alpha=0.0",
            "selection.alpha_sweep=false", "selection.budget=0.4", "report.gvendi_independent=false",
            "pretrain.enabled=false", "evaluate.tasks=[]", "wandb.enabled=false",
            "stages=[corpus,tokenizer,features,select,export]"]


def digests(run_dir: Path) -> dict[str, str]:
    wanted = [p for p in sorted(run_dir.rglob("*")) if p.is_file() and (
        p.parts[-2] in ("pool", "validation") or p.name in ("indices.npy", "lengths.npy")
        or (p.name == "ids.npy" and "selections" in p.parts)
        or p.suffix in (".bin", ".idx", ".parquet") or p.name.endswith(".jsonl.gz"))]
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in wanted}


@pytest.mark.timeout(900)
def test_two_torchrun_ranks_write_the_bytes_of_one(tmp_path):
    paths = make_inputs(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, "launch/run.py", *overrides(tmp_path, paths, one)], capture_output=True,
                        text=True, cwd=ROOT, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         "-m", "spokes_lightning.cli.run", *overrides(tmp_path, paths, two)],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "corpus: running on 2 ranks" in r2.stderr and "export: running on 2 ranks" in r2.stderr
    assert r2.stderr.count("corpus: running") == 1  # rank 0 alone logs
    d1, d2 = digests(one), digests(two)
    assert d1 == d2
    assert len([f for f in d1 if f.startswith("corpus/pool/shard_")]) == 3  # 2550 pool rows, shards of 1024
    assert {f for f in d1 if f.endswith(".bin")} == {"megatron/random_text_document.bin",
                                                      "megatron/spokes_text_document.bin"}
    from spokes_lightning.data.document_store import DocumentStore

    select = json.loads((one / "stages" / "select.json").read_text())["outputs"]
    pool_ids = [d.id for d in DocumentStore(one / "corpus" / "pool")]
    assert select["n_unselectable"] == sum(int(i[3:]) % 13 == 0 for i in pool_ids) > 0  # no features: unselectable
    assert (two / "launch" / "torchrun.sh").exists() and (two / "launch" / "slurm.sbatch").exists()
