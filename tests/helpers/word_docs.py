"""Tiny word-level documents and tokenizer for the loader and online tests (no hub, no training)."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
WORDS = "the a data model token text quality diverse select train web page cat dog sun".split()


def make_docs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"d{i:03d}", " ".join(rng.choice(WORDS, size=int(rng.integers(0, 30)))))
            for i in range(n)]


def make_tokenizer(path: Path | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)] * 3, trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    if path is not None:
        tok.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", pad_token="[PAD]")


def write_word_corpus(root: Path, n: int = 150, seed: int = 4) -> Path:
    """``root/corpus.jsonl.gz`` of :func:`make_docs` and ``root/tok.json``; returns ``root``."""
    with gzip.open(root / "corpus.jsonl.gz", "wt") as fh:
        for doc_id, text in make_docs(n, seed=seed):
            fh.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    make_tokenizer(root / "tok.json")
    return root


def script_env(**settings):
    """The environment of a test script run: the checkout on PYTHONPATH, one thread, no inherited ranks."""
    out = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", ONLINE_SETTINGS=json.dumps(settings))
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        out.pop(k, None)
    return out
