"""``unroll``: the explained forward pass of one input as a :class:`backplay.nets.FrozenNet`."""

from __future__ import annotations

from typing import Any

import torch

from backplay.nets import FrozenNet

__all__ = ["unroll"]


def unroll(model: Any, x: torch.Tensor) -> FrozenNet:
    """The forward pass of ``model`` at ONE input ``x`` (the shape of a single sample, e.g. [C, H, W]
    or [n]) as dense affine layers in float64.

    Layer l of the result is layer l of :func:`backplay.explain` (report ``layers``): each Linear /
    Conv2d (BatchNorm merged) gives its dense matrix (its action on the basis vectors) and bias vector,
    AvgPool2d / AdaptiveAvgPool2d their averaging matrix, MaxPool2d the frozen 0/1 selection of the
    argmax at this input (``kinds`` "maxpool": relevance goes to the winner whatever the rule); ReLU / Softplus are folded into the recorded values ``ys`` (y^0 = x
    flattened, ..., y^L); Flatten adds nothing. Residual blocks are not unrollable (ValueError).
    A :class:`backplay.gpu.vit.ViT` is unrolled by :func:`backplay.gpu.vit_explain.unroll_vit`
    (its residual skips carried by copy rows).
    """
    from backplay.gpu.engine import prepare_graph
    from backplay.gpu.vit import ViT

    if isinstance(model, ViT):
        from backplay.gpu.vit_explain import unroll_vit

        return unroll_vit(model, x).net
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch tensor, got {type(x).__name__}")
    prep = prepare_graph(model, x.detach().to(torch.float64))
    if not prep.squeeze:
        raise ValueError(f"unroll takes one input (the shape of a single sample), got shape {tuple(x.shape)}")
    with torch.no_grad():
        trace = prep.net.trace(prep.x)
        weights, biases, ys, kinds = [], [], [prep.x.flatten()], []
        for l, rec in enumerate(trace.layers, start=1):
            if hasattr(rec, "body"):
                raise ValueError(f"layer {l} is a Residual block: residual models cannot be unrolled "
                                 "into a chain of dense layers")
            shape = tuple(rec.input.shape[1:])
            n_in = rec.input[0].numel()
            eye = torch.eye(n_in, dtype=torch.float64, device=rec.input.device).reshape((n_in,) + shape)
            op = rec.map
            kinds.append("maxpool" if getattr(rec, "kind", None) == "maxpool" else "affine")
            if kinds[-1] == "maxpool":  # the selection of this input, per basis vector
                from backplay.gpu.graph import Selection

                op = Selection(rec.map.indices.expand((n_in,) + tuple(rec.map.indices.shape[1:])), shape)
            cols = op.apply(eye)  # [n_in, *out]
            W = cols.reshape(n_in, -1).T
            b = op.bias_like(rec.z)
            weights.append(W.cpu().numpy())
            biases.append(None if b is None else b[0].flatten().cpu().numpy())
            ys.append(rec.y[0].flatten())
        return FrozenNet(weights, biases, [y.cpu().numpy() for y in ys], kinds)
