"""The launch script's model + data path really trains: megatron-core GPTModel on GPTDataset.

The LLaMA architecture is built from the SAME ``megatron_llama_args`` flags the launch script
is rendered from (same switches, smaller numbers), and reads the exported ``.bin/.idx`` through
megatron-core's ``GPTDataset``, on CPU (see ``megatron_cpu_shim`` for what that needs).
"""
from __future__ import annotations

import math

import pytest
import torch

from spokes_lightning.megatron.export import export_selection
from spokes_lightning.megatron.dataset import build_gpt_dataset, megatron_tokenizer
from spokes_lightning.megatron.launch_script import LLAMA_3_2_1B, gpt_model_settings, megatron_llama_args
from megatron_cpu_shim import megatron_on_cpu
from tiny_text import tiny_corpus, tiny_tokenizer

SEQ = 32
SMALL = LLAMA_3_2_1B.scaled(
    num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2
)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.set_num_threads(1)
    corpus = tiny_corpus(40)
    tokenizer = tiny_tokenizer(d["text"] for d in corpus)
    run_dir = tmp_path_factory.mktemp("mrun")
    res = export_selection(corpus, list(range(0, 40, 2)), "random", run_dir, tokenizer,
                           shape=SMALL, seq_length=SEQ, global_batch_size=4,
                           train_tokens=20 * 4 * SEQ)
    return run_dir, res


def test_scaled_llama_trains_on_exported_data(export):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    run_dir, res = export
    args = megatron_llama_args(data_prefix=res.data_prefix, tokenizer_dir=res.tokenizer_dir,
                               run_dir=run_dir, method="random", shape=SMALL, seq_length=SEQ,
                               global_batch_size=4, train_tokens=20 * 4 * SEQ)
    assert args["--train-iters"] == 20
    config_kwargs, model_kwargs = gpt_model_settings(args, vocab_size=res.vocab_size)
    assert model_kwargs["position_embedding_type"] == "rope"

    # Megatron's own HF tokenizer wrapper over the exported tokenizer dir (--tokenizer-model).
    mtok = megatron_tokenizer(res.tokenizer_dir)
    assert mtok.eod == res.eod_id and mtok.vocab_size == res.vocab_size
    dataset = build_gpt_dataset(res.data_prefix, tokenizer=mtok, seq_length=SEQ,
                                num_samples=int(args["--train-iters"]) * 4,
                                seed=int(args["--seed"]),
                                cache_dir=run_dir / "cache", create_attention_mask=True)
    assert len(dataset) >= 80
    sample = dataset[0]
    assert sample["tokens"].shape == (SEQ,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])

    with megatron_on_cpu():
        torch.manual_seed(0)
        config = TransformerConfig(**config_kwargs, use_cpu_initialization=True,
                                   params_dtype=torch.float32)
        model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(
            normalization=config_kwargs["normalization"]), **model_kwargs)
        assert model.share_embeddings_and_output_weights  # tied, like Llama-3.2-1B
        attn = model.decoder.layers[0].self_attention
        assert attn.config.num_query_groups == 2  # grouped-query attention
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
        assert batch["attention_mask"].shape == (4, 1, SEQ, SEQ)  # causal, True = masked
        losses = []
        for _ in range(12):  # repeated batch: a working model must fit it
            per_token = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                              attention_mask=batch["attention_mask"], labels=batch["labels"])
            loss = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(model_kwargs["vocab_size"]), rel=0.2)
    assert losses[-1] < 0.6 * losses[0], losses
    print("megatron-core CPU losses:", [round(x, 3) for x in losses])
