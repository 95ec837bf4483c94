"""Routing laws (docs/theory.md section 8, I14-I21): exact laws (backplay.theory.routing) against their
closed forms, the GV game, path enumeration, and the cvxpy programs of backplay.numerics.routing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from backplay.nets import FrozenNet, MLPSpec
from backplay.numerics import check_local_maximisers, gibbs_handover, law_occupation, route_choice, routing_kernels
from backplay.rules import LRP0, RG, Gradient, AlphaBeta, Anchor, GradientEquilibrium, RGEq, RiskAverse
from backplay.testing import nets_with_inputs
from backplay.theory import (
    BIAS_SINK,
    ReLUNetGame,
    alpha_beta_lrp,
    bhattacharyya_paths,
    freeze,
    gibbs_alpha_beta,
    gv_law,
    hellinger,
    lrp0,
    risk_reweighted_paths,
    routing_law,
    tau_from,
)

TINY = dict(max_depth=3, max_width=3)
RULES = [
    AlphaBeta(), AlphaBeta(1.0, 0.0), RG(), RG(0.5, 2.0), RG(2.0, 0.5), RGEq(), RGEq(0.3, 0.5),
    RGEq(-0.5, 2.0, 1.5), RGEq(0.7, 0.0), GradientEquilibrium(), Anchor(RG(), 0.3),
    Anchor(GradientEquilibrium(), 1.0), RiskAverse(RG(), 1.0, 0.5), RiskAverse(AlphaBeta(), 0.5),
    RiskAverse(Anchor(GradientEquilibrium(), 0.5), 2.0, 1.0),
]
TOL_MP = 1e-40


def close(a, b, tol: float = TOL_MP) -> bool:
    """Exact equality for exact values, relative agreement to ``tol`` otherwise."""
    a, b = np.asarray(a, dtype=object).reshape(-1), np.asarray(b, dtype=object).reshape(-1)
    assert a.shape == b.shape
    return all(u == v or abs(complex(sp.N(u - v, 60))) <= tol * max(1, abs(complex(sp.N(v, 60))))
               for u, v in zip(a, b))


def input_relevance_by_paths(law) -> np.ndarray:
    out = np.array([law.arith.num(0)] * law.net.widths[0], dtype=object)
    for pth in law.paths():
        if isinstance(pth.end, tuple):
            out[pth.end[1]] += pth.probability * pth.weight
    return out


# -- I14 -------------------------------------------------------------------------------------------
@given(nets_with_inputs(**TINY), st.sampled_from(RULES))
def test_i14_stopping_decomposition(case, rule):
    spec, x, k = case
    law = routing_law(spec, x, k, rule)
    rel, stopped = law.relevance(), law.stopped()
    assert close(sum(rel[0]) + stopped["total"], law.w0)
    assert close(stopped["cemetery"] + stopped["bias_sink"], stopped["total"])
    per = law.stopped_per_layer()
    for l in range(1, spec.depth + 1):  # layer by layer: what enters layer l leaves it or stops
        assert close(sum(rel[l - 1]) + per[l - 1]["cemetery"] + per[l - 1]["bias_sink"], sum(rel[l]))
    occ = law.occupation()
    for l in range(spec.depth + 1):  # the state occupation and the layer map agree
        assert close(law.w0 * occ.signed(l), rel[l])
    assert close(input_relevance_by_paths(law), rel[0])
    assert close(law.attribution(), rel[0])
    assert close(sum(p.probability for p in law.paths()), 1)


def test_field_choice():
    spec = MLPSpec([np.array([[1.0, -0.5]]), np.array([[2.0]])])
    x = [1.0, 1.0]
    assert routing_law(spec, x, 0, AlphaBeta()).field == "rational"
    assert routing_law(spec, x, 0, GradientEquilibrium()).field == "rational"
    assert routing_law(spec, x, 0, RGEq(0, 2, 0.5)).field == "rational"
    assert routing_law(spec, x, 0, RG()).field == "mpmath"
    assert routing_law(spec, x, 0, RGEq(0.1, 1)).field == "mpmath"
    assert routing_law(spec, x, 0, RiskAverse(AlphaBeta(), 0.0)).field == "rational"
    assert routing_law(spec, x, 0, RG(tau=1 / sp.log(2))).field == "sympy"
    assert routing_law(spec, x, 0, RG(), field="exact").field == "sympy"


# -- I15 -------------------------------------------------------------------------------------------
@given(nets_with_inputs(**TINY), st.sampled_from([(2.0, 1.0), (1.0, 0.0), (1.5, 0.5), (3.0, 0.75)]))
def test_i15_alpha_beta_closed_form(case, ab):
    spec, x, k = case
    alpha, beta = ab
    rule = AlphaBeta(alpha, beta, conservative=alpha - beta == 1)
    law = routing_law(spec, x, k, rule)
    assert law.field == "rational"
    for got, want in zip(law.relevance(), alpha_beta_lrp(spec, k, alpha, beta, x=x)):
        assert all(u == v for u, v in zip(got, want))


# -- I16 -------------------------------------------------------------------------------------------
def test_i16_gibbs_mapping_symbolic():
    tau = sp.Symbol("tau", positive=True)
    alpha, beta = gibbs_alpha_beta(tau)
    assert sp.simplify(alpha - beta - 1) == 0
    assert sp.simplify((alpha + beta - sp.coth(1 / (2 * tau))).rewrite(sp.exp)) == 0
    assert sp.simplify(alpha / (alpha + beta) - 1 / (1 + sp.exp(-1 / tau))) == 0
    assert sp.simplify(tau_from(alpha, beta) - tau) == 0
    a2, b2 = gibbs_alpha_beta(1 / sp.log(2))
    assert sp.simplify(a2 - 2) == 0 and sp.simplify(b2 - 1) == 0
    assert tau_from(2, 1) == 1 / sp.log(2)
    assert sp.limit(alpha, tau, 0, "+") == 1 and sp.limit(beta, tau, 0, "+") == 0
    with pytest.raises(ValueError):
        tau_from(1, 2)
    with pytest.raises(ValueError):
        gibbs_alpha_beta(-1)


@given(nets_with_inputs(**TINY))
def test_i16_rg_is_alpha_beta(case):
    spec, x, k = case
    # tau = 1/ln 2 exactly: p = sigmoid(ln 2) = 2/3, the same law as AlphaBeta(2, 1), exactly
    rg = routing_law(spec, x, k, RG(tau=1 / sp.log(2)))
    ab = routing_law(spec, x, k, AlphaBeta(2, 1))
    for got, want in zip(rg.relevance(), ab.relevance()):
        assert all(u == v for u, v in zip(got, want))
    # general tau in mpmath against the mapped (alpha, beta), same field
    a, b = gibbs_alpha_beta(sp.Rational(1, 2))
    rg = routing_law(spec, x, k, RG(tau=0.5))
    ab = routing_law(spec, x, k, AlphaBeta(a, b, conservative=False), field="mpmath")
    for got, want in zip(rg.relevance(), ab.relevance()):
        assert close(got, want)


def test_i16_kernel_values():
    spec = MLPSpec([np.array([[1.0, -0.5]]), np.array([[2.0]])])
    law = routing_law(spec, [1.0, 1.0], 0, RG(tau=0.5))
    k = law.kernel(1, 0)
    assert close(k.p, 1 / (1 + sp.exp(-2))) and close(k.m, sp.coth(1))
    assert close(k.m * (k.p - k.q), 1)


# -- I17 -------------------------------------------------------------------------------------------
@given(nets_with_inputs(**TINY))
def test_i17_gradient_equilibrium_is_lrp0_and_gxi(case):
    spec, x, k = case
    law = routing_law(spec, x, k, GradientEquilibrium())
    rel = law.relevance()
    for got, want in zip(rel, lrp0(spec, x, k)):  # LRP-0 at every layer, biases included
        assert all(u == v for u, v in zip(got, want))
    sol = ReLUNetGame(spec).solve(x, k)
    gxi = sol.gxi
    assert all(u == v for u, v in zip(gv_law(spec, x, k).attribution(), gxi))  # the GV law's own GxI
    if sol.value == 0:  # w0 = f = 0: the law carries no mass (m needs z != 0), whatever x * grad is
        assert law.stopped()["total"] == 0 and all(v == 0 for layer in rel for v in layer)
    else:
        assert all(u == v for u, v in zip(rel[0], gxi))  # I8 + I17: Gradient x Input


def test_i17_at_a_zero_logit():
    """f = -x - 1/4 = 0 at x = -1/4: Gradient x Input is 1/4, the gradient equilibrium's start mass is
    0, so its relevance is 0 (found by the thorough profile: I17 needs z != 0 at the output too)."""
    spec = MLPSpec([np.array([[-1.0], [0.0]])], [np.array([-0.25, 0.0])])
    sol = ReLUNetGame(spec).solve([-0.25], 0)
    assert sol.value == 0 and sol.gxi[0] == sp.Rational(1, 4)
    law = routing_law(spec, [-0.25], 0, GradientEquilibrium())
    assert law.relevance()[0][0] == 0 and law.stopped()["total"] == 0


# -- I18 -------------------------------------------------------------------------------------------
@given(nets_with_inputs(**TINY))
def test_i18_special_cases(case):
    spec, x, k = case
    eq = routing_law(spec, x, k, RGEq(0, 1))
    ge = routing_law(spec, x, k, GradientEquilibrium())
    for l in range(1, spec.depth + 1):
        for i in range(spec.widths[l]):
            a, b = eq.kernel(l, i), ge.kernel(l, i)
            assert a.stopped == b.stopped
            if not a.stopped:
                assert (a.p, a.m, a.routing) == (b.p, b.m, b.routing)
    ab_sym = routing_law(spec, x, k, RGEq(kappa=sp.log(2), nu=0))  # log(alpha/beta), nu = 0
    ab = routing_law(spec, x, k, AlphaBeta(2, 1))
    for got, want in zip(ab_sym.relevance(), ab.relevance()):
        assert all(u == v for u, v in zip(got, want))
    for got, want in zip(eq.relevance(), ge.relevance()):
        assert all(u == v for u, v in zip(got, want))


# -- I19 and the cvxpy oracle ----------------------------------------------------------------------
def test_i19_route_choice_closed_form():
    r, pi0, T = np.array([0.3, -1.0, 0.8]), np.array([0.5, 0.2, 0.1]), 0.7
    pi, val = route_choice(r, pi0, T)
    want = pi0 * np.exp(r / T) / np.sum(pi0 * np.exp(r / T))
    assert abs(val - T * np.log(np.sum(pi0 * np.exp(r / T)))) < 1e-8
    assert np.max(np.abs(pi - want)) < 1e-5
    for tau in (0.3, 1.0, 1 / math.log(2), 4.0):
        p, val = gibbs_handover(tau)
        assert abs(p - 1 / (1 + math.exp(-1 / tau))) < 1e-5
        assert abs(val - tau * math.log1p(math.exp(1 / tau))) < 1e-8
    with pytest.raises(ValueError):
        gibbs_handover(0.0)
    with pytest.raises(ValueError):
        route_choice([1.0, 2.0], [0.5], 1.0)
    with pytest.raises(ValueError):
        route_choice([1.0], [0.5], -1.0)


@settings(max_examples=8)
@given(nets_with_inputs(**TINY), st.sampled_from([AlphaBeta(), RG(), RG(0.5, 2.0), RGEq(0.3, 0.5),
                                                  GradientEquilibrium()]))
def test_i19_local_maximisers(case, rule):
    spec, x, k = case
    rep = check_local_maximisers(spec, x, k, rule)
    assert rep.handover_value < 1e-7 and rep.routing_value < 1e-7
    assert rep.handover_p < 1e-4 and rep.routing_pi < 1e-4  # maximisers: ~sqrt(solver tolerance)


@settings(max_examples=10)
@given(nets_with_inputs(**TINY), st.sampled_from(RULES))
def test_flow_program_matches_exact_law(case, rule):
    spec, x, k = case
    law = routing_law(spec, x, k, rule)
    flow = law_occupation(routing_kernels(spec, x, rule), k, float(law.w0))
    scale = max(1.0, max(abs(float(v)) for r in law.relevance() for v in r))
    for got, want in zip(flow.relevance, law.relevance()):
        assert np.max(np.abs(got - np.array([float(v) for v in want]))) <= 1e-7 * scale
    stopped = law.stopped()
    assert abs(flow.cemetery - float(stopped["cemetery"])) <= 1e-7 * scale
    assert abs(flow.bias_sink - float(stopped["bias_sink"])) <= 1e-7 * scale


# -- anchor and risk reductions; I20 -----------------------------------------------------------------
@given(nets_with_inputs(**TINY), st.sampled_from([AlphaBeta(), GradientEquilibrium(), RGEq(0, 2)]))
def test_anchor_and_risk_reduce_to_base(case, base):
    spec, x, k = case
    want = routing_law(spec, x, k, base).relevance()
    for rule in (Anchor(base, 0.0), Anchor(base, (0.0,) * spec.depth), RiskAverse(base, 0.0)):
        for got, ref in zip(routing_law(spec, x, k, rule).relevance(), want):
            assert all(u == v for u, v in zip(got, ref))


@given(nets_with_inputs(**TINY), st.sampled_from([RiskAverse(RG(), 1.0, 0.5), RiskAverse(AlphaBeta(), 0.5, 2.0),
                                                  RiskAverse(Anchor(GradientEquilibrium(), 0.3), -0.5, 1.0)]))
def test_i20_doob_transform_is_path_reweighting(case, rule):
    spec, x, k = case
    law = routing_law(spec, x, k, rule)
    got: dict = {}
    for pth in law.paths():
        got[pth.key] = got.get(pth.key, 0) + pth.probability
    want = risk_reweighted_paths(law)
    assert set(got) == {key for key, v in want.items() if v != 0}
    for key, v in got.items():
        assert close(v, want[key])


# -- I21 -------------------------------------------------------------------------------------------
@given(nets_with_inputs(**TINY), st.sampled_from([(AlphaBeta(), GradientEquilibrium()), (AlphaBeta(), AlphaBeta(1, 0)),
                                                  (RG(), RGEq(0.3, 0.5)), (GradientEquilibrium(), RGEq(0, 1))]))
def test_i21_hellinger(case, pair):
    spec, x, k = case
    a, b = (routing_law(spec, x, k, r) for r in pair)
    h = hellinger(a, b)
    bc = bhattacharyya_paths(a, b)
    assert close(1 - h ** 2, bc, 1e-30)
    same = hellinger(a, a)
    assert same == 0 if a.arith.exact else abs(same) < 1e-20
    pa: dict = {}
    pb: dict = {}
    for law, d in ((a, pa), (b, pb)):
        for pth in law.paths():
            d[pth.key] = d.get(pth.key, 0) + pth.probability
    agree = set(pa) == set(pb) and all(close(pa[key], pb[key], 1e-30) for key in pa)
    assert agree == (abs(complex(sp.N(h ** 2, 50))) < 1e-30)  # H = 0 iff the path laws agree


@given(nets_with_inputs(bias=False, **TINY))
def test_i21_gv_game_vs_gradient_equilibrium(case):
    spec, x, k = case
    gv, ge = gv_law(spec, x, k), routing_law(spec, x, k, GradientEquilibrium())
    assert all(u == v for u, v in zip(gv.attribution(), ge.relevance()[0]))
    assert close(1 - hellinger(gv, ge) ** 2, bhattacharyya_paths(gv, ge), 1e-30)


def test_i21_same_attribution_positive_distance():
    spec = MLPSpec([np.array([[1.0, 0.5], [-0.5, 1.0]]), np.array([[1.0, -0.75]])])
    x = [1.0, 2.0]
    gv, ge = gv_law(spec, x, 0), routing_law(spec, x, 0, GradientEquilibrium())
    assert all(u == v for u, v in zip(gv.attribution(), ge.relevance()[0]))
    assert all(u == v for u, v in zip(gv.attribution(), ReLUNetGame(spec).solve(x, 0).gxi))
    assert float(hellinger(gv, ge)) > 0.1


# -- inputs and errors -----------------------------------------------------------------------------
@given(nets_with_inputs(**TINY))
def test_frozen_net_input(case):
    spec, x, k = case
    fwd = spec.forward(x)
    frozen = FrozenNet(list(spec.weights), list(spec.biases), [x] + [y for _, y in fwd])
    for got, want in zip(routing_law(frozen, None, k, AlphaBeta()).relevance(),
                         routing_law(spec, x, k, AlphaBeta()).relevance()):
        assert all(u == v for u, v in zip(got, want))


def test_bias_sink_and_kernel():
    spec = MLPSpec([np.array([[1.0, -1.0]])], [np.array([0.5])])
    law = routing_law(spec, [1.0, 1.0], 0, AlphaBeta())
    k = law.kernel(1, 0)
    assert k.routing[1] == {0: sp.Rational(2, 3), "bias": sp.Rational(1, 3)} and k.routing[-1] == {1: 1}
    assert law.w0 == sp.Rational(1, 2)
    assert law.stopped()["bias_sink"] == sp.Rational(1, 2) * 2 * sp.Rational(1, 3)
    assert law.stopped()["cemetery"] == 0
    assert any(p.end == BIAS_SINK for p in law.paths())


def test_errors():
    spec = MLPSpec([np.array([[1.0, -1.0]]), np.array([[1.0]])])
    with pytest.raises(ValueError, match="needs the input x"):
        routing_law(spec)
    with pytest.raises(TypeError, match="Gradient"):
        routing_law(spec, [1.0, 0.0], 0, Gradient())
    # LRP0 is the gradient equilibrium's law (I17)
    a, b = routing_law(spec, [1.0, 0.0], 0, LRP0()), routing_law(spec, [1.0, 0.0], 0, GradientEquilibrium())
    assert [list(r) for r in a.relevance()] == [list(r) for r in b.relevance()]
    with pytest.raises(ValueError, match="lam has 3 entries"):
        routing_law(spec, [1.0, 0.0], 0, Anchor(RG(), (0.1, 0.2, 0.3)))
    with pytest.raises(ValueError, match="out of range"):
        routing_law(spec, [1.0, 0.0], 3, RG())
    with pytest.raises(ValueError, match="field"):
        routing_law(spec, [1.0, 0.0], 0, RG(), field="float")
    with pytest.raises(ValueError, match="softplus"):
        freeze(spec.with_eps(0.5), [1.0, 0.0])
    with pytest.raises(ValueError):
        RG(tau=0.0)
    with pytest.raises(ValueError, match="same frozen net"):
        hellinger(routing_law(spec, [1.0, 0.0], 0, RG()), routing_law(spec, [1.0, 2.0], 0, RG()))
    with pytest.raises(TypeError, match="RiskAverse"):
        risk_reweighted_paths(routing_law(spec, [1.0, 0.0], 0, RG()))
    with pytest.raises(TypeError, match="Anchor"):
        check_local_maximisers(spec, [1.0, 0.0], 0, Anchor(RG(), 0.1))
    with pytest.raises(ValueError, match="P_flip"):
        law_occupation([{"P_keep": np.zeros((1, 2)), "P_flip": np.zeros((2, 2))}], 0)
    with pytest.raises(ValueError, match="shape mismatch"):
        FrozenNet([np.ones((1, 2))], None, [np.ones(3), np.ones(1)])
