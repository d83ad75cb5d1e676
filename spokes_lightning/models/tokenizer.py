"""Tokenizers: the one loader, and a byte-level BPE trained on the corpus itself.

SPOKES (paper, section 2.1 / 4.1) takes per-document gradients of a small proxy language
model. When no pretrained proxy (e.g. Qwen3-0.6B-Base) is reachable we train one from
scratch, starting with this tokenizer. Training is cached: ``out_dir/spokes_tokenizer.json``
records the settings and a hash of the training texts, and a matching directory is reused.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from spokes_lightning.utils.atomic import write_json_atomic
from spokes_lightning.utils.errors import UserError
from spokes_lightning.data.hub import load_pretrained

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = EOS_TOKEN
TOKENIZER_META = "spokes_tokenizer.json"
TOKENIZER_FORMAT = 1


def corpus_hash(texts: Iterable[str]) -> str:
    """SHA-256 over the texts in order (length-prefixed, so boundaries count)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def tokenizer_settings(vocab_size: int, min_frequency: int) -> dict:
    return {
        "format": TOKENIZER_FORMAT,
        "kind": "byte_level_bpe",
        "vocab_size": int(vocab_size),
        "min_frequency": int(min_frequency),
        "special_tokens": [BOS_TOKEN, EOS_TOKEN],
    }


def _read_meta(out_dir: Path) -> dict | None:
    meta = out_dir / TOKENIZER_META
    if not meta.exists():
        return None
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError:
        return None


def train_tokenizer(
    texts: list[str], vocab_size: int = 8192, out_dir: str | os.PathLike = "tokenizer",
    *, min_frequency: int = 2,
):
    """Train (or reuse) a byte-level BPE tokenizer and save it with ``save_pretrained``.

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``<|startoftext|>`` as bos and
    ``<|endoftext|>`` as eos and pad. A directory holding a tokenizer trained with the same
    settings on the same texts is reused without retraining.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if t]
    if not texts:
        raise UserError("cannot train a tokenizer on an empty corpus (no non-empty texts)")
    if vocab_size < 300:
        raise UserError(f"tokenizer vocab_size must be >= 300 (256 bytes + merges), got {vocab_size}")
    out_dir = Path(out_dir)
    wanted = {**tokenizer_settings(vocab_size, min_frequency), "corpus_hash": corpus_hash(texts)}
    if _read_meta(out_dir) == wanted and (out_dir / "tokenizer.json").exists():
        return load_tokenizer(out_dir)

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1_000_000,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TOKENIZER_META).unlink(missing_ok=True)  # invalidate before rewriting files
    fast.save_pretrained(str(out_dir))
    write_json_atomic(out_dir / TOKENIZER_META, wanted)
    return fast


def load_tokenizer(path_or_hub_id: str | os.PathLike, setting: str = "tokenizer.path"):
    """``AutoTokenizer.from_pretrained`` that fails fast and clearly when offline.

    ``setting`` is the config key the one-line offline message suggests. A tokenizer without
    a pad token gets its eos token as pad (needed for batching).
    """
    from transformers import AutoTokenizer

    def loader(name: str, local_files_only: bool):
        return AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)

    tok = load_pretrained(path_or_hub_id, loader, what="tokenizer", setting=setting,
                          example="Qwen3-0.6B-Base")
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
