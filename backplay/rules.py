"""Attribution rules: one small class per rule (zennit's split).

A rule is a frozen, parameter-only object. It never holds a model and never modifies one: the engine
(:func:`backplay.gpu.explain`) reads the model into its operation graph (:mod:`backplay.gpu.read`),
runs ONE batched forward pass and hands the rule the recorded :class:`~backplay.gpu.trace.Trace`. A
rule then maps that trace to the relevance of the input.

Most rules are layer rules (:class:`LayerRule`): a start measure at the output, one backward map per
layer (``backward(layer, upper) -> lower``; ``layer`` is a :class:`~backplay.gpu.trace.LayerTrace`
with ``map`` (apply / transpose with any part of its coefficients), ``gate``, ``input`` = y^{l-1},
``z``, ``p`` and ``y``), and a final step at the input; layout steps (reshape, cat, slice, ...) move
relevance by their transpose for every rule (:meth:`~backplay.gpu.trace.Trace.walk`). New rules
(Epsilon, AlphaBeta, the routing family of THEORY.md section 5, ...) are further subclasses; the
theory and numerics parts read the same objects for their parameters.

This module depends on torch only (the gpu package imports it, not the other way round).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from backplay.gpu.trace import LayerTrace, Trace

Tensor = torch.Tensor

__all__ = [
    "Rule", "LayerRule", "Gradient", "GradientXInput", "LRP0", "AlphaBeta", "RG", "RGEq",
    "GradientEquilibrium", "Anchor", "RiskAverse", "SoftplusGame", "safe_divide", "Sweep",
    "AttributionEquilibrium", "AttributionEquilibriumLaw",
    "TransformerRule", "CPLRP", "AttnLRP", "Rollout", "TransformerAttribution",
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
class Sweep:
    """One backward sweep: the input relevance (shape of the first layer's input), the relevance at
    every layer's input in torch order ([0] input, [L] the start at the output layer), and the
    signed stopped mass per sample accumulated by the law (``None`` when the rule does not track it)."""

    relevance: Tensor
    layers: list
    stopped: Tensor | None = None


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

    def view(self, y: Tensor, r: Tensor) -> Tensor:
        """The relevance reported at a layer whose values are ``y``, from the swept measure ``r``."""
        return r

    # -- the sweep ------------------------------------------------------------------------------
    def _context(self, trace: "Trace", target: Tensor) -> dict:
        return {"stopped": None}

    def _layer_backward(self, layer: "LayerTrace", r: Tensor, ctx: dict) -> Tensor:
        return self.backward(layer, r)

    def sweep(self, trace: "Trace", target: Tensor, keep_layers: bool = True,
              release: bool = False) -> Sweep:
        """The backward sweep over the trace's operation graph (:meth:`Trace.walk`).
        ``keep_layers=False``: ``Sweep.layers`` is left empty. ``release=True``: each step is dropped
        once swept (frees its buffers early; the trace is spent afterwards)."""
        ctx = self._context(trace, target)
        r = self.start(trace, target)
        keep = (lambda step, v: self.view(step.y, v.reshape(step.y.shape))) if keep_layers else None
        top = self.view(trace.output, r) if keep_layers else None
        lower, kept = trace.walk({trace.output_id: r},
                                 lambda layer, v: self._layer_backward(layer, v.reshape(layer.y.shape), ctx),
                                 keep, release)
        if lower is None:
            lower = torch.zeros_like(trace.x)
        lower = self.finish(trace, lower)
        rel = [lower] + [kept[i] for i in trace.cuts] + [top] if keep_layers else []
        return Sweep(lower, rel, ctx["stopped"])

    def relevance(self, trace: "Trace", target: Tensor) -> Tensor:
        return self.sweep(trace, target).relevance


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
        return layer.map.transpose(upper * layer.p)


@dataclass(frozen=True)
class GradientXInput(Gradient):
    """Gradient x Input, x_j df/dx_j: the terminal payoff x_j weighted by the signed occupation.

    Completeness (THEORY.md I4; I11 for softplus): sum_j GxI_j = f_target(x) - E[discounted bias
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

    On a ReLU net it equals Gradient x Input (THEORY.md I8), R^l_i = y^l_i df/dy^l_i at every layer;
    the relevance absorbed by the biases is the bias share of I4 (report ``stopped``). Computed
    genuinely by the LRP recursion, not through the gradient, so I8 is a real check. On a softplus
    net it is the plain LRP-0 recursion (y != z), with no identity claimed.
    """

    def start(self, trace: "Trace", target: Tensor) -> Tensor:
        return trace.onehot(target) * trace.output

    def backward(self, layer: "LayerTrace", upper: Tensor) -> Tensor:
        return layer.input * layer.map.transpose(safe_divide(upper, layer.z))


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
def _routing_parts(rule: "Rule") -> tuple["Rule", "Anchor | None", "RiskAverse | None"]:
    """(base law, anchor or None, risk aversion or None) of a routing rule."""
    risk = anchor = None
    if isinstance(rule, RiskAverse):
        risk, rule = rule, rule.rule
    if isinstance(rule, Anchor):
        anchor, rule = rule, rule.rule
    return rule, anchor, risk


def _handover(base: "Rule", Sp: Tensor, Sn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(p, m, stop) per neuron for the base law, from S+ >= 0 and S- <= 0 (bias included, T = 1)."""
    if isinstance(base, AlphaBeta):
        a, b = float(base.alpha), float(base.beta)
        p = torch.full_like(Sp, a / (a + b))
        return p, torch.full_like(Sp, a + b), torch.zeros_like(Sp, dtype=torch.bool)
    if isinstance(base, GradientEquilibrium):
        tot, z = Sp - Sn, Sp + Sn
        p = safe_divide(Sp, tot)
        stop = z == 0
        return p, safe_divide(tot, z), stop
    if isinstance(base, RG):
        pv = 1.0 / (1.0 + math.exp(-1.0 / base.tau))
        p = torch.full_like(Sp, pv)
    elif isinstance(base, RGEq):
        kappa, nu = float(base.kappa), float(base.nu)
        if nu == 0:
            p = torch.full_like(Sp, 1.0 / (1.0 + math.exp(-kappa)))
        else:
            pos, neg = Sp > 0, Sn < 0
            both = pos & neg
            one = torch.ones_like(Sp)
            lo = kappa + nu * (torch.log(torch.where(both, Sp, one)) - torch.log(torch.where(both, -Sn, one)))
            p = torch.where(both, torch.sigmoid(lo),
                            torch.where(pos, one, torch.where(neg, torch.zeros_like(Sp), 0.5 * one)))
    else:  # pragma: no cover
        raise TypeError(f"{type(base).__name__} is not a routing law")
    q = 1 - p
    stop = p == q
    m = torch.where(stop, torch.zeros_like(p), 1 / torch.where(stop, torch.ones_like(p), p - q))
    return p, m, stop


def _sdiv(num: Tensor, den: Tensor) -> Tensor:
    """safe_divide without the extra buffers: num / den, 0 where den == 0."""
    return torch.where(den == 0, 0.0, num / den)


def _const_handover(base: "Rule") -> tuple[float, float, bool] | None:
    """(p, m, stop everywhere) as numbers for the laws whose hand-over does not depend on the neuron."""
    if isinstance(base, AlphaBeta):
        a, b = float(base.alpha), float(base.beta)
        return a / (a + b), a + b, False
    if isinstance(base, RG) or (isinstance(base, RGEq) and float(base.nu) == 0):
        if isinstance(base, RG):
            p = 1.0 / (1.0 + math.exp(-1.0 / base.tau))
        else:
            p = 1.0 / (1.0 + math.exp(-float(base.kappa)))
        # the same arithmetic as _handover, in the compute dtype's precision below
        return p, None, None
    return None


class _Local:
    """The routing law at one layer of the explained pass (shared convention above), batched.

    Routing weights: + branch W+_ij u+_j + |W-_ij| u-_j (+ b_i if b_i > 0), - branch W+_ij u-_j +
    |W-_ij| u+_j (+ |b_i| if b_i < 0), u = |y|^(1/T) split by the sign of y; the anchor's uniform part
    uses the indicator weights 1{W > 0}, 1{W < 0} on 1{y > 0}, 1{y < 0}.

    Layers whose input is nonnegative (after a ReLU or a pool) take the short path: y- = 0, so the
    four branch products reduce to the two parts W+ y, W- y (one stacked product) and likewise the
    adjoints. With route temperature 1 the routing masses are the branch sums themselves
    (D+ = S+, D- = -S-). Hand-overs that do not depend on the neuron (AlphaBeta, RG, RGEq with
    nu = 0) are kept as numbers.
    """

    def __init__(self, layer: "LayerTrace", base: "Rule", lam: float, own: bool = False) -> None:
        M, y = layer.map, layer.input
        self.M, self.lam = M, float(lam)
        self.nonneg = nonneg = not bool((y < 0).any())
        b = M.bias  # shaped to broadcast against z (a conv's [C, 1, 1], a dense map's [n])
        if nonneg:
            yp, yn = y, None
            Sp, Sn = M.pair(y)
            if Sn is None:
                Sn = torch.zeros_like(Sp)
        else:
            yp, yn = y.clamp_min(0), y.clamp_max(0)
            Sp, Sn = M.cross(yp, yn)
        if b is not None:  # fresh buffers (views of one product): the bias is added in place
            Sp, Sn = Sp.add_(b.clamp_min(0)), Sn.add_(b.clamp_max(0))
        self.full_p, self.full_n = Sp > 0, Sn < 0
        const = _const_handover(base)
        if const is not None:
            pv, mv, _ = const
            p_t = torch.tensor(pv, dtype=Sp.dtype)
            q_t = 1 - p_t
            self.p, self.q = float(p_t), float(q_t)
            if mv is None:  # RG / RGEq(nu = 0): m = 1/(p - q), stop where p == q
                if self.p == self.q:
                    self.stop, self.m = True, 0.0
                else:
                    self.stop, self.m = None, float(1 / (p_t - q_t))
            else:
                self.stop, self.m = None, float(torch.tensor(mv, dtype=Sp.dtype))
        else:
            self.p, self.m, self.stop = _handover(base, Sp, Sn)
            self.q = 1 - self.p
        T = float(getattr(base, "route_temp", 1.0))
        self.T1 = T == 1.0
        self.bp = None if b is None else b.clamp_min(0)
        self.bn = None if b is None else (-b).clamp_min(0)
        if T == 1.0:
            self.up, self.un = yp, (None if nonneg else -yn)
            self.Dp, self.Dn = Sp, Sn.neg_()  # Sn is a fresh buffer, no longer read
        else:
            u = y.abs().pow(1.0 / T)
            zero = torch.zeros_like(u)
            self.up = torch.where(y > 0, u, zero)
            self.un = None if nonneg else torch.where(y < 0, u, zero)
            self.Dp, self.Dn = self._w2(self.up, self.un)
        del Sp, Sn
        if self.lam:
            self.ip = (y > 0).to(y.dtype)
            self.in_ = None if nonneg else (y < 0).to(y.dtype)
            self.ibp = None if b is None else (b > 0).to(y.dtype)
            self.ibn = None if b is None else (b < 0).to(y.dtype)
            self.Np, self.Nn = self._i2(self.ip, self.in_)
            # the token anchor (ViT attention, THEORY.md section 7): the anchor is the own unit
            # (M.own_gather / M.own_scatter) where its contribution lies in the branch, else uniform
            self.own = None
            if own:
                c = M.own_contribution(y)
                self.own = (c > 0, c < 0)

    def _w2(self, a: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        """(W+ a - W- c + b+, W+ c - W- a + b-), c None meaning 0 (the two routing sums)."""
        if c is None:
            first, Na = self.M.pair(a)
            second = None if Na is None else -Na
        else:
            first, second = self.M.cross(a, -c)
            second = -second
        if second is None:
            second = torch.zeros_like(first)
        if self.bp is not None:
            first, second = first + self.bp, second + self.bn
        return first, second

    def _i2(self, a: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        """(I+ a + I- c + 1{b>0}, I+ c + I- a + 1{b<0}) with the indicator weights."""
        if c is None:
            first, second = self.M.pair(a, ind=True)
        else:
            first, second = self.M.cross(a, c, ind=True)
        if second is None:
            second = torch.zeros_like(first)
        if self.ibp is not None:
            first, second = first + self.ibp, second + self.ibn
        return first, second

    def branch_values(self, U: Tensor) -> tuple[Tensor, Tensor]:
        """V_b = sum_j pi(j|b) U_j + pi(bias|b) * 1; 1 on an empty branch (stopped, U = 1)."""
        lam = self.lam
        wp, wn = self._w2(self.up * U, None if self.un is None else self.un * U)
        Vp, Vn = _sdiv(wp, self.Dp), _sdiv(wn, self.Dn)
        if lam:
            ip_, in_ = self._i2(self.ip * U, None if self.in_ is None else self.in_ * U)
            Ip, In = _sdiv(ip_, self.Np), _sdiv(in_, self.Nn)
            if self.own is not None:
                Uo = self.M.own_gather(U)
                Ip, In = torch.where(self.own[0], Uo, Ip), torch.where(self.own[1], Uo, In)
            Vp, Vn = (1 - lam) * Vp + lam * Ip, (1 - lam) * Vn + lam * In
        return torch.where(self.full_p, Vp, 1.0), torch.where(self.full_n, Vn, 1.0)

    def expect(self, U: Tensor) -> Tensor:
        """U at this layer from U at the layer below (the extra sweep of RiskAverse)."""
        Vp, Vn = self.branch_values(U)
        out = self.p * Vp + self.q * Vn
        if self.stop is None:
            return out
        if self.stop is True:
            return torch.ones_like(out)
        return torch.where(self.stop, 1.0, out)

    def backward(self, R: Tensor, U: Tensor | None = None, U_self: Tensor | None = None
                 ) -> tuple[Tensor, Tensor]:
        """(relevance at the layer below, signed stopped mass per sample)."""
        M, lam = self.M, self.lam
        if U is None:
            p, q, m, stop = self.p, self.q, self.m, self.stop
            Vp = Vn = None
            up, un = self.up, self.un
        else:  # Doob transform by U, multiplier reset to 1/(p_theta - q_theta)
            Vp, Vn = self.branch_values(U)
            p, q = _sdiv(self.p * Vp, U_self), _sdiv(self.q * Vn, U_self)
            stop = (U_self == 0) | (p == q)
            if self.stop is True:
                stop = torch.ones_like(stop)
            elif self.stop is not None:
                stop = stop | self.stop
            m = torch.where(stop, 0.0, 1 / torch.where(stop, 1.0, p - q))
            up = self.up * U
            un = None if self.un is None else self.un * U
        if stop is None and isinstance(p, float) and Vp is None and self.T1 and not lam:
            return self._backward_const(R, R, m * p, m * q, None)
        if Vp is None and self.T1 and not lam and stop is not True:
            if stop is None:
                return self._backward_const(R, m * R, p, q, None)
            return self._backward_const(R, torch.where(stop, 0.0, m * R), p, q,
                                        torch.where(stop, R, 0.0).flatten(1).sum(1))
        if stop is None and isinstance(p, float):  # constant hand-over: one product per branch
            ap, an = R * (m * p), R * (m * q)
        else:
            if stop is True:
                Rm = torch.zeros_like(R)
            elif stop is None:
                Rm = m * R
            else:
                Rm = torch.where(stop, 0.0, m * R)
            ap, an = Rm * p, Rm * q
            del Rm
        if Vp is None and self.T1:  # D+ = S+ >= 0 and D- = -S- >= 0: zero exactly off the branch
            cp = torch.where(self.full_p, (ap * (1 - lam) if lam else ap) / self.Dp, 0.0)
            cn = torch.where(self.full_n, (an * (1 - lam) if lam else an) / self.Dn, 0.0)
        elif lam:
            cp = _sdiv(ap * (1 - lam), self.Dp if Vp is None else self.Dp * Vp)
            cn = _sdiv(an * (1 - lam), self.Dn if Vn is None else self.Dn * Vn)
        else:
            cp = _sdiv(ap, self.Dp if Vp is None else self.Dp * Vp)
            cn = _sdiv(an, self.Dn if Vn is None else self.Dn * Vn)
        # the stopped mass first, so that the branch buffers are freed before the adjoints
        if stop is True:
            stopped = R.clone()
        elif stop is None:
            stopped = None
        else:
            stopped = torch.where(stop, R, 0.0)
        s2 = torch.where(self.full_p, 0.0, ap) - torch.where(self.full_n, 0.0, an)
        stopped = s2 if stopped is None else stopped + s2
        del s2
        stopped = stopped.flatten(1).sum(1)
        if self.bp is not None:  # the bias sink: sum over the neurons of c * b, per sample
            stopped = stopped + self._bias_sum(cp, self.bp) - self._bias_sum(cn, self.bn)
        if not lam:
            del ap, an
        if un is None:
            lower = M.pair_t(cp, cn).mul_(up)  # a fresh tensor: scaled in place
        else:
            t1, t2 = M.cross_t(cp, cn)
            lower = up * t1 - un * t2
            del t1, t2
        del cp, cn
        if lam:
            ip = self.ip if U is None else self.ip * U
            in_ = None if self.in_ is None else (self.in_ if U is None else self.in_ * U)
            lp, ln = ap * lam, an * lam
            if self.own is not None:  # the own unit takes the anchor share where it is in the branch
                op, on = self.own
                oc = torch.where(op, lp if Vp is None else _sdiv(lp, Vp), 0.0)
                oc = oc - torch.where(on, ln if Vn is None else _sdiv(ln, Vn), 0.0)
                lower = lower + M.own_scatter(oc if U is None else oc * M.own_gather(U))
                lp, ln = torch.where(op, 0.0, lp), torch.where(on, 0.0, ln)
            ci_p = _sdiv(lp, self.Np if Vp is None else self.Np * Vp)
            ci_n = _sdiv(ln, self.Nn if Vn is None else self.Nn * Vn)
            if in_ is None:
                lower = lower + ip * M.pair_t(ci_p, -ci_n, ind=True)
            else:
                t1, t2 = M.cross_t(ci_p, -ci_n, ind=True)
                lower = lower + ip * t1 + in_ * t2
                del t1, t2
            if self.ibp is not None:
                stopped = stopped + self._bias_sum(ci_p, self.ibp) - self._bias_sum(ci_n, self.ibn)
        return lower, stopped

    def _backward_const(self, R: Tensor, Rm: Tensor, p: Any, q: Any, stopped: Tensor | None
                        ) -> tuple[Tensor, Tensor]:
        """backward at route temperature 1, no anchor, no U: a+ = Rm p, a- = Rm q (Rm = m R, 0 where
        stopped) are written into one buffer [c+, c-] (dim 1) that the adjoint reads at once;
        ``stopped``: the mass already stopped at the neurons (or None)."""
        M = self.M
        n = R.shape[1]
        buf = R.new_empty((R.shape[0], 2 * n) + tuple(R.shape[2:]))
        cp, cn = buf[:, :n], buf[:, n:]
        torch.mul(Rm, p, out=cp)
        torch.mul(Rm, q, out=cn)
        del Rm
        self.p = self.q = None
        # the stopped mass: the branch mass sent to an empty branch (D = 0), with its sign
        s2 = torch.where(self.full_p, 0.0, cp).flatten(1).sum(1)
        s2 = s2 - torch.where(self.full_n, 0.0, cn).flatten(1).sum(1)
        stopped = s2 if stopped is None else stopped + s2
        cp.div_(self.Dp).masked_fill_(self.full_p.logical_not(), 0.0)
        cn.div_(self.Dn).masked_fill_(self.full_n.logical_not(), 0.0)
        self.Dp = self.Dn = self.full_p = self.full_n = None
        if self.bp is not None:  # the bias sink: sum over the neurons of c * b, per sample
            stopped = stopped + self._bias_sum(cp, self.bp) - self._bias_sum(cn, self.bn)
        up, un = self.up, self.un
        if un is None:
            lower = M.pair_t_buf(buf, n)
            del buf, cp, cn
            lower = lower.mul_(up)
        else:
            t1, t2 = M.cross_t_buf(buf, n)
            del buf, cp, cn
            lower = up * t1
            lower.sub_(un * t2)
        return lower, stopped

    @staticmethod
    def _bias_sum(c: Tensor, b: Tensor) -> Tensor:
        """sum over the neurons of c * b per sample, b broadcast over the spatial dimensions."""
        if c.ndim > 2 and b.ndim == c.ndim - 1 and all(n == 1 for n in b.shape[1:]):
            return c.flatten(2).sum(2) @ b.flatten()
        return (c * b).flatten(1).sum(1)


def _routing_context(rule: "Rule", trace: "Trace", target: Tensor) -> dict:
    base, anchor, risk = _routing_parts(rule)
    depth = trace.n_layers
    ctx = {"stopped": torch.zeros_like(trace.output[:, 0]), "base": base, "anchor": anchor,
           "depth": depth, "blocks": trace.n_blocks, "local": {}, "U": {},
           "lrp0_form": isinstance(base, GradientEquilibrium) and anchor is None and risk is None}
    if risk is not None:
        x = trace.x
        theta, s2 = float(risk.theta), float(risk.sigma) ** 2
        if theta == 0:
            U = torch.ones_like(x)
        else:
            nz = x != 0
            c = s2 / torch.where(nz, x, torch.ones_like(x)) ** 2
            U = torch.where(nz, torch.exp(-theta * c), torch.zeros_like(x))  # x = 0 is never reached
        _u_sweep(trace, U, ctx)
    return ctx


def _equilibrium_backward(layer: "LayerTrace", r: Tensor, ctx: dict) -> Tensor:
    """The gradient equilibrium at one layer in its closed form (THEORY.md I17): with p = S+/(S+ + |S-|)
    and m = (S+ + |S-|)/z both branches carry R_i / z_i per unit of |Z_ij|, so R^{l-1}_j =
    y_j sum_i W_ij R_i / z_i (LRP-0; no mass is ever handed to an empty branch); the token stops where
    z_i = 0 and the share R_i b_i / z_i ends in the bias sink. Two products instead of four."""
    M, y = layer.map, layer.input
    z = M.apply(y)
    b = M.bias_like(z)
    if b is not None:
        z = z + b
    c = _sdiv(r, z)
    stopped = torch.where(z == 0, r, 0.0).flatten(1).sum(1)
    if b is not None:
        stopped = stopped + (c * b).flatten(1).sum(1)
    ctx["stopped"] = ctx["stopped"] + stopped
    return M.transpose(c, "W").mul_(y)


def _local_of(layer: "LayerTrace", ctx: dict) -> "_Local":
    loc = ctx["local"].get(id(layer))
    if loc is None:
        anchor = ctx["anchor"]
        own = anchor is not None and anchor.anchor == "token"
        if anchor is None:
            lam = 0.0
        elif own:  # the token anchor acts at the attention (token-mixing) layers only, lam per block
            block = layer.block
            lam = 0.0 if block is None else anchor.lam_at(block + 1, ctx["blocks"])
        else:
            lam = anchor.lam_at(getattr(layer, "index", 1), ctx["depth"])
        loc = _Local(layer, ctx["base"], lam, own=own)
        ctx["local"][id(layer)] = loc
    return loc


def _u_layer(layer: "LayerTrace", U: Tensor, ctx: dict) -> Tensor:
    U = U.reshape(layer.input.shape)
    if layer.map.pass_through:
        U_self = layer.map.apply(U)
        if layer.map.bias is not None:  # a unit made of a constant only (a cls token): the bias unit, U = 1
            U_self = U_self + (1 - layer.map.apply(torch.ones_like(U)))
    else:  # only U is kept per layer: the local law and the weight parts are rebuilt in the
        # backward sweep (one more pair of branch products per layer instead of holding the
        # model's weights twice over and every layer's buffers)
        U_self = _local_of(layer, ctx).expect(U)
        ctx["local"].pop(id(layer), None)
        layer.map.drop_parts()
    ctx["U"][id(layer)] = (U, U_self)
    return U_self


def _u_sweep(trace: "Trace", U: Tensor, ctx: dict) -> None:
    """The forward sweep of U (I20) over the operation graph: U at each layer's output from U at its
    input; layout steps move U as they move values."""
    vals = {0: U}
    for step in trace.steps:
        ins = [vals[s] for s in step.sources]
        if hasattr(step, "map"):
            if len(ins) == 1:
                u_in = ins[0]
            else:
                shape = tuple(step.input.shape[:1]) + tuple(step.input.shape[2:])
                u_in = torch.stack([u.expand(shape) for u in ins], dim=1)
            vals[step.out] = _u_layer(step, u_in, ctx)
        else:
            vals[step.out] = step.fn(*ins)


@dataclass(frozen=True)
class _RoutingLaw(LayerRule):
    """Shared torch implementation of the routing laws (the convention above), one batched sweep.

    Start R^L = f_k(x) at the target; MaxPool layers route to the argmax (winner takes all) whatever
    the law; the stopped mass (cemetery and bias sink) is accumulated in the sweep's ``stopped``."""

    def start(self, trace: "Trace", target: Tensor) -> Tensor:
        return trace.onehot(target) * trace.output

    def _context(self, trace: "Trace", target: Tensor) -> dict:
        return _routing_context(self, trace, target)

    def _layer_backward(self, layer: "LayerTrace", r: Tensor, ctx: dict) -> Tensor:
        if layer.map.pass_through:  # a selection, a copy layer or a standalone gate: relevance passes
            lower = layer.map.transpose(r)
            if layer.map.bias is not None:  # units made of constants only: their mass is stopped
                ctx["stopped"] = ctx["stopped"] + r.flatten(1).sum(1) - lower.flatten(1).sum(1)
            return lower
        if ctx.get("lrp0_form"):
            return _equilibrium_backward(layer, r, ctx)
        U, U_self = ctx["U"].pop(id(layer), (None, None))
        lower, stopped = _local_of(layer, ctx).backward(r, U, U_self)
        ctx["local"].pop(id(layer), None)  # each layer is swept once: free its buffers
        ctx["stopped"] = ctx["stopped"] + stopped
        return lower

    def backward(self, layer: "LayerTrace", upper: Tensor) -> Tensor:
        """The law at one layer on its own (no anchor, no risk aversion; stopped mass dropped)."""
        ctx = {"stopped": torch.zeros(upper.shape[0], dtype=upper.dtype, device=upper.device),
               "base": _routing_parts(self)[0], "anchor": None, "depth": 1, "local": {}, "U": {}}
        return self._layer_backward(layer, upper, ctx)


def _finite(name: str, v: float) -> None:
    if not math.isfinite(float(v)):
        raise ValueError(f"{name} must be finite, got {v}")


def _positive(name: str, v: float) -> None:
    _finite(name, v)
    if not float(v) > 0:
        raise ValueError(f"{name} must be > 0, got {v}")


@dataclass(frozen=True)
class AlphaBeta(_RoutingLaw):
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
class RG(_RoutingLaw):
    """The routing game RG(tau, T) (THEORY.md I16): Gibbs hand-over p = sigmoid(1/tau), the maximiser
    of p + tau H(p); m = 1/(p - q) = coth(1/(2 tau)); route temperature T (I19). T = 1 is alpha-beta
    with alpha = 1/(1 - e^(-1/tau)), beta = 1/(e^(1/tau) - 1); the default tau = 1/ln 2 is alpha=2, beta=1."""

    tau: float = 1.0 / math.log(2.0)
    route_temp: float = 1.0

    def __post_init__(self) -> None:
        _positive("tau", self.tau)
        _positive("route_temp", self.route_temp)


@dataclass(frozen=True)
class RGEq(_RoutingLaw):
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
class GradientEquilibrium(_RoutingLaw):
    """The gradient equilibrium (THEORY.md I17): p = S+/(S+ + |S-|), m = (S+ + |S-|)/z_i (z_i != 0;
    where z_i = 0 the token is stopped), route temperature 1. It is RGEq(0, 1, 1) and gives LRP-0,
    i.e. Gradient x Input on a bias-free ReLU net: the Doob (|y|-) transform of the GV kernel."""


@dataclass(frozen=True)
class Anchor(_RoutingLaw):
    """Extended action set (THEORY.md section 5): routing pi_lam = (1 - lam) pi + lam u; lam = 0 is
    the base law.

    ``anchor="uniform"`` (default): u uniform on the branch support (bias unit included), at every
    layer; ``lam`` a number or one per layer (torch order, layer 1 first).
    ``anchor="token"`` (ViTs only, THEORY.md section 7): the anchor acts at the token-mixing edges of
    attention only; at the attention neuron (query q, feature d) u is the query's own token (q, d)
    when its contribution A_qq v_qd lies in the branch, else uniform on the branch; ``lam`` a number
    or one per block. Every other layer (LayerNorm, Linear, GELU, add nodes) keeps the base law."""

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
        if self.anchor not in ("uniform", "token"):
            raise ValueError(f"unknown anchor {self.anchor!r} ('uniform', or 'token' for ViTs)")

    def lam_at(self, layer: int, depth: int) -> float:
        """lam of torch layer ``layer`` (1..depth); for the token anchor of block ``layer``."""
        if not isinstance(self.lam, tuple):
            return self.lam
        if len(self.lam) != depth:
            unit = "blocks" if self.anchor == "token" else "layers"
            raise ValueError(f"lam has {len(self.lam)} entries, the net has {depth} {unit}")
        return self.lam[layer - 1]


@dataclass(frozen=True)
class RiskAverse(_RoutingLaw):
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

    def sweep(self, trace: "Trace", target: Tensor, keep_layers: bool = True,
              release: bool = False) -> Sweep:
        surrogate = trace.surrogate(self.eps)  # every game gate at temperature eps
        return GradientXInput().sweep(surrogate, target, keep_layers=keep_layers, release=True)


# ---------------------------------------------------------------------------------------------
# Attribution Equilibrium (Nam and Lee), THEORY.md section 8: the rule as the authors' code computes
# it (not a law on the graph), and its closest routing law.
# ---------------------------------------------------------------------------------------------
def _per_sample(t: Tensor) -> Tensor:
    """Per-sample sums of t, shaped to broadcast against t."""
    return t.flatten(1).sum(1).view((-1,) + (1,) * (t.ndim - 1))


@dataclass(frozen=True)
class AttributionEquilibrium(LayerRule):
    """Attribution Equilibrium (Nam and Lee) as THEORY.md section 8 states it, batched.

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

    Properties (tested; ``backplay.numerics.validate_rule`` measures them): sum R_lower = r - 2 at a
    kernel > 1 (or Linear) layer when R has mass of both signs and no denominator vanishes, 0 at a 1x1
    layer; not conservative, not linear in R (per-sign renormalisation), + and - mass cancel on a unit,
    the shift is not local. Residual blocks are not supported (TypeError). ``r`` in [1, 2] as in the
    authors' code (default 2, the "degree of positive attribution").
    """

    r: float = 2.0

    def __post_init__(self) -> None:
        _finite("r", self.r)
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
                             lambda it, g: it.map.transpose(g.reshape(it.y.shape) * it.p),
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
    """The closest routing law to Attribution Equilibrium on the extended graph (THEORY.md section 8).

    AE's hand-over at a + unit, p = (r+1)/(r+2) (keep) and q = 1/(r+2) (flip), routing along the
    edges of the graph by the shared convention (route temperature 1, branches by sign W_ij y_j,
    bias in the branch of its sign), no renormalisation, no annihilation, no non-local shift; the
    same law at + and - tokens (sign-symmetric, so linear in the signed relevance).

    Multiplier convention: THEORY.md gives m = r + 2 for AE's + unit, but m (p - q) = r there, and
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
        _positive("r", self.r)
        r = float(self.r)
        object.__setattr__(self, "alpha", (r + 1) / r)
        object.__setattr__(self, "beta", 1 / r)

    @property
    def name(self) -> str:
        return f"AttributionEquilibriumLaw(r={self.r!r})"


# ----------------------------------------------------------------------------------------------
# transformer rules (THEORY.md section 7): parameters only; computed on the attention nodes of the
# model's graph by backplay.gpu.transformer (they are not laws on the frozen graph)


def _check_eps(eps: float, strict: bool) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number, got {eps!r}")
    if eps < 0 or (strict and eps == 0):
        raise ValueError(f"eps must be {'> 0' if strict else '>= 0'}, got {eps!r}")


@dataclass(frozen=True)
class TransformerRule(Rule):
    """Base class of the transformer rules: they read the model's attention (its weights, or
    relevance through the softmax into q and k), so :func:`backplay.explain` computes them on the
    attention nodes of the operation graph (:mod:`backplay.gpu.transformer`), on any model the
    reader takes (transformers, and for AttnLRP / CPLRP any other model too)."""


@dataclass(frozen=True)
class CPLRP(TransformerRule):
    """Conservative propagation LRP (Ali et al. 2022, "XAI for Transformers: Better Explanations
    through Conservative Propagation"): normaliser standard deviations, gates (GELU, ...) and
    attention weights are detached (the identity rule through each; attention mixes the value
    tokens with the fixed weights A, no relevance enters q or k), and every dense / convolution layer
    uses LRP-0 (``eps=0``, default) or the epsilon rule ``eps > 0``.

    With ``eps=0`` it is Gradient x Input of the frozen graph (THEORY.md section 7), i.e.
    ``GradientXInput``: the frozen pass is positively homogeneous of degree 1 in (input, every
    bias-like constant), so ``logit = sum R + sum_p <p, d logit / d p>`` over the bias-like constants
    (zero when they are all zero)."""

    eps: float = 0.0

    def __post_init__(self) -> None:
        _check_eps(self.eps, strict=False)


@dataclass(frozen=True)
class AttnLRP(TransformerRule):
    """AttnLRP (Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation
    for Transformers"), as a modified gradient of one batched pass:

    * dense / convolution layers (patch embedding, q, k, v, proj, MLP, head): epsilon rule
      ``R_u = u * W^T (R_z / (z + eps sign z))`` (sign(0) := +1), ``eps > 0``;
    * normalisers: identity rule (std detached; centring and affine map by LRP-0, the bias absorbs
      its share); gates (GELU, SiLU, an elementwise subgraph read as one gate): identity rule;
    * softmax A = softmax(S): ``R_S = S * (R_A - A * sum_rows R_A)`` (Gradient x Input of the
      softmax w.r.t. its logits; not conservative: it absorbs ``sum(S * A) * sum R_A`` per row);
    * products of two tensors that depend on the input (Q K^T, A V, gated units): uniform rule,
      each factor gets half (``R_a = a * (g @ b^T) / 2``), so relevance flows into q and k.

    Residual adds split by LRP-0 (x * g); constants (cls token, position embeddings) absorb their
    shares. Conservation: every step above except the softmax and the biases is conservative.

    Relation to the authors' code (LXT 2.1): ``lxt/efficient`` computes the same modified gradient
    with LRP-0 linear layers, i.e. this rule as eps -> 0; ``lxt/explicit`` also epsilon-stabilises
    the matmuls, which this rule does not."""

    eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_eps(self.eps, strict=True)


@dataclass(frozen=True)
class Rollout(TransformerRule):
    """Attention rollout (Abnar and Zuidema 2020): per attention layer b the head-mean attention
    A_b, ``A_hat_b = (0.5 A_b + 0.5 I)`` row-normalised, ``Rollout = A_hat_L ... A_hat_1``; the value of
    token t is ``sum_q w_q Rollout[q, t]`` over the tokens q the explained logit reads from the last
    attention layer (w uniform on them: the cls token of a ViT, cls and distillation tokens of a
    DeiT, the explained position of a language model). Each token's value is spread evenly over the
    input units it is made of (the pixels of its patch, its embedding dimensions); tokens made of no
    input (a cls token) keep none. Target-independent up to the choice of the tokens q."""


@dataclass(frozen=True)
class TransformerAttribution(TransformerRule):
    """Gradient-weighted relevance rollout of Chefer et al. 2021 ("Transformer Interpretability
    Beyond Attention Visualization"): per attention layer b
    ``Abar_b = mean_heads[(dlogit_t/dA_b * R_{A_b})^+]`` with the plain gradient of the target
    logit w.r.t. the attention weights A_b (nothing frozen), then ``R = I``,
    ``R = R + Abar_b @ R`` for b = 1..L; token values and their spread over the input as
    :class:`Rollout` (rows: the tokens the logit reads).

    ``relevance`` picks R_A:

    * ``"attnlrp"`` (default): the AttnLRP relevance of A (:class:`AttnLRP` with this ``eps``):
      ``R_A = A * g_A``, i.e. A's half of the uniform rule at A V. This is **not** the paper's own
      LRP (alpha=1, beta=0 linear layers with its normalised rules for add and matmul), which is not
      implemented here;
    * ``"attention"``: R_A = A, i.e. ``Abar = mean_heads[(grad A * A)^+]``: the "GAE" rule of
      Chefer et al. 2021b ("Generic Attention-model Explainability"), self-attention case.
    """

    relevance: str = "attnlrp"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.relevance not in ("attnlrp", "attention"):
            raise ValueError(f"relevance must be 'attnlrp' or 'attention', got {self.relevance!r}")
        _check_eps(self.eps, strict=True)
