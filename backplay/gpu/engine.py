"""The engine: read -> trace -> sweep -> report, one route for every model.

:func:`prepare` is the one place that validates a call: the input (floating, finite, batched or
one sample), the model (an ``nn.Module``, or a :class:`backplay.MLPSpec` converted to one), the
device (the input's; every parameter must be there) and the compute dtype (the promotion of the
input's and the parameters' dtypes, so a float64 input on a float32 model is computed in float64
and a float64 model is never rounded down). The model is read by :func:`backplay.gpu.read.read`
(torch.export, cached) and never modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from backplay.gpu.read import ModelGraph, ReadError, read
from backplay.gpu.trace import Trace
from backplay.rules import Gradient, Rule, _RoutingLaw, _routing_parts

Tensor = torch.Tensor

__all__ = ["ExplainReport", "Prepared", "compute_dtype", "explain", "prepare", "resolve_target", "float_tensor"]


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
        layers: the relevance at the report layers, torch order: [0] the input (x's shape), then
            the output of every layer that each input-to-output path passes through (every layer of
            a chain; the add node of a residual block, not the layers of its body), [-1] the start
            measure at the output. For Gradient it is the gradient wrt those tensors, for
            GradientXInput the tensor times it. Tensors with batch first.
        rule: the rule's name.
    """

    logit: Tensor
    relevance_sum: Tensor
    stopped: Tensor
    rule: str
    layers: list | None = None


def float_tensor(x: Any, name: str = "x") -> Tensor:
    """``x`` as a floating torch tensor (numpy arrays converted); clear errors otherwise."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {x.dtype}")
    return x


def resolve_target(target: Any, batch: int, n_out: int, device: torch.device) -> Tensor:
    """``target`` (int, or integer tensor / array of one class per sample) as a LongTensor [B]."""
    if isinstance(target, bool) or isinstance(target, np.bool_):
        raise TypeError("target must be an int or an integer tensor, got a bool")
    if isinstance(target, (int, np.integer)):
        t = torch.full((batch,), int(target), dtype=torch.long, device=device)
    else:
        if isinstance(target, (list, tuple, np.ndarray)):
            target = torch.as_tensor(np.asarray(target))
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be an int or an integer tensor, got {type(target).__name__}")
        if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
            raise TypeError(f"target must hold integers, got dtype {target.dtype}")
        if target.ndim == 0:
            t = target.to(device=device, dtype=torch.long).expand(batch).clone()
        elif target.ndim == 1 and target.shape[0] == batch:
            t = target.to(device=device, dtype=torch.long)
        else:
            raise ValueError(f"target must be an int or have one class per sample (shape [{batch}]), "
                             f"got shape {tuple(target.shape)}")
    if t.numel() > 0:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= n_out:
            bad = lo if lo < 0 else hi
            raise ValueError(f"target {bad} out of range for {n_out} outputs (valid: 0..{n_out - 1})")
    return t


def _module(model: Any, x: Tensor) -> nn.Module:
    from backplay.nets import MLPSpec

    if isinstance(model, MLPSpec):
        return model.to_torch(dtype=x.dtype, device=x.device)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module or a backplay.MLPSpec, got {type(model).__name__}")
    return model


def _first_layer(module: nn.Module) -> nn.Module | None:
    """The first module (registration order) that holds parameters: usually the first layer."""
    return next((m for m in module.modules() if list(m.parameters(recurse=False))), None)


def _first_op(module: nn.Module) -> nn.Module | None:
    """The module that surely runs first: the first leaf of nested ``nn.Sequential`` (None otherwise)."""
    while isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward and len(module):
        module = module[0]
    return None if isinstance(module, nn.Sequential) else module


def _sample_rank(first: nn.Module | None) -> int | None:
    """The rank of ONE sample the model takes, from its first layer if it is a Linear (1) or a
    convolution (channels + spatial dims); None: unknown."""
    if isinstance(first, nn.Linear):
        return 1
    if isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return first.weight.ndim - 1
    return None


def _check_sample(first: nn.Module | None, x: Tensor, name: str) -> None:
    """Clear errors for a sample shape the first layer cannot take (before the export is tried)."""
    if isinstance(first, nn.Linear) and x.shape[-1] != first.in_features:
        raise ValueError(f"{name} has {x.shape[-1]} features per sample (shape {tuple(x.shape)}), "
                         f"the model expects {first.in_features}")
    if isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        d = first.weight.ndim - 1
        if x.ndim >= d and x.shape[-d] != first.in_channels:
            raise ValueError(f"{name} has {x.shape[-d]} channels, the model expects {first.in_channels}")


def compute_dtype(module: nn.Module, x: Tensor) -> torch.dtype:
    """The promotion of x's and the parameters' dtypes; ValueError naming a parameter on another device."""
    dtype = x.dtype
    for pname, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not t.is_floating_point():
            continue
        if t.device != x.device:
            raise ValueError(f"the model's parameters are on {t.device} ({pname}) but the input is on "
                             f"{x.device}; move the model or the input so that they share one device")
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@dataclass
class Prepared:
    """A validated call: the model read for the batch, the batch in the compute dtype, bookkeeping."""

    graph: ModelGraph
    x: Tensor  # batched, compute dtype, detached
    dtype: torch.dtype
    squeeze: bool  # the caller passed one sample
    in_dtype: torch.dtype  # the caller's dtype (relevance is returned in it)
    in_shape: tuple  # the caller's shape

    def trace(self, lean: bool = False, x: Tensor | None = None) -> Trace:
        """The explained pass of the batch (or of ``x``, same sample shape) in the compute dtype."""
        return self.graph.trace(self.x if x is None else x, self.dtype, lean=lean)


def prepare(model: Any, x: Any, name: str = "x", one_sample: bool = False) -> Prepared:
    """Validate ``x`` and read ``model`` for it (see the module docstring).

    Batching: ``x`` is a batch [B, ...] unless it is 1-d, or has the rank of ONE sample of a model
    whose first layer is a convolution (channels + spatial dims), or ``one_sample`` is set: then it
    is one sample."""
    x = float_tensor(x, name)
    module = _module(model, x)
    first = _first_layer(module)
    rank = _sample_rank(first)
    squeeze = one_sample or x.ndim == 1 or (rank is not None and rank > 1 and x.ndim == rank)
    if x.ndim == 0 or (not one_sample and rank is not None and rank > 1 and x.ndim not in (rank, rank + 1)):
        raise ValueError(f"{name} must have shape [B, ...] with {rank} dimensions per sample (or one "
                         f"sample), got shape {tuple(x.shape)}")
    if _first_op(module) is first:  # checks that need the first operation, before the export
        _check_sample(first, x, name)
    dtype = compute_dtype(module, x)
    xb = x.detach().unsqueeze(0) if squeeze else x.detach()
    if not bool(torch.isfinite(xb).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    xb = xb.to(dtype)
    graph = read(module, xb)
    return Prepared(graph, xb, dtype, squeeze, x.dtype, tuple(x.shape))


def explain(
    model: Any,
    x: Tensor,
    target: Any,
    rule: Rule = Gradient(),
    return_report: bool = False,
) -> Tensor | tuple[Tensor, ExplainReport]:
    """Relevance of every input feature for ``target`` under ``rule``.

    Args:
        model: any ``nn.Module`` whose forward ``torch.export`` can capture, made of the operations of
            :data:`backplay.gpu.read.SUPPORTED` (ResNets, VGGs, MobileNets, DenseNets, U-Nets, MLPs
            with norms and gates, written as you write them), or a :class:`backplay.MLPSpec`; a
            :class:`backplay.gpu.vit.ViT` runs on its frozen graph (and by the ViT rules). The model
            returns logits [B, classes]; its parameters must be on x's device.
        x: a batch (or one sample, see :func:`prepare`), floating, finite.
        target: an int, or an integer tensor of one class per sample ([B]).
        rule: a :class:`backplay.rules.Rule` (default :class:`~backplay.rules.Gradient`).
        return_report: also return an :class:`ExplainReport`.

    Returns:
        The relevance, in x's shape, dtype and device (detached); with ``return_report`` a pair
        ``(R, report)``. One batched forward pass and one backward sweep, in the compute dtype.
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
    prep = prepare(model, x)
    xb = prep.x
    with torch.no_grad():
        try:
            trace = prep.trace(lean=isinstance(rule, _RoutingLaw))
        except RuntimeError as e:  # shapes that do not chain
            raise ReadError(f"the model cannot be applied to x of shape {prep.in_shape}: {e}") from e
        t = resolve_target(target, xb.shape[0], trace.output.shape[1], xb.device)
        logit = trace.logit(t) if return_report else None
        sweep = rule.sweep(trace, t, keep_layers=return_report, release=True)
        del trace
        relevance = sweep.relevance.reshape(xb.shape)
        out = relevance.to(prep.in_dtype)
        if prep.squeeze:
            out = out.squeeze(0)
        if not return_report:
            return out
        total = relevance.flatten(1).sum(1)
        stopped = sweep.stopped if sweep.stopped is not None else logit - total
        fields = [f.to(prep.in_dtype) for f in (logit, total, stopped)]
        layers = [r.to(prep.in_dtype) for r in sweep.layers]
        layers[0] = layers[0].reshape(xb.shape)
        if prep.squeeze:
            layers = [r.squeeze(0) for r in layers]
            fields = [f.squeeze(0) for f in fields]
    return out, ExplainReport(*fields, rule=rule.name, layers=layers)
