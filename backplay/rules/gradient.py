"""Gradient-type rules: Gradient, GradientXInput, LRP0 and the entropic game SoftplusGame
(docs/theory.md I3, I4, I8, I10-I12; docs: README "Rules")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .base import Handover, LayerRule, Sweep, check_positive, equilibrium_handover, lrp0_backward, safe_divide

if TYPE_CHECKING:  # pragma: no cover
    from backplay.gpu.trace import LayerTrace, Trace

Tensor = torch.Tensor

__all__ = ["Gradient", "GradientXInput", "LRP0", "SoftplusGame"]


@dataclass(frozen=True)
class Gradient(LayerRule):
    """The gradient df_target/dx: the signed terminal occupation nu(+) - nu(-) of the GV game started
    at (L, target, +) (docs/theory.md I3; softplus nets: I11 under the Gibbs policies).

    Layer map (I7, backprop): S^{l-1} = (S^l * p^l) W^l, from the one-hot at the target; p is the gate
    (ReLU 1{z > 0}, ties stop; softplus sigmoid(z/eps)). Not a conservative rule: relevance_sum is
    not the logit.
    """

    @property
    def pass_fields(self) -> frozenset:
        """p only, and not even that where y gives it (ReLU, clamp) or it is 1: what autograd keeps."""
        return frozenset({"p"})

    def start(self, trace: "Trace", target: Tensor) -> Tensor:
        return trace.onehot(target)

    def backward(self, layer: "LayerTrace", upper: Tensor) -> Tensor:
        return layer.map.transpose(layer.through_gate(upper))


@dataclass(frozen=True)
class GradientXInput(Gradient):
    """Gradient x Input, x_j df/dx_j: the terminal payoff x_j weighted by the signed occupation.

    Completeness (docs/theory.md I4; I11 for softplus): sum_j GxI_j = f_target(x) - E[discounted bias
    rewards] (- E[discounted entropy terms] on softplus nets); the report's ``stopped`` is that rest.
    Equal to LRP-0 with biases on a ReLU net (I8).
    """

    def finish(self, trace: "Trace", lower: Tensor) -> Tensor:
        return trace.x.reshape(lower.shape) * lower

    def view(self, y: Tensor, r: Tensor) -> Tensor:
        return y.reshape(r.shape) * r


@dataclass(frozen=True)
class LRP0(LayerRule):
    """LRP-0 with biases, layer by layer: R^{l-1}_j = y^{l-1}_j sum_i W^l_ij R^l_i / z^l_i (0/0 := 0),
    z including the bias; the start is R^L = f_target(x) at the target.

    On a ReLU net it equals Gradient x Input (docs/theory.md I8), R^l_i = y^l_i df/dy^l_i at every layer;
    the relevance absorbed by the biases is the bias share of I4 (report ``stopped``). Computed
    genuinely by the LRP recursion, not through the gradient, so I8 is a real check. On a softplus
    net it is the plain LRP-0 recursion (y != z), with no identity claimed.
    """

    @property
    def pass_fields(self) -> frozenset:
        return frozenset({"z"})

    def start(self, trace: "Trace", target: Tensor) -> Tensor:
        return trace.onehot(target) * trace.output

    def backward(self, layer: "LayerTrace", upper: Tensor) -> tuple[Tensor, Tensor]:
        """(lower, stopped): the bias share R_i b_i / z_i and the whole R_i where z_i = 0 are stopped
        (the bias sink and the cemetery of I14, as for the gradient equilibrium, I17). Selections,
        copies and standalone gates pass relevance unchanged, as in every law (a max-pool winner of
        value 0 included); a copy of a constant (a cls token) stops its relevance (the bias sink)."""
        if layer.map.pass_through:
            lower = layer.map.transpose(upper)
            return lower, upper.flatten(1).sum(1) - lower.flatten(1).sum(1)
        return lrp0_backward(layer, upper)

    def handover(self, Sp: Tensor, Sn: Tensor) -> Handover:
        """LRP-0 as a law is the gradient equilibrium (I17)."""
        return equilibrium_handover(Sp, Sn)


@dataclass(frozen=True)
class SoftplusGame(LayerRule):
    """The entropic game (docs/theory.md I10-I12): Gradient x Input of the softplus_eps surrogate (same
    weights, every activation replaced by softplus_eps), i.e. x times the signed occupation under
    the Gibbs policies sigmoid(z/eps). eps -> 0 recovers the ReLU Gradient x Input."""

    eps: float = 0.5

    def __post_init__(self) -> None:
        check_positive("eps", self.eps)

    @property
    def pass_temperature(self) -> float:
        return self.eps

    @property
    def pass_fields(self) -> frozenset:
        return GradientXInput().pass_fields

    def sweep(self, trace: "Trace", target: Tensor, keep_layers: bool = True,
              release: bool = False) -> Sweep:
        """GradientXInput's sweep of the surrogate's pass (the trace itself when it is that pass)."""
        surrogate = trace.surrogate(self.eps)
        return GradientXInput().sweep(surrogate, target, keep_layers=keep_layers,
                                      release=release or surrogate is not trace)


@dataclass(frozen=True)
class Epsilon(LayerRule):
    """LRP-epsilon (docs/theory.md section 12): R^{l-1}_j = sum_i Z_ij / (z_i + eps sign(z_i)) R^l_i with
    Z_ij = W_ij y_j and z_i = S+_i + S-_i the pre-activation (bias included); start R^L = f_k(x) at
    the target. ``eps`` >= 0; ``eps = 0`` is LRP-0 (I17).

    As a law on the extended graph (the gradient equilibrium with a stop, I14 and I17): at unit i with
    z_i != 0 the token stops first (a move to the cemetery, multiplier 1, sign kept) with probability
    stop_i = eps / (|z_i| + eps); otherwise it follows the gradient equilibrium, so the branch
    probabilities are p_i = (1 - stop_i) S+_i / (S+_i + |S-_i|) (+ branch, sign kept) and
    q_i = (1 - stop_i) |S-_i| / (S+_i + |S-_i|) (- branch, sign flipped), p + q + stop = 1, with the
    multiplier m_i = (S+_i + |S-_i|) / z_i, and routing in branch b proportional to |Z_ij| (route
    temperature 1; the bias b_i is a constant unit in the branch of its sign and ends in the bias
    sink). At z_i = 0 the whole token stops. m (p - q) + stop = 1 at every unit, so I14 holds with
    the stopped mass = the stabiliser's share sum_i R_i eps / (|z_i| + eps) + the bias share
    sum_i R_i b_i / (z_i + eps sign z_i) + the mass at units with z_i = 0 (``backward``'s
    ``stopped``). Max pools and copy layers pass relevance to the winner unchanged, as for every law.

    zennit's ``Epsilon(epsilon)`` divides by z + epsilon sign(z) with sign(0) := +1: the same numbers
    wherever z_i != 0; at z_i = 0 zennit sends R_i Z_ij / eps down (the law stops R_i).
    """

    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not 0 <= float(self.eps) < float("inf"):
            raise ValueError(f"eps must be a finite number >= 0 (0 is LRP-0), got {self.eps}")

    @property
    def pass_fields(self) -> frozenset:
        return frozenset({"z"})

    def start(self, trace: "Trace", target: Tensor) -> Tensor:
        return trace.onehot(target) * trace.output

    def backward(self, layer: "LayerTrace", upper: Tensor) -> tuple[Tensor, Tensor]:
        """(lower, stopped): stopped = stabiliser share + bias share + the mass at z = 0."""
        M = layer.map
        if M.pass_through:  # a selection or copy layer: to the winner; units made of constants stop
            lower = M.transpose(upper)
            stopped = upper.flatten(1).sum(1) - lower.flatten(1).sum(1) if M.bias is not None \
                else upper.new_zeros(upper.shape[0])
            return lower, stopped
        z, zero, _ = layer.recursion_terms(upper)
        den = z + self.eps * torch.sign(z)  # sign(0) = 0: the token stops at z = 0
        c = safe_divide(upper, den)
        stop = safe_divide(torch.full_like(z, self.eps), z.abs() + self.eps)
        stopped = torch.where(zero > 0, upper, upper * stop).flatten(1).sum(1)
        b = M.bias_like(z)
        if b is not None:
            stopped = stopped + (c * b).flatten(1).sum(1)
        return layer.input * M.transpose(c), stopped

    def handover(self, Sp: Tensor, Sn: Tensor) -> Handover:
        """The gradient equilibrium with a direct stop eps/(|z| + eps) first (the whole token where z = 0)."""
        eps = float(self.eps)
        return equilibrium_handover(Sp, Sn, stop=safe_divide(torch.full_like(Sp, eps), (Sp + Sn).abs() + eps))


__all__ += ["Epsilon"]
