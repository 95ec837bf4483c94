"""Attribution Equilibrium (Nam and Lee), docs/theory.md section 13: the rule as the authors' code
computes it (not a law on the graph), and its closest routing law."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .base import LayerRule, Sweep, check_finite, check_positive, safe_divide
from .routing import AlphaBeta

if TYPE_CHECKING:  # pragma: no cover
    from backplay.gpu.trace import LayerTrace, Trace

Tensor = torch.Tensor

__all__ = ["AttributionEquilibrium", "AttributionEquilibriumLaw"]


# ---------------------------------------------------------------------------------------------
# Attribution Equilibrium (Nam and Lee), docs/theory.md section 13: the rule as the authors' code computes
# it (not a law on the graph), and its closest routing law.
# ---------------------------------------------------------------------------------------------
def _per_sample(t: Tensor) -> Tensor:
    """Per-sample sums of t, shaped to broadcast against t."""
    return t.flatten(1).sum(1).view((-1,) + (1,) * (t.ndim - 1))


@dataclass(frozen=True)
class AttributionEquilibrium(LayerRule):
    """Attribution Equilibrium (Nam and Lee) as docs/theory.md section 13 states it, batched.

    Start (:meth:`start_map`): at the output A of the last conv block (the input of the trailing run
    of Linear layers, the "head", which is not propagated), R0 = A * mean_spatial(dy_t/dA) per
    channel; MLP analogue (an all-Linear net): at the last hidden layer h (the input of the last
    layer), R0 = h * dy_t/dh. R0 is divided by |sum R0| per sample.

    Layer maps (:meth:`backward`, terms in :meth:`terms`), with x the layer input, P = R+/sum R+,
    N = R-/|sum R-| (N <= 0, sum N = -1), z_j = sum_k x_k |w_kj| and x/0 := 0:

    * conv (kernel > 1) and Linear (the MLP analogue: a dense layer is read as a conv whose kernel
      covers the whole input): C_i = x_i sum_j |w_ij| (r P_j + N_j)/z_j; the shift subtracts one unit
      spread evenly over the units with C != 0; A_i = 1[x_i > 0] sum_j |w_ij| P_j / sum_k 1[x_k > 0]
      |w_kj|; B_i = 1[x_i <= 0] sum_j |w_ij| N_j / sum_k 1[x_k <= 0] |w_kj|; R_i = C_i - shift_i +
      A_i + B_i. 1x1 conv: r replaced by 1 and no shift. Weight signs and biases are not used.
    * the first layer of the net (Linear or conv): the z^B rule with L = min(x), H = max(x) per
      sample, on the signed R: R_i = sum_j (x_i w_ij - L w+_ij - H w-_ij) R_j / z^B_j (no bias).
    * MaxPool: to the argmax. AvgPool2d / AdaptiveAvgPool2d: proportional to x+ + 1e-9.
    * ReLU, Dropout: R passes unchanged. BatchNorm is merged into the preceding layer's weights by
      the reader; the conv terms use |w_ij| / z_j and the indicator ratios, which are unchanged by
      a positive or negative per-output-channel scale, so merging equals passing R through the BN.

    Properties (tested; ``backplay.validate_rule`` measures them): sum R_lower = r - 2 at a
    kernel > 1 (or Linear) layer when R has mass of both signs and no denominator vanishes, 0 at a 1x1
    layer; not conservative, not linear in R (per-sign renormalisation), + and - mass cancel on a unit,
    the shift is not local. Residual blocks are not supported (TypeError). ``r`` in [1, 2] as in the
    authors' code (default 2, the "degree of positive attribution").
    """

    r: float = 2.0

    def __post_init__(self) -> None:
        check_finite("r", self.r)
        if not 1 <= float(self.r) <= 2:
            raise ValueError(f"r must lie in [1, 2] (the authors' range), got {self.r}")

    # -- the start ---------------------------------------------------------------------------------
    @staticmethod
    def start_index(trace: "Trace") -> int:
        """k such that the start sits at the output of ``trace.layers[k-1]`` (the head is layers k..L).
        The model must be a chain (every layer output a cut of the graph: no sum node, no branch)."""
        items = trace.layers
        cuts = set(trace.cuts)
        if any(len(it.sources) > 1 for it in items) or any(it.out not in cuts for it in items[:-1]):
            raise TypeError("AttributionEquilibrium does not support Residual blocks, sum nodes or branches "
                            "(VGG-like CNNs and MLPs only)")
        k = len(items)
        while k > 0 and items[k - 1].kind == "linear":
            k -= 1
        if k == 0:  # an all-Linear net: the MLP analogue starts at the last hidden layer
            k = len(items) - 1
        if k == 0:
            raise ValueError("AttributionEquilibrium needs a hidden layer (the net has one layer)")
        if k == len(items):
            raise ValueError("AttributionEquilibrium needs a Linear head after the last conv block")
        return k

    def start_map(self, trace: "Trace", target: Tensor) -> tuple[int, Tensor]:
        """(k, R0): the normalised start map at the output of layer k (its shape, batch first)."""
        k = self.start_index(trace)
        A = trace.layers[k - 1]
        _, kept = trace.walk({trace.output_id: trace.onehot(target)},
                             lambda it, g: it.map.transpose(it.through_gate(g.reshape(it.y.shape))),
                             lambda step, g: g if step is A else None)
        g = kept[A.out].reshape(A.y.shape)
        R0 = A.y * (g.mean(dim=tuple(range(2, g.ndim)), keepdim=True) if A.y.ndim > 2 else g)
        return k, safe_divide(R0, _per_sample(R0).abs())

    def start(self, trace: "Trace", target: Tensor) -> Tensor:
        return self.start_map(trace, target)[1]

    # -- the layer maps ----------------------------------------------------------------------------
    def terms(self, layer: "LayerTrace", upper: Tensor) -> dict:
        """The parts of a conv / Linear layer map as a dict of tensors (shape of ``layer.input``):
        ``C``, ``shift`` (subtracted), ``A``, ``B``; backward = C - shift + A + B."""
        M, x = layer.map, layer.input
        R = upper.reshape(layer.y.shape)
        Rp, Rn = R.clamp_min(0), R.clamp_max(0)
        P = safe_divide(Rp, _per_sample(Rp))
        N = safe_divide(Rn, _per_sample(Rn).abs())
        one_by_one = x.ndim == 4 and tuple(M.weight.shape[-2:]) == (1, 1)
        rr = 1.0 if one_by_one else float(self.r)
        C = x * M.transpose(safe_divide(rr * P + N, M.apply(x, "abs")), "abs")
        shift = torch.zeros_like(C)
        if not one_by_one:
            nz = (C != 0).to(C.dtype)
            shift = safe_divide(nz, _per_sample(nz))
        act = (x > 0).to(x.dtype)
        ina = 1 - act
        A = act * M.transpose(safe_divide(P, M.apply(act, "abs")), "abs")
        B = ina * M.transpose(safe_divide(N, M.apply(ina, "abs")), "abs")
        return {"C": C, "shift": shift, "A": A, "B": B}

    def backward(self, layer: "LayerTrace", upper: Tensor) -> Tensor:
        kind = layer.kind
        M, x = layer.map, layer.input
        R = upper.reshape(layer.y.shape)
        if M.pass_through:  # max pools (to the argmax) and standalone gates
            return M.transpose(R)
        if kind == "pool":
            xp = x.clamp_min(0) + 1e-9
            return xp * M.transpose(safe_divide(R, M.apply(xp)))
        if kind not in ("linear", "conv"):
            raise TypeError(f"AttributionEquilibrium has no map for a {kind!r} layer")
        if getattr(layer, "index", None) == 1:  # z^B with L = min x, H = max x per sample
            flat = x.flatten(1)
            shape = (-1,) + (1,) * (x.ndim - 1)
            lo, hi = flat.min(1).values.view(shape), flat.max(1).values.view(shape)
            ones = torch.ones_like(x)
            zb = M.apply(x) - M.apply(lo * ones, "pos") - M.apply(hi * ones, "neg")
            s = safe_divide(R, zb)
            return x * M.transpose(s) - lo * M.transpose(s, "pos") - hi * M.transpose(s, "neg")
        t = self.terms(layer, R)
        return t["C"] - t["shift"] + t["A"] + t["B"]

    def sweep(self, trace: "Trace", target: Tensor, keep_layers: bool = True,
              release: bool = False) -> Sweep:
        """The sweep from the start map down to the input. The head (layers above the start) is not
        propagated: its entries of ``Sweep.layers`` are NaN."""
        k, r0 = self.start_map(trace, target)
        start = trace.layers[k - 1]
        keep = (lambda step, v: v.reshape(step.y.shape)) if keep_layers else None
        heads = {it.out: it.y for it in trace.layers[k:]}
        lower, kept = trace.walk({start.out: r0}, lambda it, v: self.backward(it, v), keep, release)
        rel: list = []
        if keep_layers:
            rel = [lower] + [kept[i] if i in kept else torch.full_like(heads[i], float("nan"))
                             for i in trace.cuts] + [torch.full_like(trace.output, float("nan"))]
        return Sweep(lower, rel, None)


@dataclass(frozen=True)
class AttributionEquilibriumLaw(AlphaBeta):
    """The closest routing law to Attribution Equilibrium on the extended graph (docs/theory.md section 13).

    AE's hand-over at a + unit, p = (r+1)/(r+2) (keep) and q = 1/(r+2) (flip), routing along the
    edges of the graph by the shared convention (route temperature 1, branches by sign W_ij y_j,
    bias in the branch of its sign), no renormalisation, no annihilation, no non-local shift; the
    same law at + and - tokens (sign-symmetric, so linear in the signed relevance).

    Multiplier convention: docs/theory.md gives m = r + 2 for AE's + unit, but m (p - q) = r there, and
    conservation of signed mass (I14) needs m (p - q) = 1. As :class:`RiskAverse` does, the multiplier
    is reset to m = 1/(p - q) = (r+2)/r, so the law is conservative. With these values the law is
    exactly alpha-beta (I15) with alpha = m p = (r+1)/r and beta = m q = 1/r (alpha - beta = 1), which
    is how it is implemented (a subclass of :class:`AlphaBeta`: torch, theory and numerics read it as
    such); r = 1 is AlphaBeta(2, 1), r = 2 is AlphaBeta(1.5, 0.5).
    """

    alpha: float = dataclasses.field(init=False, default=1.5, repr=False)
    beta: float = dataclasses.field(init=False, default=0.5, repr=False)
    conservative: bool = dataclasses.field(init=False, default=True, repr=False)
    r: float = 2.0

    def __post_init__(self) -> None:
        check_positive("r", self.r)
        self.check_fast()
        r = float(self.r)
        object.__setattr__(self, "alpha", (r + 1) / r)
        object.__setattr__(self, "beta", 1 / r)

    @property
    def name(self) -> str:
        return f"AttributionEquilibriumLaw(r={self.r!r}{', fast=True' if self.fast else ''})"
