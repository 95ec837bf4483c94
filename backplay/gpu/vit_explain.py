"""``explain`` on a Vision Transformer: the frozen extended graph (THEORY.md section 7).

The explained forward pass of a :class:`backplay.gpu.vit.ViT` is read as frozen layer maps and gates
(:mod:`backplay.gpu.ops` objects) in a :class:`backplay.gpu.trace.Trace`, so every layer rule of :mod:`backplay.rules` (Gradient,
GradientXInput, LRP0, AlphaBeta, RG, RGEq, GradientEquilibrium, Anchor, RiskAverse, SoftplusGame)
runs on it unchanged, in one batched forward pass and one backward sweep:

* patch embedding (Conv2d) with the cls token and the position embedding: :class:`EmbedOp`, the conv
  weights; cls token + position embedding are bias (constant unit) contributions;
* every Linear (v, proj, fc1, fc2): its weights (:class:`backplay.gpu.ops.DenseOp`, per token);
* LayerNorm: the standard deviation std_t is frozen (the identity rule), the centring and gamma stay
  linear: per sample and token the dense map diag(gamma / std_t) (I - 11^T / n), beta a bias
  (:class:`LayerNormOp`);
* GELU: the gate Phi(z) is frozen (gelu(z) = z Phi(z)), the neuron's own gate: :class:`GELUGate`
  (the gradient passes it times Phi(z); the routing laws and LRP-0 pass relevance through it as
  through a ReLU or softplus gate);
* attention out_q = sum_t A_qt v_t (per head): a token-mixing linear map with the frozen,
  non-negative weights A (:class:`AttentionMixOp`); q and k receive no relevance;
* each residual add: a sum node with two contributions (:class:`backplay.gpu.ops.AddOp`) reading the
  block input and the body output;
* the final LayerNorm on every token, then the head on the cls token (:class:`HeadOp`).

Layers, torch order (``ExplainReport.layers``): [0] the image, [1] the token stream after the
embedding, then the stream after each residual add (two per block: attention, MLP), then the final
LayerNorm's output (tokens), then the logits. Body layers count in the numbering of ``Anchor(lam=
tuple)`` (embed, then per block norm1, v, mix, proj, add, norm2, fc1, fc2, add, then norm, head).

Conventions of this module (documented choices):

* ``SoftplusGame(eps)`` on a ViT: the GELU gates Phi(z) are the Gibbs gates. The surrogate ViT has
  the same weights with each GELU z Phi(z) replaced by z Phi(z / eps) (its gate at temperature eps);
  the rule is Gradient x Input on the surrogate's frozen graph (LayerNorm std and attention are those
  of the surrogate pass). eps = 1 is the model itself (Gradient x Input of the frozen graph);
  eps -> 0 gives the ViT with ReLU MLPs.
* ``Anchor(rule, lam, anchor="token")``: at the attention (token-mixing) edges of block b the
  routing is (1 - lam_b) pi + lam_b u with u the query's own token (same head and feature) when its
  contribution A_qq v_qd lies in the branch, else uniform on the branch; every other layer keeps the
  base law. ``anchor="uniform"`` mixes the uniform anchor in at every layer.
* The frozen-graph gradient (``Gradient``) is the gradient of the detached model
  (``forward_explain(freeze=True)``), so ``GradientXInput`` = Input x Gradient of the detached model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from backplay.gpu.engine import compute_dtype, float_tensor, resolve_target
from backplay.gpu.ops import AddOp, DenseOp, GELUGate, Gate, LinearGate, LinearOp, WeightOp
from backplay.gpu.trace import LayerTrace, Trace
from backplay.gpu.vit import ViT
from backplay.rules import (
    RG, AlphaBeta, Anchor, Gradient, GradientEquilibrium, GradientXInput, LRP0, RGEq, RiskAverse, Rule,
    SoftplusGame, _RoutingLaw,
)

Tensor = torch.Tensor

__all__ = [
    "EmbedOp", "LayerNormOp", "AttentionMixOp", "HeadOp", "ViTGraph", "GRAPH_RULES", "explain_vit",
    "prepare_vit",
]

#: The rules that run on the frozen ViT graph (the ViT-only rules subclass ViTRule instead).
GRAPH_RULES = (Gradient, GradientXInput, LRP0, AlphaBeta, RG, RGEq, GradientEquilibrium, Anchor,
               RiskAverse, SoftplusGame)


# --------------------------------------------------------------------------------------------
# the frozen layer maps
# --------------------------------------------------------------------------------------------
class EmbedOp(WeightOp):
    """Patch embedding with the cls token: image [B, C, H, W] -> tokens [B, 1 + N, dim].

    z_0 = cls + pos_0 (a bias only: no weight reaches the cls row), z_t = conv(x)_t + b + pos_t."""

    def __init__(self, weight: Tensor, conv_bias: Tensor | None, cls: Tensor, pos: Tensor,
                 patch: int) -> None:
        self.weight, self.patch = weight, patch
        d = weight.shape[0]
        n = pos.shape[1] - 1
        patch_bias = torch.zeros(n, d, dtype=weight.dtype, device=weight.device)
        if conv_bias is not None:
            patch_bias = patch_bias + conv_bias.view(1, d)
        self.bias = torch.cat([cls.reshape(1, d), patch_bias], 0) + pos.reshape(n + 1, d)

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        z = F.conv2d(y, self.parts[part], None, stride=self.patch).flatten(2).transpose(1, 2)
        return torch.cat([z.new_zeros(z.shape[0], 1, z.shape[2]), z], 1)

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        B, T, d = g.shape
        side = int(round((T - 1) ** 0.5))
        gp = g[:, 1:].transpose(1, 2).reshape(B, d, side, side)
        return F.conv_transpose2d(gp, self.parts[part], None, stride=self.patch)

    def __repr__(self) -> str:
        return f"EmbedOp({tuple(self.weight.shape)})"


_SIGN_PARTS = {
    "W": lambda w: w, "pos": lambda w: w.clamp_min(0), "neg": lambda w: w.clamp_max(0),
    "abs": lambda w: w.abs(), "ipos": lambda w: (w > 0).to(w.dtype), "ineg": lambda w: (w < 0).to(w.dtype),
}


class LayerNormOp(LinearOp):
    """LayerNorm with the standard deviation frozen (per sample and token): z = W_t y + beta with
    W_t = diag(gamma / std_t) (I - 11^T / n) = C / std_t, i.e. C has diagonal entries
    c_i = gamma_i (1 - 1/n) and off-diagonal entries o_i = -gamma_i / n in row i. A part f (W+, |W|,
    1{W > 0}, ...) is applied entrywise; as std_t > 0, f(W_t) = f(C) / std_t for W, W+, W-, |W| and
    f(W_t) = f(C) for the indicators, so f(W_t) y = (f(c) y + f(o) (sum(y) - y)) [/ std_t]: O(n) per
    token, and the op holds only gamma and 1/std ([B, T, 1])."""

    def __init__(self, gamma: Tensor | None, beta: Tensor | None, std: Tensor, n: int) -> None:
        g = torch.ones(n, dtype=std.dtype, device=std.device) if gamma is None else gamma
        self.n = n
        self.c, self.o = g * (1.0 - 1.0 / n), g * (-1.0 / n)  # [n]
        self.inv = 1.0 / std  # [B, T, 1]
        self.bias = None if beta is None else beta.view(1, n)

    def _part(self, part: str) -> tuple[Tensor, Tensor, bool]:
        f = _SIGN_PARTS[part]
        return f(self.c), f(self.o), part not in ("ipos", "ineg")

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        fc, fo, scaled = self._part(part)
        out = fc * y + fo * (y.sum(-1, keepdim=True) - y)
        return out.mul_(self.inv) if scaled else out

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        fc, fo, scaled = self._part(part)
        if scaled:
            g = g * self.inv
        og = fo * g
        return (fc * g).add_(og.sum(-1, keepdim=True)).sub_(og)

    def __repr__(self) -> str:
        return f"LayerNormOp(n={self.n})"


class AttentionMixOp(LinearOp):
    """out_q = sum_t A_qt v_t per head, A [B, H, T, T] frozen (softmax: non-negative), no bias.
    W = W+ = |W| = A, W- = 0 (as a pool). ``own_*``: the query's own token (the token anchor)."""

    def __init__(self, attn: Tensor) -> None:
        self.A = attn
        self.heads = attn.shape[1]
        self._ind: Tensor | None = None

    def _matrix(self, part: str) -> Tensor | None:
        if part in ("neg", "ineg"):
            return None
        if part == "ipos":
            if self._ind is None:
                self._ind = (self.A > 0).to(self.A.dtype)
            return self._ind
        return self.A

    def drop_parts(self) -> None:
        self._ind = None

    def _split(self, y: Tensor) -> Tensor:
        B, T, d = y.shape
        return y.reshape(B, T, self.heads, d // self.heads).transpose(1, 2)

    @staticmethod
    def _merge(t: Tensor) -> Tensor:
        B, H, T, hd = t.shape
        return t.transpose(1, 2).reshape(B, T, H * hd)

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        M = self._matrix(part)
        if M is None:
            return torch.zeros_like(y)
        return self._merge(M @ self._split(y))

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        M = self._matrix(part)
        if M is None:
            return torch.zeros_like(g)
        return self._merge(M.transpose(-2, -1) @ self._split(g))

    def pair(self, y: Tensor, ind: bool = False) -> tuple[Tensor, Tensor | None]:
        return self.apply(y, "ipos" if ind else "pos"), None

    def pair_t(self, g: Tensor, h: Tensor | None, ind: bool = False) -> Tensor:
        return self.transpose(g, "ipos" if ind else "pos")

    def own_contribution(self, y: Tensor) -> Tensor:
        """A_qq v_qd: the contribution of the query's own token to output (q, d)."""
        diag = self.A.diagonal(dim1=-2, dim2=-1)  # [B, H, T]
        return self._merge(diag.unsqueeze(-1) * self._split(y))

    @staticmethod
    def own_gather(u: Tensor) -> Tensor:
        """The lower layer's values at each output's own unit (the same position)."""
        return u

    @staticmethod
    def own_scatter(c: Tensor) -> Tensor:
        """Transpose of :meth:`own_gather`."""
        return c

    def __repr__(self) -> str:
        return f"AttentionMixOp(heads={self.heads})"


class HeadOp(WeightOp):
    """The classifier on the cls token: tokens [B, T, dim] -> logits W y_0 + b (other tokens: weight 0)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight = weight
        self.bias = None if bias is None else bias.view(1, -1)

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        return F.linear(y[:, 0], self.parts[part])

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        out = g.new_zeros((g.shape[0],) + tuple(self.in_shape))
        out[:, 0] = g @ self.parts[part]
        return out

    def __repr__(self) -> str:
        return f"HeadOp({self.weight.shape[1]} -> {self.weight.shape[0]})"


# --------------------------------------------------------------------------------------------
# the read model and its forward trace
# --------------------------------------------------------------------------------------------
def _layer_norm_std(h: Tensor, eps: float) -> Tensor:
    """sqrt(var + eps) over the last dimension (biased variance), as nn.LayerNorm and forward_explain."""
    xc = h - h.mean(dim=-1, keepdim=True)
    return torch.sqrt((xc * xc).mean(dim=-1, keepdim=True) + eps)


class ViTGraph:
    """A :class:`ViT` read as detached weights in ``dtype`` (the model is never run nor modified);
    :meth:`trace` runs the explained forward pass of a batch as layer records."""

    def __init__(self, model: ViT, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype
        self.config = model.config

    def _w(self, t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to(self.dtype)

    def _dense(self, lin: Any) -> DenseOp:
        return DenseOp(self._w(lin.weight), self._w(lin.bias))

    def _norm(self, norm: Any, h: Tensor) -> LayerNormOp:
        return LayerNormOp(self._w(norm.weight), self._w(norm.bias), _layer_norm_std(h, norm.eps),
                           h.shape[-1])

    def trace(self, x: Tensor, eps: float = 1.0, lean: bool = False, keep_z: bool = True) -> Trace:
        """Forward pass of the batch ``x`` [B, C, H, W] (compute dtype). ``eps``: the GELU gates'
        temperature (1: the model). ``lean``: keep only the layers' inputs and outputs (``z`` and
        ``p`` None), all the routing laws need; ``keep_z=False``: no ``z`` at the GELU layers (only
        LRP-0 reads it). At the layers without activation ``p`` is the number 1.0 and ``z`` is ``y``.
        The add node's stacked input holds the skip and the body output; the block input and the
        body's last output are views of it (no second copy)."""
        m, cfg = self.model, self.config
        steps: list = []
        linear = LinearGate()

        def record(op: Any, gate: Gate, y: Tensor, kind: str, src: tuple, **attrs: Any) -> LayerTrace:
            op.bound(tuple(y.shape[1:]))
            z = op.forward(y)
            if type(gate) is LinearGate:
                y_next, p = z, 1.0
            else:
                y_next, p = gate(z)
                if not keep_z:
                    z = None
            rec = LayerTrace(op, gate, y, None if lean else z, None if lean else p, y_next,
                             index=len(steps) + 1, kind=kind, sources=src, out=len(steps) + 1,
                             in_shapes=tuple(tuple(y.shape[2:]) for _ in src) if len(src) > 1 else ())
            for k, v in attrs.items():
                setattr(rec, k, v)
            steps.append(rec)
            return rec

        def residual(prev: LayerTrace, body: list) -> LayerTrace:
            stacked = torch.stack([prev.y, body[-1].y], dim=1)
            skip = stacked[:, 0]  # h and the body output become views of the stacked input
            body[0].input = skip
            body[-1].y = stacked[:, 1]
            if body[-1].z is not None:
                body[-1].z = body[-1].y
            prev.y = skip
            if prev.z is not None:
                prev.z = skip
            return record(AddOp(tuple(stacked.shape[1:])), linear, stacked, "add", (prev.out, body[-1].out))

        with torch.no_grad():
            emb = EmbedOp(self._w(m.patch_embed.weight), self._w(m.patch_embed.bias),
                          self._w(m.cls_token), self._w(m.pos_embed), cfg.patch_size)
            prev = record(emb, linear, x, "embed", (0,))
            gelu = GELUGate(eps)
            for b, blk in enumerate(m.blocks):
                a = blk.attn
                h = prev.y
                n1 = record(self._norm(blk.norm1, h), linear, h, "norm", (prev.out,))
                v = record(self._dense(a.v), linear, n1.y, "linear", (n1.out,))
                q = a._heads(F.linear(n1.y, self._w(a.q.weight), self._w(a.q.bias)))
                k = a._heads(F.linear(n1.y, self._w(a.k.weight), self._w(a.k.bias)))
                A = torch.softmax((q @ k.transpose(-2, -1)) * a.scale, dim=-1)
                del q, k
                mix = record(AttentionMixOp(A), linear, v.y, "attention", (v.out,), block=b)
                proj = record(self._dense(a.proj), linear, mix.y, "linear", (mix.out,))
                prev = residual(prev, [n1, v, mix, proj])
                h = prev.y
                n2 = record(self._norm(blk.norm2, h), linear, h, "norm", (prev.out,))
                fc1 = record(self._dense(blk.mlp.fc1), gelu, n2.y, "linear", (n2.out,))
                fc2 = record(self._dense(blk.mlp.fc2), linear, fc1.y, "linear", (fc1.out,))
                prev = residual(prev, [n2, fc1, fc2])
            norm = record(self._norm(m.norm, prev.y), linear, prev.y, "norm", (prev.out,))
            head = HeadOp(self._w(m.head.weight), self._w(m.head.bias))
            last = record(head, linear, norm.y, "head", (norm.out,))
        tr = Trace(x, steps, last.out, last.y, lambda e: self.trace(x, eps=e))
        tr.n_blocks = len(m.blocks)
        return tr


# --------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------
def prepare_vit(model: ViT, x: Any) -> tuple[Tensor, bool, torch.dtype]:
    """(batch in the compute dtype, squeeze, the caller's dtype), with clear errors."""
    x = float_tensor(x, "x")
    cfg = model.config
    want = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if x.ndim not in (3, 4) or tuple(x.shape[-3:]) != want:
        raise ValueError(f"x must have shape [B, {want[0]}, {want[1]}, {want[2]}] (or [{want[0]}, "
                         f"{want[1]}, {want[2]}] for one image) for this ViT, got shape {tuple(x.shape)}")
    if cfg.num_classes < 1:
        raise ValueError("the ViT has no classification head (num_classes = 0): nothing to explain")
    dtype = compute_dtype(model, x)
    squeeze = x.ndim == 3
    xb = x.detach().unsqueeze(0) if squeeze else x.detach()
    if not bool(torch.isfinite(xb).all()):
        raise ValueError("x contains non-finite values (nan or inf)")
    return xb.to(dtype), squeeze, x.dtype


def explain_vit(model: ViT, x: Tensor, target: Any, rule: Rule, return_report: bool = False
                ) -> Tensor | tuple[Tensor, Any]:
    """:func:`backplay.gpu.explain` for a :class:`ViT` (same contract): the relevance of every pixel,
    in x's shape, dtype and device; with ``return_report`` also an
    :class:`~backplay.gpu.engine.ExplainReport` (logit, relevance_sum, stopped per sample; the
    per-layer relevance for the graph rules, see the module docstring for the layer list).

    A :class:`backplay.gpu.vit_rules.ViTRule` is run by its ``vit_relevance`` (report: stopped =
    logit - sum R, no layers); the graph rules (:data:`GRAPH_RULES`) run on the frozen graph."""
    from backplay.gpu.engine import ExplainReport
    from backplay.gpu.vit_rules import ViTRule

    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a backplay.rules.Rule, got {type(rule).__name__}")
    is_vit_rule = isinstance(rule, ViTRule)
    if not is_vit_rule and not isinstance(rule, GRAPH_RULES):
        names = ", ".join(c.__name__ for c in GRAPH_RULES)
        raise TypeError(f"rule {type(rule).__name__} is not supported on a ViT (graph rules: {names}; "
                        "or a backplay.gpu.vit_rules.ViTRule)")
    xb, squeeze, in_dtype = prepare_vit(model, x)
    graph = ViTGraph(model, xb.dtype)
    n_out = model.config.num_classes
    layers = None
    if is_vit_rule:  # outside no_grad: a ViT rule may differentiate (attention gradients)
        t = resolve_target(target, xb.shape[0], n_out, xb.device)
        relevance = rule.vit_relevance(model, xb, t)
        if not isinstance(relevance, torch.Tensor) or relevance.numel() != xb.numel():
            raise ValueError(f"{type(rule).__name__}.vit_relevance must return a tensor of shape "
                             f"{tuple(xb.shape)}")
        relevance = relevance.detach().to(xb.dtype).reshape(xb.shape)
    with torch.no_grad():
        if is_vit_rule:
            logit = graph.trace(xb, lean=True).logit(t) if return_report else None
            stopped = None
        elif isinstance(rule, SoftplusGame):  # GxI of the surrogate (GELU gates at temperature eps)
            t = resolve_target(target, xb.shape[0], n_out, xb.device)
            logit = graph.trace(xb, lean=True).logit(t) if return_report else None
            trace = graph.trace(xb, eps=rule.eps, keep_z=False)
            sweep = GradientXInput().sweep(trace, t, keep_layers=return_report, release=True)
        else:
            trace = graph.trace(xb, lean=isinstance(rule, _RoutingLaw), keep_z=isinstance(rule, LRP0))
            t = resolve_target(target, xb.shape[0], n_out, xb.device)
            logit = trace.logit(t) if return_report else None
            sweep = rule.sweep(trace, t, keep_layers=return_report, release=True)
        if not is_vit_rule:
            del trace
            relevance = sweep.relevance.reshape(xb.shape)
            stopped = sweep.stopped
            if return_report:
                layers = [r.to(in_dtype) for r in sweep.layers]
                layers[0] = layers[0].reshape(xb.shape)
                if squeeze:
                    layers = [r.squeeze(0) for r in layers]
        out = relevance.to(in_dtype)
        if squeeze:
            out = out.squeeze(0)
        if not return_report:
            return out
        total = relevance.flatten(1).sum(1)
        if stopped is None:
            stopped = logit - total
        fields = [f.to(in_dtype) for f in (logit, total, stopped)]
        if squeeze:
            fields = [f.squeeze(0) for f in fields]
    return out, ExplainReport(*fields, rule=rule.name, layers=layers)
