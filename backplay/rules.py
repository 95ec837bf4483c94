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
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from backplay.gpu.layers import LayerTrace, Trace

Tensor = torch.Tensor

__all__ = [
    "Rule", "LayerRule", "Gradient", "GradientXInput", "LRP0", "AlphaBeta", "RG", "RGEq",
    "GradientEquilibrium", "Anchor", "RiskAverse", "SoftplusGame", "safe_divide",
]


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


# ---------------------------------------------------------------------------------------------
# Routing laws (THEORY.md section 5). The parameters live here; backplay.gpu implements them as
# batched layer maps and backplay.theory as exact laws on the extended graph, independently.
#
# Shared convention for every routing law, at neuron i of layer l with lower units j (the neurons
# of layer l-1 plus, when b_i != 0, a constant bias unit with y = 1 and weight b_i):
#   Z_ij = W_ij y_j; the + branch is {j : Z_ij > 0}, the - branch {j : Z_ij < 0};
#   S+_i = sum of Z_ij > 0, S-_i = sum of Z_ij < 0 (route temperature 1 always, bias included).
#   Routing in branch b: pi(j | i, b) proportional to |W_ij| |y_j|^(1/T) on the branch (bias: |b_i|).
#   Hand-over p_i to the + branch (sign kept), q_i = 1 - p_i to the - branch (sign flipped),
#   multiplier m_i at the transition; relevance R^{l-1}_j = sum_i m_i R_i (p_i pi(j|i,+) - q_i pi(j|i,-)).
#   Mass sent to an empty branch is stopped (cemetery) with its sign; mass routed to the bias unit
#   ends in the bias sink. Start: R^L = f_k(x) at the target. I14: sum_j R^0_j + stopped = f_k(x)
#   whenever m (p - q) = 1. Where p = q (so m = 1/(p - q) is undefined) the token is stopped.
# ---------------------------------------------------------------------------------------------
def _finite(name: str, v: float) -> None:
    if not math.isfinite(float(v)):
        raise ValueError(f"{name} must be finite, got {v}")


def _positive(name: str, v: float) -> None:
    _finite(name, v)
    if not float(v) > 0:
        raise ValueError(f"{name} must be > 0, got {v}")


@dataclass(frozen=True)
class AlphaBeta(LayerRule):
    """alpha-beta-LRP as a routing law (THEORY.md I15): p = alpha/(alpha+beta), q = beta/(alpha+beta),
    m = alpha + beta, route temperature 1, so R_j = sum_i (alpha Z+_ij/S+_i - beta Z-_ij/S-_i) R_i
    (0/0 := 0). Conservative (I14) iff alpha - beta = 1; other values need ``conservative=False``."""

    alpha: float = 2.0
    beta: float = 1.0
    conservative: bool = True

    def __post_init__(self) -> None:
        _finite("alpha", self.alpha)
        _finite("beta", self.beta)
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta <= 0:
            raise ValueError(f"need alpha, beta >= 0 and alpha + beta > 0, got {self.alpha}, {self.beta}")
        if self.conservative and self.alpha - self.beta != 1:
            raise ValueError(
                f"alpha - beta != 1 (alpha={self.alpha}, beta={self.beta}) breaks conservation (I14); "
                "pass conservative=False to use it anyway"
            )


@dataclass(frozen=True)
class RG(LayerRule):
    """The routing game RG(tau, T) (THEORY.md I16): Gibbs hand-over p = sigmoid(1/tau), the maximiser
    of p + tau H(p); m = 1/(p - q) = coth(1/(2 tau)); route temperature T (I19). T = 1 is alpha-beta
    with alpha = 1/(1 - e^(-1/tau)), beta = 1/(e^(1/tau) - 1); the default tau = 1/ln 2 is alpha=2, beta=1."""

    tau: float = 1.0 / math.log(2.0)
    route_temp: float = 1.0

    def __post_init__(self) -> None:
        _positive("tau", self.tau)
        _positive("route_temp", self.route_temp)


@dataclass(frozen=True)
class RGEq(LayerRule):
    """RG+Eq(kappa, nu, T) (THEORY.md I18): log-odds(p) = kappa + nu log(S+/|S-|), m = 1/(p - q),
    route temperature T. (log(alpha/beta), 0) is alpha-beta; (0, 1) the gradient equilibrium.
    With nu > 0, S- = 0 gives p = 1 and S+ = 0 gives p = 0; where p = q the token is stopped."""

    kappa: float = 0.0
    nu: float = 1.0
    route_temp: float = 1.0

    def __post_init__(self) -> None:
        _finite("kappa", self.kappa)
        _finite("nu", self.nu)
        if self.nu < 0:
            raise ValueError(f"nu must be >= 0, got {self.nu}")
        _positive("route_temp", self.route_temp)


@dataclass(frozen=True)
class GradientEquilibrium(LayerRule):
    """The gradient equilibrium (THEORY.md I17): p = S+/(S+ + |S-|), m = (S+ + |S-|)/z_i (z_i != 0;
    where z_i = 0 the token is stopped), route temperature 1. It is RGEq(0, 1, 1) and gives LRP-0,
    i.e. Gradient x Input on a bias-free ReLU net: the Doob (|y|-) transform of the GV kernel."""


@dataclass(frozen=True)
class Anchor(LayerRule):
    """Extended action set (THEORY.md section 5): routing pi_lam = (1 - lam) pi + lam u, u uniform on
    the branch support (bias unit included); ``lam`` a number or one per layer (torch order,
    layer 1 first). lam = 0 is the base law."""

    rule: Rule = RG()
    lam: float | tuple = 0.1
    anchor: str = "uniform"

    def __post_init__(self) -> None:
        if not isinstance(self.rule, (AlphaBeta, RG, RGEq, GradientEquilibrium)):
            raise TypeError(f"Anchor needs a routing law, got {type(self.rule).__name__}")
        lams = self.lam if isinstance(self.lam, tuple) else (self.lam,)
        for v in lams:
            _finite("lam", v)
            if not 0 <= v <= 1:
                raise ValueError(f"lam must lie in [0, 1], got {v}")
        if self.anchor != "uniform":
            raise ValueError(f"unknown anchor {self.anchor!r} (MLPs and CNNs: 'uniform')")

    def lam_at(self, layer: int, depth: int) -> float:
        """lam of torch layer ``layer`` (1..depth)."""
        if not isinstance(self.lam, tuple):
            return self.lam
        if len(self.lam) != depth:
            raise ValueError(f"lam has {len(self.lam)} entries, the net has {depth} layers")
        return self.lam[layer - 1]


@dataclass(frozen=True)
class RiskAverse(LayerRule):
    """Risk aversion (THEORY.md I20): with cost X = c_j = sigma^2 / x_j^2 at the input reached (0 for
    stopped paths), the law Q* proportional to P exp(-theta X) is Markov: K_theta(s, s') =
    K(s, s') U(s')/U(s), U(s) = E_s[exp(-theta X)] (one extra sweep). The multiplier is reset to
    m = 1/(p_theta - q_theta) so the law stays in the conservative family (I14). theta = 0 is the
    base law."""

    rule: Rule = RG()
    theta: float = 1.0
    sigma: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.rule, (AlphaBeta, RG, RGEq, GradientEquilibrium, Anchor)):
            raise TypeError(f"RiskAverse needs a routing law, got {type(self.rule).__name__}")
        _finite("theta", self.theta)
        _positive("sigma", self.sigma)


@dataclass(frozen=True)
class SoftplusGame(LayerRule):
    """The entropic game (THEORY.md I10-I12): Gradient x Input of the softplus_eps surrogate (same
    weights, every activation replaced by softplus_eps), i.e. x times the signed occupation under
    the Gibbs policies sigmoid(z/eps). eps -> 0 recovers the ReLU Gradient x Input."""

    eps: float = 0.5

    def __post_init__(self) -> None:
        _positive("eps", self.eps)
