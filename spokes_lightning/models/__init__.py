"""Language models: the LLaMA builder and trainer, tokenizers, the proxy and local pretraining."""
