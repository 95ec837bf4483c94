"""Transformer rules that are not laws on the frozen extended graph (THEORY.md section 7).

A :class:`ViTRule` reads a :class:`backplay.gpu.vit.ViT` directly (its attention matrices and their
gradients, a re-run of its forward pass with some pieces detached) instead of a chain of layer maps.
``bp.explain`` hands a ViT and such a rule to :meth:`ViTRule.vit_relevance`; rules defined on the
frozen graph (Gradient, GradientXInput, AlphaBeta, the routing laws, SoftplusGame) run through the
graph engine instead.

The relevance rules (:class:`CPLRP`, :class:`AttnLRP`) are computed as the authors compute them: a
*modified gradient*. The pass is re-run functionally from the model's detached weights (the model is
never run, hooked or modified), with the frozen pieces detached, each epsilon-stabilised linear layer
scaling its backward signal by ``z / (z + eps sign z)`` and each bilinear matmul passing half the
gradient to each factor; then the relevance of every node is its value times the modified gradient of
the target logit (Gradient x Input), in particular ``R_pixels = x * g_x``. Every LRP rule used here
has that form (the start ``R = logit`` at the target, LRP-0 = Gradient x Input through a linear map,
the identity rule through a frozen gate or standard deviation), so the result is the layer-by-layer
LRP recursion, batched (``tests/test_vit_rules.py`` checks it against the explicit recursion).

The attention-rollout rules (:class:`Rollout`, :class:`TransformerAttribution`) produce a value per
patch (``patch_scores`` -> [B, grid, grid]); their :meth:`vit_relevance` spreads each patch value evenly over its
``C * patch_size**2`` pixels, so that :func:`patch_relevance` (sum pooling) gives it back exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from backplay.gpu.vit import gelu_gate
from backplay.rules import Rule

if TYPE_CHECKING:  # pragma: no cover
    from backplay.gpu.vit import ViT

Tensor = torch.Tensor

__all__ = ["ViTRule", "CPLRP", "AttnLRP", "Rollout", "TransformerAttribution", "patch_relevance"]


@dataclass(frozen=True)
class ViTRule(Rule):
    """Base class of the ViT-only rules: ``vit_relevance(model, x, target) -> [B, C, H, W]``."""

    def vit_relevance(self, model: "ViT", x: Tensor, target: Tensor) -> Tensor:
        """Pixel relevance of the batch ``x`` ([B, C, H, W], already checked and in the compute
        dtype) for the targets (LongTensor [B]); the model is never modified."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# checks and pixel / patch conversion


def _check_eps(eps: float, strict: bool) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number, got {eps!r}")
    if eps < 0 or (strict and eps == 0):
        raise ValueError(f"eps must be {'> 0' if strict else '>= 0'}, got {eps!r}")


def _check_call(model: "ViT", x: Tensor, target: Tensor) -> None:
    from backplay.gpu.vit import ViT

    if not isinstance(model, ViT):
        raise TypeError(f"a ViT rule needs a backplay.gpu.vit.ViT, got {type(model).__name__}")
    if not isinstance(model.head, nn.Linear):
        raise ValueError("a ViT rule explains a logit: the model has no classification head "
                         "(num_classes=0)")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor [B, C, H, W]")
    model._check_input(x)
    if not isinstance(target, Tensor) or target.dtype != torch.long or target.shape != x.shape[:1]:
        raise ValueError(f"target must be a LongTensor of shape [{x.shape[0]}], got "
                         f"{getattr(target, 'dtype', type(target))} "
                         f"{tuple(getattr(target, 'shape', ()))}")
    n = model.config.num_classes
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= n):
        raise ValueError(f"target out of range [0, {n}): {target.tolist()}")


def patch_relevance(R_pixels: Tensor, patch_size: int) -> Tensor:
    """Sum pooling of a pixel relevance [B, C, H, W] (or one image [C, H, W]) over the channels and
    the non-overlapping ``patch_size x patch_size`` patches -> [B, H / p, W / p] (or [H / p, W / p])."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if not isinstance(R_pixels, Tensor) or R_pixels.dim() not in (3, 4):
        raise ValueError(f"R_pixels must be a tensor [B, C, H, W] or [C, H, W], got "
                         f"{tuple(getattr(R_pixels, 'shape', ()))}")
    h, w = R_pixels.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"image {h}x{w} is not a multiple of patch_size {patch_size}")
    s = R_pixels.sum(-3)
    return s.reshape(s.shape[:-2] + (h // patch_size, patch_size, w // patch_size, patch_size)).sum((-3, -1))


def _grid(model: "ViT", patch: Tensor) -> Tensor:
    """Patch-token values [B, n_patches] -> [B, grid, grid]."""
    g = model.config.grid
    return patch.reshape(-1, g, g)


def _spread(model: "ViT", patch: Tensor) -> Tensor:
    """Patch values [B, grid, grid] -> pixels [B, C, H, W], each patch value split evenly over its
    C * patch_size**2 pixels (the inverse of :func:`patch_relevance`)."""
    cfg = model.config
    p, g = cfg.patch_size, cfg.grid
    per_pixel = patch.reshape(-1, 1, g, 1, g, 1) / (cfg.in_channels * p * p)
    out = per_pixel.expand(-1, cfg.in_channels, g, p, g, p)
    return out.reshape(-1, cfg.in_channels, cfg.image_size, cfg.image_size).contiguous()


# ----------------------------------------------------------------------------------------------
# the modified forward pass


def _stabilize(z: Tensor, eps: float) -> Tensor:
    """z + eps * sign(z), with sign(0) := +1 (the zennit / LXT convention)."""
    return z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def _eps_scaled(z: Tensor, eps: float) -> Tensor:
    """The value z with the backward signal scaled by z / (z + eps sign z): through a linear layer
    z = W u + b that turns Gradient x Input (LRP-0) into the epsilon rule
    R_u = u * W^T (R_z / (z + eps sign z))."""
    if eps == 0:
        return z
    s = (z / _stabilize(z, eps)).detach()
    return z.detach() + (z - z.detach()) * s


def _uniform_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with half the gradient to each factor (AttnLRP's uniform rule for a bilinear map:
    R_a = a * (g @ b^T) / 2, R_b = b * (a^T @ g) / 2, which sum to the relevance of a @ b)."""
    return 0.5 * (a @ b.detach()) + 0.5 * (a.detach() @ b)


def _p(t: Tensor | None, like: Tensor) -> Tensor | None:
    return None if t is None else t.detach().to(like.dtype)


def _linear(u: Tensor, lin: nn.Linear, eps: float) -> Tensor:
    return _eps_scaled(F.linear(u, _p(lin.weight, u), _p(lin.bias, u)), eps)


def _layer_norm(x: Tensor, norm: nn.LayerNorm, freeze: bool) -> Tensor:
    """(x - mean) / std * weight + bias; the std detached with ``freeze`` (identity rule)."""
    xc = x - x.mean(dim=-1, keepdim=True)
    std = torch.sqrt((xc * xc).mean(dim=-1, keepdim=True) + norm.eps)
    y = xc / (std.detach() if freeze else std)
    if norm.weight is not None:
        y = y * _p(norm.weight, x)
    if norm.bias is not None:
        y = y + _p(norm.bias, x)
    return y


def _forward(model: "ViT", x: Tensor, mode: str, eps: float = 0.0) -> tuple[Tensor, list[Tensor]]:
    """The ViT pass from the model's detached weights. ``mode``: ``"plain"`` (the model's own
    autograd graph), ``"cp"`` (LayerNorm std, GELU gate and attention weights detached) or
    ``"attnlrp"`` (std and gate detached; softmax kept; Q K^T and A V with the uniform rule).
    Linear layers (patch embedding included) get the epsilon rule with ``eps > 0``.
    Returns (logits [B, classes], the attention matrices [B, H, T, T] per block)."""
    freeze = mode != "plain"
    pe = model.patch_embed
    z = _eps_scaled(F.conv2d(x, _p(pe.weight, x), _p(pe.bias, x), stride=pe.stride), eps)
    patches = z.flatten(2).transpose(1, 2)
    cls = _p(model.cls_token, x).expand(x.shape[0], -1, -1)
    h = torch.cat([cls, patches], dim=1) + _p(model.pos_embed, x)
    attns = []
    for blk in model.blocks:
        a = blk.attn
        u = _layer_norm(h, blk.norm1, freeze)
        q, k, v = (a._heads(_linear(u, lin, eps)) for lin in (a.q, a.k, a.v))
        kt = k.transpose(-2, -1)
        S = _uniform_matmul(q * a.scale, kt) if mode == "attnlrp" else (q @ kt) * a.scale
        A = torch.softmax(S, dim=-1)
        attns.append(A)
        if mode == "attnlrp":
            ctx = _uniform_matmul(A, v)
        else:
            ctx = (A.detach() if mode == "cp" else A) @ v
        h = h + _linear(a._merge(ctx), a.proj, eps)
        zz = _linear(_layer_norm(h, blk.norm2, freeze), blk.mlp.fc1, eps)
        gate = gelu_gate(zz)
        h = h + _linear(zz * (gate.detach() if freeze else gate), blk.mlp.fc2, eps)
    y = _layer_norm(h, model.norm, freeze)[:, 0]
    return _linear(y, model.head, eps), attns


def _target_logit(logits: Tensor, target: Tensor) -> Tensor:
    """Sum over the batch of logits[b, target[b]] (samples are independent, so one backward pass
    gives every sample's gradient)."""
    return logits.gather(1, target.reshape(-1, 1)).sum()


def _lrp(model: "ViT", x: Tensor, target: Tensor, mode: str, eps: float,
         attention: bool = False) -> tuple[Tensor, list[Tensor]]:
    """Pixel relevance x * g_x of the modified pass (and, with ``attention``, the relevance
    A * g_A of every block's attention matrix)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logits, attns = _forward(model, xg, mode, eps)
        inputs = [xg] + (attns if attention else [])
        grads = torch.autograd.grad(_target_logit(logits, target), inputs)
    R_A = [A.detach() * g for A, g in zip(attns, grads[1:])]
    return (xg.detach() * grads[0]), R_A


# ----------------------------------------------------------------------------------------------
# the rules


@dataclass(frozen=True)
class CPLRP(ViTRule):
    """Conservative propagation LRP (Ali et al. 2022, "XAI for Transformers: Better Explanations
    through Conservative Propagation"): LayerNorm standard deviations, GELU gates and attention
    weights are detached (the identity rule through each; attention mixes the value tokens with the
    fixed weights A, no relevance enters q or k), and every linear layer (patch embedding, q, k, v,
    proj, fc1, fc2, head) uses LRP-0 (``eps=0``, default) or the epsilon rule ``eps > 0``.

    With ``eps=0`` it equals Gradient x Input of ``forward_explain(freeze=True)`` (THEORY.md
    section 7). Conservation (``eps=0``): the frozen pass is positively homogeneous of degree 1 in
    (image, every bias-like parameter: Linear / Conv biases, LayerNorm biases, cls token, position
    embedding), so by Euler
    ``logit = sum R_pixels + sum_p <p, d logit / d p>`` over the bias-like parameters p, the second
    term being the relevance they absorb (zero when they are all zero).
    """

    eps: float = 0.0

    def __post_init__(self) -> None:
        _check_eps(self.eps, strict=False)

    def vit_relevance(self, model: "ViT", x: Tensor, target: Tensor) -> Tensor:
        _check_call(model, x, target)
        return _lrp(model, x, target, "cp", self.eps)[0]


@dataclass(frozen=True)
class AttnLRP(ViTRule):
    """AttnLRP (Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation
    for Transformers"), as a modified gradient of one batched pass:

    * linear layers (patch embedding, q, k, v, proj, fc1, fc2, head): epsilon rule
      ``R_u = u * W^T (R_z / (z + eps sign z))`` (sign(0) := +1), ``eps > 0``;
    * LayerNorm: identity rule (std detached; centring and affine map by LRP-0, the LayerNorm bias
      absorbs its share); GELU: identity rule (gate Phi(z) detached);
    * softmax A = softmax(S): ``R_S = S * (R_A - A * sum_rows R_A)`` (Gradient x Input of the
      softmax w.r.t. its logits; not conservative: it absorbs ``sum(S * A) * sum R_A`` per row);
    * the bilinear matmuls Q K^T and A V: uniform rule, each factor gets half
      (``R_a = a * (g @ b^T) / 2``), so relevance flows into q and k through the softmax.

    Residual adds split by LRP-0 (x * g); the cls token and position embedding absorb their shares.
    Conservation: every step above except the softmax and the biases is exactly conservative, so
    ``logit - sum R_pixels`` = (bias shares) + (softmax terms) + O(eps).

    Relation to the authors' code (LXT 2.1): ``lxt/efficient`` computes the same modified gradient
    (std detached, GELU by its identity rule, query and key gradients divided by 4 and value by 2,
    which is the uniform rule at both matmuls) with LRP-0 linear layers, i.e. this rule as
    eps -> 0; ``lxt/explicit`` also epsilon-stabilises the matmuls, which this rule does not.
    """

    eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_eps(self.eps, strict=True)

    def vit_relevance(self, model: "ViT", x: Tensor, target: Tensor) -> Tensor:
        _check_call(model, x, target)
        return _lrp(model, x, target, "attnlrp", self.eps)[0]


@dataclass(frozen=True)
class _PatchRule(ViTRule):
    """A rule with one value per patch: :meth:`patch_scores` -> [B, grid, grid];
    :meth:`vit_relevance` spreads each value evenly over the patch's C * patch_size**2 pixels (so
    ``patch_relevance(vit_relevance(...), patch_size) == patch_scores(...)``)."""

    def patch_scores(self, model: "ViT", x: Tensor, target: Tensor) -> Tensor:
        """One value per patch, [B, grid, grid] (row-major like the patch tokens)."""
        raise NotImplementedError

    def vit_relevance(self, model: "ViT", x: Tensor, target: Tensor) -> Tensor:
        return _spread(model, self.patch_scores(model, x, target))


@dataclass(frozen=True)
class Rollout(_PatchRule):
    """Attention rollout (Abnar and Zuidema 2020): per block the head-mean attention A_b,
    ``A_hat_b = (0.5 A_b + 0.5 I)`` row-normalised, ``Rollout = A_hat_L ... A_hat_1``; the value of
    patch i is ``Rollout[cls, 1 + i]`` (the cls row over the patch tokens; it sums to
    1 - Rollout[cls, cls]). Target-independent: ``target`` is checked but not used. As pixels
    (:meth:`vit_relevance`) each patch value is spread evenly over its C * patch_size**2 pixels."""

    def patch_scores(self, model: "ViT", x: Tensor, target: Tensor) -> Tensor:
        _check_call(model, x, target)
        with torch.no_grad():
            _, attns = _forward(model, x, "plain")
            T = attns[0].shape[-1]
            eye = torch.eye(T, dtype=x.dtype, device=x.device)
            roll = eye.expand(x.shape[0], T, T)
            for A in attns:
                a_hat = 0.5 * A.mean(dim=1) + 0.5 * eye
                a_hat = a_hat / a_hat.sum(dim=-1, keepdim=True)
                roll = a_hat @ roll
            return _grid(model, roll[:, 0, 1:])


@dataclass(frozen=True)
class TransformerAttribution(_PatchRule):
    """Gradient-weighted relevance rollout of Chefer et al. 2021 ("Transformer Interpretability
    Beyond Attention Visualization"): per block
    ``Abar_b = mean_heads[(dlogit_t/dA_b * R_{A_b})^+]`` with the plain gradient of the target
    logit w.r.t. the attention weights A_b (nothing frozen), then ``R = I``,
    ``R = R + Abar_b @ R`` for b = 1..L; the value of patch i is ``R[cls, 1 + i]``; as pixels
    (:meth:`vit_relevance`) spread evenly over its C * patch_size**2 pixels.

    ``relevance`` picks R_A:

    * ``"attnlrp"`` (default): the AttnLRP relevance of A (:class:`AttnLRP` with this ``eps``):
      ``R_A = A * g_A``, i.e. A's half of the uniform rule at A V. This is **not** the paper's own
      LRP (alpha=1, beta=0 linear layers with its normalised rules for add and matmul), which is not
      implemented here;
    * ``"attention"``: R_A = A, i.e. ``Abar = mean_heads[(grad A * A)^+]``: the "GAE" rule of
      Chefer et al. 2021b ("Generic Attention-model Explainability"), self-attention case.
    """

    relevance: str = "attnlrp"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.relevance not in ("attnlrp", "attention"):
            raise ValueError(f"relevance must be 'attnlrp' or 'attention', got {self.relevance!r}")
        _check_eps(self.eps, strict=True)

    def patch_scores(self, model: "ViT", x: Tensor, target: Tensor) -> Tensor:
        _check_call(model, x, target)
        with torch.enable_grad():
            logits, attns = _forward(model, x.detach().requires_grad_(True), "plain")
            grads = torch.autograd.grad(_target_logit(logits, target), attns)
        if self.relevance == "attnlrp":
            R_A = _lrp(model, x, target, "attnlrp", self.eps, attention=True)[1]
        else:
            R_A = [A.detach() for A in attns]
        T = attns[0].shape[-1]
        R = torch.eye(T, dtype=x.dtype, device=x.device).expand(x.shape[0], T, T)
        for g, r in zip(grads, R_A):
            R = R + (g * r).clamp(min=0).mean(dim=1) @ R
        return _grid(model, R[:, 0, 1:])
