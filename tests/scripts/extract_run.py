"""Run extract_features on the tiny proxy corpus (a subprocess entry point for tests/features/test_extract.py).

usage: extract_run.py MODEL_DIR STORE_DIR N_DOCS CHUNK_SIZE BATCH_SIZE DEVICES STRATEGY [SLEEP_AFTER_CHUNK_S]
Prints "chunk-written C" after each chunk; with SLEEP_AFTER_CHUNK_S it then sleeps (so a test can kill it).
"""
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_proxy import tiny_documents  # noqa: E402

from spokes_lightning.features.extract import ChunkWriter, extract_features  # noqa: E402
from spokes_lightning.features.extract import ProxyGradientModule  # noqa: E402


class ReportChunks(Callback):
    def __init__(self, sleep_s: float):
        self.sleep_s, self.reported = sleep_s, 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        writer = next(cb for cb in trainer.callbacks if isinstance(cb, ChunkWriter))
        for c in writer.chunks_written[self.reported:]:
            print(f"chunk-written {c}", flush=True)
            time.sleep(self.sleep_s)
        self.reported = len(writer.chunks_written)


def main(argv):
    model_dir, store_dir, n_docs, chunk, batch, devices, strategy = argv[:7]
    sleep_s = float(argv[7]) if len(argv) > 7 else 0.0
    torch.set_num_threads(1)
    module = ProxyGradientModule(model_dir, n_layers=2, k=64, max_length=32)
    store = extract_features(module, tiny_documents(int(n_docs)), store_dir, chunk_size=int(chunk),
                             batch_size=int(batch), devices=int(devices), strategy=strategy,
                             accelerator="cpu", progress=False, callbacks=[ReportChunks(sleep_s)])
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    # a file per rank, not stdout: a rank > 0 started by Lightning's launcher may lose its stdout
    Path(f"{store_dir}.rank{rank}.seen").write_text(str(module.documents_seen))
    print(f"done rank-docs-seen {module.documents_seen} rows {len(store)}", flush=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
