"""The exact reference for ``explain`` on any model (docs/theory.md sections 10 and 11): the frozen extended
graph of one input (:func:`backplay.gpu.unroll.unroll_graph`; :func:`backplay.gpu.unroll.unroll_vit`
for backplay's ViT: a layered FrozenNet whose skips are copy rows) with every rule computed on it
independently of the torch code path:

* the routing laws (AlphaBeta, RG, RGEq, GradientEquilibrium, Anchor incl. the token anchor,
  RiskAverse) by :func:`backplay.theory.routing_law` (its automatic field: exact rationals, or
  mpmath at 50 digits for the Gibbs forms);
* Gradient, GradientXInput, LRP-0 and SoftplusGame (GxI of the surrogate's graph) by their layer
  recursions in exact rationals on the same net (frozen gates from the unrolled pass).

``field="mpmath"`` computes everything in mpmath at 50 digits instead (rationals grow quickly with
the depth: use it beyond one block).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..gpu.unroll import Unrolled, unroll_graph
from ..rules import LRP0, Gradient, GradientXInput, Rule, SoftplusGame
from ..theory.arith import Arith
from ..theory.routing import routing_law
from .identities import err

__all__ = ["exact_report", "torch_error", "unrolled"]


def _recursions(u: Any, target: int, rule: Rule, A: Arith) -> tuple[list, Any]:
    """[R^0, ..., R^L] (FrozenNet layers) of Gradient / GxI / LRP-0 in the arithmetic ``A``, and the
    logit y^L_target."""
    net = u.net
    _conv = np.vectorize(A.num, otypes=[object])
    Ws = [_conv(w) for w in net.weights]
    bs = [None if b is None else _conv(b) for b in net.biases]
    ys = [_conv(y) for y in net.ys]
    L = net.depth
    zero = A.num(0)
    top = np.array([zero] * net.widths[-1], dtype=object)
    if isinstance(rule, LRP0):
        top[target] = ys[-1][target]
        rel = [top]
        for l in range(L, 0, -1):  # a selection or copy row passes R_i unchanged (also where z_i = 0)
            z = Ws[l - 1].dot(ys[l - 1]) + (0 if bs[l - 1] is None else bs[l - 1])
            sel = [net.selects(l, i) for i in range(len(z))]
            s = np.array([zero if c else (r / zi if zi != 0 else zero) for r, zi, c in zip(rel[0], z, sel)],
                         dtype=object)
            passed = np.array([r if c else zero for r, c in zip(rel[0], sel)], dtype=object)
            rel.insert(0, ys[l - 1] * Ws[l - 1].T.dot(s) + Ws[l - 1].T.dot(passed))
        return rel, ys[-1][target]
    top[target] = A.num(1)
    grads = [top]
    for l in range(L, 0, -1):
        grads.insert(0, Ws[l - 1].T.dot(_conv(u.gates[l - 1]) * grads[0]))
    if isinstance(rule, Gradient) and not isinstance(rule, GradientXInput):
        return grads, ys[-1][target]
    return [y * g for y, g in zip(ys, grads)], ys[-1][target]


def unrolled(model: Any, x: torch.Tensor, eps: float | None = None, **inputs: Any) -> Unrolled:
    """The unrolled graph of ``model`` at ONE input (``eps``: the SoftplusGame surrogate; ``inputs``:
    a language model's ``attention_mask`` / ``position``)."""
    return unroll_graph(model, x, eps=eps, **inputs)


def exact_report(model: Any, x: torch.Tensor, target: int, rule: Rule, field: str | None = None,
                 **inputs: Any) -> tuple[list, Any, Any]:
    """(relevance at every report layer of ``explain`` (flat arrays), stopped mass, logit) of
    ``rule`` on the frozen graph of ``model`` at ONE image ``x``. For the routing laws the stopped
    mass is the law's (cemetery and bias sink); for the other rules logit - sum R^0. ``field``:
    None (exact rationals where the rule allows) or "mpmath" (50 digits)."""
    if field not in (None, "mpmath"):
        raise ValueError(f"field must be None or 'mpmath', got {field!r}")
    A = Arith(50 if field == "mpmath" else None)
    u = unrolled(model, x, rule.eps if isinstance(rule, SoftplusGame) else None, **inputs)
    if isinstance(rule, (Gradient, LRP0, SoftplusGame)):
        rel, logit = _recursions(u, target, GradientXInput() if isinstance(rule, SoftplusGame) else rule, A)
        stopped = logit - sum(rel[0])
    else:
        law = routing_law(u.net, target=target, rule=rule, field=field)
        rel, stopped, logit = law.relevance(), law.stopped()["total"], law.w0
    if isinstance(rule, SoftplusGame):  # the logit is the model's, not the surrogate's
        logit = A.num(float(unrolled(model, x, **inputs).net.ys[-1][target]))
        stopped = logit - sum(rel[0])
    return [rel[b] for b in u.boundaries], stopped, logit


def torch_error(model: Any, x: torch.Tensor, target: int, rule: Rule, field: str | None = None,
                **inputs: Any) -> float:
    """Worst relative error (:func:`backplay.testing.err`) of ``explain``'s per-layer relevance,
    stopped mass and logit against :func:`exact_report` at ONE input ``x`` (float64 model; token ids
    [T] with a language model's ``attention_mask`` [T] / ``position``)."""
    from ..gpu.engine import explain

    layers, stopped, logit = exact_report(model, x, target, rule, field, **inputs)
    batched = {k: (v[None] if isinstance(v, torch.Tensor) and k == "attention_mask" else v) for k, v in inputs.items()}
    _, rep = explain(model, x[None], target, rule=rule, return_report=True, **batched)
    if len(rep.layers) != len(layers):
        return float("inf")
    worst = max(err(rep.layers[k][0].reshape(-1), layers[k]) for k in range(len(layers)))
    worst = max(worst, err(rep.stopped.reshape(1), [stopped]))
    return max(worst, err(rep.logit.reshape(1), [logit]))
