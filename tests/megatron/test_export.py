"""Export of a selection: text files, Megatron indexed dataset and the launch script."""
from __future__ import annotations

import gzip
import json
import subprocess

import numpy as np
import pytest

from spokes_lightning.utils.errors import UserError
from spokes_lightning.megatron.export import export_selection
from spokes_lightning.megatron.launch_script import (
    LLAMA_3_2_1B,
    gpt_model_settings,
    megatron_llama_args,
    parse_launch_script_flags,
    train_iters_for,
)
from tiny_text import tiny_corpus, tiny_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return tiny_corpus(40)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return tiny_tokenizer(d["text"] for d in corpus)


@pytest.fixture(scope="module")
def exported(corpus, tokenizer, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    selection = [7, 3, 21, 0, 39]
    return run_dir, selection, export_selection(corpus, selection, "spokes", run_dir, tokenizer)


def test_text_exports_keep_selection_order_and_are_reproducible(exported, corpus, tokenizer):
    run_dir, selection, res = exported
    raw = open(res.jsonl_path, "rb").read()
    assert raw[4:8] == b"\x00\x00\x00\x00"  # gzip mtime field is 0
    rows = [json.loads(line) for line in gzip.decompress(raw).decode().splitlines()]
    assert [r["id"] for r in rows] == [corpus[i]["id"] for i in selection]
    assert rows[2]["text"] == corpus[21]["text"] and rows[2]["source"] == "synthetic"

    import pyarrow.parquet as pq

    table = pq.read_table(res.parquet_path).to_pylist()
    assert table == rows

    # Re-exporting the same selection by ids gives byte-identical text files.
    again = export_selection(corpus, [corpus[i]["id"] for i in selection], "again", run_dir,
                             tokenizer)
    assert open(again.jsonl_path, "rb").read() == raw
    assert again.n_tokens == res.n_tokens


def test_megatron_dataset_holds_each_document_plus_eod(exported, corpus, tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    run_dir, selection, res = exported
    ds = IndexedDataset(res.data_prefix)
    assert len(ds) == res.n_docs == len(selection)
    assert res.token_dtype == "uint16" and ds.index.dtype == np.uint16
    eod = tokenizer.eos_token_id
    total = 0
    for k, i in enumerate(selection):
        want = tokenizer(corpus[i]["text"], add_special_tokens=False)["input_ids"] + [eod]
        assert ds[k].tolist() == want
        total += len(want)
    assert res.n_tokens == total and res.n_tokens_without_eod == total - len(selection)
    leftovers = [p.name for p in (run_dir / "megatron").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_launch_script_carries_the_paper_settings(exported):
    run_dir, _, res = exported
    script = open(res.script_path).read()
    subprocess.run(["bash", "-n", res.script_path], check=True)
    flags = parse_launch_script_flags(script)
    assert flags["--train-iters"] == "11921" == str(train_iters_for(100e9, 2048, 4096))
    assert flags["--lr"] == "0.0003" and flags["--lr-decay-style"] == "constant"
    assert flags["--global-batch-size"] == "2048" and flags["--seq-length"] == "4096"
    assert flags["--num-layers"] == "16" and flags["--hidden-size"] == "2048"
    assert flags["--num-query-groups"] == "8" and flags["--group-query-attention"] is True
    assert flags["--rotary-base"] == "500000" and flags["--normalization"] == "RMSNorm"
    assert flags["--swiglu"] is True and flags["--bf16"] is True
    assert "--untie-embeddings-and-output-weights" not in flags  # Llama-3.2-1B ties them
    assert flags["--data-path"] == res.data_prefix and res.data_prefix.startswith("/")
    assert flags["--tokenizer-type"] == "HuggingFaceTokenizer"
    assert flags["--tokenizer-model"] == res.tokenizer_dir
    assert flags["--micro-batch-size"] == "${MICRO_BATCH_SIZE:-4}"
    for env in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        assert f'"${env}"' in script
    # The script is exactly the settings dict (plus env overrides).
    args = megatron_llama_args(data_prefix=res.data_prefix, tokenizer_dir=res.tokenizer_dir,
                               run_dir=run_dir, method="spokes")
    rendered = {k: (True if v is True else str(v)) for k, v in args.items()}
    rendered["--micro-batch-size"] = flags["--micro-batch-size"]
    rendered["--tensor-model-parallel-size"] = flags["--tensor-model-parallel-size"]
    rendered["--pipeline-model-parallel-size"] = flags["--pipeline-model-parallel-size"]
    assert flags == rendered


def test_model_settings_follow_the_flags():
    args = megatron_llama_args(data_prefix="/d/x", tokenizer_dir="/t", run_dir="/r", method="m")
    config, model = gpt_model_settings(args, vocab_size=128256)
    assert config["num_layers"] == LLAMA_3_2_1B.num_layers and config["num_query_groups"] == 8
    assert config["gated_linear_unit"] and not config["add_bias_linear"]
    assert model["vocab_size"] == 128256 and model["rotary_base"] == 500000
    assert model["share_embeddings_and_output_weights"] is True
    assert gpt_model_settings(args, vocab_size=300)[1]["vocab_size"] == 384  # padded to 128


def test_bad_selections_fail_cleanly(corpus, tokenizer, tmp_path):
    with pytest.raises(UserError, match="not in the corpus"):
        export_selection(corpus, ["doc-000", "nope"], "m", tmp_path, tokenizer)
    with pytest.raises(UserError, match="empty selection"):
        export_selection(corpus, [], "m", tmp_path, tokenizer)
    with pytest.raises(UserError, match="outside the corpus"):
        export_selection(corpus, [0, 400], "m", tmp_path, tokenizer)
    with pytest.raises(UserError, match="more than once"):
        export_selection(corpus, [1, 1], "m", tmp_path, tokenizer)
    with pytest.raises(UserError, match="method name"):
        export_selection(corpus, [1], "../evil", tmp_path, tokenizer)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
