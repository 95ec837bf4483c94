"""Occupation measures of the GV game (ReLU) and of the entropic game (softplus), batched, on the
operation graph of any model the reader takes (:mod:`backplay.gpu.read`).

docs/theory.md sections 3-5. The game is started at (output, target, +). At a unit of layer l the mover
continues with probability p^l_i (the gate: ReLU 1{z > 0}, ties stop; softplus_eps sigmoid(z/eps);
1 without activation; the frozen gate of docs/theory.md section 11 otherwise), collects the reward
s*b^l_i, and moves along the edge (i, j) with probability |W^l_ij| / gamma^l_i, multiplying the
future payoff by gamma^l_i = sum_j |W^l_ij|. Layout steps (reshape, cat, ...) move every measure by
their transpose; a sum node is a unit with one edge per summand.

One batched forward pass records the gates; one backward sweep (:meth:`Trace.walk`) carries (I7):

* S = nu(+) - nu(-), the signed discounted occupation: S^{l-1} = W^T (S^l * p^l) (backprop);
* A = nu(+) + nu(-), the absolute discounted occupation: A^{l-1} = |W|^T (A^l * p^l);
* R = rho(+) + rho(-), the undiscounted visit probability: R^{l-1} = |W|^T (R^l * p^l / gamma^l)
  (a zero row, gamma = 0, passes nothing: 0/0 := 0).

The stop actions take sum_l sum_i R^l_i (1 - p^l_i) (``stopped``); continuing at a zero row ends the
path in the sink with probability sum_l sum_i R^l_i p^l_i 1{gamma^l_i = 0} (``sink``); the rest
reaches the input (``rho``): rho.sum + stopped + sink = 1 (when every gate lies in [0, 1]).

Completeness (I4, I11): value = sum_j x_j (nu_j(+) - nu_j(-)) + bias_share + entropy_share, with
bias_share = sum_l sum_i S^l_i p^l_i b^l_i (discounted bias rewards) and entropy_share = sum_l
sum_i S^l_i c^l_i, c the gate's reward of ``y = p z + c`` (eps H(p) on softplus layers, I9; the
constant of a saturated ReLU6; 0 on a ReLU net).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from backplay.gpu.engine import float_tensor, prepare, resolve_target
from backplay.gpu.ops import ClampGate, LeakyReLUGate, LinearGate, NormOp, ReLUGate, SoftplusGate

Tensor = torch.Tensor

__all__ = ["Occupation", "occupation", "interval_bounds"]


@dataclass(frozen=True)
class Occupation:
    """Occupation measures of the game started at (output, target, +); every tensor is batch first.

    Tensors are in the compute dtype (the promotion of the input's and the model's dtypes) on the
    input's device, detached. One sample is treated as a batch of one (B = 1).

    Attributes:
        value: [B] f_target(x), the game value (I1 / I10).
        output: [B, n_out] the network output.
        target: [B] the explained class per sample (LongTensor).
        nu_plus, nu_minus: discounted terminal occupation of (0, j, +) and (0, j, -), x's shape.
        rho: probability that the path ends at input j (either copy).
        gradient: nu_plus - nu_minus = df_target/dx (I3, I11; the frozen-graph gradient).
        abs_mass: nu_plus + nu_minus.
        gxi: x * gradient.
        bias_share: [B] E[discounted bias rewards] = sum_l sum_i S^l_i p^l_i b^l_i (I4).
        entropy_share: [B] E[discounted gate rewards] = sum_l sum_i S^l_i c^l_i (eps H(p) on softplus
            layers, I11); 0 on a ReLU net.
        stopped: [B] probability of a stop action (undiscounted).
        sink: [B] probability of continuing at a zero row (gamma = 0), undiscounted.
        layers_signed: S at the report layers of :func:`backplay.explain` ([0] input, [-1] one-hot).
        layers_abs: A at the report layers.
        layers_rho: R at the report layers (visit probability).
        gates: one tensor per layer, p^l.
        bias_gradient: one tensor per layer, S^l * p^l = df/db^l (I5).

    Identities: ``value == gxi.sum + bias_share + entropy_share`` and
    ``rho.sum + stopped + sink == 1`` (to round-off).
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

    def __repr__(self) -> str:
        return (f"Occupation(batch {self.value.shape[0]}, x shape {tuple(self.nu_plus.shape[1:])}, "
                f"{self.output.shape[1]} outputs, {len(self.gates)} layers; value {_range(self.value)}, "
                f"stopped {_range(self.stopped)}, sink {_range(self.sink)})")


def _range(t: Tensor) -> str:
    """A per-sample tensor [B] in a few characters: its value (B = 1), else its range."""
    v = t.detach().double().cpu()
    if v.numel() <= 1:
        return "[]" if v.numel() == 0 else f"{float(v[0]):.4g}"
    return f"in [{float(v.min()):.4g}, {float(v.max()):.4g}]"


def _per_sample(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


def occupation(model: Any, x: Tensor, target: Any) -> Occupation:
    """Occupation measures for a batch ``x`` (or one sample) and ``target`` (int or LongTensor [B]).

    ``model``: any model the reader takes, or a :class:`backplay.MLPSpec`. One batched forward pass
    and one backward sweep; the model is only read."""
    prep = prepare(model, x)
    xb = prep.x
    B = xb.shape[0]
    with torch.no_grad():
        trace = prep.trace()
        t = resolve_target(target, B, trace.output.shape[1], xb.device)
        zeros = xb.new_zeros(B)
        acc = {"bias": zeros.clone(), "entropy": zeros.clone(), "stopped": zeros.clone(), "sink": zeros.clone()}
        bias_grad: list = [None] * trace.n_layers
        gates = [rec.p for rec in trace.layers]

        def layer_fn(rec: Any, v: tuple) -> tuple:
            S, A, R = (u.reshape(rec.y.shape) for u in v)
            p = rec.p
            Sp, Ap, Rp = S * p, A * p, R * p
            bias_grad[rec.index - 1] = Sp
            b = rec.map.bias_like(rec.z)
            if b is not None:
                acc["bias"] += _per_sample(Sp * b)
            h = rec.offset()
            if h is not None:
                acc["entropy"] += _per_sample(S * h)
            acc["stopped"] += _per_sample(R * (1 - p))
            units = rec.unit_mask()  # the zeros a layout step writes (F.pad) are no units: no edge to them
            gamma = rec.map.apply(units, "abs")
            zero_row = gamma == 0
            acc["sink"] += _per_sample(Rp * zero_row.to(Rp.dtype))
            inv_gamma = torch.where(zero_row, torch.zeros_like(gamma), 1 / torch.where(zero_row, 1.0, gamma))
            M = rec.map
            return M.transpose(Sp, "W"), M.transpose(Ap, "abs"), units * M.transpose(Rp * inv_gamma, "abs")

        start = trace.onehot(t)
        lower, kept = trace.walk({trace.output_id: (start, start.clone(), start.clone())}, layer_fn,
                                 lambda step, v: tuple(u.reshape(step.y.shape) for u in v))
        S, A, R = (u.reshape(xb.shape) for u in lower)
        report = [(S, A, R)] + [kept[i] for i in trace.cuts] + [(start, start, start)]
        return Occupation(
            value=trace.logit(t),
            output=trace.output,
            target=t,
            nu_plus=(A + S) / 2,
            nu_minus=(A - S) / 2,
            rho=R,
            gradient=S,
            abs_mass=A,
            gxi=xb * S,
            bias_share=acc["bias"],
            entropy_share=acc["entropy"],
            stopped=acc["stopped"],
            sink=acc["sink"],
            layers_signed=[r[0] for r in report],
            layers_abs=[r[1] for r in report],
            layers_rho=[r[2] for r in report],
            gates=gates,
            bias_gradient=bias_grad,
        )


_MONOTONE = (LinearGate, ReLUGate, LeakyReLUGate, ClampGate, SoftplusGate)


def interval_bounds(model: Any, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Bounds on the output over the box [lo, hi] by interval bound propagation (docs/theory.md I13).

    Layer by layer: z_lo = W+ y_lo + W- y_hi + b, z_hi = W+ y_hi + W- y_lo + b, then the (monotone)
    activation of both ends; layout steps and max selections (monotone) act on both ends. This is
    the Shapley operator of the GV game evaluated with the terminal payoffs (lo, -hi) and (hi, -lo):
    v_lo(L, k, +) <= f_k(x') <= v_hi(L, k, +) for x' in the box. Gates must be monotone (ReLU,
    LeakyReLU, ReLU6 / hardtanh, softplus); normalisers are not covered (their std is frozen at one
    input, not over the box).

    ``lo``, ``hi``: a batch (or one sample), finite, lo <= hi, on the model's device. Returns
    ``(lower, upper)`` of the output's shape ([n_out] for one sample) in the compute dtype.
    """
    lo_t, hi_t = float_tensor(lo, "lo"), float_tensor(hi, "hi")
    if lo_t.shape != hi_t.shape:
        raise ValueError(f"lo and hi must have the same shape, got {tuple(lo_t.shape)} and {tuple(hi_t.shape)}")
    if lo_t.device != hi_t.device:
        raise ValueError(f"lo is on {lo_t.device} but hi on {hi_t.device}")
    dtype = torch.promote_types(lo_t.dtype, hi_t.dtype)
    prep_lo = prepare(model, lo_t.to(dtype), "lo")
    prep_hi = prepare(model, hi_t.to(dtype), "hi")
    l0, u0 = prep_lo.x, prep_hi.x
    if bool((l0 > u0).any()):
        raise ValueError("the box is empty: lo > hi somewhere")
    with torch.no_grad():
        trace = prep_lo.trace()
        box = {0: (l0, u0)}
        for step in trace.steps:
            ins = [box[s] for s in step.sources]
            if not hasattr(step, "map"):
                box[step.out] = (step.fn(*[a for a, _ in ins]), step.fn(*[b for _, b in ins]))
                continue
            M, gate = step.map, step.gate
            if isinstance(M, NormOp) or not isinstance(gate, _MONOTONE):
                what = "a normaliser" if isinstance(M, NormOp) else f"the non-monotone gate {gate!r}"
                raise TypeError(f"interval_bounds does not cover {what} (layer {step.index}, {step.where})")
            if len(ins) > 1:
                shape = step.input_shape[:1] + step.input_shape[2:]
                lw = torch.stack([a.expand(shape) for a, _ in ins], 1)
                up = torch.stack([b.expand(shape) for _, b in ins], 1)
            else:
                lw, up = ins[0]
            if getattr(M, "maximum", None) is not None:
                z_lo, z_hi = M.maximum(lw), M.maximum(up)
            else:
                z_lo = M.apply(lw, "pos") + M.apply(up, "neg")
                z_hi = M.apply(up, "pos") + M.apply(lw, "neg")
                b = M.bias_like(z_lo)
                if b is not None:
                    z_lo, z_hi = z_lo + b, z_hi + b
            box[step.out] = (gate(z_lo)[0], gate(z_hi)[0])
        l, u = box[trace.output_id]
    l, u = l.flatten(1), u.flatten(1)
    if prep_lo.squeeze:
        l, u = l.squeeze(0), u.squeeze(0)
    return l, u
