"""The torch side of the transformer rules (docs/theory.md section 10), on the attention nodes of any
model the reader takes (:mod:`backplay.gpu.read`).

* :class:`~backplay.rules.AttnLRP` and :class:`~backplay.rules.CPLRP` are modified gradients of the
  model's pass (:meth:`backplay.gpu.read.ModelGraph.replay`): relevance = explained tensor x the
  modified gradient of the target logit, which is the layer-by-layer LRP recursion of each rule
  (every rule used has that form: LRP-0 / epsilon through dense maps, the identity rule through a
  frozen std or gate, Gradient x Input through the softmax, the uniform rule at products).
* :class:`~backplay.rules.Rollout` and :class:`~backplay.rules.TransformerAttribution` combine the
  attention weights of every attention layer (and their gradients) into one value per token, then
  spread each token's value evenly over the input units it is made of (a uniform walk down the
  frozen graph from the first attention layer's value tensor: every unit hands its mass evenly to
  the inputs it reads through a nonzero weight).
"""

from __future__ import annotations

from typing import Any

import torch

from backplay.gpu.trace import LayerTrace, Trace
from backplay.rules import AttnLRP, CPLRP, Rollout, TransformerAttribution, TransformerRule

Tensor = torch.Tensor

__all__ = ["transformer_relevance"]


def transformer_relevance(rule: TransformerRule, prep: Any, trace: Trace, target: Tensor) -> Tensor:
    """The relevance of the explained tensor ([B, ...]: pixels, or input embeddings) for ``target``
    (LongTensor [B]) under a transformer rule; ``prep`` a :class:`backplay.gpu.engine.Prepared`,
    ``trace`` its (lean) frozen pass. Differentiates also when called under ``torch.no_grad``."""
    with torch.enable_grad():
        return _relevance(rule, prep, trace, target).detach()


def _relevance(rule: TransformerRule, prep: Any, trace: Trace, target: Tensor) -> Tensor:
    if isinstance(rule, (AttnLRP, CPLRP)):
        rp = _replay(prep, eps=rule.eps, freeze_softmax=isinstance(rule, CPLRP),
                     uniform_products=isinstance(rule, AttnLRP))
        (g,) = torch.autograd.grad(_logit(rp.output, target), rp.x)
        return (rp.x * g).detach()
    if trace.n_blocks == 0:
        raise ValueError(f"{type(rule).__name__} combines attention weights: the model has no attention "
                         "(softmax(q k^T) v) on its explained path")
    plain = _replay(prep, frozen=False)
    logit = _logit(plain.output, target)
    if isinstance(rule, Rollout):
        (g_last,) = torch.autograd.grad(logit, plain.attention_out[-1])
        A = [a.detach() for a in plain.attention]
        T = A[0].shape[-1]
        eye = torch.eye(T, dtype=A[0].dtype, device=A[0].device)
        roll = eye.expand(A[0].shape[0], T, T)
        for a in A:
            a_hat = 0.5 * _heads_mean(a) + 0.5 * eye
            roll = (a_hat / a_hat.sum(-1, keepdim=True)) @ roll
    elif isinstance(rule, TransformerAttribution):
        grads = torch.autograd.grad(logit, plain.attention + [plain.attention_out[-1]])
        g_last = grads[-1]
        if rule.relevance == "attnlrp":
            rp = _replay(prep, eps=rule.eps, uniform_products=True)
            g_lrp = torch.autograd.grad(_logit(rp.output, target), rp.attention)
            R_A = [a.detach() * g for a, g in zip(rp.attention, g_lrp)]
        else:
            R_A = [a.detach() for a in plain.attention]
        T = R_A[0].shape[-1]
        roll = torch.eye(T, dtype=R_A[0].dtype, device=R_A[0].device).expand(R_A[0].shape[0], T, T)
        for g, r in zip(grads[:-1], R_A):
            roll = roll + _heads_mean((g * r).clamp(min=0)) @ roll
    else:
        raise TypeError(f"unknown transformer rule {type(rule).__name__}")
    rows = _read_tokens(g_last.detach(), T)
    scores = (rows.unsqueeze(1) @ roll).squeeze(1)  # [B, T]
    return _spread(trace, scores)


def _replay(prep: Any, **kw: Any) -> Any:
    return prep.graph.replay(prep.x, prep.dtype, prep.inputs, prep.position, **kw)


def _logit(output: Tensor, target: Tensor) -> Tensor:
    """Sum over the batch of output[b, target[b]] (samples are independent: one backward pass)."""
    return output.gather(1, target.view(-1, 1)).sum()


def _heads_mean(a: Tensor) -> Tensor:
    """[B, heads..., T, T] -> [B, T, T] (the mean over the heads)."""
    T = a.shape[-1]
    return a.reshape(a.shape[0], -1, a.shape[-2], T).mean(1)


def _read_tokens(g: Tensor, T: int) -> Tensor:
    """The query tokens the logit reads from the last attention layer (a nonzero gradient at its
    output [B, ..., T, d]), uniform weights per sample: [B, T]."""
    read = (g.abs().transpose(-2, -1).reshape(g.shape[0], -1, T).sum(1) > 0).to(g.dtype)
    return read / read.sum(1, keepdim=True).clamp_min(1)


def _spread(trace: Trace, scores: Tensor) -> Tensor:
    """Token values [B, T] -> the explained tensor's units: each token's value evenly over the units
    of the first attention layer's value tensor at that token, then down the frozen graph by the
    uniform walk (each unit's mass evenly over the input units it reads through a nonzero weight; the
    zeros a layout step writes are none: ``LayerTrace.unit_mask``)."""
    first = next(layer for layer in trace.layers if layer.block == 0)
    v = first.input  # [B, ..., T, d]
    per_token = v[0].numel() // v.shape[-2]
    mass = (scores.reshape((scores.shape[0],) + (1,) * (v.ndim - 3) + (scores.shape[1], 1)) / per_token)
    mass = mass.expand(v.shape).contiguous()
    lower, _ = trace.walk({first.sources[0]: mass}, _uniform)
    return torch.zeros_like(trace.x) if lower is None else lower.reshape(trace.x.shape)


def _uniform(layer: LayerTrace, v: Tensor) -> Tensor:
    m = layer.map
    v = v.reshape(layer.y.shape)
    units = layer.unit_mask()
    count = m.apply(units, "ipos") + m.apply(units, "ineg")
    share = torch.where(count > 0, v / torch.where(count > 0, count, torch.ones_like(count)), torch.zeros_like(v))
    return units * (m.transpose(share, "ipos") + m.transpose(share, "ineg"))
