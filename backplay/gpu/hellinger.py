"""Hellinger distance between the trajectory laws of two rules, on any model (docs/theory.md I21).

Two routing laws P, Q started at the same state (L, target, +) are compared by

    H = sqrt(1 - BC),   BC(s) = sum_{s'} sqrt(K_P(s, s') K_Q(s, s')) BC(s'),

with BC = 1 at the inputs, the cemetery and the bias sink (I21, docs/theory.md section 8). The
multipliers m do not enter: H is a distance between path laws ("how the two rules compute"), not
between heatmaps. :func:`hellinger` computes BC for a batch by ONE sweep of the Bhattacharyya
kernel sqrt(K_P K_Q) over the operation graph of :mod:`backplay.gpu.read` (docs/theory.md section 11),
from the input up to the output, in torch order (backward in game time).

The kernel of a routing law at unit i of a layer (the convention of :mod:`backplay.rules.routing`):
hand-over h+ (the + branch {j : W_ij y_j > 0}, sign kept) and h- (the - branch, sign flipped),
routing pi(j | i, b) = |W_ij| g_j / D_b(i) on the branch with g = |y|^(1/T) (the bias a unit of
weight |b_i| and g = 1 whose moves end in the bias sink), and the cemetery: the whole token where
the law stops it, plus the hand-over to an empty branch (these moves merge into ONE move to the
cemetery, as in the exact law). Since K(l, i, s -> l-1, j, s b) does not depend on s except through
the branch label b, BC(l, i, +) = BC(l, i, -) by induction from the inputs: one BC value per unit.

Computation per layer (``a`` and ``b`` the two laws):

* **factorised** (neither law anchored at this layer): K(i -> j via branch c) = k_c(i) |W_ij| g_j
  with k_c = h_c / D_c, so
  BC_i = sqrt(cem_a cem_b) + sum_c sqrt(k_c^a k_c^b) [ sum_{j in c} |W_ij| sqrt(g^a_j g^b_j) BC_j
  + |b_i| 1{b_i in c} ]: one product of the branch parts W+, |W-| per layer (two laws with different
  route temperatures T_a, T_b get |y|^((1/T_a + 1/T_b)/2), each its own D);
* **edge-level** (an :class:`~backplay.rules.Anchor` with lam != 0 at this layer: pi = (1 - lam)
  pi0 + lam u does not factor under the square root; a single-branch law): the kernel is summed
  edge by edge on the layer's edge list (each output unit's K incoming edges,
  :meth:`~backplay.gpu.ops.LinearOp.edges`; both laws of such a pair on that layer; the other pairs
  stay factorised);
* **pass-through** layers (max selection, copy rows, a standalone gate): K = 1 to the winner in
  every law, so BC is carried by the map itself; a unit made of constants only moves to the bias
  sink (BC = 1); **layout** steps copy BC as they copy values; a **sum node** is a layer with two
  contributions per unit.

:class:`~backplay.rules.RiskAverse` is its Doob transform (I20): K_theta(s, s') = K(s, s')
U(s')/U(s) with U = E[exp(-theta X)], carried up in the same sweep (U at a layer's output is the
expectation of U at its input under the base kernel), so k_c -> k_c / U_i, g -> g U_j,
cem -> cem / U_i, and the token stops where U_i = 0 or p_theta = q_theta (as in the exact law).

Numerics: the sweep carries d = 1 - BC, not BC: d(s) = Delta(s) + sum_s' sqrt(K_P K_Q)(s, s') d(s')
with the local deficit Delta = sum_s' (sqrt K_P - sqrt K_Q)^2 / 2 >= 0 written as a sum of
nonnegative terms, so H = sqrt(d) keeps its digits when it is small (H(P, P) = 0 exactly), where
sqrt(1 - BC) would lose half of them.

Cost: factorised layers cost about two branch products (S+/S- and the sweep; one more per law with
T != 1 or risk aversion); edge-level (anchored) layers materialise the layer's matrix, which is
for small models only (a ValueError names the layer when it exceeds :data:`MAX_EDGES` entries).

Rules accepted (:data:`SIGNED_BRANCH`, one entry per base law): AlphaBeta (and ZPlus), RG, RGEq,
GradientEquilibrium (and LRP0, its law, I17), Epsilon, Gamma (docs/theory.md section 12), and Anchor
(uniform or token) / RiskAverse of the routing laws. A further law whose branches are the signs of
W_ij y_j is one entry there (its hand-over from S+ and S-). The single-branch laws
(:data:`SINGLE_BRANCH`: Flat, routing 1{W_ij != 0}, and WSquare, routing W_ij^2 with the bias unit
b_i^2; p = 1, every move keeps the sign, whatever y) are compared edge by edge (an edge with
W_ij y_j < 0 leads to (j, s) in them and to (j, -s) in a sign-branch law: the two branches are kept
apart). ZBox is a single-branch law at the first layers, routing c_ij = y_j W_ij - low_j W+_ij -
high_j W-_ij (the bounds followed from the input through layout steps, :meth:`ZBox.bounds_at`), also
edge by edge. A :class:`~backplay.rules.Composite` is its rule's law at each layer (by kind, module
and first layer, as its sweep picks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from backplay.gpu.engine import check_rule_instance, prepare, resolve_target
from backplay.gpu.trace import LayerTrace, Trace
from backplay.rules import (
    LRP0, RG, AlphaBeta, Anchor, Composite, Epsilon, Flat, Gamma, GradientEquilibrium, RGEq, RiskAverse, Rule,
    WSquare, ZBox, first_layers, safe_divide,
)
from backplay.rules.routing import routing_parts

Tensor = torch.Tensor

__all__ = ["SIGNED_BRANCH", "MAX_EDGES", "SINGLE_BRANCH", "HellingerMatrix", "hellinger", "hellinger_matrix"]

#: the largest B * n_out * n_in an anchored (edge-level) layer may materialise
MAX_EDGES = 50_000_000


#: single-branch laws (docs/theory.md section 12: p = 1, sign kept, routing along the edges W_ij != 0
#: whatever y): routing weight per edge from the coefficient W, and the bias unit's weight from b
#: (None: no bias unit). Compared edge by edge (their routing is not |W| |y|^(1/T)).
SINGLE_BRANCH: dict[type, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor] | None]] = {
    Flat: (lambda W: (W != 0).to(W.dtype), None),  # zennit zeroes the bias: no bias unit
    WSquare: (lambda W: W * W, lambda b: b * b),
}


#: the laws whose branches are the signs of W_ij y_j and whose routing is |W_ij| |y_j|^(1/T): each
#: declares its hand-over (``handover(S+, S-)``, :class:`backplay.rules.Handover`); with their
#: subclasses (ZPlus = AlphaBeta(1, 0)), and Anchor / RiskAverse of the routing laws. LRP0 is the
#: gradient equilibrium's law (I17), Epsilon and Gamma the zoo's (docs/theory.md section 12).
SIGNED_BRANCH = (AlphaBeta, RG, RGEq, GradientEquilibrium, LRP0, Epsilon, Gamma)


def _single(base: Rule) -> bool:
    """A single-branch law: Flat, WSquare (:data:`SINGLE_BRANCH`) or ZBox (routing c_ij / D_i)."""
    return type(base) in SINGLE_BRANCH or isinstance(base, ZBox)


def _known(base: Rule) -> bool:
    return isinstance(base, SIGNED_BRANCH) or _single(base)


@dataclass(frozen=True)
class _Law:
    """A rule as a kernel: base law, anchor (or None), risk aversion (or None), route exponent 1/T."""

    base: Rule
    anchor: Anchor | None
    risk: RiskAverse | None

    @property
    def inv_t(self) -> float:
        return 1.0 / float(getattr(self.base, "route_temp", 1.0))

    def lam(self, layer: LayerTrace, trace: Trace) -> tuple[float, bool]:
        """(lam, token anchor) at this layer, as the torch rule applies them."""
        a = self.anchor
        if a is None:
            return 0.0, False
        if a.anchor == "token":  # attention layers only, lam per block
            if layer.block is None:
                return 0.0, False
            return float(a.lam_at(layer.block + 1, trace.n_blocks)), True
        return float(a.lam_at(layer.index, trace.n_layers)), False


    def at(self, layer: LayerTrace, firsts: frozenset) -> "_Law":
        """The law at this layer: a composite's rule for the layer (its kind, module, first or not)."""
        if not isinstance(self.base, Composite):
            return self
        return _Law(self.base.rule_at(layer.kind, layer.module, layer.index in firsts), None, None)


def _law(rule: Any) -> _Law:
    accepted = (", ".join(c.__name__ for c in SIGNED_BRANCH + tuple(SINGLE_BRANCH) + (ZBox,))
                + ", Anchor and RiskAverse of the routing laws, and composites of these")
    if not isinstance(rule, Rule):
        raise TypeError(f"a rule must be a backplay.rules.Rule, got {type(rule).__name__}")
    base, anchor, risk = routing_parts(rule)
    subs = base.rules() if isinstance(base, Composite) else (base,)
    if not all(_known(r) for r in subs):
        bad = next(r for r in subs if not _known(r))
        raise TypeError(f"{bad.name} is not a trajectory law the Hellinger distance (I21) compares here "
                        f"(gradients, non-LRP rules); accepted: {accepted}")
    return _Law(base, anchor, risk)


# -- one layer ------------------------------------------------------------------------------------
class _Layer:
    """What every law reads at one layer: the map, y, the bias b (z's shape), the branch sums
    S+, S- at route temperature 1 (bias included) and the branch-sum operator."""

    def __init__(self, layer: LayerTrace) -> None:
        M, y = layer.map, layer.input
        self.layer, self.M, self.y = layer, M, y
        self.ypos, self.yneg = y > 0, y < 0
        self.nonneg = not bool(self.yneg.any())
        self.b = M.bias_like(layer.y)  # z has y's shape (the gate is elementwise)
        self.Sp, Sn = self.sums(y.abs())
        self.Sn = -Sn
        self.full_p, self.full_n = self.Sp > 0, self.Sn < 0

    def sums(self, v: Tensor, with_bias: bool = True) -> tuple[Tensor, Tensor]:
        """Branch sums of a nonnegative v over the lower units: (sum_{j in +} |W_ij| v_j,
        sum_{j in -} |W_ij| v_j), the bias unit (v = 1, weight |b_i|) in the branch of its sign."""
        M = self.M
        if self.nonneg:
            first, N = M.pair(torch.where(self.ypos, v, 0.0))
            second = torch.zeros_like(first) if N is None else -N
        else:
            first, second = M.cross(torch.where(self.ypos, v, 0.0), -torch.where(self.yneg, v, 0.0))
            second = -second
        if with_bias and self.b is not None:
            first, second = first + self.b.clamp_min(0), second + (-self.b).clamp_min(0)
        return first, second

    def g(self, law: _Law) -> Tensor:
        """The lower factor |y|^(1/T) of the routing weights."""
        a = self.y.abs()
        return a if law.inv_t == 1.0 else a.pow(law.inv_t)


@dataclass
class _Factor:
    """A law's kernel at one layer in factorised form: the token takes the non-empty branch c with
    probability ``t_c`` and moves to j in it with pi(j) = |W_ij| g_j / ``N_c`` (the bias unit:
    |b_i| / N_c, to the bias sink); the cemetery move is ``stop`` (the whole token) plus ``cem_p`` /
    ``cem_n`` (the hand-over to an empty + / - branch)."""

    t_p: Tensor
    t_n: Tensor
    N_p: Tensor
    N_n: Tensor
    stop: Tensor
    cem_p: Tensor
    cem_n: Tensor
    g: Tensor


@dataclass
class _Edges:
    """A law's kernel at one layer edge by edge: ``idx`` [n_out, K] the input units of each output
    unit's edges (the map's edge list, :meth:`~backplay.gpu.ops.LinearOp.edges`), ``Pp`` / ``Pn``
    [B, n_out, K] the move along each edge per branch (an edge lies in one branch; padding: 0),
    ``bias_*`` [B, n_out] the move to the bias sink, ``stop``, ``cem_*`` as in :class:`_Factor`
    (flattened to [B, n_out])."""

    idx: Tensor
    Pp: Tensor
    Pn: Tensor
    bias_p: Tensor
    bias_n: Tensor
    stop: Tensor
    cem_p: Tensor
    cem_n: Tensor


def _cemetery(K: _Factor | _Edges) -> Tensor:
    """The kernel's move to the cemetery: the whole token's stop and the hand-overs to empty branches."""
    return K.stop + K.cem_p + K.cem_n


def _handover(law: _Law, L: _Layer) -> tuple[Tensor, Tensor, Tensor]:
    """(h+, h-, stop) per unit: the law's declared hand-over, a constant one spread over the units."""
    h = law.base.handover(L.Sp, L.Sn)
    return tuple(torch.full_like(L.Sp, v) if isinstance(v, float) else v for v in (h.plus, h.minus, h.stop))


def _factor(law: _Law, L: _Layer) -> _Factor:
    hp, hn, stop = _handover(law, L)
    g = L.g(law)
    if law.inv_t == 1.0:
        Np, Nn = L.Sp, -L.Sn
    else:
        Np, Nn = L.sums(g)
    return _Factor(torch.where(L.full_p, hp, 0.0), torch.where(L.full_n, hn, 0.0), Np, Nn, stop,
                   torch.where(L.full_p, 0.0, hp), torch.where(L.full_n, 0.0, hn), g)


def _edge_list(M: Any, y: Tensor, where: LayerTrace) -> tuple[Tensor, Tensor]:
    """The map's edges at y: (coef [B, n_out, K], idx [n_out, K]), within :data:`MAX_EDGES`."""
    B, n_out = y.shape[0], math.prod(where.y.shape[1:])
    coef, idx = M.edges(y)
    if B * n_out * idx.shape[1] > MAX_EDGES:
        raise ValueError(f"an Anchor or single-branch (Flat, WSquare, ZBox) law is compared edge by edge: layer "
                         f"{where.index} ({where.kind}, {where.where or 'no source line'}) has {n_out} x "
                         f"{idx.shape[1]} edges per sample, more than backplay.gpu.hellinger.MAX_EDGES = "
                         f"{MAX_EDGES} for the batch of {B}; pass fewer samples at once, or compare the "
                         "unanchored laws")
    return coef.expand(B, -1, -1), idx


def _at(v: Tensor, idx: Tensor) -> Tensor:
    """A per-unit tensor [B, *shape] read along the edges: [B, n_out, K]."""
    return v.reshape(v.shape[0], -1)[:, idx]


def _edges(law: _Law, L: _Layer, E: tuple[Tensor, Tensor], lam: float, token: bool) -> _Edges:
    """The kernel edge by edge on the map's edge list ``E`` = (coef, idx). Anchor: pi = (1 - lam) pi0
    + lam u with u uniform on the branch support (the bias unit included), or for the token anchor
    the own unit where it lies in the branch (else uniform), as :class:`backplay.rules.Anchor`
    defines them."""
    W, idx = E
    B = W.shape[0]
    Z = W * _at(L.y, idx)
    w = W.abs() * _at(L.g(law), idx)
    b = torch.zeros(W.shape[:2], dtype=W.dtype, device=W.device) if L.b is None else L.b.reshape(B, -1)
    hp, hn, stop = (t.reshape(B, -1) for t in _handover(law, L))
    own = None
    if lam and token:  # each row's own unit: M.own_gather of the unit numbers
        units = torch.arange(math.prod(L.y.shape[1:]), dtype=W.dtype, device=W.device).reshape(L.y.shape[1:])
        own_unit = L.M.own_gather(units.expand(L.y.shape)).reshape(B, -1, 1).long()
        own = idx.unsqueeze(0) == own_unit
    out = []
    for h, mask, bmask in ((hp, Z > 0, b > 0), (hn, Z < 0, b < 0)):
        wb, bb = torch.where(mask, w, 0.0), torch.where(bmask, b.abs(), 0.0)
        D = wb.sum(-1) + bb
        pi, pib = safe_divide(wb, D.unsqueeze(-1)), safe_divide(bb, D)
        if lam:
            n = mask.sum(-1).to(W.dtype) + bmask.to(W.dtype)
            u, ub = safe_divide(mask.to(W.dtype), n.unsqueeze(-1)), safe_divide(bmask.to(W.dtype), n)
            if own is not None:
                inb = (own & mask).any(-1)
                u = torch.where(inb.unsqueeze(-1), own.to(W.dtype), u)
                ub = torch.where(inb, 0.0, ub)
            pi, pib = (1 - lam) * pi + lam * u, (1 - lam) * pib + lam * ub
        out += [h.unsqueeze(-1) * pi, h * pib]
    full_p, full_n = L.full_p.reshape(B, -1), L.full_n.reshape(B, -1)
    return _Edges(idx, out[0], out[2], out[1], out[3], stop, torch.where(full_p, 0.0, hp),
                  torch.where(full_n, 0.0, hn))


def _single_edges(law: _Law, L: _Layer, E: tuple[Tensor, Tensor], box: tuple | None) -> _Edges:
    """A single-branch law edge by edge: every move keeps the sign, pi(j | i) = w_ij / D_i over the
    edges and the bias unit (to the bias sink), D_i = 0: the cemetery. Flat and WSquare
    (:data:`SINGLE_BRANCH`): w_ij from the coefficient W_ij on the edges from units (the zeros a layout
    step writes are none: ``LayerTrace.unit_mask``); ZBox: w_ij = c_ij = y_j W_ij - low_j W+_ij
    - high_j W-_ij with ``box`` = (low, high) at the layer's input (0 at those zeros), no bias unit."""
    W, idx = E
    B = W.shape[0]
    zero = torch.zeros(W.shape[:2], dtype=W.dtype, device=W.device)
    if isinstance(law.base, ZBox):
        lo, hi = box
        w = W * _at(L.y, idx) - W.clamp_min(0) * _at(lo, idx) - W.clamp_max(0) * _at(hi, idx)
        bb = zero
    else:
        route, bias_weight = SINGLE_BRANCH[type(law.base)]
        w = route(W) * _at(L.layer.unit_mask(), idx)
        bb = zero if bias_weight is None or L.b is None else bias_weight(L.b.reshape(B, -1))
    D = w.sum(-1) + bb
    return _Edges(idx, safe_divide(w, D.unsqueeze(-1)), torch.zeros_like(w), safe_divide(bb, D), zero,
                  (D == 0).to(W.dtype), zero, zero)


def _doob(K: _Factor | _Edges, L: _Layer, U_in: Tensor) -> tuple[_Factor | _Edges, Tensor]:
    """I20: K_theta(s, s') = K(s, s') U(s')/U(s) (U = 1 at the bias sink and the cemetery), the
    token stopped where U(s) = 0 or p_theta = q_theta (the exact law's convention). Returns the
    transformed kernel and U at the layer's output, U(s) = sum_s' K(s, s') U(s')."""
    if isinstance(K, _Factor):
        sp, sn = L.sums(K.g * U_in)  # N_c V_c: the branch sums of the weights times U
        bp, bn = safe_divide(K.t_p, K.N_p) * sp, safe_divide(K.t_n, K.N_n) * sn
        mp, mn = bp + K.cem_p, bn + K.cem_n
    else:
        u = _at(U_in, K.idx)
        mp = (K.Pp * u).sum(-1) + K.bias_p + K.cem_p
        mn = (K.Pn * u).sum(-1) + K.bias_n + K.cem_n
    U = mp + mn + K.stop
    halt = (U == 0) | (safe_divide(mp, U) == safe_divide(mn, U))
    inv = safe_divide(torch.ones_like(U), U)

    def scale(t: Tensor) -> Tensor:
        return torch.where(halt, 0.0, t * inv)

    stop = torch.where(halt, 1.0, K.stop * inv)
    if isinstance(K, _Factor):
        out: _Factor | _Edges = _Factor(scale(bp), scale(bn), sp, sn, stop, scale(K.cem_p), scale(K.cem_n),
                                        K.g * U_in)
    else:
        h3 = halt.unsqueeze(-1)
        row = inv.unsqueeze(-1)
        out = _Edges(K.idx, torch.where(h3, 0.0, K.Pp * row * u), torch.where(h3, 0.0, K.Pn * row * u),
                     scale(K.bias_p), scale(K.bias_n), stop, scale(K.cem_p), scale(K.cem_n))
        U = U.reshape(L.layer.y.shape)
    return out, U


def _root(a: Tensor, b: Tensor) -> Tensor:
    """sqrt(a b) elementwise (a itself when a is b: the kernel paired with itself)."""
    return a if a is b else (a * b).sqrt()


def _half_sq(a: Tensor, b: Tensor) -> Tensor:
    """(sqrt(a) - sqrt(b))^2 / 2 elementwise."""
    return (a.sqrt() - b.sqrt()).square() * 0.5


def _deficit_layer(Ka: _Factor | _Edges, Kb: _Factor | _Edges, L: _Layer, d: Tensor) -> Tensor:
    """d = 1 - BC at the layer's output from d at its input (d = 0 at the bias sink and the cemetery):
    1 - BC(s) = Delta(s) + sum_s' sqrt(K_a K_b)(s, s') d(s'), with the local deficit
    Delta(s) = 1 - sum_s' sqrt(K_a K_b)(s, s') = sum_s' (sqrt K_a - sqrt K_b)^2 / 2 computed as a sum
    of nonnegative terms (no cancellation: H(a, a) = 0 exactly and small H keep their digits)."""
    if isinstance(Ka, _Edges):  # the two branches apart: an edge leads to (j, s) in one, (j, -s) in the other
        out = ((_root(Ka.Pp, Kb.Pp) + _root(Ka.Pn, Kb.Pn)) * _at(d, Ka.idx)).sum(-1)
        out = out + _half_sq(Ka.Pp, Kb.Pp).sum(-1) + _half_sq(Ka.Pn, Kb.Pn).sum(-1)
        out = out + _half_sq(Ka.bias_p + Ka.bias_n, Kb.bias_p + Kb.bias_n)
        return (out + _half_sq(_cemetery(Ka), _cemetery(Kb))).reshape(L.layer.y.shape)
    # branch c: sqrt(t_a t_b) sum_j sqrt(pi_a pi_b) d_j, pi = |W_ij| g_j / N_c
    sp, sn = L.sums(_root(Ka.g, Kb.g) * d, with_bias=False)
    kp = safe_divide(_root(Ka.t_p, Kb.t_p), _root(Ka.N_p, Kb.N_p))
    kn = safe_divide(_root(Ka.t_n, Kb.t_n), _root(Ka.N_n, Kb.N_n))
    out = kp * sp + kn * sn
    # Delta: hand-over and cemetery terms, then the routing terms sqrt(t_a t_b) (1 - rho_c) with
    # rho_c = sum_j sqrt(pi_a pi_b) (= 1 exactly where both laws route alike: the same g)
    out = out + _half_sq(Ka.t_p, Kb.t_p) + _half_sq(Ka.t_n, Kb.t_n) + _half_sq(_cemetery(Ka), _cemetery(Kb))
    if not (Ka.g is Kb.g or torch.equal(Ka.g, Kb.g)):
        rp, rn = L.sums(_root(Ka.g, Kb.g))
        out = out + _root(Ka.t_p, Kb.t_p) * (1 - safe_divide(rp, _root(Ka.N_p, Kb.N_p))).clamp_min(0)
        out = out + _root(Ka.t_n, Kb.t_n) * (1 - safe_divide(rn, _root(Ka.N_n, Kb.N_n))).clamp_min(0)
    return out


# -- the sweep ------------------------------------------------------------------------------------
def _risk_start(risk: RiskAverse, x: Tensor) -> Tensor:
    """U at the inputs: exp(-theta sigma^2 / x^2), 0 at x = 0 (never reached); 1 for theta = 0."""
    theta, s2 = float(risk.theta), float(risk.sigma) ** 2
    if theta == 0:
        return torch.ones_like(x)
    nz = x != 0
    return torch.where(nz, torch.exp(-theta * s2 / torch.where(nz, x, 1.0) ** 2), 0.0)


def _stack(step: LayerTrace, ins: list) -> Tensor:
    if len(ins) == 1:
        return ins[0].reshape(step.input_shape)
    shape = step.input_shape[:1] + step.input_shape[2:]
    return torch.stack([u.expand(shape) for u in ins], dim=1)


def _pass(step: LayerTrace, f: Tensor, sink: float) -> Tensor:
    """A pass-through layer: K = 1 to the winner; a unit made of constants only moves to the bias
    sink, where f is ``sink`` (U = 1, 1 - BC = 0)."""
    out = step.map.apply(f)
    if step.map.bias is not None and sink:
        out = out + sink * (1 - step.map.apply(torch.ones_like(f)))
    return out


def _sweep(trace: Trace, laws: list, pairs: list) -> list:
    """1 - BC at the output (tensor [B, n_out]) for each pair (a, b) of law indices, by one sweep over
    the steps in torch order; the U of the risk-averse laws is carried along (I20)."""
    last = {}  # tensor id -> index of the last step that reads it
    for k, step in enumerate(trace.steps):
        for s in step.sources:
            last[s] = k
    risky = [i for i, law in enumerate(laws) if law.risk is not None]
    firsts = first_layers(trace) if any(isinstance(law.base, Composite) for law in laws) else frozenset()
    boxes = {id(r): r.bounds_at(trace) for law in laws
             for r in (law.base.rules() if isinstance(law.base, Composite) else (law.base,)) if isinstance(r, ZBox)}
    vals: dict = {0: {("d", p): torch.zeros_like(trace.x) for p in pairs}}
    vals[0].update({("u", i): _risk_start(laws[i].risk, trace.x) for i in risky})
    for k, step in enumerate(trace.steps):
        ins = [vals[s] for s in step.sources]
        keys = ins[0].keys()
        if not isinstance(step, LayerTrace):
            out = {key: step.fn(*[d[key] for d in ins]) for key in keys}
        else:
            f_in = {key: _stack(step, [d[key] for d in ins]) for key in keys}
            if step.map.pass_through:
                out = {key: _pass(step, f, 1.0 if key[0] == "u" else 0.0) for key, f in f_in.items()}
            else:
                out = _layer_step(step, trace, laws, pairs, f_in, firsts, boxes)
        vals[step.out] = out
        for s in set(step.sources):
            if last.get(s) == k and s != trace.output_id:
                del vals[s]
    top = vals[trace.output_id]
    B = trace.x.shape[0]
    return [top[("d", p)].reshape(B, -1) for p in pairs]


def _layer_step(step: LayerTrace, trace: Trace, laws: list, pairs: list, f_in: dict, firsts: frozenset,
                boxes: dict) -> dict:
    """One layer for every pair: edge by edge for the pairs with an anchored or single-branch law at
    this layer, factorised for the others (a law in both kinds of pairs gets both forms of its kernel).
    ``boxes``: each ZBox's bounds at its first layers ({id(rule): {layer index: (low, high)}})."""
    L = _Layer(step)
    used = sorted({i for p in pairs for i in p})
    here = {i: laws[i].at(step, firsts) for i in used}  # a composite's law at this layer
    edge_level = {i: bool(here[i].lam(step, trace)[0]) or _single(here[i].base) for i in used}
    by_edge = {p: edge_level[p[0]] or edge_level[p[1]] for p in pairs}
    need = {(i, e) for p, e in by_edge.items() for i in p}
    E = _edge_list(step.map, step.input, step) if any(by_edge.values()) else None
    out: dict = {}
    kernels = {}
    for i, e in sorted(need):
        law = here[i]
        if _single(law.base):
            box = law.base.box_at(step, boxes[id(law.base)]) if isinstance(law.base, ZBox) else None
            K = _single_edges(law, L, E, box)
        else:
            K = _edges(law, L, E, *law.lam(step, trace)) if e else _factor(law, L)
        if law.risk is not None:
            K, out[("u", i)] = _doob(K, L, f_in[("u", i)])
        kernels[(i, e)] = K
    for p, e in by_edge.items():
        out[("d", p)] = _deficit_layer(kernels[(p[0], e)], kernels[(p[1], e)], L, f_in[("d", p)])
    return out


# -- public ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HellingerMatrix:
    """:func:`hellinger_matrix`'s result: ``rules`` the rule names (row / column order) and
    ``values`` the distances, [B, n, n] (symmetric, zero diagonal; [n, n] for one sample)."""

    rules: tuple
    values: Tensor

    def mean(self) -> Tensor:
        """The matrix averaged over the batch, [n, n]."""
        return self.values if self.values.ndim == 2 else self.values.mean(0)

    def __repr__(self) -> str:
        batch = "one sample" if self.values.ndim == 2 else f"batch {self.values.shape[0]}"
        top = f", max {float(self.values.max()):.4g}" if self.values.numel() else ""
        return f"HellingerMatrix(rules={self.rules}, {batch}, values {tuple(self.values.shape)}{top})"


def _deficits(model: Any, x: Any, target: Any, rules: Sequence[Rule], pairs: list | None = None
              ) -> tuple[list, list, Any]:
    laws = [_law(r) for r in rules]
    prep = prepare(model, x)
    if prep.tokens:
        raise TypeError("hellinger takes floating inputs (a language model's token ids are not supported)")
    n = len(laws)
    if pairs is None:
        pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    with torch.no_grad():
        trace = prep.trace(frozenset())
        for law in laws:
            if law.anchor is not None and law.anchor.anchor == "token" and trace.n_blocks == 0:
                raise ValueError("Anchor(anchor='token') acts at attention layers: this model has none")
        t = resolve_target(target, trace.x.shape[0], trace.output.shape[1], trace.x.device)
        tops = _sweep(trace, laws, pairs) if pairs else []
        ds = [top.gather(1, t.view(-1, 1)).squeeze(1) for top in tops]
    return ds, pairs, prep


def hellinger(model: Any, x: Any, target: Any, rule_a: Rule, rule_b: Rule) -> Tensor:
    """The Hellinger distance (I21) between the trajectory laws of ``rule_a`` and ``rule_b`` started
    at (L, target, +), per sample.

    Args:
        model: any model :func:`backplay.explain` takes (an ``nn.Module`` read by
            :mod:`backplay.gpu.read`, or a :class:`backplay.MLPSpec`); never modified.
        x: a batch (or one sample, as in :func:`backplay.explain`), floating.
        target: an int, or one class per sample.
        rule_a, rule_b: laws (:data:`SIGNED_BRANCH`: AlphaBeta, RG, RGEq, GradientEquilibrium, LRP0,
            Epsilon, Gamma and Anchor / RiskAverse of the routing laws; :data:`SINGLE_BRANCH`: Flat,
            WSquare, and ZBox at the first layers; composites of these, EpsilonGammaBox included); any other
            rule is a TypeError.

    Returns:
        H in [0, 1], shape [B] (0-d for one sample), in x's dtype: H = sqrt(1 - BC) with BC the
        Bhattacharyya coefficient of the two path laws, computed by one sweep of sqrt(K_a K_b) over
        the operation graph (see the module docstring); equal to
        :func:`backplay.theory.hellinger` of the exact laws on the unrolled graph.
    """
    check_rule_instance(rule_a, "rule_a")
    check_rule_instance(rule_b, "rule_b")
    (d,), _, prep = _deficits(model, x, target, [rule_a, rule_b])
    h = d.sqrt().to(prep.in_dtype)
    return h.squeeze(0) if prep.squeeze else h


def hellinger_matrix(model: Any, x: Any, target: Any, rules: Sequence[Rule],
                     pairs: Sequence[tuple[int, int]] | None = None) -> HellingerMatrix:
    """The Hellinger distances (I21) between every pair of ``rules`` (see :func:`hellinger`), all
    pairs in one sweep over the graph; a :class:`HellingerMatrix` ([B, n, n], rule names).
    ``pairs``: only these pairs (i, j) of rule indices are computed (e.g. a share of the matrix per
    process); the entries of the others are NaN."""
    rules = list(rules)
    if not rules:
        raise ValueError("hellinger_matrix needs at least one rule")
    for i, r in enumerate(rules):
        check_rule_instance(r, f"rules[{i}]")
    n = len(rules)
    todo = None
    if pairs is not None:
        todo = sorted({(min(a, b), max(a, b)) for a, b in pairs if a != b})
        bad = [(a, b) for a, b in todo if not (0 <= a < n and 0 <= b < n)]
        if bad:
            raise ValueError(f"pairs must hold rule indices in 0..{n - 1}, got {bad[0]}")
    ds, pairs, prep = _deficits(model, x, target, rules, todo)
    B = prep.x.shape[0]
    fill = 0.0 if todo is None else float("nan")
    vals = torch.full((B, n, n), fill, dtype=prep.in_dtype, device=prep.x.device)
    vals.diagonal(dim1=1, dim2=2).zero_()
    for (a, b), d in zip(pairs, ds):
        h = d.sqrt().to(prep.in_dtype)
        vals[:, a, b] = vals[:, b, a] = h
    return HellingerMatrix(tuple(r.name for r in rules), vals.squeeze(0) if prep.squeeze else vals)
