"""Typed stage outputs (spokes_lightning/pipeline/outputs.py): every stage declares one, it survives
the marker's JSON unchanged, and markers written before the types still read back."""
import json

import pytest
from omegaconf import OmegaConf

from spokes_lightning.pipeline import outputs as o
from spokes_lightning.pipeline.stage import RunContext, Stage, read_stage_output, run_pipeline
from spokes_lightning.pipeline.stages import STAGES
from spokes_lightning.utils.errors import UserError

EXPORTED = {"n_docs": 3, "n_tokens": 40, "megatron_prefix": "megatron/random_text_document",
            "script": "megatron/random_pretrain.sh", "jsonl": "selected/random.jsonl.gz",
            "parquet": "selected/random.parquet", "timings": {"tokenize_s": 0.5}}
RUN = {"seed": 0, "model_dir": "pretrain/random/seed_0/hf", "checkpoint": "pretrain/random/seed_0/megatron",
       "metrics": "pretrain/random/seed_0/metrics.jsonl", "final_loss": 6.5, "val_loss": 6.8}
PRETRAINED = {"model_dir": RUN["model_dir"], "metrics": RUN["metrics"], "steps": 4, "tokens_seen": 512,
              "dataset_tokens": 400, "epochs": 1.28, "final_loss": 6.5, "val_loss": 6.8, "runs": [RUN]}

#: one value of every output type, as its stage writes it
SAMPLES = [
    o.CorpusOutput(pool="corpus/pool", validation="corpus/validation", n_read=10, n_pool=8, n_validation=2,
                   sources={"c4": 8}, skipped_examples=["line 3: not JSON"], inputs=1),
    o.TokenizerOutput(dir="tokenizer", vocab_size=512, lengths="corpus/lengths.npy", pool_tokens=900),
    o.ProxyOutput(model="proxy", trained=True, loss=5.25),
    o.FeaturesOutput(gradients="features/gradients", embeddings="features/embeddings", quality="features/quality.npy",
                     quality_ids="features/quality_ids.npy", quality_source="column",
                     extras={"ref": o.ExtraArray(array="features/ref.npy")},
                     quality_scores={"heuristic_length": o.NamedScores(scores="features/h.npy", ids="features/h_ids.npy")}),
    o.SelectOutput(n_pool=8, n_unselectable=1, alpha=0.3,
                   methods={"random": o.SelectedMethod(selection="selections/random", n_selected=4, n_copies=4,
                                                       n_tokens=300)}, alpha_sweep="select/alpha_sweep.json"),
    o.ExportOutput.from_json({"methods": {"random": EXPORTED}}),
    o.PretrainOutput.from_json({"methods": {"random": PRETRAINED}}),
    o.EvaluateOutput(scores={"random": {"avg": 31.0}}, items={"random": "evaluate/random_items.npz"},
                     contamination={"random": o.Contamination(n_contaminated=1, n_documents=4, ids=["d1"])}),
    o.OnlineOutput(table="online/comparison.md", comparison="online/comparison.json", arms={"random": {"steps": 3}}),
    o.ReportOutput(summary="summary.json", report="report.md", figures={"fig3": "figures/fig3.png"}),
]


def test_every_stage_declares_its_own_output_type():
    assert [s.output_type for s in STAGES] == [o.OUTPUT_TYPES[s.name] for s in STAGES]
    assert all(s.output_type.stage == s.name for s in STAGES)
    assert sorted(o.OUTPUT_TYPES) == sorted(s.name for s in STAGES)
    assert {type(x) for x in SAMPLES} == set(o.OUTPUT_TYPES.values())


@pytest.mark.parametrize("value", SAMPLES, ids=lambda v: v.stage)
def test_outputs_survive_the_markers_json(value):
    back = type(value).from_json(json.loads(json.dumps(value.to_json())))
    assert back == value
    assert type(back.to_json()) is dict and back.to_json() == value.to_json()


def test_nested_values_are_typed_after_reading_back():
    export = o.ExportOutput.from_json({"methods": {"random": EXPORTED}})
    assert isinstance(export.methods["random"], o.ExportedMethod) and export.methods["random"].n_tokens == 40
    pre = o.PretrainOutput.from_json({"methods": {"random": PRETRAINED}})
    assert isinstance(pre.methods["random"].runs[0], o.PretrainRun) and pre.methods["random"].runs[0].val_loss == 6.8


@pytest.mark.parametrize("kind, legacy, check", [
    (o.ExportOutput, {"random": EXPORTED}, lambda v: v.methods["random"].megatron_prefix == EXPORTED["megatron_prefix"]),
    (o.ExportOutput, {"methods": EXPORTED}, lambda v: v.methods["methods"].n_docs == 3),  # a method named "methods"
    (o.PretrainOutput, {"random": PRETRAINED}, lambda v: v.methods["random"].runs[0].seed == 0),
    (o.PretrainOutput, {}, lambda v: v.methods == {}),  # pretraining disabled
    (o.OnlineOutput, {}, lambda v: not v.ran),  # online stage off
    (o.FeaturesOutput, {"gradients": "features/gradients", "extras.ref": {"array": "features/ref.npy"},
                        "quality_scores.h": {"scores": "features/h.npy", "ids": "features/h_ids.npy"}},
     lambda v: v.extras["ref"].array == "features/ref.npy" and v.quality_scores["h"].ids == "features/h_ids.npy"),
    (o.CorpusOutput, {"pool": "corpus/pool", "validation": "corpus/validation", "n_read": 3, "n_pool": 2,
                      "n_validation": 1}, lambda v: v.inputs is None and v.empty_texts == 0),
])
def test_markers_written_before_the_types_read_back(kind, legacy, check):
    assert check(kind.from_json(json.loads(json.dumps(legacy))))


@pytest.mark.parametrize("kind, data, message", [
    (o.TokenizerOutput, {"dir": "tokenizer", "vocab_size": 5, "lengths": "x.npy"}, "pool_tokens"),
    (o.TokenizerOutput, {"dir": "t", "vocab_size": 5, "lengths": "x.npy", "pool_tokens": 1, "colour": 1}, "colour"),
    (o.SelectOutput, {"n_pool": 1, "n_unselectable": 0, "alpha": None, "methods": []}, "methods"),
    (o.ExportOutput, {"methods": {"random": {**EXPORTED, "n_docs": None, "extra": 1}}}, "extra"),
])
def test_outputs_that_do_not_fit_their_type_are_refused(kind, data, message):
    with pytest.raises(o.OutputFormatError, match=message):
        kind.from_json(data)


class _Count(Stage):
    name = "tokenizer"  # any stage name with an output type will do
    output_type = o.TokenizerOutput

    def __init__(self, returns=None):
        self.runs, self.returns = 0, returns

    def run(self, ctx):
        self.runs += 1
        return self.returns or o.TokenizerOutput(dir="tok", vocab_size=self.runs, lengths="l.npy", pool_tokens=1)


def test_the_runner_hands_on_typed_outputs_and_reruns_a_marker_it_cannot_read(tmp_path, capsys):
    cfg = OmegaConf.create({"run_dir": str(tmp_path)})
    stage = _Count()
    ctx = run_pipeline([stage], cfg)
    assert ctx.output(o.TokenizerOutput).vocab_size == 1 and stage.runs == 1
    assert read_stage_output(tmp_path, o.TokenizerOutput) == ctx.output(o.TokenizerOutput)
    assert run_pipeline([stage], cfg).output(o.TokenizerOutput).vocab_size == 1 and stage.runs == 1  # cached
    marker = tmp_path / "stages" / "tokenizer.json"
    data = json.loads(marker.read_text())
    data["outputs"]["colour"] = "blue"  # a field this version does not know
    marker.write_text(json.dumps(data))
    assert run_pipeline([stage], cfg).output(o.TokenizerOutput).vocab_size == 2 and stage.runs == 2
    assert "holds outputs this version cannot read" in capsys.readouterr().err
    with pytest.raises(UserError, match="no usable proxy stage"):
        read_stage_output(tmp_path, o.ProxyOutput)


def test_a_stage_must_return_its_output_type(tmp_path):
    with pytest.raises(TypeError, match="returned dict, not TokenizerOutput"):
        run_pipeline([_Count(returns={"dir": "tok"})], OmegaConf.create({"run_dir": str(tmp_path)}))


def test_reading_another_stages_output_names_what_is_missing(tmp_path):
    ctx = RunContext(cfg=None, run_dir=tmp_path, results={"proxy": o.ProxyOutput(model="m", trained=False)})
    assert ctx.optional(o.SelectOutput) is None and ctx.optional(o.ProxyOutput).model == "m"
    with pytest.raises(UserError, match="stage 'select' has not run"):
        ctx.output(o.SelectOutput)
    ctx.unusable["select"] = "cached output selections/random is damaged"
    with pytest.raises(UserError, match="cannot be used: cached output"):
        ctx.output(o.SelectOutput)

