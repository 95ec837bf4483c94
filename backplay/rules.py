"""Attribution rules: one small class per rule (zennit's split).

A rule is a frozen, parameter-only object. It never holds a model and never modifies one: the engine
(:func:`backplay.gpu.explain`) reads the model into detached layer maps, runs ONE batched forward
pass and hands the rule the recorded :class:`~backplay.gpu.layers.Trace`. A rule then maps that trace
to the relevance of the input, [B, n_0].

Most rules are layer rules (:class:`LayerRule`): a start measure at the output layer L, one backward
map per layer (``backward(layer, upper) -> lower``; ``layer`` is a
:class:`~backplay.gpu.layers.LayerTrace` with ``map`` (forward / adjoint with any weight, row masses),
``gate``, ``input`` = y^{l-1}, ``z``, ``p`` and ``y``), and a final step at the input. New rules
(Epsilon, AlphaBeta, the routing family of THEORY.md section 5, ...) are further subclasses; the
theory and numerics parts read the same objects for their parameters.

This module depends on torch only (the gpu package imports it, not the other way round).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from backplay.gpu.layers import LayerTrace, Trace

Tensor = torch.Tensor

__all__ = ["Rule", "LayerRule", "Gradient", "GradientXInput", "LRP0", "safe_divide"]


def safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """num / den with x/0 := 0 (in particular 0/0 := 0), elementwise."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


@dataclass(frozen=True)
class Rule:
    """Base class of every rule: ``relevance(trace, target) -> [B, n_0]``."""

    @property
    def name(self) -> str:
        """The rule and its parameters, e.g. ``"LRP0"`` or ``"AlphaBeta(alpha=2, beta=1)"``."""
        params = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return type(self).__name__ + (f"({params})" if params else "")

    def relevance(self, trace: "Trace", target: Tensor) -> Tensor:
        """Input relevance [B, n_0] for the recorded forward pass and targets (LongTensor [B])."""
        raise NotImplementedError


@dataclass(frozen=True)
class LayerRule(Rule):
    """A rule computed by one backward sweep, layer L down to the input."""

    def start(self, trace: "Trace", target: Tensor) -> Tensor:
        """The measure put on the output layer L, shape [B, n_L]."""
        raise NotImplementedError

    def backward(self, layer: "LayerTrace", upper: Tensor) -> Tensor:
        """Map the relevance of layer l (shape of ``layer.y``) to layer l-1 (shape of ``layer.input``)."""
        raise NotImplementedError

    def finish(self, trace: "Trace", lower: Tensor) -> Tensor:
        """Turn the measure reached at layer 0 into the input relevance (default: unchanged)."""
        return lower

    def relevance(self, trace: "Trace", target: Tensor) -> Tensor:
        r = self.start(trace, target)
        for layer in reversed(trace.layers):
            r = self.backward(layer, r)
        return self.finish(trace, r)


@dataclass(frozen=True)
class Gradient(LayerRule):
    """The gradient df_target/dx: the signed terminal occupation nu(+) - nu(-) of the GV game started
    at (L, target, +) (THEORY.md I3; softplus nets: I11 under the Gibbs policies).

    Layer map (I7, backprop): S^{l-1} = (S^l * p^l) W^l, from the one-hot at the target; p is the gate
    (ReLU 1{z > 0}, ties stop; softplus sigmoid(z/eps)). Not a conservative rule: relevance_sum is
    not the logit.
    """

    def start(self, trace: "Trace", target: Tensor) -> Tensor:
        return trace.onehot(target)

    def backward(self, layer: "LayerTrace", upper: Tensor) -> Tensor:
        return layer.map.adjoint(upper * layer.p)


@dataclass(frozen=True)
class GradientXInput(Gradient):
    """Gradient x Input, x_j df/dx_j: the terminal payoff x_j weighted by the signed occupation.

    Completeness (THEORY.md I4; I11 for softplus): sum_j GxI_j = f_target(x) - E[discounted bias
    rewards] (- E[discounted entropy terms] on softplus nets); the report's ``stopped`` is that rest.
    Equal to LRP-0 with biases on a ReLU net (I8).
    """

    def finish(self, trace: "Trace", lower: Tensor) -> Tensor:
        return trace.x * lower


@dataclass(frozen=True)
class LRP0(LayerRule):
    """LRP-0 with biases, layer by layer: R^{l-1}_j = y^{l-1}_j sum_i W^l_ij R^l_i / z^l_i (0/0 := 0),
    z including the bias; the start is R^L = f_target(x) at the target.

    On a ReLU net it equals Gradient x Input (THEORY.md I8), R^l_i = y^l_i df/dy^l_i at every layer;
    the relevance absorbed by the biases is the bias share of I4 (report ``stopped``). Computed
    genuinely by the LRP recursion, not through the gradient, so I8 is a real check. On a softplus
    net it is the plain LRP-0 recursion (y != z), with no identity claimed.
    """

    def start(self, trace: "Trace", target: Tensor) -> Tensor:
        return trace.onehot(target) * trace.output

    def backward(self, layer: "LayerTrace", upper: Tensor) -> Tensor:
        return layer.input * layer.map.adjoint(safe_divide(upper, layer.z))
