"""The routing-game identities I14-I21 (docs/theory.md section 8), each checked three ways.

Same contract as :mod:`backplay.testing.identities`: ``exact`` is the identity in exact arithmetic
(rationals; mpmath at 50 digits for the Gibbs forms, "exact" meaning within 1e-30), ``torch_err`` the
worst error of ``backplay.explain`` (float64, every layer) against the exact law, ``cvxpy_err`` the
worst error of the cvxpy programs of ``backplay.numerics`` (flow program of the law's occupation,
local maximiser programs). ``None`` marks a column with nothing to compare (I21 has no torch or
cvxpy counterpart).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import sympy as sp
import torch

from .. import numerics
from ..gpu.engine import explain
from ..rules import RG, AlphaBeta, Anchor, GradientEquilibrium, RGEq, RiskAverse, Rule
from ..theory import (
    alpha_beta_lrp,
    bhattacharyya_paths,
    gibbs_alpha_beta,
    gv_law,
    hellinger,
    risk_reweighted_paths,
    routing_law,
)
from .identities import TOL_MP, Case, IdentityCheck, err

# The conservative laws every routing row runs (I14, torch and cvxpy columns).
ROUTING_RULES: list[Rule] = [
    AlphaBeta(2, 1), AlphaBeta(1, 0), RG(), RG(tau=0.5), RG(route_temp=0.5), RGEq(),
    RGEq(kappa=0.5, nu=0.5, route_temp=2.0), GradientEquilibrium(), Anchor(RG(), 0.25),
    RiskAverse(RG(), theta=0.5, sigma=1.0),
]
MAX_PATHS = 20_000


def _close(a: Any, b: Any) -> bool:
    a, b = np.asarray(a, dtype=object).reshape(-1), np.asarray(b, dtype=object).reshape(-1)
    return a.shape == b.shape and all(abs(u - v) <= TOL_MP * max(1, abs(v)) for u, v in zip(a, b))


def _torch_err(c: Case, rule: Rule, law: Any) -> float:
    """Worst error of explain's per-layer relevance and stopped mass against the exact law."""
    _, rep = explain(c.model, c.xt, c.target, rule=rule, return_report=True)
    rel = law.relevance()
    worst = max(err(rep.layers[l][0], rel[l]) for l in range(len(rel)))
    return max(worst, err(rep.stopped.reshape(1), [law.stopped()["total"]]))


def _cvxpy_err(c: Case, rule: Rule, law: Any) -> float:
    """The law's occupation by the cvxpy flow program (numerics' own float64 kernels), every layer."""
    kernels = numerics.routing_kernels(c.spec, c.x, rule)
    occ = numerics.law_occupation(kernels, c.target, w0=float(law.w0), solver=c.solver)
    worst = max(err(r, e) for r, e in zip(occ.relevance, law.relevance()))
    return max(worst, err([occ.cemetery + occ.bias_sink], [law.stopped()["total"]]))


def check_i14(c: Case) -> IdentityCheck:
    """I14: sum_j R_j + stopped signed mass (cemetery and bias sink) = f_k(x), for every law."""
    ok, t_err, cv = True, 0.0, 0.0
    for rule in ROUTING_RULES:
        law = c.law(rule)
        ok = ok and _close([sum(law.relevance()[0]) + law.stopped()["total"]], [law.w0])
        t_err = max(t_err, _torch_err(c, rule, law))
        cv = max(cv, _cvxpy_err(c, rule, law))
    return IdentityCheck("I14", ok, t_err, cv, f"{len(ROUTING_RULES)} laws")


def check_i15(c: Case) -> IdentityCheck:
    """I15: the alpha-beta hand-over (p = alpha/(alpha+beta), m = alpha+beta, T = 1) gives the standard
    rule R_j = sum_i (alpha Z+_ij/S+_i - beta Z-_ij/S-_i) R_i exactly, at every layer."""
    ok, t_err, cv = True, 0.0, 0.0
    for alpha, beta in ((2, 1), (1, 0), (3, 2)):
        rule = AlphaBeta(alpha, beta)
        law = c.law(rule)
        closed = alpha_beta_lrp(c.frozen, c.target, alpha, beta)
        ok = ok and all(np.all(a == b) for a, b in zip(law.relevance(), closed))
        t_err = max(t_err, _torch_err(c, rule, law))
        cv = max(cv, _cvxpy_err(c, rule, law))
    return IdentityCheck("I15", ok, t_err, cv)


def check_i16(c: Case) -> IdentityCheck:
    """I16: p* = sigmoid(1/tau) maximises p + tau H(p); m = coth(1/(2 tau)), alpha - beta = 1, so
    RG(tau) is AlphaBeta(alpha(tau), beta(tau)) at every layer (tau = 1/ln 2: alpha=2, beta=1)."""
    rg_exact = routing_law(c.frozen, target=c.target, rule=RG(tau=1 / sp.log(2)))
    ok = all(np.all(a == b) for a, b in zip(rg_exact.relevance(), c.law(AlphaBeta(2, 1)).relevance()))
    t_err, cv = 0.0, 0.0
    for tau in (sp.Rational(1, 2), sp.Integer(2)):
        alpha, beta = gibbs_alpha_beta(tau)
        ok = ok and sp.simplify(alpha - beta - 1) == 0
        rule = RG(tau=float(tau))
        law = c.law(rule)
        mapped = routing_law(c.frozen, target=c.target, field="mpmath",
                             rule=AlphaBeta(alpha, beta, conservative=False))
        ok = ok and all(_close(a, b) for a, b in zip(law.relevance(), mapped.relevance()))
        ok = ok and all(_close([k.m], [sp.N(sp.coth(1 / (2 * tau)), 60)])
                        for k in (law.kernel(l, i) for l in range(1, c.spec.depth + 1)
                                  for i in range(c.spec.widths[l])) if not k.stopped)
        t_err = max(t_err, _torch_err(c, rule, law))
        _, value = numerics.gibbs_handover(float(tau), solver=c.solver)
        cv = max(cv, err([value], [float(tau) * math.log1p(math.exp(1 / float(tau)))]))
    return IdentityCheck("I16", ok, t_err, cv)


def check_i17(c: Case) -> IdentityCheck:
    """I17: the gradient equilibrium p = S+/(S+ + |S-|), m = (S+ + |S-|)/z gives LRP-0, i.e.
    Gradient x Input (the GV game's signed terminal payoff) on a ReLU net."""
    rule = GradientEquilibrium()
    law = c.law(rule)
    ok = bool(np.all(law.relevance()[0] == _i17_input_relevance(c)))
    return IdentityCheck("I17", ok, _torch_err(c, rule, law), _cvxpy_err(c, rule, law))


def _i17_input_relevance(c: Case) -> np.ndarray:
    """What I17 gives at the input: Gradient x Input when the start mass w0 = f_k(x) is not 0. At
    f_k(x) = 0 (a linear output at exactly 0; m = (S+ + |S-|)/z needs z != 0) the law carries no mass
    and every relevance is 0, while x * grad need not be."""
    if c.sol.value == 0:
        return np.zeros(len(c.sol.gxi), dtype=object)
    return c.sol.gxi


def check_i18(c: Case) -> IdentityCheck:
    """I18: log-odds(p) = kappa + nu log(S+/|S-|), m = 1/(p - q): (log(alpha/beta), 0) is alpha-beta,
    (0, 1) is the gradient equilibrium; the hand-over is the Gibbs maximiser (cvxpy)."""
    eq = c.law(RGEq(0.0, 1.0))
    ok = all(np.all(a == b) for a, b in zip(eq.relevance(), c.law(GradientEquilibrium()).relevance()))
    ab_like = routing_law(c.frozen, target=c.target, rule=RGEq(sp.log(2), 0))
    ok = ok and all(_close(a, b) for a, b in zip(ab_like.relevance(), c.law(AlphaBeta(2, 1)).relevance()))
    rule = RGEq(kappa=0.5, nu=0.5, route_temp=2.0)
    law = c.law(rule)
    rep = numerics.check_local_maximisers(c.spec, c.x, c.target, RGEq(0.5, 0.5), solver=c.solver)
    cv = max(rep.handover_value, _cvxpy_err(c, rule, law))
    return IdentityCheck("I18", ok, _torch_err(c, rule, law), cv,
                         f"hand-over maximiser within {rep.handover_p:.1e}")


def check_i19(c: Case) -> IdentityCheck:
    """I19: routing pi*_T proportional to pi0 exp(r/T) (pi0 = |W|/gamma, r = log|y|) is the unique
    maximiser of sum pi r - T KL(pi || pi0); at T = 1 its value is log(|S_b|/gamma)."""
    ok = True
    rule = RG(route_temp=0.5)
    law = c.law(rule)
    for l in range(1, c.spec.depth + 1):  # exact: routing weights |W| |y|^(1/T) / sum
        for i in range(c.spec.widths[l]):
            k = law.kernel(l, i)
            for b, routes in k.routing.items():
                ok = ok and (not routes or abs(sum(routes.values()) - 1) < TOL_MP)
    rep = numerics.check_local_maximisers(c.spec, c.x, c.target, rule, solver=c.solver)
    rep1 = numerics.check_local_maximisers(c.spec, c.x, c.target, RG(), solver=c.solver)
    cv = max(rep.routing_value, rep1.routing_value, _cvxpy_err(c, rule, law))
    return IdentityCheck("I19", ok, _torch_err(c, rule, law), cv,
                         f"routing maximisers within {max(rep.routing_pi, rep1.routing_pi):.1e}")


def check_i20(c: Case) -> IdentityCheck:
    """I20: the risk-averse law Q* ~ P exp(-theta X) is Markov, K_theta = K U(s')/U(s): its path
    probabilities equal P(path) exp(-theta X) / U(start); theta = 0 is the base law."""
    rule = RiskAverse(RG(), theta=0.5, sigma=1.0)
    law = c.law(rule)
    ok = all(np.all(a == b) for a, b in zip(
        c.law(RiskAverse(AlphaBeta(2, 1), theta=0.0)).relevance(), c.law(AlphaBeta(2, 1)).relevance()))
    detail = "path oracle skipped: too many paths"
    try:
        paths = law.paths(MAX_PATHS)
    except RuntimeError:
        paths = None
    if paths is not None:
        reweighted = risk_reweighted_paths(law, MAX_PATHS)
        doob: dict = {}  # the law's path probabilities on graph states (the cemetery is one state)
        for p in paths:
            doob[p.key] = doob.get(p.key, 0) + p.probability
        ok = ok and doob.keys() == reweighted.keys() and \
            all(abs(v - reweighted[k]) <= TOL_MP for k, v in doob.items())
        detail = f"{len(paths)} paths"
    return IdentityCheck("I20", ok, _torch_err(c, rule, law), _cvxpy_err(c, rule, law), detail)


def check_i21(c: Case) -> IdentityCheck:
    """I21: Hellinger distance by the Bhattacharyya recursion (= path enumeration); 0 for a law
    against itself; the GV game and the gradient equilibrium give the same attribution."""
    ab, rg = c.law(AlphaBeta(2, 1)), c.law(RG(tau=0.5))
    ok = hellinger(ab, ab) == 0
    gv, eq = gv_law(c.spec, c.x, c.target), c.law(GradientEquilibrium())
    ok = ok and np.all(gv.attribution() == c.sol.gxi) and np.all(eq.relevance()[0] == _i17_input_relevance(c))
    detail = "path oracle skipped: too many paths"
    try:
        bc = bhattacharyya_paths(ab, rg, MAX_PATHS)
        ok = ok and abs((1 - hellinger(ab, rg) ** 2) - bc) <= TOL_MP
        detail = f"H(AB, RG(0.5)) = {float(hellinger(ab, rg)):.3f}, H(GV, GradEq) = {float(hellinger(gv, eq)):.3f}"
    except RuntimeError:
        pass
    return IdentityCheck("I21", ok, None, None, detail)


def distinct_lams(depth: int) -> tuple:
    """One anchor weight per layer, all different: (1/8, 2/8, ..., depth/8) for depth <= 7, so that
    applying the weight of layer l at another layer (an index off by one, ``lam[-1]``) changes the
    law."""
    if not 1 <= depth <= 7:
        raise ValueError(f"distinct_lams covers depths 1..7, got {depth}")
    return tuple((k + 1) / 8 for k in range(depth))


def check_per_layer_lam(c: Case) -> IdentityCheck:
    """Per-layer parameters: ``Anchor(base, lam)`` with one lam per layer, all entries distinct.

    exact: at every neuron of layer l the anchored routing is (1 - lam_l) pi + lam_l u with lam_l =
    ``lam[l - 1]`` (torch order, layer 1 first), pi the base law's routing and u uniform on the branch
    support (docs/theory.md section 8, extended action set), the hand-over is the base law's, and I14
    holds; torch: ``explain`` (float64) equals the exact law at every layer and in its stopped mass;
    cvxpy: the occupation of ``numerics.routing_kernels`` (its own per-layer lam) equals it too."""
    lams = distinct_lams(c.spec.depth)
    ok, t_err, cv = True, 0.0, 0.0
    for base in (AlphaBeta(2, 1), GradientEquilibrium()):
        rule = Anchor(base, lams)
        law, plain = c.law(rule), c.law(base)
        ok = ok and _close([sum(law.relevance()[0]) + law.stopped()["total"]], [law.w0])
        for l in range(1, c.spec.depth + 1):
            lam = sp.Rational(lams[l - 1])  # exact: the lams are dyadic
            for i in range(c.spec.widths[l]):
                k, k0 = law.kernel(l, i), plain.kernel(l, i)
                ok = ok and k.stopped == k0.stopped and (k.stopped or k.p == k0.p)
                for b, routes in k0.routing.items():
                    want = {u: (1 - lam) * v + lam / len(routes) for u, v in routes.items()}
                    ok = ok and k.routing[b].keys() == want.keys() and \
                        all(k.routing[b][u] == w for u, w in want.items())
        t_err = max(t_err, _torch_err(c, rule, law))
        cv = max(cv, _cvxpy_err(c, rule, law))
    return IdentityCheck("per-layer lam", ok, t_err, cv, f"lam = {lams}")


def torch_matches_law(model: torch.nn.Module, x: torch.Tensor, target: int, rule: Rule,
                      frozen: Any) -> float:
    """Worst relative error of ``explain``'s per-layer relevance and stopped mass against the exact
    law on ``frozen`` (e.g. ``backplay.gpu.unroll(model, x)`` for a CNN)."""
    law = routing_law(frozen, target=target, rule=rule)
    _, rep = explain(model, x[None], target, rule=rule, return_report=True)
    rel = law.relevance()
    worst = max(err(rep.layers[l][0].reshape(-1), rel[l]) for l in range(len(rel)))
    return max(worst, err(rep.stopped.reshape(1), [law.stopped()["total"]]))
