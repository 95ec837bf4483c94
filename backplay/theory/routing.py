"""Routing laws (docs/theory.md section 8) as exact trajectory laws on the extended graph.

A routing law moves a token from (l, i, s) to layer l-1: hand-over to the + branch (sign kept) with
probability p or to the - branch (sign flipped) with q = 1 - p, then routing inside the branch, with
a multiplier m per transition. The shared convention is the block comment above
:class:`backplay.rules.AlphaBeta`: the bias b_i is a constant unit (y = 1, weight b_i) in the branch
of its sign and a path routed to it ends in the bias sink; mass handed to an empty branch goes to the
cemetery with its sign; where p = q (m = 1/(p - q) undefined) the whole token is stopped (one move to
the cemetery, multiplier 1, sign kept).

The LRP zoo (docs/theory.md section 12) is a family of such laws too: Epsilon (the gradient equilibrium
with a direct stop of probability eps/(|z| + eps), :attr:`LocalLaw.stop`), Gamma (I22), ZPlus
(AlphaBeta(1, 0), I15), ZBox, Flat and WSquare (single-branch laws), and a Composite picks one of
them per layer (by the FrozenNet's ``ops``, ``modules`` and ``first``).

Fields (``RoutingLaw.field``):
  * ``"rational"``: sympy Rationals, exact. Used when the rule needs no exp/log: AlphaBeta,
    GradientEquilibrium, RGEq with kappa = 0 and integer nu, route temperature T with 1/T an
    integer, Anchor of these, RiskAverse with theta = 0 of these. Floats are taken at their exact
    binary value (:func:`backplay.nets.to_rational`).
  * ``"mpmath"``: mpmath at ``dps`` (default 50) digits for the Gibbs forms (RG's sigmoid(1/tau), RGEq
    in general, |y|^(1/T), RiskAverse's exp), as :class:`backplay.theory.game.Field` does for the
    entropic game.
  * ``"sympy"``: exact sympy expressions (exp, log, radicals). Chosen automatically when a rule
    parameter is an irrational sympy number (e.g. ``RG(tau=1/sympy.log(2))``, whose p is exactly
    2/3), or on request with ``field="exact"``. Expressions can grow: tiny nets only.

The state space is (l, i, s) with s = +1/-1, plus the absorbing :data:`CEMETERY` and
:data:`BIAS_SINK`; the input states (0, j, s) are terminal. Moves out of a state are
:class:`Move` records (target, probability, multiplier, sign carried). Everything is computed
layer by layer on the DAG (I7-style); path enumeration (:meth:`TrajectoryLaw.paths`) is the
exponential test oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sympy as sp

from ..nets import FrozenNet, MLPSpec, check_input, check_target, to_rational
from ..rules import (
    LRP0, RG, AlphaBeta, Anchor, AttributionEquilibriumLaw, Composite, Epsilon, Flat, Gamma,
    GradientEquilibrium, RGEq, RiskAverse, Rule, WSquare, ZBox,
)
from ..rules.routing import routing_parts
from .arith import Arith
from .game import exact_forward

CEMETERY = "cemetery"
BIAS_SINK = "bias_sink"
BIAS = "bias"  # routing key of the bias unit in :attr:`LocalLaw.routing`

__all__ = [
    "BIAS", "BIAS_SINK", "CEMETERY", "GVLaw", "LawArith", "LawOccupation", "LocalLaw", "Move", "RoutePath",
    "RoutingLaw", "TrajectoryLaw", "alpha_beta_lrp", "bhattacharyya_paths", "freeze", "gibbs_alpha_beta", "gv_law",
    "hellinger", "risk_reweighted_paths", "routing_law", "tau_from", "exact_net",
]

_ROUTING_RULES = (AlphaBeta, RG, RGEq, GradientEquilibrium, Anchor, RiskAverse, LRP0, Epsilon, Gamma, ZBox,
                  Flat, WSquare, Composite)
#: the LRP zoo's single-layer laws (docs/theory.md section 12; ZPlus is AlphaBeta(1, 0))
_ZOO = (LRP0, Epsilon, Gamma, ZBox, Flat, WSquare)


# -- arithmetic -----------------------------------------------------------------------------------
class LawArith(Arith):
    """:class:`Arith` labelled with the field a law reports: "rational", "sympy" or "mpmath"."""

    def __init__(self, mode: str, dps: int = 50) -> None:
        super().__init__(dps if mode == "mpmath" else None)
        self.mode = mode


def _params(rule: Rule) -> tuple[list, bool]:
    """(parameters, needs exp/log) of a routing rule; TypeError for anything else."""
    if not isinstance(rule, _ROUTING_RULES):
        raise TypeError(f"not a routing law: {type(rule).__name__} (expected one of "
                        f"{', '.join(c.__name__ for c in _ROUTING_RULES)})")
    if isinstance(rule, Composite):
        ps, tr = [], False
        for sub in rule.rules():
            p, t = _params(sub)
            ps, tr = ps + p, tr or t
        return ps, tr
    if isinstance(rule, LRP0):  # the gradient equilibrium's law (I17)
        return [], False
    if isinstance(rule, (Epsilon, Gamma)):
        return [rule.eps if isinstance(rule, Epsilon) else rule.gamma], False
    if isinstance(rule, (ZBox, Flat, WSquare)):
        return [], False
    if isinstance(rule, RiskAverse):
        ps, tr = _params(rule.rule)
        return ps + [rule.theta, rule.sigma], tr or rule.theta != 0
    if isinstance(rule, Anchor):
        ps, tr = _params(rule.rule)
        return ps + list(rule.lam if isinstance(rule.lam, tuple) else (rule.lam,)), tr
    if isinstance(rule, AttributionEquilibriumLaw):
        return [rule.r], False
    if isinstance(rule, AlphaBeta):
        return [rule.alpha, rule.beta], False
    if isinstance(rule, GradientEquilibrium):
        return [], False
    if isinstance(rule, RG):
        return [rule.tau, rule.route_temp], True
    tr = not isinstance(1 / to_rational(rule.route_temp), sp.Integer)  # |y|^(1/T)
    nu = to_rational(rule.nu)
    return [rule.kappa, rule.nu, rule.route_temp], tr or rule.kappa != 0 or not isinstance(nu, sp.Integer)


def _field_of(rule: Rule, field_: str | None) -> str:
    ps, transcendental = _params(rule)
    if field_ not in (None, "exact", "mpmath"):
        raise ValueError(f"field must be None (automatic), 'exact' or 'mpmath', got {field_!r}")
    symbolic = any(isinstance(v, sp.Basic) and not isinstance(v, sp.Rational) for v in ps)
    if field_ == "mpmath":
        return "mpmath"
    if field_ == "exact" or symbolic:
        return "sympy" if (transcendental or symbolic) else "rational"
    return "mpmath" if transcendental else "rational"


# -- the explained forward pass -------------------------------------------------------------------
def freeze(spec: MLPSpec, x: Any) -> FrozenNet:
    """The exact explained forward pass of a ReLU MLPSpec as a FrozenNet of sympy Rationals.

    Softplus nets are rejected: their y values are transcendental, and a FrozenNet of floats (or of
    values the caller computed) can be passed to :func:`routing_law` instead.
    """
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"freeze needs an MLPSpec, got {type(spec).__name__}")
    if spec.activation != "relu":
        raise ValueError("freeze is exact for ReLU nets only (softplus values are transcendental); "
                         "build a FrozenNet from the float forward pass instead")
    ex = spec.exact()
    return FrozenNet(list(ex.weights), list(ex.biases), exact_forward(ex, x))


def exact_net(net: FrozenNet) -> FrozenNet:
    """``net`` with every number replaced by the Rational of its exact binary value (the exact laws'
    input; :func:`backplay.nets.to_rational`)."""
    conv = np.vectorize(to_rational, otypes=[object])
    return FrozenNet([conv(w) for w in net.weights],
                     [None if b is None else conv(b) for b in net.biases], [conv(y) for y in net.ys],
                     net.kinds, net.anchors, net.ops, net.modules, net.first, net.in_shape)


def _same_net(a: FrozenNet, b: FrozenNet) -> bool:
    if a.widths != b.widths:
        return False
    for l in range(1, a.depth + 1):
        ba, bb = a.biases[l - 1], b.biases[l - 1]
        ba = np.zeros(a.widths[l], dtype=object) if ba is None else ba
        bb = np.zeros(b.widths[l], dtype=object) if bb is None else bb
        if not (np.all(a.weights[l - 1] == b.weights[l - 1]) and np.all(ba == bb)):
            return False
    return all(np.all(ya == yb) for ya, yb in zip(a.ys, b.ys))


# -- records --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Move:
    """One transition out of a state: ``to`` is (l-1, j, s'), :data:`CEMETERY` or :data:`BIAS_SINK`;
    ``sign`` is the token's sign after the move (s' for a neuron state)."""

    to: Any
    probability: Any
    multiplier: Any
    sign: int


@dataclass
class LocalLaw:
    """The local law at neuron i of layer l (docs/theory.md section 8).

    ``p``/``q``: hand-over probabilities, ``m`` the multiplier (None where the whole token is
    stopped: ``stopped`` True, p = q or both branches empty for rules with m = 1/(p - q)).
    ``routing[+1]`` / ``routing[-1]``: {j or :data:`BIAS`: pi(j | i, b)} on each branch (empty dict
    for an empty branch). ``s_plus``, ``s_minus``, ``z``: S+_i, S-_i and z_i = S+ + S- (bias included).
    ``stop``: the probability of a direct move to the cemetery (multiplier 1, sign kept) beside the
    two branches, so p + q + stop = 1 (0 for every law of section 5; LRP-epsilon's stabiliser share
    eps/(|z| + eps), docs/theory.md section 12); conservation (I14) needs m (p - q) + stop = 1.
    """

    p: Any
    q: Any
    m: Any
    stopped: bool
    routing: dict
    s_plus: Any
    s_minus: Any
    z: Any
    stop: Any = 0

    def __repr__(self) -> str:
        m = "stopped" if self.stopped else f"m={_num(self.m)}"
        stop = f", stop={_num(self.stop)}" if self.stop != 0 else ""
        return (f"LocalLaw(p={_num(self.p)}, q={_num(self.q)}, {m}{stop}, z={_num(self.z)}, moves: "
                f"{len(self.routing.get(1, {}))} on +, {len(self.routing.get(-1, {}))} on -)")


def _num(v: Any) -> str:
    """A number of any field in a few characters: exact when short, else a float (or cut)."""
    s = str(v)
    if len(s) <= 14:
        return s
    try:
        return f"{float(v):.8g}"
    except (TypeError, ValueError):  # a symbolic expression
        return s[:14] + "..."


@dataclass
class RoutePath:
    """One trajectory: ``states`` visited (l, i, s) from the start, ``end`` (0, j, s), "cemetery" or
    "bias_sink", ``sign`` the final sign, ``probability``, ``multiplier`` prod(m) and ``weight``
    w0 * prod(m) * sign."""

    states: list
    end: Any
    sign: int
    probability: Any
    multiplier: Any
    weight: Any

    @property
    def key(self) -> tuple:
        """The path as a sequence of graph states (cemetery and bias sink are single states)."""
        return tuple(self.states) + (self.end,)


@dataclass
class LawOccupation:
    """Occupations of the start state by the layer recursion (I7-style).

    ``nu[(l, i, s)]`` = E[prod(m) 1{visit (l, i, s)}] (signed multipliers), ``rho`` the visiting
    probabilities; ``cemetery``/``bias_sink``: per layer l (1..L, index l-1) the signed stopped mass
    E[prod(m) s_end 1{stopped at layer l}] (without w0).
    """

    nu: dict
    rho: dict
    cemetery: list
    bias_sink: list
    widths: tuple = field(repr=False)

    def layer(self, l: int) -> tuple[np.ndarray, np.ndarray]:
        """(nu(l, ., +), nu(l, ., -)) as object arrays."""
        n = self.widths[l]
        return (np.array([self.nu[(l, i, 1)] for i in range(n)], dtype=object),
                np.array([self.nu[(l, i, -1)] for i in range(n)], dtype=object))

    def signed(self, l: int) -> np.ndarray:
        """nu(+) - nu(-) at layer l."""
        plus, minus = self.layer(l)
        return plus - minus

    def __repr__(self) -> str:
        return (f"LawOccupation(widths={self.widths}, {len(self.nu)} states, cemetery total "
                f"{_num(sum(self.cemetery))}, bias_sink total {_num(sum(self.bias_sink))})")


# -- trajectory laws ------------------------------------------------------------------------------
class TrajectoryLaw:
    """A Markov law on the extended graph of a frozen net, started at (L, target, +).

    Subclasses define :meth:`moves`. Kernels are sign-symmetric in structure but given per state.
    """

    net: FrozenNet
    target: int
    arith: LawArith

    @property
    def field(self) -> str:
        return self.arith.mode

    @property
    def start(self) -> tuple[int, int, int]:
        return (self.net.depth, self.target, 1)

    def moves(self, state: tuple[int, int, int]) -> list[Move]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._describe())})"

    def _describe(self) -> list[str]:
        """The parts of the repr (a subclass adds its own)."""
        return [f"target={self.target}", f"depth={self.net.depth}", f"widths={self.net.widths}",
                f"field={self.field!r}"]

    def kernel_row(self, state: tuple[int, int, int]) -> dict:
        """K(state, .) as {target state: probability} (cemetery and bias sink are single states)."""
        row: dict = {}
        for mv in self.moves(state):
            row[mv.to] = row.get(mv.to, 0) + mv.probability
        return row

    def occupation(self) -> LawOccupation:
        """Signed occupation nu and visiting probability rho of every state, layer by layer."""
        A, widths = self.arith, self.net.widths
        zero = A.num(0)
        nu = {(l, i, s): zero for l in range(len(widths)) for i in range(widths[l]) for s in (1, -1)}
        rho = dict(nu)
        nu[self.start] = rho[self.start] = A.num(1)
        cem = [zero] * self.net.depth
        sink = [zero] * self.net.depth
        for l in range(self.net.depth, 0, -1):
            for i in range(widths[l]):
                for s in (1, -1):
                    st = (l, i, s)
                    if rho[st] == 0:
                        continue
                    for mv in self.moves(st):
                        flow = nu[st] * mv.probability * mv.multiplier
                        if mv.to == CEMETERY:
                            cem[l - 1] += flow * mv.sign
                        elif mv.to == BIAS_SINK:
                            sink[l - 1] += flow * mv.sign
                        else:
                            nu[mv.to] += flow
                            rho[mv.to] += rho[st] * mv.probability
        return LawOccupation(nu, rho, cem, sink, widths)

    def _w0(self) -> Any:
        return self.arith.num(1)

    def paths(self, max_paths: int = 100_000) -> list[RoutePath]:
        """Every trajectory from the start with its probability, multiplier and signed weight.
        Exponential: a test oracle for tiny nets."""
        A, w0 = self.arith, self._w0()
        out: list[RoutePath] = []

        def walk(st: tuple, states: list, prob: Any, mult: Any) -> None:
            if len(out) > max_paths:
                raise RuntimeError(f"more than {max_paths} paths: the net is too large to enumerate")
            states = states + [st]
            if st[0] == 0:
                out.append(RoutePath(states, st, st[2], prob, mult, w0 * mult * st[2]))
                return
            for mv in self.moves(st):
                if mv.probability == 0:
                    continue
                pr, mu = prob * mv.probability, mult * mv.multiplier
                if mv.to in (CEMETERY, BIAS_SINK):
                    out.append(RoutePath(states, mv.to, mv.sign, pr, mu, w0 * mu * mv.sign))
                else:
                    walk(mv.to, states, pr, mu)

        walk(self.start, [], A.num(1), A.num(1))
        return out


class RoutingLaw(TrajectoryLaw):
    """A routing law of docs/theory.md section 8 on one explained forward pass (build with
    :func:`routing_law`). ``w0`` = f_k(x); ``rule`` the parameter object of :mod:`backplay.rules`."""

    def __init__(self, net: FrozenNet, target: int, rule: Rule, arith: LawArith) -> None:
        self.net, self.target, self.rule, self.arith = net, target, rule, arith
        self.w0 = arith.num(net.ys[-1][target])
        self.potential: dict | None = None  # U(l, i) of RiskAverse (I20)
        self._kernels = self._build(rule)

    def _w0(self) -> Any:
        return self.w0

    def _describe(self) -> list[str]:
        return [f"rule={self.rule.name!r}"] + super()._describe() + [f"{len(self._kernels)} local laws"]

    # -- local laws --------------------------------------------------------------------------------
    def _units(self, l: int, i: int) -> list[tuple[Any, Any, Any]]:
        """(unit, W, y) of the lower units of neuron (l, i): neurons j, then the bias unit."""
        A, net = self.arith, self.net
        w, y = net.weights[l - 1][i], net.ys[l - 1]
        units = [(j, A.num(w[j]), A.num(y[j])) for j in range(len(y))]
        b = net.biases[l - 1]
        if b is not None and b[i] != 0:
            units.append((BIAS, A.num(b[i]), A.num(1)))
        return units

    def _base_local(self, rule: Rule, l: int, i: int) -> LocalLaw:
        A = self.arith
        if self.net.selects(l, i):  # max-pool / copy row: winner takes all, whatever the rule
            winners = [j for j, w in enumerate(self.net.weights[l - 1][i]) if w != 0]
            one = A.num(1)
            if not winners:  # a copy of a constant (a cls token): the bias unit, its mass is stopped
                b = A.num(self.net.biases[l - 1][i]) if self.net.biases[l - 1] is not None else A.num(0)
                return LocalLaw(one, A.num(0), one, False, {1: {BIAS: one}, -1: {}}, b, A.num(0), b)
            (winner,) = winners
            y = A.num(self.net.ys[l - 1][winner])
            return LocalLaw(one, A.num(0), one, False, {1: {winner: one}, -1: {}}, y, A.num(0), y)
        if isinstance(rule, Composite):  # the rule of this layer (kind, module, first layer)
            net = self.net
            rule = rule.rule_at(net.ops[l - 1], net.modules[l - 1], net.first[l - 1])
        if isinstance(rule, _ZOO):
            return self._zoo_local(rule, l, i)
        lam, own = A.num(0), None
        if isinstance(rule, Anchor):
            if rule.anchor == "token":  # attention layers only (FrozenNet.anchors), lam per block
                anchors = self.net.anchors
                if anchors[l - 1] is not None:
                    block = sum(a is not None for a in anchors[:l])
                    lam = A.num(to_rational(rule.lam_at(block, sum(a is not None for a in anchors))))
                    own = anchors[l - 1][i] if anchors[l - 1][i] >= 0 else None
            else:
                lam = A.num(to_rational(rule.lam_at(l, self.net.depth)))
            rule = rule.rule
        inv_t = 1 / A.num(to_rational(getattr(rule, "route_temp", 1)))
        branches, s_plus, s_minus = self._branches(l, i, inv_t)
        routing: dict = {}
        for b, ws in branches.items():
            tot = sum(ws.values(), A.num(0))
            n = len(ws)
            if own is not None and own in ws:  # the token anchor: the own unit, if in the branch
                routing[b] = {u: (1 - lam) * v / tot + (lam if u == own else 0) for u, v in ws.items()}
            else:
                routing[b] = {u: (1 - lam) * v / tot + lam / n for u, v in ws.items()}
        z = s_plus + s_minus
        both_empty = not routing[1] and not routing[-1]
        if isinstance(rule, AttributionEquilibriumLaw):  # AE's hand-over, m = 1/(p - q) (section 8)
            r = A.num(to_rational(rule.r))
            return LocalLaw((r + 1) / (r + 2), 1 / (r + 2), (r + 2) / r, False, routing, s_plus, s_minus, z)
        if isinstance(rule, AlphaBeta):
            a, be = A.num(rule.alpha), A.num(rule.beta)
            return LocalLaw(a / (a + be), be / (a + be), a + be, False, routing, s_plus, s_minus, z)
        if isinstance(rule, RG):
            p = A.sigmoid(1 / A.num(rule.tau))
        elif isinstance(rule, GradientEquilibrium):
            if z == 0:
                return LocalLaw(None, None, None, True, routing, s_plus, s_minus, z)
            tot = s_plus - s_minus
            return LocalLaw(s_plus / tot, -s_minus / tot, tot / z, False, routing, s_plus, s_minus, z)
        else:  # RGEq
            kappa, nu = A.num(rule.kappa), A.num(to_rational(rule.nu))
            if nu == 0:
                p = A.sigmoid(kappa)
            elif both_empty:
                return LocalLaw(None, None, None, True, routing, s_plus, s_minus, z)
            elif s_minus == 0:
                p = A.num(1)
            elif s_plus == 0:
                p = A.num(0)
            elif kappa == 0 and A.exact and isinstance(nu, sp.Integer):
                p = s_plus ** nu / (s_plus ** nu + (-s_minus) ** nu)
            else:
                p = 1 / (1 + A.exp(-kappa) * A.power(-s_minus / s_plus, nu))
        q = 1 - p
        if p == q:
            return LocalLaw(p, q, None, True, routing, s_plus, s_minus, z)
        return LocalLaw(p, q, 1 / (p - q), False, routing, s_plus, s_minus, z)

    def _branches(self, l: int, i: int, inv_t: Any) -> tuple[dict, Any, Any]:
        """(routing weights, S+, S-) at unit i: each contribution Z_ij = W_ij y_j != 0 (the bias unit
        included) lies in the branch of its sign with weight |W_ij| |y_j|^(1/T); S+- at T = 1."""
        A = self.arith
        branches: dict = {1: {}, -1: {}}
        s_plus = s_minus = A.num(0)
        for unit, w, y in self._units(l, i):
            zc = w * y
            if zc == 0:
                continue
            if zc > 0:
                branches[1][unit] = abs(w) * A.power(abs(y), inv_t)
                s_plus += zc
            else:
                branches[-1][unit] = abs(w) * A.power(abs(y), inv_t)
                s_minus += zc
        return branches, s_plus, s_minus

    def _contributions(self, l: int, i: int) -> tuple[dict, Any, Any]:
        """(routing, S+, S-) at route temperature 1: pi(j | i, b) = |Z_ij| / |S_b| on each branch (the
        bias unit included), {} for an empty branch."""
        A = self.arith
        branches, s_plus, s_minus = self._branches(l, i, A.num(1))
        routing = {b: {u: v / sum(ws.values(), A.num(0)) for u, v in ws.items()} for b, ws in branches.items()}
        return routing, s_plus, s_minus

    def _zoo_local(self, rule: Rule, l: int, i: int) -> LocalLaw:
        """The local law of an LRP zoo rule (docs/theory.md section 12; the rules' docstrings state each)."""
        A = self.arith
        zero, one = A.num(0), A.num(1)
        routing, s_plus, s_minus = self._contributions(l, i)
        z = s_plus + s_minus
        tot = s_plus - s_minus
        if isinstance(rule, (LRP0, Epsilon, Gamma)):
            if z == 0:  # the whole token stops
                return LocalLaw(None, None, None, True, routing, s_plus, s_minus, z)
            if isinstance(rule, Gamma):  # I22: log-odds(p) = sign(z) log(1 + gamma) + log(S+/|S-|)
                g = A.num(to_rational(rule.gamma))
                wp, wn = (1 + g) * s_plus, -s_minus
                if z < 0:
                    wp, wn = s_plus, -(1 + g) * s_minus
                den = z + g * (s_plus if z > 0 else s_minus)
                return LocalLaw(wp / (wp + wn), wn / (wp + wn), (wp + wn) / den, False, routing, s_plus, s_minus, z)
            stop = zero  # LRP0: the gradient equilibrium (I17); Epsilon: with the stabiliser's stop (I14)
            if isinstance(rule, Epsilon):
                eps = A.num(to_rational(rule.eps))
                stop = eps / (abs(z) + eps)
            return LocalLaw((1 - stop) * s_plus / tot, (1 - stop) * (-s_minus) / tot, tot / z, False, routing,
                            s_plus, s_minus, z, stop)
        net = self.net
        w = net.weights[l - 1][i]
        if isinstance(rule, ZBox):  # one branch, pi(j) proportional to x_j W_ij - low_j W+_ij - high_j W-_ij
            if not net.first[l - 1]:
                raise ValueError(f"ZBox is a first-layer rule: layer {l} does not read the input; use it as "
                                 "Composite(first=ZBox(...), ...)")
            lo, hi = (np.array([to_rational(v) for v in t.reshape(-1).tolist()], dtype=object)
                      for t in rule.bounds(net.in_shape))
            src = self._input_units(l - 1)
            weights = {}
            for j, (wj, yj) in enumerate(zip(w, net.ys[l - 1])):
                wj = A.num(wj)
                if wj == 0:
                    continue
                k = src[j]
                if k < 0:
                    raise ValueError(f"ZBox at layer {l}: lower unit {j} is not a copy of an input unit")
                c = A.num(yj) * wj - A.num(lo[k]) * max(wj, zero) - A.num(hi[k]) * min(wj, zero)
                if c < 0:
                    raise ValueError(f"ZBox: input {k} lies outside [low, high]; pass bounds that hold it")
                if c != 0:
                    weights[j] = c
        else:  # Flat: pi(j) proportional to 1{W_ij != 0}; WSquare: to W_ij^2, the bias unit b_i^2
            weights = {j: (one if isinstance(rule, Flat) else A.num(wj) ** 2)
                       for j, wj in enumerate(w) if wj != 0}
            b = net.biases[l - 1]
            if isinstance(rule, WSquare) and b is not None and b[i] != 0:
                weights[BIAS] = A.num(b[i]) ** 2
        d = sum(weights.values(), zero)
        single = {1: {u: v / d for u, v in weights.items()}, -1: {}}
        return LocalLaw(one, zero, one, False, single, s_plus, s_minus, z)

    def _input_units(self, l: int) -> list:
        """For each unit of layer l, the input unit it is a copy of (through copy and selection rows:
        one weight 1, no bias), or -1."""
        net = self.net
        src = list(range(net.widths[0]))
        for k in range(1, l + 1):
            w, b = net.weights[k - 1], net.biases[k - 1]
            row = []
            for r in range(net.widths[k]):
                nz = [j for j, v in enumerate(w[r]) if v != 0]
                copy = net.selects(k, r) and len(nz) == 1 and (b is None or b[r] == 0)
                row.append(src[nz[0]] if copy else -1)
            src = row
        return src

    def _build(self, rule: Rule) -> dict:
        net = self.net
        base_rule = rule.rule if isinstance(rule, RiskAverse) else rule
        ks = {(l, i): self._base_local(base_rule, l, i)
              for l in range(1, net.depth + 1) for i in range(net.widths[l])}
        if isinstance(rule, RiskAverse):
            ks = self._doob(rule, ks)
        return ks

    def _doob(self, rule: RiskAverse, ks: dict) -> dict:
        """I20: K_theta(s, s') = K(s, s') U(s')/U(s), U(s) = E_s[exp(-theta X)], X = sigma^2/x_j^2
        at the input reached, 0 for stopped paths; multiplier reset to 1/(p_theta - q_theta)."""
        A, net = self.arith, self.net
        theta, sigma = A.num(rule.theta), A.num(rule.sigma)
        one = A.num(1)
        u: dict = {}
        for j, xj in enumerate(net.ys[0]):
            xj = A.num(xj)
            u[(0, j)] = A.exp(-theta * sigma ** 2 / xj ** 2) if xj != 0 else (one if theta == 0 else A.num(0))
        out = {}
        for l in range(1, net.depth + 1):
            for i in range(net.widths[l]):
                k = ks[(l, i)]
                if k.stopped:
                    u[(l, i)] = one
                    out[(l, i)] = k
                    continue
                mass, routing = {}, {}
                for b, pb in ((1, k.p), (-1, k.q)):
                    r = k.routing[b]
                    ur = {unit: pr * (one if unit == BIAS else u[(l - 1, unit)]) for unit, pr in r.items()}
                    tot = sum(ur.values(), A.num(0)) if r else one
                    mass[b] = pb * tot
                    routing[b] = {unit: v / tot for unit, v in ur.items()} if tot != 0 else {}
                u[(l, i)] = mass[1] + mass[-1]
                if u[(l, i)] == 0:  # no path from here reaches an input with U > 0: the token stops
                    out[(l, i)] = LocalLaw(k.p, k.q, None, True, k.routing, k.s_plus, k.s_minus, k.z)
                    continue
                p, q = mass[1] / u[(l, i)], mass[-1] / u[(l, i)]
                if p == q:
                    out[(l, i)] = LocalLaw(p, q, None, True, routing, k.s_plus, k.s_minus, k.z)
                else:
                    out[(l, i)] = LocalLaw(p, q, 1 / (p - q), False, routing, k.s_plus, k.s_minus, k.z)
        self.potential = u
        return out

    # -- public ------------------------------------------------------------------------------------
    def kernel(self, l: int, i: int) -> LocalLaw:
        """The local law at neuron i of layer l (1 <= l <= L)."""
        if (l, i) not in self._kernels:
            raise ValueError(f"no neuron {i} in layer {l} (widths {self.net.widths})")
        return self._kernels[(l, i)]

    def moves(self, state: tuple[int, int, int]) -> list[Move]:
        l, i, s = state
        k = self.kernel(l, i)
        if k.stopped:
            return [Move(CEMETERY, self.arith.num(1), self.arith.num(1), s)]
        out = []
        if k.stop != 0:  # the stabiliser's stop (LRP-epsilon): to the cemetery, multiplier 1
            out.append(Move(CEMETERY, k.stop, self.arith.num(1), s))
        for b, pb in ((1, k.p), (-1, k.q)):
            if pb == 0:
                continue
            if not k.routing[b]:
                out.append(Move(CEMETERY, pb, k.m, s * b))
                continue
            for unit, pr in k.routing[b].items():
                to = BIAS_SINK if unit == BIAS else (l - 1, unit, s * b)
                out.append(Move(to, pb * pr, k.m, s * b))
        return out

    def relevance(self) -> list[np.ndarray]:
        """[R^0, ..., R^L] by the layer map R^{l-1}_j = sum_i m_i R_i (p_i pi(j|i,+) - q_i pi(j|i,-))
        from R^L = f_k(x) e_k (the torch organisation; I14, I15, I17)."""
        A, widths = self.arith, self.net.widths
        top = np.array([A.num(0)] * widths[-1], dtype=object)
        top[self.target] = self.w0
        rel = [top]
        for l in range(self.net.depth, 0, -1):
            lower = np.array([A.num(0)] * widths[l - 1], dtype=object)
            for i, r in enumerate(rel[0]):
                k = self.kernel(l, i)
                if r == 0 or k.stopped:
                    continue
                for b, pb in ((1, k.p), (-1, k.q)):
                    for unit, pr in k.routing[b].items():
                        if unit != BIAS:
                            lower[unit] += b * k.m * pb * pr * r
            rel.insert(0, lower)
        return rel

    def stopped_per_layer(self) -> list[dict]:
        """Per layer l = 1..L (index l-1): {"cemetery": ..., "bias_sink": ...}, signed, times w0."""
        occ = self.occupation()
        return [{"cemetery": self.w0 * c, "bias_sink": self.w0 * s} for c, s in zip(occ.cemetery, occ.bias_sink)]

    def stopped(self) -> dict:
        """Signed stopped mass {"cemetery", "bias_sink", "total"} (I14: sum R^0 + total = w0)."""
        per = self.stopped_per_layer()
        zero = self.arith.num(0)
        cem = sum((d["cemetery"] for d in per), zero)
        sink = sum((d["bias_sink"] for d in per), zero)
        return {"cemetery": cem, "bias_sink": sink, "total": cem + sink}

    def attribution(self) -> np.ndarray:
        """Input relevance R^0 = w0 (nu(0, ., +) - nu(0, ., -))."""
        return self.w0 * self.occupation().signed(0)


def routing_law(net: MLPSpec | FrozenNet, x: Any = None, target: int = 0, rule: Rule = RG(),
                field: str | None = None, dps: int = 50) -> RoutingLaw:
    """The routing law ``rule`` (AlphaBeta, RG, RGEq, GradientEquilibrium, Anchor, RiskAverse; the LRP
    zoo of docs/theory.md section 12: Epsilon, Gamma, ZPlus, ZBox, Flat, WSquare and a Composite of these,
    LRP0 and the routing laws) of output ``target`` on one explained forward pass.

    ``net``: an MLPSpec (then ``x`` is required and the pass is frozen exactly, ReLU only) or a
    FrozenNet (``x`` ignored; floats converted to the Rationals of their exact binary values).
    ``field``: None (automatic, see the module docstring), "exact" (sympy) or "mpmath" (``dps``).
    """
    if isinstance(net, MLPSpec):
        if x is None:
            raise ValueError("routing_law on an MLPSpec needs the input x")
        frozen = freeze(net, x)
    elif isinstance(net, FrozenNet):
        frozen = exact_net(net)
    else:
        raise TypeError(f"net must be an MLPSpec or a FrozenNet, got {type(net).__name__}")
    if not isinstance(target, (int, np.integer)) or isinstance(target, bool):
        raise TypeError(f"target must be an int, got {type(target).__name__}")
    if not 0 <= int(target) < frozen.widths[-1]:
        raise ValueError(f"target {target} out of range for {frozen.widths[-1]} outputs")
    if dps < 15:
        raise ValueError(f"dps must be >= 15, got {dps}")
    anchor = routing_parts(rule)[1]
    if anchor is not None and anchor.anchor == "token" and all(a is None for a in frozen.anchors):
        raise ValueError("Anchor(anchor='token') needs a FrozenNet with attention anchors "
                         "(backplay.gpu.unroll of a ViT)")
    return RoutingLaw(frozen, int(target), rule, LawArith(_field_of(rule, field), dps))


# -- the GV game's trajectory law -----------------------------------------------------------------
class GVLaw(TrajectoryLaw):
    """The trajectory law of the GV game at its equilibrium (docs/theory.md I2, I3): from (l, i, s)
    continue iff z^l_i > 0 (always at a linear output; ties stop), then move to
    (l-1, j, s*sign W_ij) with probability |W_ij|/gamma_i and multiplier gamma_i (a zero row goes to
    the bias sink with multiplier 0). Its signed terminal occupation is the gradient (I3), and
    :meth:`attribution` = x * (nu(0,.,+) - nu(0,.,-)) is Gradient x Input. Compare with a routing
    law by :func:`hellinger` (I21)."""

    def __init__(self, spec: MLPSpec, x: Any, target: int) -> None:
        self.spec = spec.exact()
        self.net = freeze(self.spec, x)
        self.target = check_target(self.spec, target)
        self.arith = LawArith("rational")

    def moves(self, state: tuple[int, int, int]) -> list[Move]:
        l, i, s = state
        w = self.net.weights[l - 1][i]
        b = self.net.biases[l - 1]
        z = sum((w[j] * y for j, y in enumerate(self.net.ys[l - 1])), sp.Integer(0)) + (0 if b is None else b[i])
        one = sp.Integer(1)
        if self.spec.activated(l) and not z > 0:
            return [Move(CEMETERY, one, one, s)]
        gamma = sum((abs(v) for v in w), sp.Integer(0))
        if gamma == 0:
            return [Move(BIAS_SINK, one, sp.Integer(0), s)]
        return [Move((l - 1, j, s * (1 if v > 0 else -1)), abs(v) / gamma, gamma, s * (1 if v > 0 else -1))
                for j, v in enumerate(w) if v != 0]

    def attribution(self) -> np.ndarray:
        """Gradient x Input: x_j (nu(0, j, +) - nu(0, j, -))."""
        return self.net.ys[0] * self.occupation().signed(0)


def gv_law(spec: MLPSpec, x: Any, target: int) -> GVLaw:
    """The GV game's equilibrium trajectory law of a ReLU net (see :class:`GVLaw`)."""
    if spec.activation != "relu":
        raise ValueError("gv_law is the ReLU game's law; the net is softplus")
    check_input(spec, x)
    return GVLaw(spec, x, target)


# -- Hellinger distance (I21) ---------------------------------------------------------------------
def hellinger(law_a: TrajectoryLaw, law_b: TrajectoryLaw) -> Any:
    """I21: H = sqrt(1 - BC(start)) with BC(s) = sum_s' sqrt(K_a(s,s') K_b(s,s')) BC(s'), BC = 1 at
    the inputs, the cemetery and the bias sink. Kernels are probability kernels on states (l, i, s);
    multipliers do not enter. Exact (sympy) when both laws are exact, else mpmath (larger dps).
    The laws must share the frozen net and the start state."""
    for law in (law_a, law_b):
        if not isinstance(law, TrajectoryLaw):
            raise TypeError(f"hellinger needs two trajectory laws, got {type(law).__name__}")
    if law_a.start != law_b.start or not _same_net(law_a.net, law_b.net):
        raise ValueError("hellinger compares two laws of the same frozen net and start state")
    if law_a.arith.exact and law_b.arith.exact:
        A = LawArith("sympy")
    else:
        A = LawArith("mpmath", max(law_a.arith.dps or 0, law_b.arith.dps or 0))
    bc = _bhattacharyya(law_a, law_b, A)
    val = 1 - bc
    if not A.exact and val < 0:
        val = A.num(0)
    return A.sqrt(val)


def _bhattacharyya(law_a: TrajectoryLaw, law_b: TrajectoryLaw, A: LawArith) -> Any:
    widths = law_a.net.widths
    one = A.num(1)
    bc: dict = {(0, j, s): one for j in range(widths[0]) for s in (1, -1)}
    bc[CEMETERY] = bc[BIAS_SINK] = one
    for l in range(1, len(widths)):
        for i in range(widths[l]):
            for s in (1, -1):
                ra, rb = law_a.kernel_row((l, i, s)), law_b.kernel_row((l, i, s))
                tot = A.num(0)
                for to, pa in ra.items():
                    pb = rb.get(to, 0)
                    if pa == 0 or pb == 0:
                        continue
                    pa, pb = A.num(pa), A.num(pb)
                    tot += (pa if pa == pb else A.sqrt(pa * pb)) * bc[to]
                bc[(l, i, s)] = tot
    return bc[law_a.start]


def bhattacharyya_paths(law_a: TrajectoryLaw, law_b: TrajectoryLaw, max_paths: int = 100_000) -> Any:
    """BC by path enumeration, sum over paths of sqrt(P_a(path) P_b(path)) (oracle for I21)."""
    def probs(law: TrajectoryLaw) -> dict:
        out: dict = {}
        for pth in law.paths(max_paths):
            out[pth.key] = out.get(pth.key, 0) + pth.probability
        return out
    pa, pb = probs(law_a), probs(law_b)
    exact = law_a.arith.exact and law_b.arith.exact
    A = LawArith("sympy") if exact else LawArith("mpmath", 50)
    tot = A.num(0)
    for key, va in pa.items():
        if key in pb:
            va, vb = A.num(va), A.num(pb[key])
            tot += va if va == vb else A.sqrt(va * vb)
    return tot


# -- risk aversion (I20) --------------------------------------------------------------------------
def risk_reweighted_paths(law: RoutingLaw, max_paths: int = 100_000) -> dict:
    """I20 oracle: for a RiskAverse law, {path key: P(path) exp(-theta X(path)) / U(start)} with P the
    base law's path probabilities, X = sigma^2/x_j^2 at the input reached (0 if stopped). Equals
    the Doob-transformed law's path probabilities."""
    if not isinstance(law.rule, RiskAverse):
        raise TypeError(f"risk_reweighted_paths needs a RiskAverse law, got {type(law.rule).__name__}")
    A = law.arith
    base = RoutingLaw(law.net, law.target, law.rule.rule, A)
    theta, sigma = A.num(law.rule.theta), A.num(law.rule.sigma)
    u_start = law.potential[(law.net.depth, law.target)]
    out: dict = {}
    for pth in base.paths(max_paths):
        if isinstance(pth.end, tuple):
            weight = A.exp(-theta * sigma ** 2 / A.num(law.net.ys[0][pth.end[1]]) ** 2)
        else:
            weight = A.num(1)
        out[pth.key] = out.get(pth.key, 0) + pth.probability * weight / u_start
    return out


# -- closed forms (I15, I16) ----------------------------------------------------------------------
def alpha_beta_lrp(net: FrozenNet | MLPSpec, target: int, alpha: Any, beta: Any, x: Any = None) -> list[np.ndarray]:
    """I15 closed form, independent of the routing machinery: [R^0, ..., R^L] with
    R^{l-1}_j = sum_i (alpha Z+_ij / S+_i - beta Z-_ij / S-_i) R^l_i (0/0 := 0), bias as a unit."""
    frozen = freeze(net, x) if isinstance(net, MLPSpec) else exact_net(net)
    a, b = to_rational(alpha), to_rational(beta)
    top = np.array([sp.Integer(0)] * frozen.widths[-1], dtype=object)
    top[target] = frozen.ys[-1][target]
    rel = [top]
    for l in range(frozen.depth, 0, -1):
        w, y = frozen.weights[l - 1], frozen.ys[l - 1]
        bias = frozen.biases[l - 1]
        lower = np.array([sp.Integer(0)] * len(y), dtype=object)
        for i, r in enumerate(rel[0]):
            zs = [w[i, j] * y[j] for j in range(len(y))]
            extra = [] if bias is None else [bias[i]]
            sp_ = sum((v for v in zs + extra if v > 0), sp.Integer(0))
            sm = sum((v for v in zs + extra if v < 0), sp.Integer(0))
            for j, zc in enumerate(zs):
                if zc > 0:
                    lower[j] += a * zc / sp_ * r
                elif zc < 0:
                    lower[j] -= b * zc / sm * r
        rel.insert(0, lower)
    return rel


def gibbs_alpha_beta(tau: Any) -> tuple[sp.Expr, sp.Expr]:
    """I16: (alpha, beta) = (1/(1 - e^(-1/tau)), 1/(e^(1/tau) - 1)) as sympy expressions."""
    t = to_rational(tau)
    if t.is_positive is False:
        raise ValueError(f"tau must be > 0, got {tau}")
    return 1 / (1 - sp.exp(-1 / t)), 1 / (sp.exp(1 / t) - 1)


def tau_from(alpha: Any, beta: Any) -> sp.Expr:
    """I16: tau = 1/log(alpha/beta) (needs alpha > beta > 0; symbolic arguments are accepted unless
    sympy can tell the condition fails)."""
    a, b = to_rational(alpha), to_rational(beta)
    if b.is_positive is False or (a - b).is_positive is False:
        raise ValueError(f"need alpha > beta > 0, got alpha={alpha}, beta={beta}")
    return 1 / sp.log(a / b)
