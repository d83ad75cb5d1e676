"""An Accelerate user's script: prepare the tiny proxy, extract gradient features (tests/integrations/test_accelerate.py).

usage: accelerate launch ... accelerate_extract.py MODEL_DIR STORE_DIR N_DOCS CHUNK_SIZE BATCH_SIZE
       [SLEEP_AFTER_CHUNK_S] [N_LAYERS] [MODE]
MODE ``prepared`` (default): the model goes through ``accelerator.prepare`` (DDP when launched with
2 processes) and the toolkit unwraps it; ``module``: a ProxyGradients made from MODEL_DIR.
Prints "chunk-written C" after each chunk it wrote; with SLEEP_AFTER_CHUNK_S it then sleeps (so a
test can kill it). Bad input: one line on stderr, exit 2.
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_proxy import tiny_documents  # noqa: E402


def main(argv):
    model_dir, store_dir, n_docs, chunk, batch = argv[:5]
    sleep_s = float(argv[5]) if len(argv) > 5 else 0.0
    n_layers = int(argv[6]) if len(argv) > 6 else 2
    mode = argv[7] if len(argv) > 7 else "prepared"
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spokes_lightning.utils.errors import user_errors_exit
    from spokes_lightning.integrations.accelerate import extract_with_accelerate

    accelerator = Accelerator()

    written = []

    def report(c):
        written.append(c)
        print(f"chunk-written {c}", flush=True)
        time.sleep(sleep_s)

    options = dict(n_layers=n_layers, k=64, max_length=32)  # as tests/scripts/extract_run.py
    with user_errors_exit():
        if mode == "module":
            from spokes_lightning.features.gradients import ProxyGradients

            target, options = ProxyGradients(model_dir, **options), {}
        else:
            target = accelerator.prepare(AutoModelForCausalLM.from_pretrained(model_dir))
            options["tokenizer"] = AutoTokenizer.from_pretrained(model_dir)
        store = extract_with_accelerate(target, tiny_documents(int(n_docs)), store_dir, chunk_size=int(chunk),
                                        batch_size=int(batch), accelerator=accelerator, progress=False,
                                        on_chunk=report, **options)
    Path(f"{store_dir}.rank{accelerator.process_index}.json").write_text(json.dumps(
        {"world": accelerator.num_processes, "type": str(accelerator.distributed_type), "chunks": written,
         "requires_grad_kept": all(p.requires_grad for p in target.parameters()) if mode != "module" else None}))
    print(f"done rank {accelerator.process_index} of {accelerator.num_processes} rows {len(store)}", flush=True)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1:])
