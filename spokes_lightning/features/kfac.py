"""Quad's influence (arXiv 2409.16986, section 3.3) with K-FAC, projected with the feature sketch.

``I(D_r, z) = -grad L(D_r)^T (H + lambda I)^-1 grad L(z)``. The preconditioned reference
gradient ``u = (H + lambda I)^-1 grad L(D_r)`` is computed ONCE (:func:`reference_direction`)
and then sketched with exactly the projection of the per-document gradient features
(:class:`~spokes_lightning.features.gradients.ProxyGradients`: same proxy, layers, seed,
Kronecker or dense Rademacher matrices), so for every pool document
``<sketch(u), sketch(grad L(z))> ~ <u, grad L(z)> = -I(D_r, z)`` is one dot product with the
existing feature store (JL preserves inner products; memory is bounded by the sketch).

The Hessian (``hessian="kfac"``), per *block* of Linear layers of the selected layers (the last
``n_layers`` decoder blocks + head, as the sketches):

* attention Q, K and V are ONE block (``qkv="joint"``, the paper's ``theta_qkv``): they share
  their input, so one input factor ``A = E[x x^T]`` and one output-gradient factor
  ``G = E[delta delta^T]`` over the concatenated ``delta_q | delta_k | delta_v``; the block's
  Hessian is ``G (x) A`` (row-major ``vec(dW)``, ``dW`` = [W_q; W_k; W_v] stacked by rows), so
  the cross terms between Q, K and V are kept. ``qkv="separate"`` (ablation) gives each its own G.
* the attention output projection, every MLP Linear and the head: one block each (the paper
  treats them as independent, so influence is the sum over blocks).
* expectations are over the tokens that carry a loss (a next-token target) of ``n`` pool
  documents, with ``delta`` the gradient of the summed token losses w.r.t. the layer output
  (the empirical Fisher of the mean token loss, the paper's ``E(D theta D theta^T)``).
* a factor wider than ``max_factor_dim`` (the head's vocabulary side) is kept DIAGONAL
  (``diag E[delta delta^T]``): a 151,936^2 matrix does not fit; documented choice.

Damping (the paper does not say how ``lambda`` enters the factored inverse). ``damping`` is
RELATIVE and ONE ``lambda`` serves the whole Hessian, as in the paper's ``H + lambda I``:
``lambda = damping * mean eigenvalue of the block-diagonal K-FAC H`` =
``damping * sum_b tr(G_b) tr(A_b) / sum_b dim(G_b) dim(A_b)`` (default 0.1: scale-free across
models). A per-layer relative lambda (Kronfluence's default) would blow up the layers of low
curvature by their own small scale; a global one keeps ``u`` closer to the gradient there,
which also keeps the JL error of ``<sketch(u), sketch(g)>`` (``~ |u| |g| / sqrt(k)``) small.
The iHVP is
``vec(G_d^-1 V A_d^-1)`` (the paper's ``vec(Delta^-1 V X^-1)``) with

* ``damping_split="pi"`` (default, Martens & Grosse 2015 pi-damping):
  ``pi = sqrt(mean eig(A) / mean eig(G))``, ``A_d = A + pi sqrt(lambda) I``,
  ``G_d = G + sqrt(lambda)/pi I``; the product of the two dampings is ``lambda`` and the result
  depends only on ``G (x) A`` (rescaling ``A -> cA, G -> G/c`` changes nothing);
* ``"sqrt"``: ``sqrt(lambda)`` on each factor (not rescaling-invariant);
* ``"eigen"``: the exact ``(G (x) A + lambda I)^-1 v`` through the eigenbases of both factors
  (EK-FAC-style, same cost); no split.

``hessian="none"``: ``u = grad L(D_r)`` (plain gradient similarity; what the authors' released
code does, the cheap ablation).

Which parameters: K-FAC covers Linear weights only (as the Kronecker sketch). With the dense
projection the sketch also covers norm weights and biases; under ``hessian="kfac"`` their part
of ``u`` is zero (influence over the Linear weights, as in the Kronecker mode), under
``hessian="none"`` it is the plain gradient.

``grad L(D_r)`` is the mean over reference documents of each document's mean-token-loss
gradient: the same per-document convention as the features.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from spokes_lightning.utils.errors import UserError
from spokes_lightning.features.fused_head import IGNORE, next_token_targets
from spokes_lightning.features.projection import DenseRademacherProjector
from spokes_lightning.features.kfac_options import (  # noqa: F401  (re-exported: kfac.HESSIANS, ...)
    DAMPING_SPLITS, DEFAULT_DAMPING, DEFAULT_MAX_FACTOR_DIM, HESSIANS, QKV_MODES)

if TYPE_CHECKING:  # gradients.py imports lightning: kept out of the selector's import path
    from spokes_lightning.features.gradients import ProxyGradients

QKV_LEAVES = ("q_proj", "k_proj", "v_proj")
_FLOOR = 1e-30


@dataclass
class Block:
    """Linear layers sharing one K-FAC block: ``members`` stacked by output rows."""

    name: str
    members: list[str]
    in_features: int
    out_sizes: list[int]

    @property
    def out_features(self) -> int:
        return sum(self.out_sizes)


def linear_blocks(modules: dict[str, nn.Module], names: Sequence[str], qkv: str = "joint") -> list[Block]:
    """The K-FAC blocks of the Linear layers ``names``: sibling q/k/v_proj as one block when joint."""
    if qkv not in QKV_MODES:
        raise UserError(f"qkv must be one of {', '.join(QKV_MODES)}, got {qkv!r}")
    names = list(names)
    blocks, used = [], set()
    for name in names:
        if name in used:
            continue
        parent, _, leaf = name.rpartition(".")
        if qkv == "joint" and leaf in QKV_LEAVES:
            sib = [f"{parent}.{x}" if parent else x for x in QKV_LEAVES]
            if all(s in names for s in sib) and len({modules[s].in_features for s in sib}) == 1:
                blocks.append(Block(f"{parent}.qkv" if parent else "qkv", sib, modules[sib[0]].in_features,
                                    [modules[s].out_features for s in sib]))
                used.update(sib)
                continue
        m = modules[name]
        blocks.append(Block(name, [name], m.in_features, [m.out_features]))
        used.add(name)
    return blocks


@dataclass
class KFACFactors:
    """Running sums of ``x x^T`` and ``delta delta^T`` per block; :meth:`factors` gives the means."""

    blocks: list[Block]
    max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM
    device: str | torch.device = "cpu"
    sums_a: dict[str, torch.Tensor] = field(default_factory=dict)
    sums_g: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def diagonal(self, block: Block) -> bool:
        return block.out_features > self.max_factor_dim

    def add(self, block: Block, x: torch.Tensor, delta: torch.Tensor) -> None:
        """Tokens of one batch: ``x`` [N, in], ``delta`` [N, out] (concatenated members)."""
        if block.in_features > self.max_factor_dim:
            raise UserError(f"K-FAC: layer {block.name} has {block.in_features} inputs, more than "
                            f"max_factor_dim={self.max_factor_dim}; raise max_factor_dim")
        x, delta = x.to(self.device, torch.float64), delta.to(self.device, torch.float64)
        a = x.T @ x
        g = (delta * delta).sum(0) if self.diagonal(block) else delta.T @ delta
        if block.name in self.sums_a:
            self.sums_a[block.name] += a
            self.sums_g[block.name] += g
            self.tokens[block.name] += int(x.shape[0])
        else:
            self.sums_a[block.name], self.sums_g[block.name] = a, g
            self.tokens[block.name] = int(x.shape[0])

    def factors(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, G)``: means over tokens; ``G`` is a vector when kept diagonal."""
        n = self.tokens.get(block.name, 0)
        if n == 0:
            raise UserError(f"K-FAC: no tokens reached layer {block.name}; give more K-FAC documents")
        return self.sums_a[block.name] / n, self.sums_g[block.name] / n


def _mean_eig(m: torch.Tensor) -> float:
    return float((m if m.ndim == 1 else m.diagonal()).mean())


def absolute_damping(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], damping: float) -> float:
    """Relative ``damping`` -> ``lambda = damping * mean eigenvalue of the block-diagonal G (x) A``
    over the blocks' ``(A, G)`` (module doc)."""
    trace = sum(_mean_eig(a) * a.shape[0] * _mean_eig(g) * g.shape[0] for a, g in factors)
    dims = sum(a.shape[0] * g.shape[0] for a, g in factors)
    return float(damping) * max(trace / dims, _FLOOR)


def split_damping(a: torch.Tensor, g: torch.Tensor, lam: float, split: str) -> tuple[float, float]:
    """``(lambda_A, lambda_G)`` with ``lambda_A * lambda_G = lambda`` (``pi`` or ``sqrt``)."""
    root = math.sqrt(lam)
    if split == "sqrt":
        return root, root
    if split == "pi":
        pi = math.sqrt(max(_mean_eig(a), _FLOOR) / max(_mean_eig(g), _FLOOR))
        return pi * root, root / pi
    raise UserError(f"damping_split must be one of {', '.join(DAMPING_SPLITS)}, got {split!r}")


def kfac_ihvp(a: torch.Tensor, g: torch.Tensor, v: torch.Tensor, lam: float, split: str = "pi") -> torch.Tensor:
    """The damped K-FAC iHVP of one block for ``V`` [out, in] (row-major ``vec``), as a matrix.

    ``split`` in pi / sqrt: ``G_d^-1 V A_d^-1``; ``eigen``: the exact ``(G (x) A + lam I)^-1 vec(V)``.
    ``g`` may be a vector (a diagonal factor).
    """
    if split not in DAMPING_SPLITS:
        raise UserError(f"damping_split must be one of {', '.join(DAMPING_SPLITS)}, got {split!r}")
    a, g, v = a.double(), g.double(), v.double()
    eye_a = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    if split == "eigen":
        ea, qa = torch.linalg.eigh(a)
        if g.ndim == 1:
            eg, vp = g, v @ qa
        else:
            eg, qg = torch.linalg.eigh(g)
            vp = qg.T @ v @ qa
        up = vp / (eg.clamp_min(0)[:, None] * ea.clamp_min(0)[None, :] + lam)
        return (up if g.ndim == 1 else qg @ up) @ qa.T
    lam_a, lam_g = split_damping(a, g, lam, split)
    if g.ndim == 1:
        left = v / (g + lam_g)[:, None]
    else:
        left = torch.linalg.solve(g + lam_g * torch.eye(g.shape[0], dtype=g.dtype, device=g.device), v)
    return torch.linalg.solve(a + lam_a * eye_a, left.T).T  # A_d symmetric: (A_d^-1 L^T)^T = L A_d^-1


# --------------------------------------------------------------------------- on a proxy


def _batches(module: ProxyGradients, texts: Sequence[str], batch_size: int):
    _, token_lists, _ = module.tokenize([str(i) for i in range(len(texts))], list(texts))
    for start in range(0, len(token_lists), batch_size):
        yield module.pad(token_lists[start : start + batch_size])


def _n_kept(module: ProxyGradients, texts: Sequence[str]) -> int:
    return len(module.tokenize([str(i) for i in range(len(texts))], list(texts))[0])


def weight_param_names(module: ProxyGradients) -> dict[str, str]:
    """Linear layer name -> the name of its weight in ``module.grad_params`` (tied heads included)."""
    modules = dict(module.model.named_modules())
    by_id = {id(p): n for n, p in module.grad_params.items()}
    return {name: by_id[id(modules[name].weight)] for name in module.linear_names}


def reference_gradient(module: ProxyGradients, texts: Sequence[str], batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``grad L(D_r)``: the mean over documents of each one's mean-token-loss gradient, per parameter."""
    n = _n_kept(module, texts)
    if n == 0:
        raise UserError("the Quad reference set has no document of at least 2 tokens")
    names = list(module.grad_params)
    params = [module.grad_params[p] for p in names]
    total = {p: torch.zeros_like(t, dtype=torch.float32) for p, t in zip(names, params)}
    with torch.enable_grad():
        for ids, mask in _batches(module, texts, batch_size):
            loss = module.document_losses(ids, mask).sum() / n
            for p, grad in zip(names, torch.autograd.grad(loss, params, allow_unused=True)):
                if grad is not None:
                    total[p] += grad.float()
    return total


def estimate_factors(module: ProxyGradients, texts: Sequence[str], blocks: list[Block], batch_size: int = 8,
                     max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM) -> KFACFactors:
    """K-FAC factors of every block over the loss-carrying tokens of ``texts`` (module doc)."""
    from spokes_lightning.features.gradients import grad_only_from

    modules = dict(module.model.named_modules())
    acc = KFACFactors(blocks, max_factor_dim, module.device)
    checked = False
    for ids, mask in _batches(module, texts, batch_size):
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}
        handles = []
        for name in module.linear_names:
            def hook(_m, args, out, name=name):
                if out.requires_grad:
                    inputs[name], outputs[name] = args[0].detach(), out
            handles.append(modules[name].register_forward_hook(hook))
        try:
            with torch.enable_grad():
                with grad_only_from(module.first_selected_block):
                    logits = module.model(input_ids=ids, attention_mask=mask).logits
                targets = next_token_targets(ids, mask)
                b, t, v = logits.shape
                total = nn.functional.cross_entropy(logits.reshape(b * t, v).float(), targets.reshape(-1),
                                                    reduction="sum", ignore_index=IGNORE)
                names = [n for n in module.linear_names if n in outputs]
                grads = torch.autograd.grad(total, [outputs[n] for n in names], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        deltas = {n: torch.zeros_like(outputs[n]) if d is None else d for n, d in zip(names, grads)}
        keep = (targets != IGNORE).reshape(-1)
        for block in blocks:
            if any(m not in inputs for m in block.members):
                continue
            x = inputs[block.members[0]]
            if not checked and len(block.members) > 1:
                if any(not torch.equal(inputs[m], x) for m in block.members[1:]):
                    raise UserError(f"K-FAC: {', '.join(block.members)} do not share their input; use qkv=separate")
            x = x.reshape(b * t, -1)[keep]
            delta = torch.cat([deltas[m].reshape(b * t, -1) for m in block.members], dim=1)[keep]
            acc.add(block, x, delta)
        checked = True
    return acc


def sketch_direction(module: ProxyGradients, direction: dict[str, torch.Tensor], seed: int | None = None) -> torch.Tensor:
    """``direction`` (parameter name -> tensor, shaped like ``module.grad_params``) under the SAME sketch
    as the module's feature rows (``seed``: the primary one by default, or one of its extra seeds):
    a k-vector with ``<sketch(u), row(z)> ~ <u, grad L(z)>`` (error ``~ |u| |grad L(z)| / sqrt(k)``).

    Kronecker: every Linear's ``R_out U R_in^T`` concatenated in the module's layer order, then its
    final dense Rademacher projection; dense: eq. 4 over every selected parameter.
    """
    seed = module.seed if seed is None else int(seed)
    with torch.no_grad():
        if module.projection == "kronecker":
            modules = dict(module.model.named_modules())
            weights = weight_param_names(module)
            blocks = []
            for name in module.linear_names:
                sketch = module._sketch(name, modules[name], seed)
                u = direction[weights[name]].float().to(sketch.r_in.device)
                blocks.append((sketch.r_out @ u @ sketch.r_in.T).reshape(1, -1))
            concat = torch.cat(blocks, dim=1)
            return module._final_projector(concat.shape[1], seed).project({"kronecker-concat": concat})[0]
        sizes = {n: p.numel() for n, p in module.grad_params.items()}
        projector = DenseRademacherProjector(module.k, sizes, seed, module.dense_block_cols)
        return projector.project({n: direction[n].reshape(1, -1).float() for n in sizes})[0]


def precondition(module: ProxyGradients, gradient: dict[str, torch.Tensor], factor_texts: Sequence[str], *,
                 damping: float = DEFAULT_DAMPING, damping_split: str = "pi", qkv: str = "joint",
                 max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM, batch_size: int = 8) -> tuple[dict, dict]:
    """``(H + lambda I)^-1 gradient`` with K-FAC factors from ``factor_texts``; non-Linear parts zero."""
    modules = dict(module.model.named_modules())
    blocks = linear_blocks(modules, module.linear_names, qkv)
    acc = estimate_factors(module, factor_texts, blocks, batch_size, max_factor_dim)
    weights = weight_param_names(module)
    out = {n: torch.zeros_like(t) for n, t in gradient.items()}
    factors = {block.name: acc.factors(block) for block in blocks}
    lam = absolute_damping(list(factors.values()), damping)
    info = {"blocks": [], "tokens": 0, "lambda": lam}
    for block in blocks:
        a, g = factors[block.name]
        v = torch.cat([gradient[weights[m]].to(a.device, torch.float64) for m in block.members], dim=0)
        u = kfac_ihvp(a, g, v, lam, damping_split)
        for m, part in zip(block.members, torch.split(u, block.out_sizes, dim=0)):
            out[weights[m]] = part.to(gradient[weights[m]].device, torch.float32)
        info["blocks"].append({"name": block.name, "members": len(block.members), "in": block.in_features,
                               "out": block.out_features, "diagonal_G": g.ndim == 1})
        info["tokens"] = max(info["tokens"], acc.tokens[block.name])
    return out, info


def reference_direction(module: ProxyGradients, reference_texts: Sequence[str], factor_texts: Sequence[str] = (),
                        *, hessian: str = "kfac", damping: float = DEFAULT_DAMPING, damping_split: str = "pi",
                        qkv: str = "joint", max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM,
                        batch_size: int = 8) -> tuple[np.ndarray, dict]:
    """The sketched ``u = (H + lambda I)^-1 grad L(D_r)`` (``hessian="none"``: ``u = grad L(D_r)``).

    Returns ``(k-vector float32, info)``; a pool document's Quad score is ``<vector, row(z)>``
    (= ``-I(D_r, z)``, higher = more helpful).
    """
    if hessian not in HESSIANS:
        raise UserError(f"hessian must be one of {', '.join(HESSIANS)}, got {hessian!r}")
    if hessian == "kfac" and damping <= 0:
        raise UserError(f"K-FAC damping must be > 0, got {damping}")
    gradient = reference_gradient(module, reference_texts, batch_size)
    info: dict = {"hessian": hessian, "reference_documents": _n_kept(module, reference_texts),
                  "projection": module.projection, "k": module.k, "seed": module.seed}
    if hessian == "kfac":
        if _n_kept(module, factor_texts) == 0:
            raise UserError("K-FAC needs pool documents of at least 2 tokens to estimate its factors")
        gradient, kinfo = precondition(module, gradient, factor_texts, damping=damping, damping_split=damping_split,
                                       qkv=qkv, max_factor_dim=max_factor_dim, batch_size=batch_size)
        info.update(damping=damping, damping_split=damping_split, qkv=qkv, factor_documents=_n_kept(module, factor_texts),
                    factor_tokens=kinfo["tokens"], blocks=kinfo["blocks"], damping_lambda=kinfo["lambda"])
    vector = sketch_direction(module, gradient).detach().cpu().numpy().astype(np.float32)
    info["norm"] = float(np.linalg.norm(vector))
    return vector, info
