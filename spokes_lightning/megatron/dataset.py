"""Reading exported Megatron data the way Megatron-LM does (megatron-core ``GPTDataset``).

The exported ``<prefix>.bin/.idx`` pair is read through
``BlendedMegatronDatasetBuilder(GPTDataset, ...)``: the same document shuffling, packing into
``seq_length + 1`` token windows and multi-epoch sample index that Megatron-LM's
``pretrain_gpt.py`` uses, so local runs see exactly the samples a Megatron run would.
Works on CPU and with or without ``torch.distributed`` initialised.
"""
from __future__ import annotations

import os
from pathlib import Path

from spokes_lightning.utils.errors import UserError, require_package


def require_megatron_prefix(prefix: str | os.PathLike) -> str:
    """Absolute prefix of a finished Megatron indexed dataset, or ``UserError``."""
    prefix = str(Path(prefix).resolve())
    for suffix in (".bin", ".idx"):
        if not os.path.exists(prefix + suffix):
            raise UserError(f"Megatron dataset file missing: {prefix + suffix}")
    return prefix


def indexed_dataset_stats(prefix: str | os.PathLike) -> tuple[int, int]:
    """``(n_documents, n_tokens)`` of an indexed dataset (tokens include the EOD tokens), from its
    index alone, without megatron-core: a pipeline whose models are all trained does not load it."""
    from spokes_lightning.megatron.index_format import index_counts

    return index_counts(require_megatron_prefix(prefix) + ".idx")


def megatron_tokenizer(tokenizer_dir: str | os.PathLike):
    """Megatron's own HuggingFace tokenizer wrapper around a ``save_pretrained`` directory.

    This is what ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model <dir>`` loads; the
    GPTDataset only needs its ``vocab_size``, ``eod`` and ``pad``.
    """
    require_package("megatron.core", "megatron-core")
    from megatron.core.tokenizers import MegatronTokenizer

    tokenizer_dir = Path(tokenizer_dir).resolve()
    if not (tokenizer_dir / "tokenizer_config.json").exists():
        raise UserError(f"not a saved HuggingFace tokenizer directory: {tokenizer_dir}")
    metadata = {"library": "huggingface", "model_type": "gpt"}
    return MegatronTokenizer.from_pretrained(str(tokenizer_dir), metadata_path=metadata)


class _VocabOnlyTokenizer:
    """Minimal tokenizer facts for ``GPTDatasetConfig`` when only a vocab size is known."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size = int(vocab_size)
        self.eod = int(eod)
        self.eos = int(eod)
        self.pad = -1
        # Part of the GPTDataset cache key (Megatron hashes its config, tokenizer included).
        self.unique_identifiers = {"class": "VocabOnly", "vocab_size": self.vocab_size,
                                   "eod": self.eod}


def build_gpt_dataset(
    prefix: str | os.PathLike,
    *,
    tokenizer,
    seq_length: int,
    num_samples: int,
    seed: int,
    cache_dir: str | os.PathLike,
    create_attention_mask: bool = False,
):
    """The training ``GPTDataset`` over one exported prefix (all documents in the train split).

    ``tokenizer`` is a Megatron tokenizer (see :func:`megatron_tokenizer`) or
    ``(vocab_size, eod_id)``. At least ``num_samples`` samples of ``seq_length`` tokens are
    available; Megatron repeats (re-shuffled) epochs when the data is smaller than that.
    """
    require_package("megatron.core", "megatron-core")
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if isinstance(tokenizer, tuple):
        tokenizer = _VocabOnlyTokenizer(*tokenizer)
    prefix = require_megatron_prefix(prefix)
    if num_samples < 1:
        raise UserError("need at least one training sample")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split="1,0,0",
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=create_attention_mask,
        path_to_cache=str(Path(cache_dir).resolve()),
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config)
    train, _valid, _test = builder.build()
    if train is None or len(train) == 0:
        raise UserError(f"Megatron dataset {prefix} is too small for seq_length={seq_length}")
    return train
