"""Test helpers: a small synthetic corpus and a tokenizer trained on it with `tokenizers`.

The corpus is generated (seeded) rather than read from disk, so the tests stand alone; its
sentences follow a few fixed templates, so a tiny LM can visibly lower its loss in ~20 steps.
"""
from __future__ import annotations

import random

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our team", "the river", "a bird"]
VERBS = ["sees", "likes", "follows", "finds", "builds", "paints", "carries"]
OBJECTS = ["the ball", "a red house", "the old tree", "some bread", "the long road", "a song"]


def tiny_corpus(n: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = [
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
            for _ in range(rng.randint(3, 9))
        ]
        docs.append({"id": f"doc-{i:03d}", "text": " ".join(sentences), "source": "synthetic"})
    return docs


def tiny_tokenizer(texts, vocab_size: int = 300):
    """A byte-level BPE tokenizer wrapped as a HuggingFace PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
