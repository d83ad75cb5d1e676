"""Per-document gradient features of a proxy causal LM (paper sections 3.1 eq. 3-4, 4.1-4.3).

:class:`ProxyGradients` is a plain ``nn.Module`` (the Accelerate path runs it as it is);
:class:`~spokes_lightning.features.extract.ProxyGradientModule` is the same class as a
LightningModule, for :func:`~spokes_lightning.features.extract.extract_features`. For each
document it takes the gradient of the document's mean next-token loss (truncated to
``max_length`` tokens, section 4.3) with respect to the last ``n_layers`` decoder blocks plus the
output head (section 4.1; for tied models the head is the embedding matrix, which is how
Qwen3-0.6B's last two layers + head reach the paper's ~200M parameters) and sketches it to
``k`` dims with a Rademacher projection (eq. 4, section 4.2):

* ``projection="dense"``: the exact eq. 4. One forward + backward per document (only the selected
  parameters require grad), the batch's flattened gradients stacked and projected together so
  every column block of ``R`` is generated once per batch (:class:`DenseRademacherProjector`).
* ``projection="kronecker"`` (default, fast): one forward + backward per batch. Hooks on every
  ``nn.Linear`` of the selected blocks (+ head) keep ``R_in x_t`` and the output gradients
  ``delta_t``; each Linear gets the block ``sum_t (R_out delta_t)(R_in x_t)^T / sqrt(k_o k_i)``
  with ``k_o = k_i = side`` (default ``side = 4 ceil(sqrt(k))``, so every Linear alone has
  ``16 k`` sketch dims; a side no wider than ``side`` is kept exact). How ``k`` is split: each
  Linear's block is a sketch of that layer alone, the ``~n_linear * side**2`` concatenation is
  then projected once more with a dense Rademacher matrix to exactly ``k`` (scaled
  ``1/sqrt(k)``), so layers share the final ``k`` dims in proportion to their gradient energy,
  as in the dense eq. 4. It sketches Linear weights
  only (norm weights and biases, a tiny share of the parameters, are left out).

``extra_seeds`` adds whole independent projections (every Rademacher matrix redrawn) of the same
gradients to each row, ``[seed | extra seed 1 | ...]``, at the cost of the projections only:
the forward + backward is shared (the pipeline uses this for the report's independent G-Vendi).

A batch's loss is the SUM of per-document mean losses and padding is on the right and masked,
so a document's row does not depend on its batch mates. A one-token document is followed by
EOS, its only target (pretraining puts EOS after every document), so every document with text
gets a row; an empty one, or a one-token one under a tokenizer without EOS, is reported in
``skipped``, never dropped silently (the pipeline's pool holds no empty texts). Layers before the selected blocks
run under ``torch.no_grad`` (grad is switched on by a pre-hook on the first selected block), so
they get no gradient and keep no activations; for tied models the input-embedding lookup
therefore contributes nothing to the head's gradient.
"""
from __future__ import annotations

import hashlib
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from spokes_lightning.utils.errors import UserError
from spokes_lightning.features.fused_head import IGNORE, HeadCrossEntropy, decoder_and_head, next_token_targets
from spokes_lightning.features.projection import DEFAULT_BLOCK_COLS, DenseRademacherProjector, KroneckerLayerSketch, kronecker_side
from spokes_lightning.models.llama import load_causal_lm
from spokes_lightning.models.tokenizer import load_tokenizer

PROJECTIONS = ("kronecker", "dense")
HEAD_CHUNK_BYTES = 1 << 28  # the fused head computes at most this many bytes of logits at once
DTYPES = ("float16", "float32")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of an HF causal LM (Llama/Qwen/Mistral: ``model.model.layers``)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise UserError(f"cannot find the decoder blocks of {type(model).__name__} (expected model.model.layers)")


@contextmanager
def grad_only_from(block: nn.Module):
    """Run a forward under ``no_grad`` until ``block`` starts, with grad from there on."""

    def enable_grad(_module, _args):
        torch.set_grad_enabled(True)

    handle = block.register_forward_pre_hook(enable_grad)
    try:
        with torch.no_grad():
            yield
    finally:
        handle.remove()


def _model_fingerprint(model: nn.Module, ref: str | None) -> str:
    if ref is not None:
        path = Path(ref).expanduser()
        return str(path.resolve()) if path.is_dir() else str(ref)
    config = getattr(model, "config", None)
    text = config.to_json_string() if config is not None else type(model).__name__
    return f"{type(model).__name__}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


class ProxyGradients(nn.Module):
    """Rows = Rademacher sketches of per-document gradients of the last ``n_layers`` (+ head).

    A feature module (``predict_step``, ``feature_dim``, ``manifest``: :mod:`.chunks`) with no
    training framework in it; :class:`~spokes_lightning.features.extract.ProxyGradientModule`
    adds Lightning."""

    def __init__(
        self,
        model: str | Path | nn.Module,
        tokenizer=None,
        n_layers: int = 2,
        include_head: bool = True,
        projection: str = "kronecker",
        k: int = 1024,
        seed: int = 0,
        max_length: int = 768,
        dtype: str = "float16",
        kron_side: int | None = None,
        dense_block_cols: int = DEFAULT_BLOCK_COLS,
        extra_seeds: Sequence[int] = (),
        fused_head: bool = True,
    ):
        super().__init__()
        if projection not in PROJECTIONS:
            raise UserError(f"unknown projection '{projection}' (choose from {', '.join(PROJECTIONS)})")
        if int(k) <= 0:
            raise UserError(f"projection dimension k must be positive, got {k}")
        if dtype not in DTYPES:
            raise UserError(f"unknown feature dtype '{dtype}' (choose from {', '.join(DTYPES)})")
        if int(max_length) < 2:
            raise UserError(f"max_length must be at least 2 tokens, got {max_length}")
        ref = None if isinstance(model, nn.Module) else str(model)
        self.model = load_causal_lm(model) if ref is not None else model
        self.tokenizer = tokenizer if tokenizer is not None else self._tokenizer_for(ref)
        self.model_ref = _model_fingerprint(self.model, ref)
        self.layers = tuple(find_decoder_layers(self.model))  # a tuple: not registered twice
        if not 1 <= int(n_layers) <= len(self.layers):
            raise UserError(f"n_layers={n_layers} but the model has {len(self.layers)} decoder layers")
        self.n_layers, self.include_head, self.projection = int(n_layers), bool(include_head), projection
        self.k, self.seed, self.max_length, self.feature_dtype = int(k), int(seed), int(max_length), dtype
        self.seeds = (self.seed, *(int(s) for s in extra_seeds))
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"projection seeds must differ, got {list(self.seeds)}")
        self.kron_side = int(kron_side) if kron_side else kronecker_side(self.k)
        self.dense_block_cols = int(dense_block_cols)
        self.model.eval()
        self._select_parameters()
        self._sketches: dict[tuple[int, str], KroneckerLayerSketch] = {}
        self._final: dict[int, DenseRademacherProjector] = {}
        # kronecker + head: run the head in row chunks (fused_head.py) when head(decoder(x)) is the model
        self.fused_head = bool(fused_head) and projection == "kronecker" and self.include_head
        self._fused: tuple[nn.Module, nn.Linear] | None | bool = False  # False = not checked yet
        self.documents_seen = 0

    # ----------------------------------------------------------------- setup
    @property
    def device(self) -> torch.device:
        """Where the model's weights are (batches are moved there)."""
        return next(self.model.parameters()).device

    @staticmethod
    def _tokenizer_for(ref: str | None):
        if ref is None:
            raise UserError("pass a tokenizer together with an in-memory model")
        return load_tokenizer(ref, setting="proxy.model")

    @property
    def first_selected_block(self) -> nn.Module:
        return self.layers[len(self.layers) - self.n_layers]

    @property
    def head(self) -> nn.Module | None:
        return self.model.get_output_embeddings() if self.include_head else None

    def _select_parameters(self) -> None:
        """Only the last ``n_layers`` blocks (+ head) require grad (section 4.1)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        chosen: list[nn.Module] = list(self.layers)[-self.n_layers :]
        if self.head is not None:
            chosen.append(self.head)
        for module in chosen:
            for p in module.parameters():
                p.requires_grad_(True)
        seen: set[int] = set()
        self.grad_params: dict[str, nn.Parameter] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.grad_params[name] = p
        inside = {id(m) for c in chosen for m in c.modules()}
        self.linear_names = [
            name for name, m in self.model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside
        ]

    @property
    def feature_dim(self) -> int:
        """``k`` per projection seed: row = [sketch under ``seed`` | sketch under each extra seed]."""
        return self.k * len(self.seeds)

    @property
    def n_selected_parameters(self) -> int:
        return sum(p.numel() for p in self.grad_params.values())

    def manifest(self) -> dict[str, Any]:
        m = {
            "kind": "proxy_gradients",
            "model": self.model_ref,
            "n_layers": self.n_layers,
            "include_head": self.include_head,
            "projection": self.projection,
            "k": self.k,
            "seed": self.seed,
            "max_length": self.max_length,
            "dtype": self.feature_dtype,
            "n_selected_parameters": self.n_selected_parameters,
            "normalized": False,
        }
        if len(self.seeds) > 1:
            m["extra_seeds"] = list(self.seeds[1:])
        if self.projection == "kronecker":
            m["kron_side"] = self.kron_side
            m["fused_head"] = self.fused_head
        else:
            m["dense_block_cols"] = self.dense_block_cols
        return m

    # ----------------------------------------------------------------- tokens and loss
    def tokenize(self, ids: list[str], texts: list[str]):
        """Token ids per document, truncated to ``max_length``; short documents -> skipped."""
        kept, token_lists, skipped = [], [], {}
        for doc_id, text in zip(ids, texts):
            if not text or not text.strip():
                skipped[doc_id] = "empty text"
                continue
            toks = list(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"])
            eos = getattr(self.tokenizer, "eos_token_id", None)
            if len(toks) == 1 and eos is not None:  # one token: its target is the end of the document,
                toks.append(int(eos))                # as in pretraining, where EOS follows every document
            if len(toks) < 2:
                skipped[doc_id] = f"fewer than 2 tokens ({len(toks)})"
                continue
            kept.append(doc_id)
            token_lists.append(list(toks))
        return kept, token_lists, skipped

    def pad(self, token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right padding (id 0) + attention mask, on the module's device."""
        width = max(len(t) for t in token_lists)
        input_ids = torch.zeros(len(token_lists), width, dtype=torch.long)
        mask = torch.zeros(len(token_lists), width, dtype=torch.long)
        for i, toks in enumerate(token_lists):
            input_ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def document_losses(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-document mean next-token cross-entropy [b] (split forward, see module doc)."""
        with grad_only_from(self.first_selected_block):
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        # the logits are neither sliced nor transposed: with a large vocabulary a strided
        # log-softmax and the zero-filled gradient of a slice cost more than the transformer
        targets = next_token_targets(input_ids, mask)
        b, t, v = logits.shape
        ce = nn.functional.cross_entropy(logits.reshape(b * t, v).float(), targets.reshape(-1),
                                         reduction="none", ignore_index=IGNORE).view(b, t)
        return ce.sum(dim=1) / (targets != IGNORE).sum(dim=1)

    # ----------------------------------------------------------------- projections
    def _sketch(self, name: str, linear: nn.Linear, seed: int) -> KroneckerLayerSketch:
        if (seed, name) not in self._sketches:
            self._sketches[seed, name] = KroneckerLayerSketch(
                name, linear.in_features, linear.out_features, self.kron_side, seed, linear.weight.device
            )
        return self._sketches[seed, name]

    def _final_projector(self, width: int, seed: int) -> DenseRademacherProjector:
        """The dense ``k x width`` Rademacher matrix of the second stage, kept in float32.

        ``width`` is ``~n_linear * side**2`` whatever the model (245,760 for 2 LLaMA blocks + head
        at k = 1024), so the cache is ``4 k width`` bytes (~1 GB) per seed; generating it per batch
        instead would cost more than the forward + backward of a small proxy.
        """
        if seed not in self._final or self._final[seed].input_dim != width:
            self._final[seed] = DenseRademacherProjector(
                self.k, {"kronecker-concat": width}, seed, self.dense_block_cols, cache_blocks="float32"
            )
        return self._final[seed]

    def _fused_pieces(self, input_ids: torch.Tensor, mask: torch.Tensor):
        """``(decoder, head)`` when the chunked head applies (checked once against the model's logits)."""
        if self._fused is False:
            self._fused = None
            pieces = decoder_and_head(self.model) if self.fused_head else None
            if pieces is not None:
                ids, m = input_ids[:1, :16], mask[:1, :16]
                with torch.no_grad():
                    want = self.model(input_ids=ids, attention_mask=m).logits.float()
                    got = pieces[1](pieces[0](input_ids=ids, attention_mask=m)[0]).float()
                if torch.allclose(want, got, rtol=1e-4, atol=1e-4):
                    self._fused = pieces
                else:
                    warnings.warn(f"{type(self.model).__name__}: head(decoder(x)) differs from the model's logits; "
                                  "using the unfused head (same features, more memory)")
            self.head_name = (next(n for n, mod in self.model.named_modules() if mod is self._fused[1])
                              if self._fused else None)
        return self._fused

    def _fused_total_loss(self, input_ids, mask, pieces, sink) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of per-document mean losses through :class:`HeadCrossEntropy`; also the head's inputs."""
        decoder, head = pieces
        with grad_only_from(self.first_selected_block):
            hidden = decoder(input_ids=input_ids, attention_mask=mask)[0]
        targets = next_token_targets(input_ids, mask)
        counts = (targets != IGNORE).sum(dim=1, keepdim=True)
        weights = (1.0 / counts.float()).expand(targets.shape).reshape(-1).contiguous()
        b, t, h = hidden.shape
        out_sides = {seed: self._sketches[seed, self.head_name].r_out for seed in self.seeds}
        rows = max(64, HEAD_CHUNK_BYTES // (4 * head.out_features))
        token_losses = HeadCrossEntropy.apply(hidden.reshape(b * t, h), head.weight, targets.reshape(-1), weights,
                                              out_sides, sink, rows)
        return token_losses.sum(), hidden.detach()

    def kronecker_rows(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One forward + backward for the batch -> [b, k * n_seeds] (module doc, ``kronecker``)."""
        modules = dict(self.model.named_modules())
        fused = self._fused_pieces(input_ids, mask)
        head_name = self.head_name if fused else None
        projected: dict[tuple[int, str], torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}
        handles = []
        for name in self.linear_names:
            sketches = {seed: self._sketch(name, modules[name], seed) for seed in self.seeds}
            if name == head_name:
                continue  # the fused head sketches itself

            def hook(_m, args, out, name=name, sketches=sketches):
                if out.requires_grad:
                    for seed, sketch in sketches.items():
                        projected[seed, name] = sketch.project_inputs(args[0].detach(), mask)
                    outputs[name] = out

            handles.append(modules[name].register_forward_hook(hook))
        head_sink: dict[int, torch.Tensor] = {}
        try:
            if fused:
                total, head_inputs = self._fused_total_loss(input_ids, mask, fused, head_sink)
                for seed in self.seeds:
                    projected[seed, head_name] = self._sketches[seed, head_name].project_inputs(head_inputs, mask)
            else:
                total = self.document_losses(input_ids, mask).sum()
        finally:
            for h in handles:
                h.remove()
        names = [n for n in self.linear_names if n in outputs]
        grads = torch.autograd.grad(total, [outputs[n] for n in names], allow_unused=True)
        deltas = {n: torch.zeros_like(outputs[n]) if d is None else d for n, d in zip(names, grads)}
        b, t = input_ids.shape
        rows = []
        for seed in self.seeds:  # the expensive part (forward + backward) is shared by every seed
            blocks = []
            for n in self.linear_names:
                if n == head_name:
                    blocks.append(KroneckerLayerSketch.block_from_projected(
                        projected[seed, n], head_sink[seed].view(b, t, -1)))
                elif n in deltas:
                    blocks.append(self._sketches[seed, n].block(projected[seed, n], deltas[n]))
            concat = torch.cat(blocks, dim=1)
            rows.append(self._final_projector(concat.shape[1], seed).project({"kronecker-concat": concat}))
        return torch.cat(rows, dim=1)

    def dense_rows(self, token_lists: list[list[int]]) -> torch.Tensor:
        """Per-document backward, then exact eq. 4 on the stacked batch of gradients."""
        names = list(self.grad_params)
        params = [self.grad_params[n] for n in names]
        per_doc: list[list[torch.Tensor]] = []
        for toks in token_lists:
            ids, mask = self.pad([toks])
            loss = self.document_losses(ids, mask).sum()
            per_doc.append([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        stacked = {n: torch.stack([doc[i] for doc in per_doc]) for i, n in enumerate(names)}
        del per_doc
        sizes = {n: p.numel() for n, p in zip(names, params)}
        return torch.cat([DenseRademacherProjector(self.k, sizes, seed, self.dense_block_cols).project(stacked)
                          for seed in self.seeds], dim=1)

    # ----------------------------------------------------------------- Lightning
    def rows_for(self, ids: list[str], texts: list[str]) -> dict[str, Any]:
        kept, token_lists, skipped = self.tokenize(ids, texts)
        self.documents_seen += len(ids)
        if not kept:
            return {"ids": [], "rows": None, "skipped": skipped}
        with torch.enable_grad():
            if self.projection == "kronecker":
                rows = self.kronecker_rows(*self.pad(token_lists))
            else:
                rows = self.dense_rows(token_lists)
        return {"ids": kept, "rows": rows.detach().float(), "skipped": skipped}

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        return self.rows_for(list(batch["ids"]), list(batch["texts"]))
