import pytest
from word_docs import write_word_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 150-document word corpus and its tokenizer (the online Lightning and HF Trainer tests)."""
    return write_word_corpus(tmp_path_factory.mktemp("online"))
