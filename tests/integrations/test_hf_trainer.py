"""SelectionDataset + SelectionTrainerCallback under a stock ``transformers.Trainer``: 2 gloo processes
(dispatched and sharded loaders) and 1 process serve each selected document once per copy per epoch,
exactly the planned batches; padding-only batches are harmless; a resume replays the uninterrupted
batches; bad input exits 2 with one line."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
from ports import free_port  # noqa: E402  (tests/helpers: a per-xdist-worker port block)
SCRIPT = ROOT / "tests" / "scripts" / "hf_trainer_run.py"
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from tiny_text import tiny_corpus, tiny_tokenizer  # noqa: E402

from spokes_lightning.utils.errors import UserError  # noqa: E402
from spokes_lightning.integrations.hf_trainer import (SelectionDataset, SelectionTrainerCallback,  # noqa: E402
                                                      find_selection_dataset)

torch.set_num_threads(1)
N_DOCS, SEQ, BS, EPOCHS, SAVE, RESUME_AT = 40, 32, 2, 2, 20, 20
DOCS = tiny_corpus(N_DOCS)
SELECTION = {d["id"]: (2 if i % 4 == 0 else 1) for i, d in enumerate(DOCS[:16])}  # 4 of 16 taken twice



def launch(spec: dict, path: Path, processes: int = 1) -> subprocess.Popen:
    path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    cmd = [sys.executable, str(SCRIPT), str(path)]
    if processes > 1:  # torchrun through accelerate: MULTI_CPU + gloo (see tests/integrations/test_accelerate.py)
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
               "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(free_port()), *cmd[1:]]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tokenizer = tiny_tokenizer(d["text"] for d in DOCS)
    tokenizer.save_pretrained(root / "tok")
    spec = {"tokenizer": str(root / "tok"), "n_docs": N_DOCS, "selection": SELECTION, "seq_length": SEQ,
            "batch_size": BS}
    return root, tokenizer, spec


@pytest.fixture(scope="module")
def runs(base):
    """One 2-process launch (three Trainers: dispatched, sharded, batch_size 1) and, meanwhile, one
    uninterrupted 1-process run with checkpoints."""
    root, _, spec = base
    two = launch({**spec, "out": str(root / "two"), "runs": [
        {"name": "dispatch", "epochs": EPOCHS, "output_dir": str(root / "d")},
        {"name": "shard", "epochs": EPOCHS, "dispatch_batches": False, "output_dir": str(root / "s")},
        {"name": "bs1", "epochs": 1, "batch_size": 1, "output_dir": str(root / "b")}]}, root / "two.json", 2)
    one = launch({**spec, "out": str(root / "one"), "runs": [
        {"name": "one", "epochs": EPOCHS, "save_steps": SAVE, "output_dir": str(root / "ck")}]}, root / "one.json")
    for proc in (finish(two), finish(one)):
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return root


def report(directory: Path, name: str, rank: int) -> dict:
    return json.loads((directory / f"{name}.rank{rank}.json").read_text())


def dataset(tokenizer, world: int, batch_size: int = BS, selection=SELECTION) -> SelectionDataset:
    return SelectionDataset(DOCS, selection, tokenizer, seq_length=SEQ, batch_size=batch_size, world_size=world)


def planned(ds: SelectionDataset, epoch: int, rank: int) -> list[list[list[int]]]:
    return [[ds.sequence(seq)["input_ids"].tolist() for seq in batch] for batch in ds.plan(epoch)[rank]]


def documents_served(batches: list[dict], eos: int) -> Counter:
    """Concatenate the real tokens (labels != -100) of a rank's batches in order and split on EOS."""
    stream = [t for b in batches for ids, labels in zip(b["input_ids"], b["labels"])
              for t, y in zip(ids, labels) if y != -100]
    assert not stream or stream[-1] == eos  # the last document ends with its EOS
    docs, current = Counter(), []
    for t in stream:
        current.append(t)
        if t == eos:
            docs[tuple(current)] += 1
            current = []
    return docs


def expected_documents(tokenizer) -> Counter:
    text, want = {d["id"]: d["text"] for d in DOCS}, Counter()
    for doc_id, copies in SELECTION.items():
        tokens = tokenizer(text[doc_id], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        want[tuple(tokens)] += copies
    return want


def by_epoch(rep: dict, epoch: int) -> list[dict]:
    n = rep["batches_per_epoch"]
    return [b for b in rep["batches"] if epoch * n <= b["step"] < (epoch + 1) * n]


def test_each_selected_document_is_served_once_per_copy_per_epoch(base, runs):
    _, tokenizer, _ = base
    eos, want = tokenizer.eos_token_id, expected_documents(tokenizer)
    assert sum(want.values()) == 20 and sum(SELECTION.values()) == 20
    ds2, ds1 = dataset(tokenizer, 2), dataset(tokenizer, 1)
    for name in ("dispatch", "shard"):
        reps = [report(runs / "two", name, r) for r in (0, 1)]
        assert all(r["world"] == 2 and r["type"] == "DistributedType.MULTI_CPU" and r["backend"] == "gloo"
                   for r in reps)
        n = ds2.batches_per_epoch()
        assert all(r["batches_per_epoch"] == r["len_dataloader"] == n and r["global_step"] == EPOCHS * n
                   and len(r["batches"]) == EPOCHS * n for r in reps)
        for epoch in range(EPOCHS):
            served = [documents_served(by_epoch(r, epoch), eos) for r in reps]
            assert served[0] + served[1] == want, (name, epoch)  # everything, once per copy, nothing else
            assert served[0] and served[1]
            for rank, rep in enumerate(reps):  # process r saw exactly plan[r], batch by batch
                assert [b["input_ids"] for b in by_epoch(rep, epoch)] == planned(ds2, epoch, rank)
    assert [report(runs / "two", "shard", r)["batches"] for r in (0, 1)] == \
        [report(runs / "two", "dispatch", r)["batches"] for r in (0, 1)]
    one = report(runs / "one", "one", 0)
    assert one["world"] == 1 and one["batches_per_epoch"] == ds1.batches_per_epoch() == one["len_dataloader"]
    for epoch in range(EPOCHS):
        assert documents_served(by_epoch(one, epoch), eos) == want
        assert [b["input_ids"] for b in by_epoch(one, epoch)] == planned(ds1, epoch, 0)
    assert planned(ds1, 0, 0) != planned(ds1, 1, 0)  # a new shuffle each epoch


def test_a_batch_that_is_all_padding_on_one_rank_is_harmless(base, runs):
    _, tokenizer, _ = base
    reps = [report(runs / "two", "bs1", r) for r in (0, 1)]
    empty = [[all(y == -100 for row in b["labels"] for y in row) for b in rep["batches"]] for rep in reps]
    assert any(empty[0]) or any(empty[1])  # this run does have padding-only batches on a rank ...
    assert not any(a and b for a, b in zip(*empty))  # ... never on both at the same step
    assert documents_served(reps[0]["batches"], tokenizer.eos_token_id) + \
        documents_served(reps[1]["batches"], tokenizer.eos_token_id) == expected_documents(tokenizer)
    assert all(r["finite"] and r["losses_finite"] and len(r["losses"]) == r["global_step"] for r in reps)

    # the Trainer's loss on W ranks (trainer.py compute_loss): model(..., num_items_in_batch=N).loss * W,
    # N = the targets of the step on all ranks; DDP averages the gradients over the ranks
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    ds = dataset(tokenizer, 2)
    real = {k: torch.stack([ds.sequence(s)[k] for s in ds.plan(0)[0][0]])
            for k in ("input_ids", "labels", "attention_mask")}
    pad = {k: torch.stack([ds.sequence([])[k]] * BS) for k in real}
    assert (pad["labels"] == -100).all() and (pad["attention_mask"] == 0).all()
    n_items = (real["labels"][:, 1:] != -100).sum()

    def grads(batch, **kw):
        model.zero_grad()
        loss = model(**batch, **kw).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_real, g_real = grads(real, num_items_in_batch=n_items)
    loss_pad, g_pad = grads(pad, num_items_in_batch=n_items)
    loss_mean, g_mean = grads(real)  # one process holding only the real sequences
    assert loss_pad == 0 and all((g == 0).all() for g in g_pad)  # exactly nothing from the padding rank
    assert torch.allclose((2 * loss_real + 2 * loss_pad) / 2, loss_mean)
    assert all(torch.allclose((2 * a + 2 * b) / 2, c, atol=1e-6) for a, b, c in zip(g_real, g_pad, g_mean))
    assert torch.isnan(model(**pad).loss)  # a per-rank mean would be 0/0: why the callback wants global counts


OTHER = dict(list(SELECTION.items())[:-1])  # one document less
BAD = {  # case: (run, words of the one stderr line)
    "unknown id": ({"selection": {**SELECTION, "no-such-doc": 1}}, ["not in the corpus", "no-such-doc"]),
    "other selection": ({"selection": OTHER, "epochs": EPOCHS, "resume": True},
                        [f"checkpoint at step {RESUME_AT} is for a different selection", "n_documents 16 -> 15"]),
    "batch size": ({"trainer_batch_size": 3}, ["per_device_train_batch_size=3", "batch_size=2"]),
}


@pytest.fixture(scope="module")
def followups(base, runs):
    """Concurrently: a fresh 1-process Trainer resumed from checkpoint-RESUME_AT, and the bad inputs."""
    root, _, spec = base
    checkpoint = str(root / "ck" / f"checkpoint-{RESUME_AT}")
    procs = {"resumed": launch({**spec, "out": str(root / "resumed"), "runs": [
        {"name": "resumed", "epochs": EPOCHS, "resume": checkpoint, "restore_callbacks": True,
         "output_dir": str(root / "ck2")}]}, root / "resumed.json")}
    for i, (name, (run, _)) in enumerate(BAD.items()):
        run = {**run, "name": "x", "output_dir": str(root / f"x{i}")}
        if run.get("resume"):
            run["resume"] = checkpoint
        procs[name] = launch({**spec, "out": str(root / "bad"), "runs": [run]}, root / f"bad{i}.json")
    return {name: finish(proc) for name, proc in procs.items()}


def test_resume_replays_the_uninterrupted_batches_and_records_the_fingerprint(base, runs, followups):
    root, tokenizer, _ = base
    ds1 = dataset(tokenizer, 1)
    n = ds1.batches_per_epoch()
    assert RESUME_AT < n < EPOCHS * n  # the resumed part crosses an epoch boundary
    state = json.loads((root / "ck" / f"checkpoint-{RESUME_AT}" / "trainer_state.json").read_text())
    record = state["stateful_callbacks"]["SelectionTrainerCallback"]
    assert record["attributes"]["record"]["fingerprint"] == ds1.fingerprint == record["args"]["expected_fingerprint"]
    assert record["attributes"]["record"]["batches_per_epoch"] == n
    assert followups["resumed"].returncode == 0, followups["resumed"].stderr[-4000:]
    full, resumed = report(runs / "one", "one", 0), report(root / "resumed", "resumed", 0)
    assert [b["step"] for b in resumed["batches"]] == list(range(RESUME_AT, EPOCHS * n))
    assert resumed["batches"] == full["batches"][RESUME_AT:]  # the same token ids, step by step
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-4)  # log history: loaded + resumed
    assert full["batches"][RESUME_AT - 1] != full["batches"][RESUME_AT]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line(base, followups, case):
    done = followups[case]
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert all(word in lines[0] for word in BAD[case][1]), lines[0]
    bad = base[0] / "bad"
    assert not bad.exists() or not list(bad.iterdir())  # nothing written


def test_callback_checks_in_process(base, runs):
    """The restored callback (Trainer._load_callback_state: type(cb)(**args) + attributes) refuses another
    selection; the dataset is found through Accelerate's sharded loader; workers keep the order."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader
    from transformers import TrainerState, TrainingArguments

    root, tokenizer, _ = base
    saved = json.loads((root / "ck" / f"checkpoint-{RESUME_AT}" / "trainer_state.json").read_text())
    data = saved["stateful_callbacks"]["SelectionTrainerCallback"]
    restored = SelectionTrainerCallback(**data["args"])
    for key, value in data["attributes"].items():
        setattr(restored, key, value)
    json.dumps(restored.state())  # JSON-able
    args = TrainingArguments(str(root / "unused"), per_device_train_batch_size=BS, use_cpu=True, report_to="none")
    ds = dataset(tokenizer, 1)
    loader = prepare_data_loader(DataLoader(ds, batch_size=BS), num_processes=2, process_index=1,
                                 dispatch_batches=False, put_on_device=False)
    assert find_selection_dataset(loader) is ds
    other = dataset(tokenizer, 1, selection={**SELECTION, DOCS[0]["id"]: 3})
    fresh = TrainerState()
    with pytest.raises(UserError, match="expected_fingerprint is for a different selection"):
        restored.on_train_begin(args, fresh, None, train_dataloader=DataLoader(other, batch_size=BS))
    restored.on_train_begin(args, fresh, None, train_dataloader=DataLoader(ds, batch_size=BS))
    assert restored.record["fingerprint"] == ds.fingerprint
    with pytest.raises(UserError, match="per_device_train_batch_size=2 but the SelectionDataset was built with "
                                        "batch_size=1"):
        SelectionTrainerCallback().on_train_begin(args, fresh, None,
                                                  train_dataloader=DataLoader(dataset(tokenizer, 1, 1)))
    ds.set_epoch(1)
    plain = [b["input_ids"] for b in DataLoader(ds, batch_size=BS)]
    with_workers = [b["input_ids"] for b in DataLoader(ds, batch_size=BS, num_workers=2)]
    assert len(plain) == ds.batches_per_epoch() and all(torch.equal(a, b) for a, b in zip(plain, with_workers))
    assert len(with_workers) == len(plain) and len(ds) == len(plain) * BS
    with pytest.raises(UserError, match="not in the corpus"):
        dataset(tokenizer, 1, selection=["doc-000", "nope"])


def test_fixed_batches_per_epoch_bound_every_shuffle():
    class Tok:
        eos_token_id, pad_token_id = 0, None

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[1] * len(t.split()) for t in texts]}

    import numpy as np

    rng = np.random.default_rng(0)
    docs = [(f"d{i}", " ".join(["w"] * int(n))) for i, n in enumerate(rng.integers(1, 90, size=30))]
    for world in (1, 2, 3):
        for batch_size in (2, 3):
            ds = SelectionDataset(docs, {d: 1 + i % 2 for i, (d, _) in enumerate(docs)}, Tok(), seq_length=16,
                                  batch_size=batch_size, world_size=world)
            n = ds.batches_per_epoch()
            for epoch in range(20):
                plan = ds.plan(epoch)
                assert [len(rank) for rank in plan] == [n] * world
                need = max(-(-sum(1 for b in rank for s in b if s) // batch_size) for rank in plan)
                assert need <= n
                for b in range(n):  # every step has something to predict on some rank
                    assert any(sum(e - s for _, s, e in seq) >= 2 for rank in plan for seq in rank[b])
            assert len(ds) == n * world * batch_size
    tail = [("a", " ".join(["w"] * 10)), ("b", " ".join(["w"] * 21))]  # 11 + 22 = 33 tokens = 2 * 16 + 1
    with pytest.raises(UserError, match="batch 2 has no token to predict on any rank"):
        SelectionDataset(tail, ["a", "b"], Tok(), seq_length=16, batch_size=1, world_size=1).plan(0)
    merged = SelectionDataset(tail, ["a", "b"], Tok(), seq_length=16, batch_size=2, world_size=1).plan(0)
    # with 2 a batch, the 1-token tail rides with the sequence before it: every batch has a target
    assert [[sum(e - s for _, s, e in seq) for seq in batch] for batch in merged[0]] == [[16, 0], [16, 1]]
