"""A tiny random-init Llama proxy + byte-level BPE tokenizer saved to a directory (tests only)."""
from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "data model gradient token layer river mountain cloud quick brown fox jumps over lazy dog "
    "science history music paper energy market city garden ocean light number table code"
).split()


def tiny_documents(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (id, text) pairs of varied length; a couple are empty/one-token to be skipped."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        if i == 3:
            text = ""
        elif i == 7:
            text = "a"
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
        docs.append((f"doc{i:03d}", text))
    return docs


def build_tiny_proxy(directory: str | Path, *, vocab: int = 512, hidden: int = 64, layers: int = 4,
                     tie: bool = True, seed: int = 0) -> Path:
    """Save a random-init LlamaForCausalLM and a trained BPE tokenizer into ``directory``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([t for _, t in tiny_documents(60, seed=1)] * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=tie)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory
