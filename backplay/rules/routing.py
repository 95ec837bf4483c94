"""The routing laws (docs/theory.md section 8): AlphaBeta, RG, RGEq, GradientEquilibrium, Anchor,
RiskAverse, their shared convention and their batched torch form (:class:`RoutingRule`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .base import (Handover, LayerRule, Rule, check_finite, check_positive, constant_handover,
                   equilibrium_handover, lrp0_backward, option, bias_sum, safe_divide)

if TYPE_CHECKING:  # pragma: no cover
    from backplay.gpu.trace import LayerTrace, Trace

Tensor = torch.Tensor

__all__ = ["RoutingRule", "AlphaBeta", "RG", "RGEq", "GradientEquilibrium", "Anchor", "RiskAverse",
           "routing_parts", "fast_tolerance"]


# ---------------------------------------------------------------------------------------------
# Routing laws (docs/theory.md section 8). The parameters live here; backplay.gpu implements them as
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
def routing_parts(rule: "Rule") -> tuple["Rule", "Anchor | None", "RiskAverse | None"]:
    """(base law, anchor or None, risk aversion or None) of a routing rule."""
    risk = anchor = None
    if isinstance(rule, RiskAverse):
        risk, rule = rule, rule.rule
    if isinstance(rule, Anchor):
        anchor, rule = rule, rule.rule
    return rule, anchor, risk


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
        self.nonneg = nonneg = y.numel() == 0 or bool(y.min() >= 0)  # a reduction: no boolean tensor
        b = M.bias  # shaped to broadcast against z (a conv's [C, 1, 1], a dense map's [n])
        # the sum/difference form (``fast=True``) on inputs of both signs only: on a nonnegative input
        # the exact form already takes two products each way
        self.fast = fast = base.fast and not nonneg
        self.y = y if fast else None
        self.wp = self.wn = None  # fast, with a bias: where the weight part of a branch is nonempty
        S = None  # the branch sums as one stacked tensor [S+, S-] where the map gives them so
        if nonneg:
            yp, yn = y, None
            S = M.stacked_pair(y)
            Sp, Sn = M.pair(y) if S is None else M.halves(S)
            if Sn is None:
                Sn = torch.zeros_like(Sp)
        elif fast:
            yp = yn = None
            Sp, Sn = _fast_sums(M, y)
            if b is not None:
                self.wp, self.wn = Sp > 0, Sn < 0
        else:
            yp, yn, Y = M.split(y)  # y+- the halves of one stacked tensor Y where the map reads it at once
            S = None if Y is None else M.stacked_cross(Y)
            del Y
            Sp, Sn = M.cross(yp, yn) if S is None else M.halves(S)
        if b is not None:  # fresh buffers (views of one product): the bias is added in place
            Sp, Sn = Sp.add_(b.clamp_min(0)), Sn.add_(b.clamp_max(0))
        h = base.handover(Sp, Sn)
        if isinstance(h.plus, float):  # the same hand-over at every unit: kept as numbers
            self.p, self.q, self.m = (float(torch.tensor(v, dtype=Sp.dtype)) for v in (h.plus, h.minus, h.mult))
            self.stop = True if h.stop == 1.0 else None
        else:  # a routing law stops whole tokens (stop is 0 or 1)
            self.p, self.q, self.m, self.stop = h.plus, h.minus, h.mult, h.stop > 0
        T = float(getattr(base, "route_temp", 1.0))
        self.T1 = T == 1.0
        self.bp = None if b is None else b.clamp_min(0)
        self.bn = None if b is None else (-b).clamp_min(0)
        # the branches' nonempty units (S+ > 0, S- < 0): made from D+ = S+ and D- = -S- when first read
        # at route temperature 1 (the constant hand-over's backward needs none: it finds them from D)
        self._full = None
        self.S = None  # [D+, D-] as one tensor: the constant hand-over's backward writes [c+, c-] over it
        if fast:  # route temperature 1 (checked by the rule): D+ = S+, D- = -S-; the adjoint reads y
            self.up = self.un = None
            self.Dp, self.Dn = Sp, Sn.neg_()
        elif T == 1.0:
            self.up, self.un = yp, (None if nonneg else yn.neg_())  # yn no longer read
            self.Dp, self.Dn = Sp, Sn.neg_()  # Sn is a fresh buffer, no longer read
            self.S = S
        else:
            self._full = (Sp > 0, Sn < 0)
            u = y.abs().pow(1.0 / T)
            zero = torch.zeros_like(u)
            self.up = torch.where(y > 0, u, zero)
            self.un = None if nonneg else torch.where(y < 0, u, zero)
            self.Dp, self.Dn = self._w2(self.up, self.un)
        del Sp, Sn, S
        if self.lam:
            self.ip = (y > 0).to(y.dtype)
            self.in_ = None if nonneg else (y < 0).to(y.dtype)
            self.ibp = None if b is None else (b > 0).to(y.dtype)
            self.ibn = None if b is None else (b < 0).to(y.dtype)
            self.Np, self.Nn = self._i2(self.ip, self.in_)
            # the token anchor (ViT attention, docs/theory.md section 10): the anchor is the own unit
            # (M.own_gather / M.own_scatter) where its contribution lies in the branch, else uniform
            self.own = None
            if own:
                c = M.own_contribution(y)
                self.own = (c > 0, c < 0)

    @property
    def full_p(self) -> Tensor:
        """Where the + branch is nonempty (S+ > 0)."""
        return self._fulls()[0]

    @property
    def full_n(self) -> Tensor:
        """Where the - branch is nonempty (S- < 0)."""
        return self._fulls()[1]

    def _fulls(self) -> tuple[Tensor, Tensor]:
        if self._full is None:
            self._full = (self.Dp > 0, self.Dn > 0)
        return self._full

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
        Vp, Vn = safe_divide(wp, self.Dp), safe_divide(wn, self.Dn)
        if lam:
            ip_, in_ = self._i2(self.ip * U, None if self.in_ is None else self.in_ * U)
            Ip, In = safe_divide(ip_, self.Np), safe_divide(in_, self.Nn)
            if self.own is not None:
                Uo = self.M.own_gather(U)
                Ip, In = torch.where(self.own[0], Uo, Ip), torch.where(self.own[1], Uo, In)
            Vp, Vn = (1 - lam) * Vp + lam * Ip, (1 - lam) * Vn + lam * In
        return torch.where(self.full_p, Vp, 1.0), torch.where(self.full_n, Vn, 1.0)

    def expect(self, U: Tensor) -> tuple[Tensor, Tensor]:
        """(U at this layer, delta = p V+ - q V-) from U at the layer below (the extra sweep of
        RiskAverse, I20); delta is 0 where the token stops (the base law's stop, or U = 0 there).
        The Doob transform's multiplier is m_theta = U/delta, so the backward reads delta alone."""
        Vp, Vn = self.branch_values(U)
        a, b = self.p * Vp, self.q * Vn
        out, delta = a + b, a - b
        if self.stop is None:
            return out, delta
        if self.stop is True:
            return torch.ones_like(out), torch.zeros_like(delta)
        return torch.where(self.stop, 1.0, out), torch.where(self.stop, 0.0, delta)

    def backward(self, R: Tensor, U: Tensor | None = None, U_self: Tensor | None = None,
                 delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(relevance at the layer below, signed stopped mass per sample); ``U``, ``U_self``, ``delta``:
        RiskAverse's U at the layer's input and output and :meth:`expect`'s delta."""
        M, lam = self.M, self.lam
        if U is not None and self.T1 and not lam and self.stop is not True:
            return self._backward_doob(R, U, delta)
        if U is None:
            p, q, m, stop = self.p, self.q, self.m, self.stop
            Vp = Vn = None
            up, un = self.up, self.un
        else:  # Doob transform by U, multiplier reset to 1/(p_theta - q_theta)
            Vp, Vn = self.branch_values(U)
            p, q = safe_divide(self.p * Vp, U_self), safe_divide(self.q * Vn, U_self)
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
            cp = safe_divide(ap * (1 - lam), self.Dp if Vp is None else self.Dp * Vp)
            cn = safe_divide(an * (1 - lam), self.Dn if Vn is None else self.Dn * Vn)
        else:
            cp = safe_divide(ap, self.Dp if Vp is None else self.Dp * Vp)
            cn = safe_divide(an, self.Dn if Vn is None else self.Dn * Vn)
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
            stopped = stopped + bias_sum(cp, self.bp) - bias_sum(cn, self.bn)
        if not lam:
            del ap, an
        if self.fast:
            lower = self._fast_adjoint(cp, cn)
        elif un is None:
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
                oc = torch.where(op, lp if Vp is None else safe_divide(lp, Vp), 0.0)
                oc = oc - torch.where(on, ln if Vn is None else safe_divide(ln, Vn), 0.0)
                lower = lower + M.own_scatter(oc if U is None else oc * M.own_gather(U))
                lp, ln = torch.where(op, 0.0, lp), torch.where(on, 0.0, ln)
            ci_p = safe_divide(lp, self.Np if Vp is None else self.Np * Vp)
            ci_n = safe_divide(ln, self.Nn if Vn is None else self.Nn * Vn)
            if in_ is None:
                lower = lower + ip * M.pair_t(ci_p, -ci_n, ind=True)
            else:
                t1, t2 = M.cross_t(ci_p, -ci_n, ind=True)
                lower = lower + ip * t1 + in_ * t2
                del t1, t2
            if self.ibp is not None:
                stopped = stopped + bias_sum(ci_p, self.ibp) - bias_sum(ci_n, self.ibn)
        return lower, stopped

    def _backward_doob(self, R: Tensor, U: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """The Doob transform by U (I20) at route temperature 1 without an anchor, in closed form:
        p_theta = p V+/U, q_theta = q V-/U, m_theta = 1/(p_theta - q_theta) = U/delta and the routing
        pi(j|b) U_j / V_b, so the + branch share of unit i is m_theta R p_theta pi(j|+) U_j / V+ =
        (R p / delta) pi(j|+) U_j: the constant hand-over's backward with R/delta for m R and y U for
        y (V+- cancel; no branch values are recomputed). The token stops where delta = 0 (p_theta =
        q_theta, U = 0 there, or the base law's stop)."""
        zero = torch.eq(delta, 0, out=torch.empty_like(delta))
        stopped = torch.mul(R, zero).flatten(1).sum(1)
        Rm = safe_divide(R, delta, zero, consume=True)  # R/delta, 0 where delta = 0
        del zero
        self.up = self.up * U
        self.un = None if self.un is None else self.un * U
        return self._backward_const(R, Rm, self.p, self.q, stopped)

    def _backward_const(self, R: Tensor, Rm: Tensor, p: Any, q: Any, stopped: Tensor | None
                        ) -> tuple[Tensor, Tensor]:
        """backward at route temperature 1 without an anchor: a+ = Rm p, a- = Rm q (Rm = m R, 0 where
        stopped; RiskAverse's closed form passes R/delta, with y U for y); ``stopped``: the mass already stopped at the neurons (or None). c+ = a+ / D+ and
        c- = a- / D- are written over D+ and D- (the halves of one tensor where the map stacks them,
        which the adjoint then reads at once): with the 0/1 mask e of an empty branch (D = 0),
        c = Rm / (D + e) * share, the stopped mass is the sum of c e (a itself there) and c - c e is 0
        there. Arithmetic masks and in-place passes: one buffer of z's size beside D (no boolean
        reads, which cost ten multiplies each on CPU)."""
        M = self.M
        Dp, Dn, S = self.Dp, self.Dn, self.S
        self.Dp = self.Dn = self.S = self.p = self.q = self._full = None
        s2 = None
        for D, share in ((Dp, p), (Dn, q)):
            e = torch.eq(D, 0, out=torch.empty(D.shape, dtype=D.dtype, device=D.device))
            torch.div(Rm, D.add_(e), out=D)
            if not (isinstance(share, float) and share == 1.0):
                D.mul_(share)
            s = e.mul_(D).flatten(1).sum(1)  # the mass sent to the empty branch, stopped with its sign
            D.sub_(e)
            del e
            s2 = s if s2 is None else s2 - s
        del Rm
        stopped = s2 if stopped is None else stopped + s2
        cp, cn = Dp, Dn
        if self.bp is not None:  # the bias sink: sum over the neurons of c * b, per sample
            stopped = stopped + bias_sum(cp, self.bp) - bias_sum(cn, self.bn)
        up, un = self.up, self.un
        if self.fast:
            lower = self._fast_adjoint(cp, cn)
        elif un is None:
            lower = M.pair_t(cp, cn) if S is None else M.pair_t_buf(S)
            del S, cp, cn, Dp, Dn
            lower = lower.mul_(up)
        else:
            t1, t2 = M.cross_t(cp, cn) if S is None else M.cross_t_buf(S)
            del S, cp, cn, Dp, Dn
            lower = up * t1
            lower.sub_(un * t2)
        return lower, stopped

    def _fast_adjoint(self, cp: Tensor, cn: Tensor) -> Tensor:
        """sum_i cp_i max(Z_ij, 0) + cn_i min(Z_ij, 0) in the sum/difference form (``fast=True``):
        max(Z, 0) = (Z + |Z|)/2, min(Z, 0) = (Z - |Z|)/2, so the lower relevance is
        (y_j [W^T (cp + cn)]_j + |y_j| [|W|^T (cp - cn)]_j) / 2: two products. A branch whose weight
        part was found empty (:func:`_fast_sums`) sends nothing to the inputs (its bias share, if any,
        ended in the bias sink)."""
        if self.wp is not None:
            cp, cn = cp.masked_fill(~self.wp, 0.0), cn.masked_fill(~self.wn, 0.0)
        M, y = self.M, self.y
        lower = M.transpose(cp + cn).mul_(y)
        lower.addcmul_(M.transpose(cp - cn, "abs"), y.abs())
        return lower.mul_(0.5)


def fast_tolerance(dtype: torch.dtype) -> float:
    """kappa of the sum/difference form (``fast=True``): a branch whose weight part is at most kappa
    times A_i = sum_j |Z_ij| is taken as empty; kappa = 2 sqrt(eps) of the dtype (about 3e-8 in
    float64, 7e-4 in float32). docs/theory.md section 8, "fast": the bound this gives."""
    return 2.0 * math.sqrt(torch.finfo(dtype).eps)


def _fast_sums(M: Any, y: Tensor) -> tuple[Tensor, Tensor]:
    """The weight parts of the branch sums in the sum/difference form (``fast=True``): with
    z = W y and A = |W| |y| (two products), S+ = (z + A)/2 and S- = (z - A)/2, each set to exactly 0
    where it is at most kappa A in size (:func:`fast_tolerance`): within round-off of an empty
    branch, whose exact zero decides where mass stops (I14)."""
    A = M.apply(y.abs(), "abs")
    z = M.apply(y)
    Sp = torch.add(z, A).mul_(0.5)
    Sn = z.sub_(A).mul_(0.5)
    tol = A.mul_(fast_tolerance(y.dtype))
    Sp.masked_fill_(Sp <= tol, 0.0)
    Sn.masked_fill_(Sn >= tol.neg_(), 0.0)
    return Sp, Sn


def _routing_context(rule: "Rule", trace: "Trace", target: Tensor) -> dict:
    base, anchor, risk = routing_parts(rule)
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
    """The gradient equilibrium at one layer in its closed form (docs/theory.md I17): with p = S+/(S+ + |S-|)
    and m = (S+ + |S-|)/z both branches carry R_i / z_i per unit of |Z_ij|, so R^{l-1}_j =
    y_j sum_i W_ij R_i / z_i (LRP-0; no mass is ever handed to an empty branch); the token stops where
    z_i = 0 and the share R_i b_i / z_i ends in the bias sink. Two products instead of four."""
    lower, stopped = lrp0_backward(layer, r)
    ctx["stopped"] = ctx["stopped"] + stopped
    return lower


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
    U = U.reshape(layer.input_shape)
    if layer.map.pass_through:
        U_self = layer.map.apply(U)
        if layer.map.bias is not None:  # a unit made of a constant only (a cls token): the bias unit, U = 1
            U_self = U_self + (1 - layer.map.apply(torch.ones_like(U)))
    else:  # only U is kept per layer: the local law and the weight parts are rebuilt in the
        # backward sweep (one more pair of branch products per layer instead of holding the
        # model's weights twice over and every layer's buffers)
        U_self, delta = _local_of(layer, ctx).expect(U)
        ctx["local"].pop(id(layer), None)
        layer.map.drop_parts()
        ctx["U"][id(layer)] = (U, U_self, delta)  # a pass-through layer's relevance passes: no U kept
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
                shape = step.input_shape[:1] + step.input_shape[2:]
                u_in = torch.stack([u.expand(shape) for u in ins], dim=1)
            vals[step.out] = _u_layer(step, u_in, ctx)
        else:
            vals[step.out] = step.fn(*ins)


@dataclass(frozen=True)
class RoutingRule(LayerRule):
    """Shared torch implementation of the routing laws (the convention above), one batched sweep.

    Start R^L = f_k(x) at the target; MaxPool layers route to the argmax (winner takes all) whatever
    the law; the stopped mass (cemetery and bias sink) is accumulated in the sweep's ``stopped``.

    ``fast=True`` (AlphaBeta and RG at route temperature 1, the laws with one hand-over at every unit;
    off by default): on a layer whose
    input has both signs the branch sums and the adjoint take the sum/difference form, two products
    each way instead of four: S+- = (W y +- |W| |y|)/2, a branch whose weight part is at most kappa
    sum_j |Z_ij| in size taken as empty (:func:`fast_tolerance`), and R_j = (y_j [W^T (c+ + c-)]_j +
    |y_j| [|W|^T (c+ - c-)]_j)/2. Layers with a nonnegative input keep the exact form. The deviation
    from the exact law is bounded in docs/theory.md section 8 ("fast") and checked by
    tests/rules/test_fast.py. Only the torch relevance sweep reads it: the law (theory, Hellinger,
    occupation, validate_rule's named laws) is the exact one."""

    #: the sum/difference form (a field of AlphaBeta and RG; the other laws are always exact)
    fast = False

    def check_fast(self) -> None:
        """TypeError / ValueError where ``fast`` is set and the rule cannot take it (called by each law's
        ``__post_init__``)."""
        fast = self.fast
        if not isinstance(fast, bool):
            raise TypeError(f"fast must be True or False, got {fast!r}")
        if fast and float(getattr(self, "route_temp", 1.0)) != 1.0:
            raise ValueError(f"fast=True needs route_temp=1 (got {self.route_temp}): the sum/difference "
                             "form gives the branch sums of route temperature 1")
        base = getattr(self, "rule", None)
        if base is not None and routing_parts(base)[0].fast:
            raise ValueError(f"{type(self).__name__} takes an exact law: pass {type(routing_parts(base)[0]).__name__} "
                             "without fast=True (fast is built for AlphaBeta and RG on their own)")

    @property
    def pass_fields(self) -> frozenset:
        """None: the branch sums come from each layer's map and input (I14-I18)."""
        return frozenset()

    def start(self, trace: "Trace", target: Tensor) -> Tensor:
        return trace.onehot(target) * trace.output

    def sweep_context(self, trace: "Trace", target: Tensor) -> dict:
        return _routing_context(self, trace, target)

    def sweep_step(self, layer: "LayerTrace", r: Tensor, ctx: dict) -> Tensor:
        if layer.map.pass_through:  # a selection, a copy layer or a standalone gate: relevance passes
            lower = layer.map.transpose(r)
            if layer.map.bias is not None:  # units made of constants only: their mass is stopped
                ctx["stopped"] = ctx["stopped"] + r.flatten(1).sum(1) - lower.flatten(1).sum(1)
            return lower
        if ctx.get("lrp0_form"):
            return _equilibrium_backward(layer, r, ctx)
        U, U_self, delta = ctx["U"].pop(id(layer), (None, None, None))
        lower, stopped = _local_of(layer, ctx).backward(r, U, U_self, delta)
        ctx["local"].pop(id(layer), None)  # each layer is swept once: free its buffers
        ctx["stopped"] = ctx["stopped"] + stopped
        return lower

    def backward(self, layer: "LayerTrace", upper: Tensor) -> Tensor:
        """The law at one layer on its own (no anchor, no risk aversion; stopped mass dropped)."""
        ctx = {"stopped": torch.zeros(upper.shape[0], dtype=upper.dtype, device=upper.device),
               "base": routing_parts(self)[0], "anchor": None, "depth": 1, "local": {}, "U": {}}
        return self.sweep_step(layer, upper, ctx)


@dataclass(frozen=True)
class AlphaBeta(RoutingRule):
    """alpha-beta-LRP as a routing law (docs/theory.md I15): p = alpha/(alpha+beta), q = beta/(alpha+beta),
    m = alpha + beta, route temperature 1, so R_j = sum_i (alpha Z+_ij/S+_i - beta Z-_ij/S-_i) R_i
    (0/0 := 0). Conservative (I14) iff alpha - beta = 1; other values need ``conservative=False``.
    ``fast=True``: the sum/difference form on inputs of both signs (:class:`RoutingRule`)."""

    alpha: float = 2.0
    beta: float = 1.0
    conservative: bool = True
    fast: bool = option()

    def __post_init__(self) -> None:
        check_finite("alpha", self.alpha)
        check_finite("beta", self.beta)
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta <= 0:
            raise ValueError(f"need alpha, beta >= 0 and alpha + beta > 0, got {self.alpha}, {self.beta}")
        if self.conservative and self.alpha - self.beta != 1:
            raise ValueError(
                f"alpha - beta != 1 (alpha={self.alpha}, beta={self.beta}) breaks conservation (I14); "
                "pass conservative=False to use it anyway"
            )
        self.check_fast()

    def handover(self, Sp: Tensor, Sn: Tensor) -> Handover:
        """I15: p = alpha/(alpha+beta), q = beta/(alpha+beta), m = alpha + beta, never stopped."""
        a, b = float(self.alpha), float(self.beta)
        return Handover(a / (a + b), b / (a + b), 0.0, a + b)


@dataclass(frozen=True)
class RG(RoutingRule):
    """The routing game RG(tau, T) (docs/theory.md I16): Gibbs hand-over p = sigmoid(1/tau), the maximiser
    of p + tau H(p); m = 1/(p - q) = coth(1/(2 tau)); route temperature T (I19). T = 1 is alpha-beta
    with alpha = 1/(1 - e^(-1/tau)), beta = 1/(e^(1/tau) - 1); the default tau = 1/ln 2 is alpha=2, beta=1.
    ``fast=True`` (route temperature 1): the sum/difference form on inputs of both signs (:class:`RoutingRule`)."""

    tau: float = 1.0 / math.log(2.0)
    route_temp: float = 1.0
    fast: bool = option()

    def __post_init__(self) -> None:
        check_positive("tau", self.tau)
        check_positive("route_temp", self.route_temp)
        self.check_fast()

    def handover(self, Sp: Tensor, Sn: Tensor) -> Handover:
        """I16: the Gibbs hand-over p = sigmoid(1/tau), m = 1/(p - q) (stopped where p = q)."""
        return constant_handover(1.0 / (1.0 + math.exp(-1.0 / self.tau)))


@dataclass(frozen=True)
class RGEq(RoutingRule):
    """RG+Eq(kappa, nu, T) (docs/theory.md I18): log-odds(p) = kappa + nu log(S+/|S-|), m = 1/(p - q),
    route temperature T. (log(alpha/beta), 0) is alpha-beta; (0, 1) the gradient equilibrium.
    With nu > 0, S- = 0 gives p = 1 and S+ = 0 gives p = 0; where p = q the token is stopped."""

    kappa: float = 0.0
    nu: float = 1.0
    route_temp: float = 1.0

    def __post_init__(self) -> None:
        check_finite("kappa", self.kappa)
        check_finite("nu", self.nu)
        if self.nu < 0:
            raise ValueError(f"nu must be >= 0, got {self.nu}")
        check_positive("route_temp", self.route_temp)

    def handover(self, Sp: Tensor, Sn: Tensor) -> Handover:
        """I18: log-odds(p) = kappa + nu log(S+/|S-|) (nu > 0: p = 1 where S- = 0, p = 0 where S+ = 0),
        m = 1/(p - q); the token stops where p = q (both branches empty included)."""
        kappa, nu = float(self.kappa), float(self.nu)
        if nu == 0:
            return constant_handover(1.0 / (1.0 + math.exp(-kappa)))
        pos, neg = Sp > 0, Sn < 0
        both = pos & neg
        lo = kappa + nu * (torch.log(torch.where(both, Sp, 1.0)) - torch.log(torch.where(both, -Sn, 1.0)))
        p = torch.where(both, torch.sigmoid(lo), torch.where(pos, 1.0, torch.where(neg, 0.0, 0.5)))
        q = 1 - p
        stop = p == q
        m = torch.where(stop, 0.0, 1 / torch.where(stop, 1.0, p - q))
        return Handover(torch.where(stop, 0.0, p), torch.where(stop, 0.0, q), stop.to(Sp.dtype), m)


@dataclass(frozen=True)
class GradientEquilibrium(RoutingRule):
    """The gradient equilibrium (docs/theory.md I17): p = S+/(S+ + |S-|), m = (S+ + |S-|)/z_i (z_i != 0;
    where z_i = 0 the token is stopped), route temperature 1. It is RGEq(0, 1, 1) and gives LRP-0,
    i.e. Gradient x Input on a bias-free ReLU net: the Doob (|y|-) transform of the GV kernel."""

    @property
    def pass_fields(self) -> frozenset:
        """z, read in the closed LRP-0 form (``recursion_terms``: not kept where y stands for it)."""
        return frozenset({"z"})

    def handover(self, Sp: Tensor, Sn: Tensor) -> Handover:
        """I17: p = S+/(S+ + |S-|), m = (S+ + |S-|)/z, the token stopped where z = 0."""
        return equilibrium_handover(Sp, Sn)


@dataclass(frozen=True)
class Anchor(RoutingRule):
    """Extended action set (docs/theory.md section 8): routing pi_lam = (1 - lam) pi + lam u; lam = 0 is
    the base law.

    ``anchor="uniform"`` (default): u uniform on the branch support (bias unit included), at every
    layer; ``lam`` a number or one per layer (torch order, layer 1 first).
    ``anchor="token"`` (ViTs only, docs/theory.md section 10): the anchor acts at the token-mixing edges of
    attention only; at the attention neuron (query q, feature d) u is the query's own token (q, d)
    when its contribution A_qq v_qd lies in the branch, else uniform on the branch; ``lam`` a number
    or one per block. Every other layer (LayerNorm, Linear, GELU, add nodes) keeps the base law."""

    rule: Rule = RG()
    lam: float | tuple = 0.1
    anchor: str = "uniform"

    def __post_init__(self) -> None:
        if not isinstance(self.rule, (AlphaBeta, RG, RGEq, GradientEquilibrium)):
            raise TypeError(f"Anchor needs a routing law, got {type(self.rule).__name__}")
        self.check_fast()
        lams = self.lam if isinstance(self.lam, tuple) else (self.lam,)
        for v in lams:
            check_finite("lam", v)
            if not 0 <= v <= 1:
                raise ValueError(f"lam must lie in [0, 1], got {v}")
        if self.anchor not in ("uniform", "token"):
            raise ValueError(f"unknown anchor {self.anchor!r} ('uniform', or 'token' for ViTs)")

    def lam_at(self, layer: int, depth: int) -> float:
        """lam of torch layer ``layer`` (1..depth); for the token anchor of block ``layer``."""
        if not isinstance(self.lam, tuple):
            return self.lam
        unit = "blocks" if self.anchor == "token" else "layers"
        if len(self.lam) != depth:
            raise ValueError(f"lam has {len(self.lam)} entries, the net has {depth} {unit}")
        if not 1 <= layer <= depth:  # never a silent lam[-1]
            raise ValueError(f"no {unit[:-1]} {layer}: the net has {unit} 1..{depth}")
        return self.lam[layer - 1]


@dataclass(frozen=True)
class RiskAverse(RoutingRule):
    """Risk aversion (docs/theory.md I20): with cost X = c_j = sigma^2 / x_j^2 at the input reached (0 for
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
        self.check_fast()
        check_finite("theta", self.theta)
        check_positive("sigma", self.sigma)
