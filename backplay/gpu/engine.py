"""The engine: run a rule on a model for a batch, in one batched forward and one backward sweep.

The model is read, never run nor modified: its weights are taken as detached tensors
(:mod:`backplay.gpu.layers`), the forward pass is a manual walk over the layers under
``torch.no_grad()``, and no hook is registered. So the model's parameters, ``requires_grad`` flags,
training flag and hooks are exactly as before the call (and the model's own hooks do not fire).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from backplay.gpu.checks import prepare, resolve_target
from backplay.rules import Gradient, Rule

Tensor = torch.Tensor

__all__ = ["ExplainReport", "explain"]


@dataclass(frozen=True)
class ExplainReport:
    """Per-sample bookkeeping of one :func:`explain` call (tensors [B] in x's dtype; 0-d for 1-d x).

    Attributes:
        logit: f_target(x).
        relevance_sum: the sum of the returned relevance over the input.
        stopped: logit - relevance_sum, the signed mass that did not reach the input (I14). For
            GradientXInput and LRP-0 on a ReLU net it is the discounted bias rewards (I4); on a
            softplus net GradientXInput adds the entropy terms (I11). For the plain Gradient (not a
            conservative rule) it is only the difference.
        rule: the rule's name.
    """

    logit: Tensor
    relevance_sum: Tensor
    stopped: Tensor
    rule: str


def explain(
    model: Any,
    x: Tensor,
    target: Any,
    rule: Rule = Gradient(),
    return_report: bool = False,
) -> Tensor | tuple[Tensor, ExplainReport]:
    """Relevance of every input feature for ``target`` under ``rule``.

    Args:
        model: ``nn.Sequential`` of Linear / ReLU / Softplus (nested Sequential, Identity, Dropout
            allowed; Dropout is read as the identity), or a :class:`backplay.MLPSpec` (converted with
            ``spec.to_torch(dtype=x.dtype, device=x.device)``). Its parameters must be on x's device.
        x: [B, n_0] floating tensor (or [n_0], one sample), finite.
        target: an int, or an integer tensor of one class per sample ([B]).
        rule: a :class:`backplay.rules.Rule` (default :class:`~backplay.rules.Gradient`).
        return_report: also return an :class:`ExplainReport`.

    Returns:
        The relevance, in x's shape, dtype and device (detached); with ``return_report`` a pair
        ``(R, report)``. The computation runs in the promotion of x's and the model's dtypes.
    """
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a backplay.rules.Rule, got {type(rule).__name__}")
    prep = prepare(model, x)
    net, xb = prep.net, prep.x
    t = resolve_target(target, xb.shape[0], net.out_features, xb.device)
    with torch.no_grad():
        trace = net.trace(xb)
        relevance = rule.relevance(trace, t)
        if relevance.shape != xb.shape:
            raise RuntimeError(
                f"rule {rule.name} returned shape {tuple(relevance.shape)}, expected {tuple(xb.shape)}"
            )
        out = relevance.to(prep.in_dtype)
        if prep.squeeze:
            out = out.squeeze(0)
        if not return_report:
            return out
        logit = trace.logit(t)
        total = relevance.sum(1)
        fields = [logit, total, logit - total]
        fields = [f.to(prep.in_dtype) for f in fields]
        if prep.squeeze:
            fields = [f.squeeze(0) for f in fields]
    report = ExplainReport(*fields, rule=rule.name)
    return out, report
