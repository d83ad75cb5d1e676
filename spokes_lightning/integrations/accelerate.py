"""Gradient-feature extraction from a Hugging Face Accelerate script.

:func:`extract_with_accelerate` is the Accelerate twin of
:func:`spokes_lightning.features.extract.extract_features`: the same feature modules (each batch
goes through the module's own ``predict_step``, e.g. :class:`ProxyGradients`' sketches),
the same fixed global chunks (:class:`~spokes_lightning.features.chunks.ChunkPlan`: chunk ``c`` to
process ``c % num_processes``), the same chunk writer (:class:`~spokes_lightning.features.chunks.ChunkRows`)
and feature store (manifest check, atomic chunks, resume of a killed run at any process count,
rank-0 finalize), hence the same rows. Lightning is not imported on this path.

Per-document gradients are never averaged across processes: a model that went through
``accelerator.prepare`` is unwrapped (``accelerator.unwrap_model``) and the backward runs on the
bare model, under ``accelerator.no_sync``, never through the DDP wrapper. Documents are split by
chunks, never with ``split_between_processes`` (whose padding repeats documents). Each process
reports what it wrote with ``accelerate.utils.gather_object``; the main process checks that every
chunk is there and finalizes after ``accelerator.wait_for_everyone()``. An error on any process is
raised on every process, so no process is left waiting at a barrier. Example (run with
``accelerate launch --num_processes 2 script.py``; on CPU see the note below)::

    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from spokes_lightning.utils.errors import user_errors_exit
    from spokes_lightning.integrations.accelerate import extract_with_accelerate

    accelerator = Accelerator()
    model = accelerator.prepare(AutoModelForCausalLM.from_pretrained("runs/proxy"))
    with user_errors_exit():  # bad input: one line on stderr, exit 2
        store = extract_with_accelerate(model, documents, "runs/features/grad", chunk_size=1024,
                                        batch_size=8, accelerator=accelerator,
                                        tokenizer=AutoTokenizer.from_pretrained("runs/proxy"),
                                        n_layers=2, k=1024)

CPU processes: ``accelerate launch --cpu --num_processes 2`` starts ONE process unless MPI is set
up (``--mpirun_hostfile``); ``accelerate launch --multi_gpu --num_processes 2`` with
``ACCELERATE_USE_CPU=true`` starts two processes through torchrun and Accelerate then picks
``DistributedType.MULTI_CPU`` with the gloo backend (``Accelerator(cpu=True)`` does the same).
"""
from __future__ import annotations

from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from spokes_lightning.utils.errors import UserError
from spokes_lightning.features.chunks import ChunkPlan, ChunkRows, as_source, store_manifest
from spokes_lightning.features.store import FeatureStore, FeatureStoreWriter, open_feature_store
from spokes_lightning.utils.progress import progress as progress_bar
from spokes_lightning.selection.driver import on_all_ranks

__all__ = ["extract_with_accelerate", "feature_module_for"]


def _is_feature_module(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ("predict_step", "manifest", "feature_dim"))


def feature_module_for(model_or_module: Any, accelerator=None, tokenizer=None, **gradient_options):
    """``(feature module, wrapped model or None)``.

    A feature module (e.g. :class:`~spokes_lightning.features.gradients.ProxyGradients`, or its
    LightningModule face ``ProxyGradientModule``) is used as it is; a model directory or hub id, or
    an ``nn.Module`` (unwrapped first if it went through ``accelerator.prepare``), becomes a
    :class:`~spokes_lightning.features.gradients.ProxyGradients` with ``tokenizer`` and
    ``gradient_options`` (``n_layers``, ``k``, ``projection``, ``seed``, ``max_length``, ...).
    """
    from spokes_lightning.features.gradients import ProxyGradients

    if _is_feature_module(model_or_module):
        if gradient_options or tokenizer is not None:
            raise UserError("tokenizer and gradient options go with a model, not with a ready feature module")
        return model_or_module, None
    if isinstance(model_or_module, (str, Path)):
        return ProxyGradients(str(model_or_module), tokenizer=tokenizer, **gradient_options), None
    if not isinstance(model_or_module, nn.Module):
        raise UserError(f"expected a feature module, a model or a model directory, got {type(model_or_module).__name__}")
    bare = accelerator.unwrap_model(model_or_module) if accelerator is not None else model_or_module
    bare = getattr(bare, "module", bare)  # a DDP wrapper that Accelerate did not make
    if tokenizer is None:
        raise UserError("pass tokenizer= together with an in-memory model")
    wrapped = model_or_module if bare is not model_or_module else None
    return ProxyGradients(bare, tokenizer=tokenizer, **gradient_options), wrapped


def _saved_state(model: nn.Module) -> Callable[[], None]:
    """A function that restores ``model``'s train/eval modes and ``requires_grad`` flags."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]

    def restore():
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.train(mode)

    return restore


def extract_with_accelerate(model_or_module: Any, documents: Iterable[Any], store_dir: str | Path, *,
                            chunk_size: int = 1024, batch_size: int = 8, accelerator=None,
                            progress: bool = True, tokenizer=None, unchecked_keys: tuple[str, ...] = (),
                            on_chunk: Callable[[int], None] | None = None,
                            **gradient_options) -> FeatureStore:
    """Feature rows of ``documents`` into the chunked store at ``store_dir``, from every process.

    Call it on every process of an ``accelerate launch`` run (or in a plain single process).
    ``model_or_module``: see :func:`feature_module_for`. ``accelerator``: the script's
    ``Accelerator`` (one is made if None). ``on_chunk(c)`` is called after this process wrote chunk
    ``c``. Returns the finished store (rows in corpus order; ``store.skipped``: ``{id: reason}``).
    Bad input (``chunk_size`` or ``batch_size`` <= 0, no documents, duplicate ids, a store made with
    other settings) raises one :class:`UserError` line before anything is written.
    """
    if int(chunk_size) <= 0 or int(batch_size) <= 0:
        raise UserError(f"chunk_size and batch_size must be positive (got {chunk_size}, {batch_size})")
    pairs = as_source(documents)
    if not len(pairs):
        raise UserError("no documents to extract features from")
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
    store_dir = Path(store_dir)
    rank, world = accelerator.process_index, accelerator.num_processes

    # ProxyGradients switches requires_grad and eval mode on the model: put them back afterwards
    restore = _saved_state(model_or_module) if isinstance(model_or_module, nn.Module) else (lambda: None)
    try:
        module, wrapped = on_all_ranks(lambda: feature_module_for(model_or_module, accelerator, tokenizer,
                                                                  **gradient_options))
        dim = int(module.feature_dim)
        dtype = str(getattr(module, "feature_dtype", "float16"))
        # every process checks the store's settings before any process writes (one error, raised on all)
        writer = on_all_ranks(lambda: FeatureStoreWriter(
            store_dir, store_manifest(module, pairs, chunk_size, dtype, store_dir), unchecked_keys))

        def prepare_store():
            if accelerator.is_main_process:
                writer.write_manifest()
                return writer.drop_damaged_chunks(dim)
            return []

        dropped = on_all_ranks(prepare_store)
        if dropped:
            accelerator.print(f"[spokes] features: {len(dropped)} damaged chunk(s) in {store_dir} will be computed "
                              f"again ({', '.join(map(str, dropped[:10]))})")
        accelerator.wait_for_everyone()
        data = ChunkPlan(pairs, chunk_size, batch_size, writer.done_chunks())
        accelerator.wait_for_everyone()  # every process has read the finished chunks before any writes one
        pending = data.rank_chunks(rank, world)
        chunk_writer = ChunkRows(writer, dim, dtype)

        def run_batches() -> list[int]:
            bar = progress_bar(desc=f"features ({type(module).__name__})", unit="doc",
                               total=sum(data.chunk_length(c) for c in pending),
                               disable=not (progress and accelerator.is_main_process))
            try:
                module.to(accelerator.device)
                module.eval()
                reported = 0
                with ExitStack() as stack:
                    stack.enter_context(accelerator.no_sync(wrapped) if wrapped is not None else nullcontext())
                    stack.enter_context(torch.no_grad())  # as Trainer.predict(inference_mode=False)
                    for i, batch in enumerate(data.iter_batches(rank, world)):
                        prediction = module.predict_step(batch, i)  # the Lightning path's code, batch by batch
                        chunk_writer.add(prediction, batch)
                        bar.update(len(batch["ids"]))
                        for c in chunk_writer.chunks_written[reported:]:
                            if on_chunk is not None:
                                on_chunk(c)
                        reported = len(chunk_writer.chunks_written)
                if chunk_writer.pending:
                    raise RuntimeError(f"chunks left incomplete: {sorted(chunk_writer.pending)}")
            finally:
                bar.close()
            return list(chunk_writer.chunks_written)

        on_all_ranks(run_batches)
        from accelerate.utils import gather_object

        reports = gather_object([{"rank": rank, "chunks": list(chunk_writer.chunks_written),
                                  "documents": sum(data.chunk_length(c) for c in chunk_writer.chunks_written)}])
        accelerator.wait_for_everyone()

        def finalize():
            if not accelerator.is_main_process:
                return None
            written = sorted(c for r in reports for c in r["chunks"])
            expected = sorted(c for c in range(data.n_chunks) if c not in data.done_chunks)
            if written != expected:
                raise RuntimeError(f"processes wrote chunks {written}, expected {expected}")
            writer.finalize(data.n_chunks, dim, dtype)
            return None

        on_all_ranks(finalize)
        accelerator.wait_for_everyone()
    finally:
        restore()
    return open_feature_store(store_dir)
