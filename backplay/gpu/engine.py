"""The engine: run a rule on a model for a batch, in one batched forward and one backward sweep.

The model is read, never run nor modified: its weights are taken as detached tensors (BatchNorm is
merged into detached copies, :mod:`backplay.gpu.graph`), the forward pass is a manual walk over the
layers under ``torch.no_grad()``, and no hook is registered. So the model's parameters,
``requires_grad`` flags, training flag and hooks are exactly as before the call (and the model's own
hooks do not fire).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from backplay.gpu.checks import _to_module, float_tensor, resolve_target
from backplay.gpu.graph import GraphNetwork, check_items_device, items_dtype, read_items, _build
from backplay.rules import Gradient, Rule, _RoutingLaw, _routing_parts

Tensor = torch.Tensor

__all__ = ["ExplainReport", "explain", "prepare_graph"]


@dataclass(frozen=True)
class ExplainReport:
    """Per-sample bookkeeping of one :func:`explain` call (tensors [B] in x's dtype; 0-d for one input).

    Attributes:
        logit: f_target(x).
        relevance_sum: the sum of the returned relevance over the input.
        stopped: for the routing laws (AlphaBeta, RG, RGEq, GradientEquilibrium, Anchor, RiskAverse)
            the signed mass the law actually accumulated in the cemetery (empty branches, p = q) and
            the bias sink, so ``relevance_sum + stopped == logit`` (I14) is a real check for the
            conservative ones. For the other rules it is logit - relevance_sum: for GradientXInput
            and LRP-0 on a ReLU net the discounted bias rewards (I4); on a softplus net GxI adds the
            entropy terms (I11); for the plain Gradient (not conservative) only the difference.
        layers: the relevance at the input of every layer, torch order: [0] is the input (x's
            shape), [l] the relevance of y^l (the output of layer l, the input of layer l+1), [L] the
            start measure at the output layer. Layers are the Linear / Conv2d / pool modules and the
            add node of each Residual block (whose body layers are not listed); for Gradient it is
            the gradient wrt y^l, for GradientXInput y^l times it. Tensors with batch first.
        rule: the rule's name.
    """

    logit: Tensor
    relevance_sum: Tensor
    stopped: Tensor
    rule: str
    layers: list | None = None


@dataclass
class PreparedGraph:
    net: GraphNetwork
    x: Tensor  # batched, compute dtype, detached
    squeeze: bool
    in_dtype: torch.dtype
    in_shape: tuple  # the caller's shape


def prepare_graph(model: Any, x: Any, name: str = "x") -> PreparedGraph:
    """Validate ``x`` and read ``model`` (Linear, Conv2d, pools, BN, Flatten, Residual ...) for it.

    Batching: a model starting with Linear takes [B, n_0] or [n_0]; one starting with Conv2d or a
    pool takes [B, C, H, W] or [C, H, W]; one starting with Flatten takes [B, ...] (a 1-d x is one
    sample).
    """
    x = float_tensor(x, name)
    module = _to_module(model, x)
    items = read_items(module)
    check_items_device(items, x.device)
    dtype = torch.promote_types(x.dtype, items_dtype(items, x.dtype))
    net = GraphNetwork(_build(items, dtype), dtype)
    kind = net.first_kind()
    if kind == "linear":
        if x.ndim not in (1, 2):
            raise ValueError(f"{name} must have shape [B, n_0] (or [n_0] for one input), got shape "
                             f"{tuple(x.shape)}")
        squeeze = x.ndim == 1
        n0 = net.first_op().weight.shape[1]
        if x.shape[-1] != n0:
            raise ValueError(f"{name} has {x.shape[-1]} features per sample (shape {tuple(x.shape)}), "
                             f"the model expects {n0}")
    elif kind == "flat":
        if x.ndim < 1:
            raise ValueError(f"{name} must have at least one dimension")
        squeeze = x.ndim == 1
    else:
        if x.ndim not in (3, 4):
            raise ValueError(f"{name} must have shape [B, C, H, W] (or [C, H, W] for one input), got "
                             f"shape {tuple(x.shape)}")
        squeeze = x.ndim == 3
        if kind == "conv":
            op = net.first_op()
            c = op.weight.shape[1] * op.kw["groups"]
            if x.shape[-3] != c:
                raise ValueError(f"{name} has {x.shape[-3]} channels, the model expects {c}")
    xb = x.detach().unsqueeze(0) if squeeze else x.detach()
    if not bool(torch.isfinite(xb).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return PreparedGraph(net, xb.to(dtype), squeeze, x.dtype, tuple(x.shape))


def explain(
    model: Any,
    x: Tensor,
    target: Any,
    rule: Rule = Gradient(),
    return_report: bool = False,
) -> Tensor | tuple[Tensor, ExplainReport]:
    """Relevance of every input feature for ``target`` under ``rule``.

    Args:
        model: a :class:`backplay.gpu.vit.ViT` (run on its frozen graph, or by a ViT rule: see
            :func:`backplay.gpu.vit_explain.explain_vit`), an ``nn.Sequential`` (nested allowed) of Linear, Conv2d, BatchNorm1d/2d (directly after
            Linear/Conv2d; eval-mode statistics, merged on copies), AvgPool2d, AdaptiveAvgPool2d,
            MaxPool2d, Flatten, ReLU, Softplus, Identity, Dropout (the identity) and
            :class:`backplay.gpu.Residual` blocks; or a :class:`backplay.MLPSpec` (converted with
            ``spec.to_torch(dtype=x.dtype, device=x.device)``). Parameters must be on x's device.
        x: a batch (or one sample, see :func:`prepare_graph`), floating, finite.
        target: an int, or an integer tensor of one class per sample ([B]).
        rule: a :class:`backplay.rules.Rule` (default :class:`~backplay.rules.Gradient`).
        return_report: also return an :class:`ExplainReport`.

    Returns:
        The relevance, in x's shape, dtype and device (detached); with ``return_report`` a pair
        ``(R, report)``. The computation runs in the promotion of x's and the model's dtypes, in one
        batched forward pass and one backward sweep.
    """
    from backplay.gpu.vit import ViT
    from backplay.gpu.vit_rules import ViTRule

    if isinstance(model, ViT):  # the frozen ViT graph (THEORY.md section 7)
        from backplay.gpu.vit_explain import explain_vit

        return explain_vit(model, x, target, rule, return_report)
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a backplay.rules.Rule, got {type(rule).__name__}")
    if isinstance(rule, ViTRule):
        raise TypeError(f"{type(rule).__name__} is a ViT rule: it needs a backplay.gpu.vit.ViT model")
    anchor = _routing_parts(rule)[1]
    if anchor is not None and anchor.anchor == "token":
        raise ValueError("Anchor(anchor='token') acts at attention layers: it needs a backplay.gpu.vit.ViT")
    prep = prepare_graph(model, x)
    xb = prep.x
    with torch.no_grad():
        try:  # the routing laws read only inputs and outputs
            trace = prep.net.trace(xb, lean=isinstance(rule, _RoutingLaw))
        except RuntimeError as e:  # shapes that do not chain
            raise ValueError(f"the model cannot be applied to x of shape {prep.in_shape}: {e}") from e
        t = resolve_target(target, xb.shape[0], trace.output.shape[1], xb.device)
        logit = trace.logit(t) if return_report else None
        if hasattr(rule, "sweep"):  # the trace is consumed layer by layer (its buffers freed early)
            sweep = rule.sweep(trace, t, keep_layers=return_report, release=True)
        else:
            sweep = None
        relevance = sweep.relevance if sweep is not None else rule.relevance(trace, t)
        del trace
        relevance = relevance.reshape(xb.shape)
        out = relevance.to(prep.in_dtype)
        if prep.squeeze:
            out = out.squeeze(0)
        if not return_report:
            return out
        total = relevance.flatten(1).sum(1)
        stopped = sweep.stopped if sweep is not None and sweep.stopped is not None else logit - total
        fields = [f.to(prep.in_dtype) for f in (logit, total, stopped)]
        layers = None
        if sweep is not None:
            layers = [r.to(prep.in_dtype) for r in sweep.layers]
            layers[0] = layers[0].reshape(xb.shape)
            if prep.squeeze:
                layers = [r.squeeze(0) for r in layers]
        if prep.squeeze:
            fields = [f.squeeze(0) for f in fields]
    return out, ExplainReport(*fields, rule=rule.name, layers=layers)
