"""The ReLU net game of Gaubert and Vlassopoulos and its entropic (softplus) version, exactly.

docs/theory.md sections 3-6. The game is solved on the extended graph of :func:`extended_graph`:
a Shapley recursion from the inputs up (values, I1), the optimal policies (I2, ties stop), and a
sweep from the start state down that gives the occupation measures (I3, I4, I5, I7, I11).
Arithmetic: sympy Rationals for ReLU nets (exact); for softplus nets mpmath at 50 digits when eps is
a number (the values are transcendental) and sympy expressions when eps is a Symbol.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import networkx as nx
import numpy as np
import sympy as sp

from ..nets import MLPSpec, check_input, check_target, to_rational
from .arith import Arith
from .graph import CEMETERY, SINK, continue_edges, extended_graph, layer_nodes

Policy = list  # per layer l = 1..L an object array (n_l, 2): P(continue) at (l, i, +), (l, i, -)


class Field(Arith):
    """The arithmetic of one game: exact rationals (ReLU), mpmath at ``dps`` digits (softplus with a
    numeric eps) or symbolic sympy (softplus with a Symbol eps)."""

    def __init__(self, eps: Any = None, dps: int = 50) -> None:
        symbolic = eps is not None and bool(sp.sympify(eps).free_symbols)
        super().__init__(dps if eps is not None and not symbolic else None)
        self.symbolic = symbolic
        self.eps = None if eps is None else self.num(eps)

    def softplus(self, c: Any) -> Any:
        """softplus_eps(c) = eps*log(1 + exp(c/eps))  (I9)."""
        return self.eps * self.log(1 + self.exp(c / self.eps))


class Occupation(NamedTuple):
    """Occupation measures of the start state at the input (I3, I7)."""

    nu_plus: np.ndarray
    nu_minus: np.ndarray
    rho: np.ndarray


@dataclass
class GameSolution:
    """The solved game for one input and one explained output.

    ``values`` and ``nu`` (discounted occupation), ``rho_states`` (undiscounted) are keyed by the
    graph's states; per-input arrays are numpy object arrays of exact (or mpmath) numbers.
    """

    value: Any
    values: dict
    policy: Policy
    nu: dict
    rho_states: dict
    occupation: Occupation
    gradient: np.ndarray
    gxi: np.ndarray
    bias_share: Any
    entropy_share: Any
    stopped: Any
    sink: Any
    bias_gradient: list
    widths: tuple = field(repr=False)

    def __repr__(self) -> str:
        return f"GameSolution(value={self.value}, widths={self.widths}, input gradient of {len(self.gradient)} entries)"

    def layer(self, l: int, which: str = "signed") -> np.ndarray:
        """Per-neuron occupation at layer l: "signed" nu+ - nu-, "abs" nu+ + nu-, or "rho"."""
        src = self.rho_states if which == "rho" else self.nu
        plus = np.array([src[(l, i, 1)] for i in range(self.widths[l])], dtype=object)
        minus = np.array([src[(l, i, -1)] for i in range(self.widths[l])], dtype=object)
        if which == "signed":
            return plus - minus
        if which in ("abs", "rho"):
            return plus + minus
        raise ValueError(f"which must be 'signed', 'abs' or 'rho', got {which!r}")


@dataclass
class Path:
    """One trajectory from the start (I6): states visited, how it ended, its weight and payoff."""

    states: list
    end: Any  # (0, j, s) at an input, "cemetery" or "sink"
    probability: Any
    discount: Any  # D, the product of the gammas collected
    payoff: Any  # discounted rewards + entropy terms + discounted terminal payoff
    weights: list  # the signed weights W along the continue moves taken


class ReLUNetGame:
    """The GV game of a ReLU net, or the entropic game of a softplus net (docs/theory.md 2-4).

    ``solve(x, target)`` returns a :class:`GameSolution`; ``paths`` enumerates trajectories (I6);
    ``bounds`` gives the box bounds of section 4 (I13).
    """

    def __init__(self, spec: MLPSpec, dps: int = 50) -> None:
        self.spec = spec.exact()
        self.entropic = spec.activation == "softplus"
        self.F = Field(self.spec.eps if self.entropic else None, dps)
        self._graph = self.graph()

    # -- the pieces a variant may override -------------------------------------------------------
    def graph(self) -> nx.DiGraph:
        """The extended graph the game is played on (section 1)."""
        return extended_graph(self.spec)

    def continues(self, player: str, c: Any) -> bool:
        """I2: the optimal deterministic choice in the ReLU game; ties (c = 0) stop."""
        return c > 0 if player == "max" else c < 0

    # -- values ----------------------------------------------------------------------------------
    def _terminal(self, x: Any) -> dict:
        xs = [self.F.num(to_rational(v)) for v in check_input(self.spec, x)]
        return {(0, j, s): s * xs[j] for j in range(len(xs)) for s in (1, -1)}

    def _continue_value(self, node: Any, v: dict) -> Any:
        F, g = self.F, self._graph
        return sum(
            (F.num(d["probability"]) * (F.num(d["reward"]) + F.num(d["multiplier"]) * v.get(u, 0))
             for u, d in continue_edges(g, node)),
            F.num(0),
        )

    def _choose(self, node: Any, c: Any, fixed: Any) -> tuple[Any, Any]:
        """(value, P(continue)) at ``node`` given the continue value c; ``fixed`` = imposed P."""
        F = self.F
        attrs = self._graph.nodes[node]
        if not attrs["can_stop"]:
            return c, F.num(1)
        kappa = 1 if attrs["player"] == "max" else -1
        if fixed is not None:
            p = F.num(fixed)
            reg = kappa * F.eps * F.entropy(p) if self.entropic else 0
            return p * c + reg, p
        if self.entropic:  # I9/I10: max_p pc + eps H(p), resp. min_q qc - eps H(q)
            return kappa * F.softplus(kappa * c), F.sigmoid(kappa * c / F.eps)
        p = F.num(1 if self.continues(attrs["player"], c) else 0)
        return p * c, p

    def values(self, terminal: dict, policy: Policy | None = None,
               fix: str = "both") -> tuple[dict, Policy]:
        """Shapley recursion (I1) from terminal payoffs up; returns state values and policies.

        With ``policy`` given, ``fix`` says which player follows it ("max", "min" or "both"); the
        other player optimises (one-player recursion of section 4).
        """
        v = dict(terminal)
        pol: Policy = []
        for l in range(1, self.spec.depth + 1):
            arr = np.empty((self.spec.widths[l], 2), dtype=object)
            for node in layer_nodes(self._graph, l):
                _, i, s = node
                col = 0 if s > 0 else 1
                player = "max" if s > 0 else "min"
                fixed = None
                if policy is not None and fix in (player, "both"):
                    fixed = policy[l - 1][i, col]
                v[node], arr[i, col] = self._choose(node, self._continue_value(node, v), fixed)
            pol.append(arr)
        return v, pol

    # -- solve ------------------------------------------------------------------------------------
    def solve(self, x: Any, target: int, policy: Policy | None = None) -> GameSolution:
        """Values, equilibrium policies and occupation measures of the start (L, target, +).

        I1 (values), I2 (policy), I3 (gradient = nu+ - nu-), I4/I11 (bias and entropy shares),
        I5 (bias gradient), I7 (the occupation sweep is the layer DP). ``policy`` imposes a
        policy pair instead of the equilibrium.
        """
        k = check_target(self.spec, target)
        F, g, spec = self.F, self._graph, self.spec
        v, pol = self.values(self._terminal(x), policy)
        start = (spec.depth, k, 1)
        zero = F.num(0)
        nu = {n: zero for n in g.nodes if n not in (CEMETERY, SINK)}
        rho = dict(nu)
        nu[start] = rho[start] = F.num(1)
        bias_share = entropy_share = stopped = sink = zero
        bias_grad = []
        for l in range(spec.depth, 0, -1):
            bg = np.array([zero] * spec.widths[l], dtype=object)
            for node in layer_nodes(g, l):
                _, i, s = node
                p = pol[l - 1][i, 0 if s > 0 else 1]
                if nu[node] == 0 and rho[node] == 0:
                    continue
                if g.nodes[node]["can_stop"] and self.entropic:
                    entropy_share += nu[node] * s * F.eps * F.entropy(p)  # I11, kappa = s
                stopped += rho[node] * (1 - p)
                moving, moving_rho = nu[node] * p, rho[node] * p
                bg[i] += s * moving  # I5
                for u, d in continue_edges(g, node):
                    prob = F.num(d["probability"])
                    bias_share += moving * prob * F.num(d["reward"])
                    if u == SINK:
                        sink += moving_rho
                        continue
                    nu[u] += moving * prob * F.num(d["multiplier"])
                    rho[u] += moving_rho * prob
            bias_grad.insert(0, bg)
        n0 = spec.widths[0]
        nu_p = np.array([nu[(0, j, 1)] for j in range(n0)], dtype=object)
        nu_m = np.array([nu[(0, j, -1)] for j in range(n0)], dtype=object)
        rho0 = np.array([rho[(0, j, 1)] + rho[(0, j, -1)] for j in range(n0)], dtype=object)
        grad = nu_p - nu_m
        xs = np.array([v[(0, j, 1)] for j in range(n0)], dtype=object)
        return GameSolution(
            value=v[start], values=v, policy=pol, nu=nu, rho_states=rho,
            occupation=Occupation(nu_p, nu_m, rho0), gradient=grad, gxi=xs * grad,
            bias_share=bias_share, entropy_share=entropy_share, stopped=stopped, sink=sink,
            bias_gradient=bias_grad, widths=spec.widths,
        )

    # -- paths (I6) -------------------------------------------------------------------------------
    def paths(self, x: Any, target: int, policy: Policy | None = None,
              max_paths: int = 100_000) -> list[Path]:
        """Every trajectory of the start under the equilibrium (or ``policy``) with its
        probability, discount D and payoff (I6). Exponential: a test oracle for tiny nets."""
        k = check_target(self.spec, target)
        F, g = self.F, self._graph
        terminal = self._terminal(x)
        _, pol = self.values(terminal, policy)
        out: list[Path] = []

        def walk(node: Any, states: list, prob: Any, disc: Any, pay: Any, ws: list) -> None:
            if len(out) > max_paths:
                raise RuntimeError(f"more than {max_paths} paths: the net is too large to enumerate")
            states = states + [node]
            if node[0] == 0:
                out.append(Path(states, node, prob, disc, pay + disc * terminal[node], ws))
                return
            l, i, s = node
            p = pol[l - 1][i, 0 if s > 0 else 1]
            attrs = g.nodes[node]
            if attrs["can_stop"] and p != 1:
                ent = s * F.eps * disc * -F.log(1 - p) if self.entropic else 0  # eps*kappa*(-log pi)
                out.append(Path(states + [CEMETERY], CEMETERY, prob * (1 - p), disc, pay + ent, ws))
            if p == 0:
                return
            ent = s * F.eps * disc * -F.log(p) if self.entropic and attrs["can_stop"] else 0
            for u, d in continue_edges(g, node):
                q = F.num(d["probability"])
                r = pay + ent + disc * F.num(d["reward"])
                if u == SINK:
                    out.append(Path(states + [SINK], SINK, prob * p * q, disc * 0, r, ws))
                    continue
                walk(u, states, prob * p * q, disc * F.num(d["multiplier"]), r, ws + [d["weight"]])

        walk((self.spec.depth, k, 1), [], F.num(1), F.num(1), F.num(0), [])
        return out

    # -- bounds (section 4, I13) ------------------------------------------------------------------
    def _box_terminal(self, lo: Sequence, hi: Sequence) -> tuple[dict, dict]:
        lo_ = [self.F.num(to_rational(v)) for v in check_input(self.spec, lo)]
        hi_ = [self.F.num(to_rational(v)) for v in check_input(self.spec, hi)]
        if any(a > b for a, b in zip(lo_, hi_)):
            raise ValueError("box bounds need lo <= hi in every coordinate")
        low = {(0, j, s): (lo_[j] if s > 0 else -hi_[j]) for j in range(len(lo_)) for s in (1, -1)}
        up = {(0, j, s): (hi_[j] if s > 0 else -lo_[j]) for j in range(len(lo_)) for s in (1, -1)}
        return low, up

    def bounds(self, lo: Sequence, hi: Sequence, target: int) -> tuple[Any, Any]:
        """v_lo(L,k,+) <= f_k(x') <= v_hi(L,k,+) on the box [lo, hi] (I13: equals IBP)."""
        k = check_target(self.spec, target)
        low, up = self._box_terminal(lo, hi)
        start = (self.spec.depth, k, 1)
        return self.values(low)[0][start], self.values(up)[0][start]

    def policy_bound(self, lo: Sequence, hi: Sequence, target: int, policy: Policy,
                     player: str = "max") -> Any:
        """Certified bound from a fixed policy (section 4): Max's policy gives the lower bound
        min_tau J_lo(sigma, tau), Min's policy the upper bound max_sigma J_hi(sigma, tau)."""
        k = check_target(self.spec, target)
        low, up = self._box_terminal(lo, hi)
        if player not in ("max", "min"):
            raise ValueError(f"player must be 'max' or 'min', got {player!r}")
        terminal = low if player == "max" else up
        return self.values(terminal, policy, fix=player)[0][(self.spec.depth, k, 1)]


def exact_forward(spec: MLPSpec, x: Any, dps: int = 50) -> list[np.ndarray]:
    """The network's own forward pass in the game's arithmetic: [y^0, y^1, ..., y^L].

    Independent of the game (used to check I1/I10).
    """
    spec = spec.exact()
    F = Field(spec.eps if spec.activation == "softplus" else None, dps)
    y = [F.num(to_rational(v)) for v in check_input(spec, x)]
    out = [np.array(y, dtype=object)]
    for l in range(1, spec.depth + 1):
        w, b = spec.weight(l), spec.bias(l)
        z = [F.num(b[i]) + sum((F.num(w[i, j]) * y[j] for j in range(len(y))), F.num(0))
             for i in range(w.shape[0])]
        if not spec.activated(l):
            y = z
        elif spec.activation == "relu":
            y = [zi if zi > 0 else F.num(0) for zi in z]
        else:
            y = [F.softplus(zi) for zi in z]
        out.append(np.array(y, dtype=object))
    return out


def ibp(spec: MLPSpec, lo: Sequence, hi: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Interval bound propagation in centre-radius form, exactly (the I13 reference)."""
    spec = spec.exact()
    if spec.activation != "relu":
        raise ValueError("ibp is implemented for ReLU nets")
    lo_ = np.array([to_rational(v) for v in check_input(spec, lo)], dtype=object)
    hi_ = np.array([to_rational(v) for v in check_input(spec, hi)], dtype=object)
    for l in range(1, spec.depth + 1):
        w = spec.weight(l)
        mid, rad = (lo_ + hi_) / 2, (hi_ - lo_) / 2
        absw = np.vectorize(abs, otypes=[object])(w)
        c, r = w.dot(mid) + spec.bias(l), absw.dot(rad)
        lo_, hi_ = c - r, c + r
        if spec.activated(l):
            relu = np.vectorize(lambda t: max(t, sp.Integer(0)), otypes=[object])
            lo_, hi_ = relu(lo_), relu(hi_)
    return lo_, hi_


def gap_bound(spec: MLPSpec) -> np.ndarray:
    """I12: |f_eps(x) - f_relu(x)| <= this vector (per output), for the softplus surrogate.

    Per neuron 0 <= softplus_eps - relu <= eps*log 2, amplified by the gammas:
    E^l = |W^l| E^{l-1} + eps*log 2 at activated layers, E^0 = 0.
    """
    spec = spec.numeric()
    if spec.activation != "softplus":
        raise ValueError("gap_bound needs a softplus spec (use spec.with_eps(eps))")
    e = np.zeros(spec.widths[0])
    for l in range(1, spec.depth + 1):
        e = np.abs(spec.weight(l)) @ e + (spec.eps * np.log(2.0) if spec.activated(l) else 0.0)
    return e


def enumerate_policies(spec: MLPSpec) -> itertools.product:
    """All deterministic Markov policies of ONE player on a tiny net: per layer a 0/1 object
    array (n_l,) of continue choices (always 1 at a linear output). The brute-force oracle for
    I2: combine with the other player's column of an equilibrium policy."""
    choices = []
    for l in range(1, spec.depth + 1):
        n = spec.widths[l]
        if spec.activated(l):
            choices.append([np.array(c, dtype=object) for c in itertools.product((0, 1), repeat=n)])
        else:
            choices.append([np.ones(n, dtype=object)])
    return itertools.product(*choices)


def to_float(a: Any) -> Any:
    """float / float64 array of exact or mpmath values."""
    if isinstance(a, np.ndarray):
        return np.array([float(v) for v in a.flat], dtype=np.float64).reshape(a.shape)
    if isinstance(a, (list, tuple)):
        return [to_float(v) for v in a]
    return float(a)

