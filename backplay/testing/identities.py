"""The identities I1-I13 of docs/theory.md, each checked three ways on one (net, input, target).

For every identity a check function returns an :class:`IdentityCheck`:
  * ``exact``: the identity itself, in exact arithmetic (sympy rationals; mpmath at 50 digits for the
    transcendental values of the entropic game, where "exact" means within 1e-30);
  * ``torch_err``: worst error of backplay.gpu in float64 against the exact objects;
  * ``cvxpy_err``: worst error of backplay.numerics (cvxpy programs) against the exact objects.
Errors are absolute errors divided by max(1, largest |exact value| compared), so nets with large
outputs are held to the same number of significant digits. Both the property tests and
``backplay verify`` call these functions (through :mod:`backplay.testing.registry`), so the table
and the tests cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import Any

import numpy as np
import sympy as sp
import torch

from .. import numerics
from ..gpu import interval_bounds, occupation
from ..gpu.engine import explain
from ..nets import FrozenNet, MLPSpec
from ..rules import LRP0
from ..theory import (
    ReLUNetGame, enumerate_policies, exact_forward, freeze, gap_bound, ibp, lrp0, routing_law, to_float,
)

TOL_TORCH = 1e-10
TOL_CVXPY = 1e-6
TOL_MP = 1e-30  # mpmath (50 digits) stands in for exact arithmetic in the entropic game


def _floats(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy().reshape(-1)
    return np.array([float(v) for v in np.asarray(a, dtype=object).reshape(-1)], dtype=np.float64)


def err(a: Any, b: Any) -> float:
    """max |a - b| / max(1, max |b|), b the exact reference (any of: exact, mpmath, float, torch)."""
    a, b = _floats(a), _floats(b)
    if a.shape != b.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _same(a: Any, b: Any, entropic: bool) -> bool:
    """Exact equality (rationals) or agreement to TOL_MP (mpmath)."""
    a, b = np.asarray(a, dtype=object).reshape(-1), np.asarray(b, dtype=object).reshape(-1)
    if a.shape != b.shape:
        return False
    if entropic:
        return all(abs(u - v) <= TOL_MP * max(1, abs(v)) for u, v in zip(a, b))
    return all(u == v for u, v in zip(a, b))


@dataclass
class IdentityCheck:
    """Outcome of one identity on one case."""

    identity: str
    exact: bool
    torch_err: float | None  # None: no torch counterpart
    cvxpy_err: float | None  # None: no cvxpy counterpart
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.exact and (self.torch_err is None or self.torch_err <= TOL_TORCH) and \
            (self.cvxpy_err is None or self.cvxpy_err <= TOL_CVXPY)


@dataclass
class Case:
    """One (net, input, target), with every object the checks share computed once."""

    spec: MLPSpec
    x: np.ndarray
    target: int
    game_cls: type = ReLUNetGame
    solver: str = "CLARABEL"
    laws: dict = field(default_factory=dict, repr=False)

    @property
    def entropic(self) -> bool:
        return self.spec.activation == "softplus"

    @cached_property
    def game(self) -> ReLUNetGame:
        return self.game_cls(self.spec)

    @cached_property
    def sol(self) -> Any:
        return self.game.solve(self.x, self.target)

    @cached_property
    def ys(self) -> list[np.ndarray]:
        return exact_forward(self.spec, self.x)

    @cached_property
    def zs(self) -> list[np.ndarray]:
        """Exact pre-activations z^1..z^L (index l-1)."""
        F = self.game.F
        out = []
        for l in range(1, self.spec.depth + 1):
            w, b = self.game.spec.weight(l), self.game.spec.bias(l)
            out.append(np.array([F.num(b[i]) + sum((F.num(w[i, j]) * self.ys[l - 1][j]
                                                     for j in range(w.shape[1])), F.num(0))
                                 for i in range(w.shape[0])], dtype=object))
        return out

    @cached_property
    def gates(self) -> list[np.ndarray]:
        """Exact continue probabilities from the net: 1{z > 0} (ReLU) or sigmoid(z/eps)."""
        F = self.game.F
        out = []
        for l, z in enumerate(self.zs, start=1):
            if not self.spec.activated(l):
                out.append(np.array([F.num(1)] * len(z), dtype=object))
            elif self.entropic:
                out.append(np.array([F.sigmoid(v / F.eps) for v in z], dtype=object))
            else:
                out.append(np.array([F.num(1 if v > 0 else 0) for v in z], dtype=object))
        return out

    @cached_property
    def backprop(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """Exact chain rule (independent of the game): (df/dx, [df/db^l for l = 1..L])."""
        F = self.game.F
        g = np.array([F.num(0)] * self.spec.widths[-1], dtype=object)
        g[self.target] = F.num(1)
        bgrads = []
        for l in range(self.spec.depth, 0, -1):
            delta = g * self.gates[l - 1]
            bgrads.insert(0, delta)
            w = np.vectorize(self.game.F.num, otypes=[object])(self.game.spec.weight(l))
            g = w.T.dot(delta)
        return g, bgrads

    @cached_property
    def frozen(self) -> FrozenNet:
        """The exact explained forward pass (routing laws, docs/theory.md section 8)."""
        return freeze(self.spec, self.x)

    def law(self, rule: Any) -> Any:
        """The exact routing law of ``rule`` on this case (cached)."""
        if rule not in self.laws:
            self.laws[rule] = routing_law(self.frozen, target=self.target, rule=rule)
        return self.laws[rule]

    @cached_property
    def model(self) -> torch.nn.Module:
        return self.spec.to_torch(dtype=torch.float64)

    @cached_property
    def xt(self) -> torch.Tensor:
        return torch.tensor(self.x, dtype=torch.float64)[None]

    @cached_property
    def occ(self) -> Any:
        return occupation(self.model, self.xt, self.target)

    @cached_property
    def policy_float(self) -> list[np.ndarray]:
        return [to_float(p) for p in self.sol.policy]

    @cached_property
    def cvx_occ(self) -> Any:
        """The flow program under numerics' own equilibrium policy (from its float forward)."""
        return numerics.occupation_measure(self.spec, self.x, self.target, solver=self.solver)

    @cached_property
    def cert(self) -> Any:
        return numerics.certify_equilibrium(self.spec, self.x, self.target,
                                            policy=self.policy_float, solver=self.solver)

    @cached_property
    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """A box around x: [x - 1/2, x + 1/4] (asymmetric so centre and corners differ)."""
        return self.x - 0.5, self.x + 0.25

    def torch_layers(self) -> list[torch.Tensor]:
        """float64 outputs y^1..y^L of the torch model."""
        out, h = [], self.xt
        for m in self.model:
            h = m(h)
            if not isinstance(m, torch.nn.Linear) or m is self.model[-1]:
                out.append(h[0])
        return out


# ---------------------------------------------------------------------------------------------
def check_i1(c: Case) -> IdentityCheck:
    """I1: v(l,i,+) = y^l_i, v(l,i,-) = -y^l_i at every layer; f_k = v(L,k,+)."""
    v = c.sol.values
    ok = all(
        _same([v[(l, i, 1)], -v[(l, i, -1)]], [c.ys[l][i]] * 2, c.entropic)
        for l in range(1, c.spec.depth + 1) for i in range(c.spec.widths[l])
    )
    t_err = max(err(_floats(y), c.ys[l]) for l, y in enumerate(c.torch_layers(), start=1))
    t_err = max(t_err, err(_floats(c.occ.value), [c.sol.value]))
    br = numerics.best_response(c.spec, c.x, c.target, "max", c.policy_float, solver=c.solver)
    return IdentityCheck("I1", ok, t_err, err([br.value], [c.sol.value]))


def check_i2(c: Case) -> IdentityCheck:
    """I2: both copies continue iff z > 0 (ties stop); a saddle point (cvxpy exploitability 0,
    and by enumerating deterministic policies on tiny nets)."""
    pol = c.sol.policy
    ok = all(_same(pol[l][:, 0], c.gates[l], c.entropic) and _same(pol[l][:, 1], c.gates[l], c.entropic)
             for l in range(c.spec.depth))
    detail = ""
    n_act = sum(c.spec.widths[l] for l in range(1, c.spec.depth + 1) if c.spec.activated(l))
    if ok and not c.entropic and n_act <= 8:
        term = c.game._terminal(c.x)
        start = (c.spec.depth, c.target, 1)
        for dev in enumerate_policies(c.spec):
            as_max = [np.stack([d, p[:, 1]], axis=1) for d, p in zip(dev, pol)]
            as_min = [np.stack([p[:, 0], d], axis=1) for d, p in zip(dev, pol)]
            if c.game.values(term, as_max)[0][start] > c.sol.value or \
               c.game.values(term, as_min)[0][start] < c.sol.value:
                ok, detail = False, "a unilateral deviation gains"
                break
        detail = detail or f"checked {2 * 2 ** n_act} unilateral deviations"
    gates = c.occ.gates
    t_err = max(err(_floats(gates[l][0]), c.gates[l]) for l in range(c.spec.depth))
    return IdentityCheck("I2", ok, t_err, abs(c.cert.exploitability) / max(1.0, abs(float(c.sol.value))), detail)


def check_i3(c: Case) -> IdentityCheck:
    """I3: df/dx = nu+ - nu- (the exact chain rule; torch autograd; the cvxpy flow program)."""
    ok = _same(c.sol.gradient, c.backprop[0], c.entropic)
    x = c.xt.clone().requires_grad_(True)
    c.model(x)[0, c.target].backward()
    t_err = max(err(_floats(x.grad[0]), c.sol.gradient), err(_floats(c.occ.gradient[0]), c.sol.gradient))
    cv = err(c.cvx_occ.nu_plus - c.cvx_occ.nu_minus, c.sol.gradient)
    return IdentityCheck("I3", ok, t_err, cv)


def check_i4(c: Case) -> IdentityCheck:
    """I4: f = sum_j x_j df/dx_j + E[discounted bias rewards] (Euler's identity without biases)."""
    ok = _same([sum(c.sol.gxi) + c.sol.bias_share], [c.sol.value], False)
    t_err = max(err(_floats(c.occ.bias_share), [c.sol.bias_share]),
                err(_floats(c.occ.gxi[0]), c.sol.gxi))
    cv = max(err([c.cvx_occ.bias_share], [c.sol.bias_share]),
             err(c.x * (c.cvx_occ.nu_plus - c.cvx_occ.nu_minus), c.sol.gxi))
    if not c.spec.has_bias:
        ok = ok and c.sol.bias_share == 0
    return IdentityCheck("I4", ok, t_err, cv)


def check_i5(c: Case) -> IdentityCheck:
    """I5: df/db^l_i = E[sum_t s_t D_t 1{at (l,i,s_t) and continue}]."""
    ok = all(_same(a, b, c.entropic) for a, b in zip(c.sol.bias_gradient, c.backprop[1]))
    model = c.spec.to_torch(dtype=torch.float64)
    lins = [m for m in model if isinstance(m, torch.nn.Linear)]
    bs = []
    for m in lins:
        if m.bias is None:
            m.bias = torch.nn.Parameter(torch.zeros(m.out_features, dtype=torch.float64))
        bs.append(m.bias)
    model(c.xt)[0, c.target].backward()
    t_err = max(err(_floats(b.grad), g) for b, g in zip(bs, c.sol.bias_gradient))
    t_err = max(t_err, max(err(_floats(g[0]), h) for g, h in zip(c.occ.bias_gradient, c.sol.bias_gradient)))
    cm = c.cvx_occ.continue_mass
    cv = max(err(m[:, 0] - m[:, 1], g) for m, g in zip(cm, c.sol.bias_gradient))
    return IdentityCheck("I5", ok, t_err, cv)


def check_i6(c: Case, max_paths: int = 20_000) -> IdentityCheck:
    """I6: f is the sum over trajectories of probability x payoff; along a path to an input,
    probability x D = prod |W| and the end copy = prod sign W."""
    paths = c.game.paths(c.x, c.target, max_paths=max_paths)
    ok = _same([sum(p.probability * p.payoff for p in paths)], [c.sol.value], c.entropic)
    n0 = c.spec.widths[0]
    by_end = {(j, s): 0 for j in range(n0) for s in (1, -1)}
    for p in paths:
        if p.end in ("cemetery", "sink"):
            continue
        prod_abs = sp.Mul(*[abs(w) for w in p.weights])
        sign = int(np.prod([1 if w > 0 else -1 for w in p.weights]))
        ok = ok and p.end[2] == sign
        if not c.entropic:
            ok = ok and p.probability * p.discount == prod_abs
        by_end[(p.end[1], p.end[2])] += p.probability * p.discount
    nu_p = np.array([by_end[(j, 1)] for j in range(n0)], dtype=object)
    nu_m = np.array([by_end[(j, -1)] for j in range(n0)], dtype=object)
    ok = ok and _same(nu_p, c.sol.occupation.nu_plus, c.entropic) and \
        _same(nu_m, c.sol.occupation.nu_minus, c.entropic)
    t_err = max(err(_floats(c.occ.nu_plus[0]), nu_p), err(_floats(c.occ.nu_minus[0]), nu_m))
    cv = max(err(c.cvx_occ.nu_plus, nu_p), err(c.cvx_occ.nu_minus, nu_m))
    return IdentityCheck("I6", ok, t_err, cv, f"{len(paths)} paths")


def check_i7(c: Case) -> IdentityCheck:
    """I7: the layer DP: nu+ - nu- through W, nu+ + nu- through |W| on active neurons, rho
    through |W|/gamma; every layer, against the state-by-state sweep on the graph."""
    F = c.game.F
    signed = abs_ = None
    ok = True
    rho = None
    for l in range(c.spec.depth, -1, -1):
        if l == c.spec.depth:
            signed = np.array([F.num(0)] * c.spec.widths[l], dtype=object)
            signed[c.target] = F.num(1)
            abs_, rho = signed.copy(), signed.copy()
        else:
            w = np.vectorize(F.num, otypes=[object])(c.game.spec.weight(l + 1))
            aw = np.vectorize(abs, otypes=[object])(w)
            gamma = aw.sum(axis=1)
            p = c.gates[l]
            signed = w.T.dot(signed * p)
            abs_ = aw.T.dot(abs_ * p)
            rho = aw.T.dot(np.array([r * q / g if g != 0 else F.num(0)
                                     for r, q, g in zip(rho, p, gamma)], dtype=object))
        ok = ok and _same(signed, c.sol.layer(l, "signed"), c.entropic) and \
            _same(abs_, c.sol.layer(l, "abs"), c.entropic) and \
            _same(rho, c.sol.layer(l, "rho"), c.entropic)
    t_err = max(
        max(err(_floats(c.occ.layers_signed[l][0]), c.sol.layer(l, "signed")),
            err(_floats(c.occ.layers_abs[l][0]), c.sol.layer(l, "abs")),
            err(_floats(c.occ.layers_rho[l][0]), c.sol.layer(l, "rho")))
        for l in range(c.spec.depth + 1)
    )
    cv = max(max(err(c.cvx_occ.states[l][:, 0] - c.cvx_occ.states[l][:, 1], c.sol.layer(l, "signed")),
                 err(c.cvx_occ.states[l][:, 0] + c.cvx_occ.states[l][:, 1], c.sol.layer(l, "abs")))
             for l in range(c.spec.depth + 1))
    cv = max(cv, err(c.cvx_occ.rho, c.sol.occupation.rho))
    return IdentityCheck("I7", ok, t_err, cv)


def check_i8(c: Case) -> IdentityCheck:
    """I8: LRP-0 with biases on a ReLU net equals Gradient x Input (where the target logit is not 0;
    at f = 0 LRP-0 starts with no mass and every relevance is 0, as for I17)."""
    rel = lrp0(c.spec, c.x, c.target)
    if c.sol.value == 0:  # LRP-0 starts with R^L = f = 0: no relevance, while x * grad need not be 0
        ok = all(v == 0 for v in rel[0])
    else:
        ok = _same(rel[0], c.sol.gxi, False)
    r_t = explain(c.model, c.xt, c.target, rule=LRP0())
    t_err = err(_floats(r_t[0]), rel[0])
    cv = err(c.x * (c.cvx_occ.nu_plus - c.cvx_occ.nu_minus), rel[0])
    return IdentityCheck("I8", ok, t_err, cv)


@cache
def _variational_symbolic() -> bool:
    """I9 symbolically: d/dp [p c + eps H(p)] = 0 at p* = sigmoid(c/eps), second derivative
    -eps/(p(1-p)) < 0, value at p* = softplus_eps(c)."""
    p, e = sp.symbols("p epsilon", positive=True)
    c = sp.Symbol("c", real=True)
    obj = p * c + e * (-p * sp.log(p) - (1 - p) * sp.log(1 - p))
    pstar = 1 / (1 + sp.exp(-c / e))
    d1 = sp.simplify(sp.diff(obj, p).subs(p, pstar))
    d2 = sp.simplify(sp.diff(obj, p, 2) + e / (p * (1 - p)))
    val = obj.subs(p, pstar) - e * sp.log(1 + sp.exp(c / e))
    val_ok = sp.simplify(sp.expand_log(sp.simplify(val), force=True)) == 0 or \
        all(abs(sp.N(val.subs({c: cv, e: ev}), 40)) < 1e-35 for cv in (-3, 0.5, 2) for ev in (0.25, 1))
    return d1 == 0 and d2 == 0 and val_ok


def check_i9(c: Case) -> IdentityCheck:
    """I9: max_p {p c + eps H(p)} = softplus_eps(c) at p* = sigmoid(c/eps), strictly concave;
    at every pre-activation of the net."""
    F = c.game.F
    ok = _variational_symbolic()
    t_err = cv = p_gap = 0.0
    eps_f = float(c.spec.eps)
    for z in c.zs:
        for zi in z:
            p = F.sigmoid(zi / F.eps)
            val = F.softplus(zi)
            ok = ok and abs(p * zi + F.eps * F.entropy(p) - val) <= TOL_MP * max(1, abs(val))
            zt = torch.tensor(float(zi), dtype=torch.float64)
            pt = torch.sigmoid(zt / eps_f)
            ht = -(torch.xlogy(pt, pt) + torch.xlogy(1 - pt, 1 - pt))
            t_err = max(t_err, err([float(pt * zt + eps_f * ht)], [val]))
            # cvxpy: its optimal value is softplus_eps(c), and p* is no worse than its maximiser.
            # (The maximiser of this flat concave objective is only determined to about the square
            # root of the solver tolerance, so p itself is compared in `detail`, not asserted.)
            p_cvx, v_cvx = numerics.entropic_choice(float(zi), eps_f, solver=c.solver)
            at_pstar = float(p) * float(zi) + eps_f * numerics.binary_entropy(float(p))
            cv = max(cv, err([v_cvx], [val]), max(0.0, v_cvx - at_pstar) / max(1.0, abs(float(val))))
            p_gap = max(p_gap, abs(p_cvx - float(p)))
    return IdentityCheck("I9", ok, t_err, cv, f"|p_cvxpy - sigmoid(c/eps)| <= {p_gap:.1e}")


def check_i10(c: Case) -> IdentityCheck:
    """I10: the entropic game value is the softplus net: v(l,i,+/-) = +/- softplus_eps(z), both
    copies continue with probability sigmoid(z/eps)."""
    v = c.sol.values
    ok = all(_same([v[(l, i, 1)], -v[(l, i, -1)]], [c.ys[l][i]] * 2, True)
             for l in range(1, c.spec.depth + 1) for i in range(c.spec.widths[l]))
    ok = ok and all(_same(c.sol.policy[l][:, s], c.gates[l], True)
                    for l in range(c.spec.depth) for s in (0, 1))
    t_err = max(err(_floats(y), c.ys[l]) for l, y in enumerate(c.torch_layers(), start=1))
    t_err = max(t_err, max(err(_floats(c.occ.gates[l][0]), c.gates[l]) for l in range(c.spec.depth)))
    scale = max(1.0, abs(float(c.sol.value)))
    cv = max(err([c.cert.max_value], [c.sol.value]), err([c.cert.min_value], [c.sol.value]),
             abs(c.cert.exploitability) / scale)
    return IdentityCheck("I10", ok, t_err, cv)


def check_i11(c: Case) -> IdentityCheck:
    """I11: df/dx = nu+ - nu- under the Gibbs policies and
    f = sum_j GxI_j + E[discounted bias rewards] + E[discounted entropy terms]."""
    s = c.sol
    ok = _same([sum(s.gxi) + s.bias_share + s.entropy_share], [s.value], True) and \
        _same(s.gradient, c.backprop[0], True)
    x = c.xt.clone().requires_grad_(True)
    c.model(x)[0, c.target].backward()
    t_err = max(err(_floats(x.grad[0]), s.gradient), err(_floats(c.occ.gradient[0]), s.gradient),
                err(_floats(c.occ.entropy_share), [s.entropy_share]),
                err(_floats(c.occ.bias_share), [s.bias_share]))
    o = c.cvx_occ
    cv = max(err(o.nu_plus - o.nu_minus, s.gradient), err([o.entropy_share], [s.entropy_share]),
             err([o.bias_share], [s.bias_share]))
    return IdentityCheck("I11", ok, t_err, cv)


def check_i12(c: Case) -> IdentityCheck:
    """I12: eps -> 0 gives the ReLU value; 0 <= softplus_eps - relu <= eps log 2 per neuron and
    |f_eps - f_0| <= the gamma-amplified bound, at eps = spec's eps (or 1/2) and smaller."""
    relu_spec = MLPSpec(c.spec.weights, c.spec.biases, "relu", None,
                        "linear" if c.spec.output == "linear" else "relu")
    f0 = exact_forward(relu_spec, c.x)[-1][c.target]
    eps0 = c.spec.eps if c.entropic else 0.5
    ok, t_err, gaps = True, 0.0, []
    for scale in (1, 2 ** -4, 2 ** -12):
        sp_spec = relu_spec.with_eps(float(eps0) * scale)
        game = c.game_cls(sp_spec)
        F = game.F
        ys = exact_forward(sp_spec, c.x)
        fe = ys[-1][c.target]
        bound = gap_bound(sp_spec)[c.target]
        gap = abs(fe - F.num(f0))
        gaps.append(float(gap))
        ok = ok and gap <= bound * (1 + 1e-12) and \
            abs(game.solve(c.x, c.target).value - fe) <= TOL_MP * max(1, abs(fe))
        y_prev, exact_spec = ys[0], sp_spec.exact()
        for l in range(1, sp_spec.depth + 1):  # per neuron, at the softplus net's own z
            w, b = exact_spec.weight(l), exact_spec.bias(l)
            z = [F.num(b[i]) + sum((F.num(w[i, j]) * y_prev[j] for j in range(w.shape[1])), F.num(0))
                 for i in range(w.shape[0])]
            if sp_spec.activated(l):
                d = [F.softplus(zi) - max(zi, F.num(0)) for zi in z]
                ok = ok and all(-TOL_MP <= di <= F.eps * F.log(2) + TOL_MP for di in d)
            y_prev = ys[l]
        model = sp_spec.to_torch(dtype=torch.float64)
        t_err = max(t_err, err(_floats(model(c.xt)[0, c.target]).reshape(1), [fe]))
    # the bound is tight where every pre-activation is 0 (softplus_eps(0) - relu(0) = eps log 2): the
    # float64 bound then equals the exact gap up to its own round-off
    ok = ok and gaps[-1] <= gap_bound(relu_spec.with_eps(float(eps0) * 2 ** -12))[c.target] * (1 + 1e-12)
    sp_spec = relu_spec.with_eps(float(eps0))
    cert = numerics.certify_equilibrium(sp_spec, c.x, c.target, solver=c.solver)
    fe = exact_forward(sp_spec, c.x)[-1][c.target]
    cv = err([cert.max_value], [fe])
    return IdentityCheck("I12", ok, t_err, cv, "gaps " + ", ".join(f"{g:.2e}" for g in gaps))


def check_i13(c: Case) -> IdentityCheck:
    """I13: the Shapley bounds on a box equal interval bound propagation; a fixed Max policy gives
    a sound lower bound no tighter than IBP; f stays inside the bounds on the box."""
    lo, hi = c.box
    lower, upper = c.game.bounds(lo, hi, c.target)
    ibp_lo, ibp_hi = ibp(c.spec, lo, hi)
    ok = lower == ibp_lo[c.target] and upper == ibp_hi[c.target]
    pol_lower = c.game.policy_bound(lo, hi, c.target, c.sol.policy, "max")
    pol_upper = c.game.policy_bound(lo, hi, c.target, c.sol.policy, "min")
    ok = ok and pol_lower <= lower and pol_upper >= upper
    rng = np.random.default_rng(0)
    for _ in range(8):
        xp = lo + (hi - lo) * rng.integers(0, 5, size=len(lo)) / 4
        f = exact_forward(c.spec, xp)[-1][c.target]
        ok = ok and lower <= f <= upper
    t_lo, t_hi = interval_bounds(c.model, torch.tensor(lo)[None], torch.tensor(hi)[None])
    t_err = max(err(_floats(t_lo[0]), ibp_lo), err(_floats(t_hi[0]), ibp_hi))
    n_lo, n_hi = numerics.box_bound(c.spec, lo, hi, c.target, solver=c.solver)
    cv = max(err([n_lo], [lower]), err([n_hi], [upper]))
    return IdentityCheck("I13", ok, t_err, cv)
