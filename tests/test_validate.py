"""validate_rule (docs/theory.md section 13): the named laws are found with their section 5 parameters,
Attribution Equilibrium's failures are reported with their sizes, black boxes, the report formats."""

import json
import math

import numpy as np
import pytest
import torch

from backplay.gpu.unroll import unroll
from backplay.nets import MLPSpec
from backplay.validate import validate_rule
from backplay.validate import LAW_ROW
from backplay.rules import (RG, AlphaBeta, AttributionEquilibrium, AttributionEquilibriumLaw,
                            GradientEquilibrium, RGEq)
from backplay.theory import routing_law
from _factories import two_sign_cnn

D = torch.float64


def _mlp():
    rng = np.random.default_rng(0)
    W = [rng.integers(-8, 9, size=s) / 4 for s in [(4, 3), (4, 4), (2, 4)]]
    B = [rng.integers(-4, 5, size=s) / 4 for s in [4, 4, 2]]
    return MLPSpec(W, B, "relu"), np.array([1.0, -0.5, 2.0])


def _named_kernels(net, x, rule):
    frozen = unroll(net.to_torch(dtype=D) if isinstance(net, MLPSpec) else net, torch.as_tensor(x, dtype=D))
    return frozen, routing_law(frozen, target=0, rule=rule)


LAWS = [AlphaBeta(2, 1), RG(tau=0.5), RG(route_temp=0.5), RGEq(kappa=0.5, nu=0.5), GradientEquilibrium(),
        AttributionEquilibriumLaw(2), AttributionEquilibriumLaw(1)]


@pytest.mark.parametrize("rule", LAWS, ids=lambda r: r.name)
def test_named_laws_found_with_their_parameters(rule):
    spec, x = _mlp()
    rep = validate_rule(rule, spec, x, 0)
    assert rep.is_law and rep.violated == []
    for f in rep.findings:
        assert f.holds, f
    frozen, named = _named_kernels(spec, x, rule)
    checked = 0
    for l in range(1, frozen.depth + 1):
        p, q, m = rep.law.handover(l)
        for i in range(frozen.widths[l]):
            k = named.kernel(l, i)
            if k.stopped or rep.law.ambiguous[l - 1][i] or not np.isfinite(p[i]):
                continue
            if not (k.s_plus > 0 and k.s_minus < 0):  # only one branch: p is not identified by the maps
                continue
            assert p[i] == pytest.approx(float(k.p), abs=1e-12)
            assert m[i] == pytest.approx(float(k.m), rel=1e-12)
            checked += 1
    assert checked >= 4
    # the nearest named rule is the rule itself (or a name of the same law), at distance 0; the fitted
    # parameters are reported to 6 decimals, hence the 1e-6
    assert rep.nearest["hellinger"] < 1e-6 and rep.nearest["max_dp"] < 1e-6 and rep.nearest["max_dm"] < 1e-6


def test_named_law_values_match_theory_section_5():
    """Spot values of docs/theory.md section 8: alpha-beta p = 2/3, m = 3; RG(tau) p = sigmoid(1/tau),
    m = coth(1/(2 tau)); AttributionEquilibriumLaw(2) p = 3/4, q = 1/4, m = 2 (m (p - q) = 1)."""
    spec, x = _mlp()
    for rule, pv, mv in ((AlphaBeta(2, 1), 2 / 3, 3.0), (RG(tau=0.5), 1 / (1 + math.exp(-2)), 1 / math.tanh(1)),
                         (AttributionEquilibriumLaw(2), 0.75, 2.0)):
        rep = validate_rule(rule, spec, x, 0, compare=False)
        p, q, m = rep.law.handover(2)
        sure = np.isfinite(p) & ~rep.law.ambiguous[1]
        assert sure.any()
        assert np.allclose(p[sure], pv, atol=1e-12, rtol=0) and np.allclose(m[sure], mv, atol=1e-12, rtol=0)
        assert np.allclose(m[sure] * (p[sure] - q[sure]), 1.0, atol=1e-12, rtol=0)


def test_extended_laws_are_laws():
    """Anchor and RiskAverse (sections 5, I20) are Markov laws too, conservative (I14)."""
    from backplay.rules import Anchor, RiskAverse

    spec, x = _mlp()
    for rule in (Anchor(RG(), 0.25), RiskAverse(RG(), theta=0.5)):
        rep = validate_rule(rule, spec, x, 0)
        assert rep.is_law and rep.finding("conservation (I14)").holds


def test_gradient_is_not_a_routing_law():
    """Gradient x Input moves the gradient by the GV kernel (weight signs, units with y = 0 reached):
    not a law of the routing family; its Doob transform, the gradient equilibrium, is (I17)."""
    from backplay.rules import GradientXInput

    spec, x = _mlp()
    rep = validate_rule(GradientXInput(), spec, x, 0)
    assert not rep.is_law and any("Z = W y = 0" in v for v in rep.violated)
    assert any("transformed view" in n for n in rep.notes)


def test_gradient_equilibrium_negative_multiplier():
    """z_i < 0 gives p < q and m = (S+ + |S-|)/z < 0: still a law (the neuron's orientation)."""
    spec, x = _mlp()
    rep = validate_rule(GradientEquilibrium(), spec, x, 0, compare=False)
    frozen, named = _named_kernels(spec, x, GradientEquilibrium())
    negative = [(l, i) for l in range(1, 4) for i in range(frozen.widths[l])
                if not named.kernel(l, i).stopped and named.kernel(l, i).m < 0]
    assert negative and rep.is_law
    for l, i in negative:
        assert rep.law.handover(l)[2][i] == pytest.approx(float(named.kernel(l, i).m), rel=1e-12)


@pytest.mark.parametrize("r", [1, 2])
def test_attribution_equilibrium_failures_reported_with_sizes(r):
    model, x = two_sign_cnn(0.1)
    rep = validate_rule(AttributionEquilibrium(r), model, x, 0)
    f = {k.name: k for k in rep.findings}
    cons = f["conservation (I14)"]
    assert cons.holds is False and cons.worst > 0.1 and cons.where["layer"] in (1, 2, 3)
    # per-layer renormalisation: scale-free, hence not homogeneous (F(3R) = F(R) != 3 F(R))
    hom = f["homogeneity"]
    assert hom.holds is False and hom.worst > 1e-3 and hom.where is not None
    assert f["linearity in R"].holds is False
    # + and - mass: moving the sign classes separately is not moving their sum (the shift, per class)
    canc = f["cancellation of + and - mass"]
    assert canc.holds is False and canc.worst > 1e-3
    assert canc.extra["annihilated_total"] > 1e-3
    # the shift and the global renormalisation: relevance at k depends on units not joined to k
    loc = f["locality"]
    assert loc.holds is False and loc.worst > 1e-3 and "index" in loc.where
    assert f["sign consistency"].holds is False
    assert not rep.is_law and rep.nearest is None
    joined = " ".join(rep.violated)
    for word in ("homogeneity", "sign classes", "locality"):
        assert word in joined
    assert any("skipped" in line for line in str(rep).splitlines())  # the head is not propagated


def test_attribution_equilibrium_law_on_cnn_is_a_law():
    model, x = two_sign_cnn(0.1)
    rep = validate_rule(AttributionEquilibriumLaw(2), model, x, 0)
    assert rep.is_law
    assert rep.nearest["hellinger"] < 1e-6
    assert any(c["rule"].startswith("AttributionEquilibriumLaw(r=2.0") and c["hellinger"] < 1e-6 for c in rep.candidates)


def test_black_box_layer_map_and_a_wrong_rule():
    spec, x = _mlp()
    from backplay.gpu.engine import prepare

    def alpha_beta_map(model, xb, target, layer, upper):
        prep = prepare(model, xb.expand(upper.shape[0], -1))
        return AlphaBeta(2, 1).backward(prep.trace().layers[layer - 1], upper)

    rep = validate_rule(alpha_beta_map, spec, x, 0)
    assert rep.is_law  # without the stopped mass the hand-over of neurons that stop is not identified

    def with_stops(model, xb, target, layer, upper):  # AlphaBeta(2, 1) is conservative: stopped = in - out
        lower = alpha_beta_map(model, xb, target, layer, upper)
        return lower, upper.sum(1) - lower.sum(1)

    rep = validate_rule(with_stops, spec, x, 0)
    assert rep.is_law and rep.finding("conservation (I14)").holds
    assert rep.nearest["hellinger"] < 1e-6 and "alpha=2.0" in rep.nearest["rule"]

    def uniform(model, xb, target, layer, upper):  # spreads every unit's relevance over all lower units
        n = prepare(model, xb).trace().layers[layer - 1].input.shape[1]
        return upper.sum(1, keepdim=True).expand(-1, n) / n

    zero_w = MLPSpec([np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 1.0]])], [None, None])
    rep = validate_rule(uniform, zero_w, np.array([1.0, 2.0]), 0)
    assert rep.finding("locality").holds is False and not rep.is_law
    assert any("off the edges" in v for v in rep.violated)


def test_black_box_relevances_only():
    spec, x = _mlp()
    from backplay.gpu import explain

    def relevances(model, xb, target):
        _, rep = explain(model, xb, target, AlphaBeta(2, 1), return_report=True)
        return [r[0] for r in rep.layers]

    rep = validate_rule(relevances, spec, x, 0)
    assert rep.finding("linearity in R").holds is None
    assert rep.finding(LAW_ROW).holds is None
    assert rep.finding("conservation (I14)").holds is False  # the stopped mass is not visible
    assert rep.finding("locality").holds is True


def test_report_formats():
    spec, x = _mlp()
    rep = validate_rule(AlphaBeta(2, 1), spec, x, 0)
    text = str(rep)
    assert "conservation (I14)" in text and "Markov routing law: yes" in text and "Hellinger" in text
    md = rep._repr_markdown_()
    assert "| property | holds | figure | tol | where | detail |" in md and "| linearity in R | yes |" in md
    d = json.loads(rep.to_json())
    assert d["is_law"] is True and d["nearest"]["rule"] == rep.nearest["rule"]
    assert len(d["law"]["layers"]) == 3 and d["findings"][0]["property"] == "conservation (I14)"


def test_bad_inputs():
    spec, x = _mlp()
    with pytest.raises(TypeError, match="LayerRule or a callable"):
        validate_rule(42, spec, x, 0)
    with pytest.raises(TypeError, match="parameters"):
        validate_rule(lambda a, b: None, spec, x, 0)
    with pytest.raises(ValueError, match="out of range"):
        validate_rule(AlphaBeta(2, 1), spec, x, 5)
    with pytest.raises(TypeError, match="MLPSpec or an nn.Module"):
        validate_rule(AlphaBeta(2, 1), "net", x, 0)


# -- the user-facing testing helpers (backplay.testing) ---------------------------------------------
def _readme_example():
    """The README example, run as written (the rule class and the test), from the module docstring."""
    import backplay.testing.rule_checks as rc

    src = rc.__doc__.split("::", 1)[1]
    lines = [ln[4:] for ln in src.splitlines()]
    ns: dict = {}
    exec("\n".join(lines), ns)  # noqa: S102 - the documented example itself
    return ns


def test_readme_example_runs_and_passes():
    ns = _readme_example()
    ns["test_zplus"]()  # hypothesis runs the ci profile's examples


def test_readme_example_fails_on_a_wrong_rule():
    from hypothesis import Phase, given, settings

    from backplay.rules import AlphaBeta, LayerRule, safe_divide
    from backplay.testing import assert_matches_law, rule_cases

    ns = _readme_example()
    ZPlus = ns["ZPlus"]

    class ZPlusNoBias(ZPlus):  # forgets the positive bias in S+: not the z+ law
        def backward(self, layer, upper):
            M, y = layer.map, layer.input
            yp, yn = y.clamp(min=0), y.clamp(max=0)
            c = safe_divide(upper, M.apply(yp, "pos") + M.apply(yn, "neg"))
            return yp * M.transpose(c, "pos") + yn * M.transpose(c, "neg")

    @settings(phases=[Phase.explicit, Phase.generate])  # the failure, not its shrinking
    @given(rule_cases(bias=True))
    def test_wrong(case):
        assert_matches_law(ZPlusNoBias(), *case, law_rule=AlphaBeta(1, 0))

    with pytest.raises(AssertionError, match="differs from the law AlphaBeta"):
        test_wrong()
    assert issubclass(ZPlusNoBias, LayerRule)


def test_assert_matches_law_without_a_named_law_and_on_cnns():
    from hypothesis import given, settings

    from backplay.testing import assert_matches_law, cnn_cases

    @settings(max_examples=5)
    @given(cnn_cases())
    def check(case):
        model, x, target = case
        rep = assert_matches_law(AttributionEquilibriumLaw(2), model, x, target)
        assert rep.is_law
        law = assert_matches_law(AttributionEquilibriumLaw(2), model, x, target, law_rule=AttributionEquilibriumLaw(2))
        assert law.rule.r == 2

    check()
    spec, x = _mlp()
    with pytest.raises(AssertionError, match="not a Markov routing law"):
        assert_matches_law(AttributionEquilibrium(2), spec, x, 0)


def test_models_with_skips_are_refused_with_the_reason():
    from backplay.testing.zoo import ZOO, zoo_input

    case = ZOO["resnet18"]("tiny", dtype=torch.float64)
    with pytest.raises(ValueError, match="skips or branches"):
        validate_rule(AlphaBeta(2, 1), case.model, zoo_input(case), 0)
