"""Occupation measures of the GV game (ReLU) and of the entropic game (softplus), batched.

THEORY.md sections 2-3. The game is started at (L, target, +). At a neuron of layer l the mover
continues with probability p^l_i (the gate: ReLU 1{z > 0}, ties stop; softplus_eps sigmoid(z/eps);
1 at a linear output layer), collects the reward s*b^l_i, and moves along the edge (i, j) with
probability |W^l_ij| / gamma^l_i, multiplying the future payoff by gamma^l_i = sum_j |W^l_ij|.

One batched forward pass records the gates; one backward sweep, layer by layer, carries (I7):

* S^l = nu^l(+) - nu^l(-), the signed discounted occupation: S^{l-1} = (S^l * p^l) @ W^l (backprop);
* A^l = nu^l(+) + nu^l(-), the absolute discounted occupation: A^{l-1} = (A^l * p^l) @ |W^l|;
* R^l = rho^l(+) + rho^l(-), the undiscounted visit probability:
  R^{l-1} = (R^l * p^l / gamma^l) @ |W^l| (a zero row, gamma = 0, passes nothing: 0/0 := 0).

The stop actions take sum_l sum_i R^l_i (1 - p^l_i) (``stopped``); continuing at a zero row ends the
path in the sink with probability sum_l sum_i R^l_i p^l_i 1{gamma^l_i = 0} (``sink``); the rest
reaches the input (``rho``): rho.sum + stopped + sink = 1.

Completeness (I4, I11): value = sum_j x_j (nu_j(+) - nu_j(-)) + bias_share + entropy_share, with
bias_share = sum_l sum_i S^l_i p^l_i b^l_i (discounted bias rewards) and
entropy_share = sum over softplus layers of eps * S^l_i * H(p^l_i) (discounted entropy terms; 0 on a
ReLU net), because y^l = p^l z^l + eps H(p^l) per neuron (I9).

Softplus is computed as eps*logaddexp(0, z/eps) (see :mod:`backplay.gpu.layers`), not by
``nn.Softplus``, whose identity switch above ``threshold`` would break float64 exactness.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from backplay.gpu.checks import as_input, prepare, resolve_target

Tensor = torch.Tensor

__all__ = ["Occupation", "occupation", "interval_bounds"]


@dataclass(frozen=True)
class Occupation:
    """Occupation measures of the game started at (L, target, +); every tensor is batch first.

    Tensors are in the compute dtype (the promotion of the input's and the model's dtypes) on the
    input's device, detached. A 1-d input is treated as a batch of one (B = 1).

    Attributes:
        value: [B] f_target(x), the game value (I1 / I10).
        output: [B, n_L] the network output y^L.
        target: [B] the explained class per sample (LongTensor).
        nu_plus, nu_minus: [B, n_0] discounted terminal occupation of (0, j, +) and (0, j, -).
        rho: [B, n_0] probability that the path ends at input j (either copy).
        gradient: [B, n_0] nu_plus - nu_minus = df_target/dx (I3, I11).
        abs_mass: [B, n_0] nu_plus + nu_minus.
        gxi: [B, n_0] x * gradient.
        bias_share: [B] E[discounted bias rewards] = sum_l sum_i S^l_i p^l_i b^l_i (I4).
        entropy_share: [B] E[discounted entropy terms] = sum_l sum_i eps S^l_i H(p^l_i) over softplus
            layers (I11); 0 on a ReLU net.
        stopped: [B] probability of a stop action (undiscounted).
        sink: [B] probability of continuing at a zero row (gamma = 0), undiscounted.
        layers_signed: L+1 tensors [B, n_l], S^l = nu^l(+) - nu^l(-); [0] input, [L] one-hot at target.
        layers_abs: L+1 tensors [B, n_l], A^l = nu^l(+) + nu^l(-).
        layers_rho: L+1 tensors [B, n_l], R^l = rho^l(+) + rho^l(-) (visit probability).
        gates: L tensors [B, n_l], gates[l-1] = p^l.
        bias_gradient: L tensors [B, n_l], bias_gradient[l-1] = S^l * p^l = df/db^l (I5).

    Identities: ``value == gxi.sum(1) + bias_share + entropy_share`` and
    ``rho.sum(1) + stopped + sink == 1`` (to round-off).
    """

    value: Tensor
    output: Tensor
    target: Tensor
    nu_plus: Tensor
    nu_minus: Tensor
    rho: Tensor
    gradient: Tensor
    abs_mass: Tensor
    gxi: Tensor
    bias_share: Tensor
    entropy_share: Tensor
    stopped: Tensor
    sink: Tensor
    layers_signed: list
    layers_abs: list
    layers_rho: list
    gates: list
    bias_gradient: list


def occupation(model: Any, x: Tensor, target: Any) -> Occupation:
    """Occupation measures for a batch ``x`` [B, n_0] (or [n_0]) and ``target`` (int or LongTensor [B]).

    ``model``: an ``nn.Sequential`` of Linear / ReLU / Softplus (nested Sequential, Identity, Dropout
    allowed) or a :class:`backplay.MLPSpec`. One batched forward pass and one backward sweep; the
    model is only read.
    """
    prep = prepare(model, x)
    net, xb = prep.net, prep.x
    B = xb.shape[0]
    t = resolve_target(target, B, net.out_features, xb.device)
    with torch.no_grad():
        trace = net.trace(xb)
        L = net.depth
        dtype = xb.dtype
        zeros_b = xb.new_zeros(B)

        start = trace.onehot(t)
        S, A, R = start, start.clone(), start.clone()
        signed: list = [None] * (L + 1)
        absolute: list = [None] * (L + 1)
        visits: list = [None] * (L + 1)
        bias_grad: list = [None] * L
        signed[L], absolute[L], visits[L] = S, A, R
        bias_share = zeros_b.clone()
        entropy_share = zeros_b.clone()
        stopped = zeros_b.clone()
        sink = zeros_b.clone()

        for l in range(L, 0, -1):
            rec = trace.layers[l - 1]
            p = rec.p
            Sp, Ap, Rp = S * p, A * p, R * p
            bias_grad[l - 1] = Sp
            b = rec.map.bias_like(rec.z)
            if b is not None:
                bias_share = bias_share + (Sp * b).sum(1)
            h = rec.entropy()
            if h is not None:
                entropy_share = entropy_share + (S * h).sum(1)
            stopped = stopped + (R * (1 - p)).sum(1)
            gamma = rec.map.row_mass()
            zero_row = gamma == 0
            sink = sink + (Rp * zero_row.to(dtype)).sum(1)
            safe = torch.where(zero_row, torch.ones_like(gamma), gamma)
            inv_gamma = torch.where(zero_row, torch.zeros_like(gamma), 1 / safe)
            S = rec.map.adjoint(Sp)
            A = rec.map.adjoint(Ap, weight=rec.map.abs_weight)
            R = rec.map.adjoint(Rp * inv_gamma, weight=rec.map.abs_weight)
            signed[l - 1], absolute[l - 1], visits[l - 1] = S, A, R

        nu_plus = (A + S) / 2
        nu_minus = (A - S) / 2
        return Occupation(
            value=trace.logit(t),
            output=trace.output,
            target=t,
            nu_plus=nu_plus,
            nu_minus=nu_minus,
            rho=R,
            gradient=S,
            abs_mass=A,
            gxi=xb * S,
            bias_share=bias_share,
            entropy_share=entropy_share,
            stopped=stopped,
            sink=sink,
            layers_signed=signed,
            layers_abs=absolute,
            layers_rho=visits,
            gates=[rec.p for rec in trace.layers],
            bias_gradient=bias_grad,
        )


def interval_bounds(model: Any, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Bounds on the output over the box [lo, hi] by interval bound propagation (THEORY.md I13).

    Layer by layer: z_lo = W+ y_lo + W- y_hi + b, z_hi = W+ y_hi + W- y_lo + b, then the (monotone)
    activation of both ends. This is the Shapley operator of the GV game evaluated with the terminal
    payoffs (lo, -hi) and (hi, -lo): v_lo(L, k, +) <= f_k(x') <= v_hi(L, k, +) for x' in the box.

    ``lo``, ``hi``: [B, n_0] (or [n_0]), finite, lo <= hi, on the model's device. Returns
    ``(lower, upper)`` of shape [B, n_L] ([n_L] for 1-d boxes) in the compute dtype.
    """
    lo_t, hi_t = as_input(lo, "lo"), as_input(hi, "hi")
    if lo_t.shape != hi_t.shape:
        raise ValueError(
            f"lo and hi must have the same shape, got {tuple(lo_t.shape)} and {tuple(hi_t.shape)}"
        )
    if lo_t.device != hi_t.device:
        raise ValueError(f"lo is on {lo_t.device} but hi on {hi_t.device}")
    dtype = torch.promote_types(lo_t.dtype, hi_t.dtype)
    prep_lo = prepare(model, lo_t.to(dtype), "lo")
    prep_hi = prepare(model, hi_t.to(dtype), "hi")
    net, l, u = prep_lo.net, prep_lo.x, prep_hi.x
    if bool((l > u).any()):
        raise ValueError("the box is empty: lo > hi somewhere")
    with torch.no_grad():
        for layer in net.layers:
            m = layer.map
            wp, wn = m.positive_weight, m.negative_weight
            z_lo = m.forward(l, weight=wp) + m.forward(u, weight=wn, bias=False)
            z_hi = m.forward(u, weight=wp) + m.forward(l, weight=wn, bias=False)
            l, u = layer.gate(z_lo)[0], layer.gate(z_hi)[0]
    if prep_lo.squeeze:
        l, u = l.squeeze(0), u.squeeze(0)
    return l, u
