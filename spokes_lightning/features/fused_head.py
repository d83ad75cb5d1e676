"""Output head + next-token cross-entropy in row chunks, with the head's Kronecker sketch on the side.

With a large vocabulary the head dominates a proxy's cost: for Qwen3's 151,936 tokens a batch of
8 x 768 tokens has 3.7 GB of logits, and autograd keeps the log-softmax output and a zero-filled
gradient of the same size. Per-document gradient features need neither the head's weight
gradient nor the logits kept: for token t of document i, the gradient of the document's mean loss
with respect to the logits is ``delta_t = (softmax(z_t) - onehot(y_t)) / n_i``. So
:class:`HeadCrossEntropy` runs the head over ``chunk_rows`` rows at a time, keeps only the
per-token losses, and in backward recomputes each chunk's logits, forms ``delta`` in place, and
returns ``delta W`` to the hidden states; the Kronecker sketch of the head (``R_out delta_t``, see
:class:`~spokes_lightning.features.projection.KroneckerLayerSketch`) is taken from the same
chunk and handed to the caller in ``sink``. Peak extra memory is ``chunk_rows x vocab`` floats.

:func:`decoder_and_head` finds the pieces (decoder stack with its final norm, head weight) of a
plain causal LM; :class:`~spokes_lightning.features.gradients.ProxyGradients` checks once that ``head(decoder(x))`` reproduces the
model's logits before using this path.
"""
from __future__ import annotations

import torch
from torch import nn

IGNORE = -100  # target of positions without a next token (last position, padding)


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """``(decoder, head)`` of an HF causal LM whose logits are ``head(decoder(x))``, else None."""
    config = getattr(model, "config", None)
    if any(getattr(config, key, None) for key in ("final_logit_softcapping", "logit_scale", "output_mult")):
        return None
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if get_decoder is None or not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    decoder = get_decoder()
    return (decoder, head) if decoder is not None and decoder is not model else None


class HeadCrossEntropy(torch.autograd.Function):
    """Per-token weighted cross-entropy of ``hidden @ weight.T``; backward also sketches the head.

    forward(hidden [N, H], weight [V, H], targets [N], token_weights [N], out_sides, sink, chunk_rows)
    returns ``token_weights * CE`` [N] (zero where ``targets == IGNORE``). In backward, for every
    matrix ``R`` in ``out_sides`` (a dict key -> [side, V]) ``sink[key]`` becomes ``delta @ R.T``
    [N, side], where ``delta`` is the gradient of the summed output with respect to the logits.
    The weight gets no gradient (features never need it).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, out_sides, sink, chunk_rows):
        cdt = torch.promote_types(hidden.dtype, torch.float32)  # at least float32 for the softmax
        losses = torch.zeros(hidden.shape[0], dtype=cdt, device=hidden.device)
        valid = targets != IGNORE
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (hidden[rows] @ weight.T).to(cdt)
            safe = targets[rows].clamp_min(0)
            picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
            ce = torch.logsumexp(logits, dim=1) - picked
            losses[rows] = torch.where(valid[rows], ce * token_weights[rows], torch.zeros_like(ce))
        ctx.save_for_backward(hidden, weight, targets, token_weights)
        ctx.out_sides, ctx.sink, ctx.chunk_rows = out_sides, sink, chunk_rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, targets, token_weights = ctx.saved_tensors
        cdt = torch.promote_types(hidden.dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden)
        projected = {key: [] for key in ctx.out_sides}
        scale = torch.where(targets != IGNORE, grad_losses.to(cdt) * token_weights.to(cdt),
                            torch.zeros((), dtype=cdt, device=hidden.device))
        # cast once, not per chunk (a no-op in float32; one copy of the head for a bf16 model)
        weight_cdt = weight.to(cdt)
        sides_cdt = {key: r_out.T.to(cdt) for key, r_out in ctx.out_sides.items()}
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            delta = torch.softmax((hidden[rows] @ weight.T).to(cdt), dim=1)  # fresh tensor, edited in place
            idx = torch.arange(delta.shape[0], device=delta.device)
            delta[idx, targets[rows].clamp_min(0)] -= 1.0
            delta.mul_(scale[rows].unsqueeze(1))  # ignored rows become exactly zero
            grad_hidden[rows] = (delta @ weight_cdt).to(hidden.dtype)
            for key, side in sides_cdt.items():
                projected[key].append(delta @ side)
        for key, parts in projected.items():
            ctx.sink[key] = torch.cat(parts)
        return grad_hidden, None, None, None, None, None, None


def next_token_targets(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Target of position t is token t+1; the last position and padding get :data:`IGNORE`."""
    targets = torch.full_like(input_ids, IGNORE)
    targets[:, :-1] = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
    return targets
