"""A user's plain transformers Trainer script (no error handling of its own, as in the module docstring of
spokes_lightning.integrations.hf_trainer): resuming with another selection ends with ONE line on stderr and
exit code 2, not a traceback; other errors keep their traceback."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
from tiny_text import tiny_corpus, tiny_tokenizer  # noqa: E402

USER_SCRIPT = r'''
import json, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments
from spokes_lightning.integrations.hf_trainer import SelectionDataset, SelectionTrainerCallback

corpus, tok_dir, selection, out, max_steps = sys.argv[1:6]
torch.set_num_threads(1)
tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
train = SelectionDataset(documents=corpus, selection=json.loads(selection), tokenizer=tokenizer,
                         seq_length=16, batch_size=2, seed=0)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                     max_position_embeddings=32))
args = TrainingArguments(out, per_device_train_batch_size=2, max_steps=int(max_steps), save_steps=2,
                         use_cpu=True, report_to="none", logging_steps=1)
trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[SelectionTrainerCallback()])
trainer.train(resume_from_checkpoint=len(sys.argv) > 6 or None)
'''


def test_resume_with_another_selection_is_one_line_and_exit_2(tmp_path):
    docs = tiny_corpus(12)
    corpus = tmp_path / "corpus.jsonl.gz"
    with gzip.open(corpus, "wt") as fh:
        fh.writelines(json.dumps(d) + "\n" for d in docs)
    tiny_tokenizer(d["text"] for d in docs).save_pretrained(tmp_path / "tok")
    script = tmp_path / "train.py"
    script.write_text(USER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               ACCELERATE_USE_CPU="true")
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(k, None)
    ids = [d["id"] for d in docs]
    out = tmp_path / "lm"

    def train(selection, max_steps, *resume):
        return subprocess.run([sys.executable, str(script), str(corpus), str(tmp_path / "tok"),
                               json.dumps(selection), str(out), str(max_steps), *resume],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    first = train(ids[:10], 2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "checkpoint-2" / "trainer_state.json").exists()

    other = train(ids[:9], 4, "resume")  # one document less
    lines = [line for line in other.stderr.splitlines() if line.strip()]
    assert other.returncode == 2, other.stderr[-3000:]
    assert "Traceback" not in other.stderr, other.stderr[-3000:]
    assert lines[-1].startswith("error: the checkpoint at step 2 is for a different selection"), lines[-1]
    assert "n_documents 10 -> 9" in lines[-1]
    assert not (out / "checkpoint-4").exists()  # nothing trained on the other selection

    same = train(ids[:10], 4, "resume")  # the same selection resumes
    assert same.returncode == 0, same.stderr[-3000:]
    assert (out / "checkpoint-4").exists()


def test_other_errors_keep_their_traceback(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text("from spokes_lightning.utils.errors import UserError, exit_on_uncaught_user_error\n"
                      "import sys\n"
                      "exit_on_uncaught_user_error()\n"
                      "exit_on_uncaught_user_error()  # once per process\n"
                      "if sys.argv[1] == 'user':\n"
                      "    raise UserError('bad\\n  input')\n"
                      "raise RuntimeError('a bug')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bug = subprocess.run([sys.executable, str(script), "bug"], env=env, capture_output=True, text=True, timeout=60)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "RuntimeError: a bug" in bug.stderr
    user = subprocess.run([sys.executable, str(script), "user"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert (user.returncode, user.stderr) == (2, "error: bad input\n")
