"""validate_rule tells the truth (issue 15): LRP-0 with biases is the gradient equilibrium with its
bias mass in the bias sink (docs/theory.md I17, I14); a user's LayerRule reports its stopped mass through
``backward -> (lower, stopped)``; every row's verdict follows from its own figure and tolerance; the
hand-over that the maps do not identify is said, with the distance as a bound; the public
``LayerRule.layer_map`` is the sweep's own layer map."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import backplay as bp
from backplay.gpu.engine import prepare
from backplay.nets import MLPSpec
from backplay.validate import validate_rule
from backplay.validate import LAW_ROW
from backplay.rules import (LRP0, RG, AlphaBeta, Anchor, AttributionEquilibrium, GradientEquilibrium,
                            LayerRule, RiskAverse, SoftplusGame, safe_divide)
from backplay.theory import routing_law
from _factories import two_sign_cnn

D = torch.float64
GRAD_EQ_NAMES = ("GradientEquilibrium", "RGEq(kappa=0.0, nu=1.0, route_temp=1.0)")


class MLP(nn.Module):
    """A ReLU MLP with biases, written the usual way."""

    def __init__(self, widths, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class SmallCNN(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv2d(1, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 5 * 5, 3)
        with torch.no_grad():
            self.c2.weight[0, 1, 1, 1] = 0.0  # a zero weight
            self.c1.bias.copy_(torch.tensor([0.2, -0.3]))

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).flatten(1))


def _cnn_case(seed=0):
    model = SmallCNN(seed).double().eval()
    x = torch.rand((1, 5, 5), generator=torch.Generator().manual_seed(seed + 1), dtype=D) - 0.4
    return model, x


def _issue_mlp(seed):
    """A 5-6-6-3 ReLU MLP with biases (the issue's net), normal weights."""
    rng = np.random.default_rng(seed)
    ws = [5, 6, 6, 3]
    W = [rng.normal(size=(ws[i + 1], ws[i])) for i in range(3)]
    B = [rng.normal(size=ws[i + 1]) for i in range(3)]
    return MLPSpec(W, B, "relu"), rng.normal(size=5)


def assert_rows_follow_their_figures(rep):
    """Every checkable row: holds == (figure <= tol), and a failing row says where; the summary's law
    verdict is is_law and names every violated condition."""
    for f in rep.findings:
        if f.holds is None:
            assert f.worst is None and f.tol is None, f
            continue
        assert f.worst is not None and f.tol is not None and f.tol > 0, f
        assert f.holds == (f.worst <= f.tol), f
        if not f.holds:
            assert f.where, f
    text = str(rep)
    assert ("Markov routing law: yes" in text) == rep.is_law
    assert "(holds: figure <= tol)" in text.splitlines()[0]
    if not rep.is_law and rep.law is not None:
        for v in rep.violated:
            assert v in text


# -- LRP-0 with biases is the gradient equilibrium (I17) ------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lrp0_with_biases_is_the_gradient_equilibrium_on_mlps(seed):
    spec, x = _issue_mlp(seed)
    rep = validate_rule(LRP0(), spec, x, 0)
    assert_rows_follow_their_figures(rep)
    assert rep.stops_reported and rep.is_law
    for f in rep.findings:
        assert f.holds, f
    assert rep.nearest["rule"] in GRAD_EQ_NAMES and rep.nearest["hellinger"] < 1e-9
    # its total stopped mass is the gradient equilibrium's bias sink and cemetery (exact law)
    model = spec.to_torch(dtype=D)
    law = routing_law(bp.gpu.unroll(model, torch.tensor(x)), target=0, rule=GradientEquilibrium())
    sweep = LRP0().sweep(prepare(model, torch.tensor(x)[None]).trace(), torch.tensor([0]))
    assert abs(float(sweep.stopped[0]) - float(law.stopped()["total"])) <= 1e-9 * max(1, abs(float(law.w0)))


def test_lrp0_with_biases_is_the_gradient_equilibrium_on_dyadic_mlp_and_module():
    """Dyadic weights with zero weights and a user nn.Module (F.relu in forward)."""
    rng = np.random.default_rng(7)
    W = [rng.integers(-8, 9, size=s) / 4 for s in [(4, 3), (4, 4), (2, 4)]]
    W[1][0, 0] = 0.0
    B = [rng.integers(-4, 5, size=s) / 4 for s in [4, 4, 2]]
    for net, x in ((MLPSpec(W, B, "relu"), np.array([1.0, -0.5, 2.0])),
                   (MLP([4, 5, 5, 3], seed=3).double().eval(), torch.tensor([0.5, -1.0, 0.25, 2.0], dtype=D))):
        rep = validate_rule(LRP0(), net, x, 1)
        assert_rows_follow_their_figures(rep)
        assert rep.is_law and rep.finding("conservation (I14)").holds
        assert rep.nearest["rule"] in GRAD_EQ_NAMES and rep.nearest["hellinger"] < 1e-9


@pytest.mark.parametrize("seed", [0, 1])
def test_lrp0_with_biases_is_the_gradient_equilibrium_on_a_cnn(seed):
    model, x = _cnn_case(seed)
    rep = validate_rule(LRP0(), model, x, 0)
    assert_rows_follow_their_figures(rep)
    assert rep.is_law and rep.stops_reported
    for f in rep.findings:
        assert f.holds, f
    assert rep.nearest["rule"] in GRAD_EQ_NAMES and rep.nearest["hellinger"] < 1e-9


# -- a user's rule reports its stopped mass -------------------------------------------------------------
@dataclass(frozen=True)
class MyLRP0(LayerRule):
    """LRP-0 written by a user: the bias share R_i b_i / z_i and the whole R_i at z_i = 0 are stopped,
    and reported by returning (lower, stopped)."""

    report_stops: bool = True

    def start(self, trace, target):
        return trace.onehot(target) * trace.output

    def backward(self, layer, upper):
        z = layer.z
        c = safe_divide(upper, z)
        lower = layer.input * layer.map.transpose(c)
        if not self.report_stops:
            return lower
        return lower, upper.flatten(1).sum(1) - lower.flatten(1).sum(1)


def test_user_rule_reporting_its_stopped_mass_is_the_gradient_equilibrium():
    spec, x = _issue_mlp(0)
    rep = validate_rule(MyLRP0(), spec, x, 0)
    assert_rows_follow_their_figures(rep)
    assert rep.stops_reported and rep.is_law and rep.finding("conservation (I14)").holds
    assert rep.finding("conservation per neuron (I14)").holds
    assert rep.nearest["rule"] in GRAD_EQ_NAMES and rep.nearest["hellinger"] < 1e-9
    model, xc = _cnn_case(0)
    rep = validate_rule(MyLRP0(), model, xc, 2)
    assert rep.is_law and rep.nearest["rule"] in GRAD_EQ_NAMES and rep.nearest["hellinger"] < 1e-9


def test_user_rule_without_its_stopped_mass_is_reported_as_such():
    """The same rule returning lower alone: conservation fails by the bias share (its figure), the
    maps are still a law, and the summary says the hand-over is not identified and the distance is
    an upper bound, with the count."""
    spec, x = _issue_mlp(0)
    rep = validate_rule(MyLRP0(report_stops=False), spec, x, 0)
    assert_rows_follow_their_figures(rep)
    cons = rep.finding("conservation (I14)")
    assert cons.holds is False and cons.worst > 1e-3 and "not reported" in cons.detail
    assert rep.is_law and not rep.stops_reported and rep.unidentified > 0
    assert rep.nearest["bound"] is True
    text = str(rep)
    assert f"hand-over not identified at {rep.unidentified} neuron(s)" in text and "upper bounds" in text
    assert "Hellinger <= " in text


def test_ambiguous_neurons_are_counted_with_reported_stops():
    """Neuron 0 of layer 1 has Z > 0 only, a positive bias and an empty - branch: its stopped mass
    could be the + branch's bias sink or the - branch's cemetery, so the maps do not identify its
    hand-over: the count and the bound are stated even though the rule reports its stops."""
    W = [np.array([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]]), np.array([[1.0, 1.0, 1.0]])]
    B = [np.array([0.5, 3.0, 0.5]), np.array([0.0])]
    spec = MLPSpec(W, B, "relu")
    rep = validate_rule(AlphaBeta(2, 1), spec, np.array([1.0, 0.5]), 0)
    amb = int(sum(a.sum() for a in rep.law.ambiguous if a is not None))
    assert rep.stops_reported and amb == 1 and rep.unidentified == 1 and rep.law.ambiguous[0][0]
    assert rep.nearest["bound"] is True and "hand-over not identified at 1 neuron(s)" in str(rep)
    assert rep.nearest["hellinger"] < 1e-9  # the split closest to AlphaBeta(2, 1) is its own
    # without ambiguity (no biases) the distance is not a bound
    rep = validate_rule(AlphaBeta(2, 1), MLPSpec(W, [None, None], "relu"), np.array([1.0, 0.5]), 0)
    assert rep.unidentified == 0 and rep.nearest["bound"] is False and "upper bounds" not in str(rep)


# -- the rows follow their figures (the issue's contradictions) ------------------------------------------
@dataclass(frozen=True)
class RenormalisedLRP0(LayerRule):
    """LRP-0 whose result is rescaled at every layer so that the layer keeps the upper total: conservative
    and homogeneous of degree 1, neither additive nor linear nor (on a CNN) local."""

    def start(self, trace, target):
        return trace.onehot(target) * trace.output

    def backward(self, layer, upper):
        lower = layer.input * layer.map.transpose(safe_divide(upper, layer.z))
        tot_u = upper.flatten(1).sum(1).view((-1,) + (1,) * (lower.ndim - 1))
        tot_l = lower.flatten(1).sum(1).view((-1,) + (1,) * (lower.ndim - 1))
        return lower * safe_divide(tot_u, tot_l)


def test_per_layer_renormalisation_is_homogeneous_but_not_additive():
    """The issue's "homogeneity yes" for a rule that renormalises every layer: homogeneity is what it
    says (F(3R) = 3F(R) holds for this rule, and the row no longer claims "no renormalisation");
    additivity on independent probes catches the renormalisation."""
    spec, x = _issue_mlp(1)
    rep = validate_rule(RenormalisedLRP0(), spec, x, 0)
    assert_rows_follow_their_figures(rep)
    assert rep.finding("homogeneity").holds is True
    assert "renormalisation" not in rep.finding("homogeneity").detail.split(":")[0]
    add = rep.finding("additivity")
    assert add.holds is False and add.worst > 1e-3
    assert rep.finding("linearity in R").holds is False
    assert rep.finding("conservation (I14)").holds is True
    assert not rep.is_law and any(v.startswith("additivity") for v in rep.violated)


def test_renormalisation_on_a_cnn_is_not_local_and_the_locality_figure_is_the_deciding_one():
    """The issue's "locality NO ... off-edge mass 0": the row's figure is the figure its verdict uses
    (here the restriction residual; the unit probes put no mass off the edges)."""
    model, x = _cnn_case(0)
    rep = validate_rule(RenormalisedLRP0(), model, x, 0)
    assert_rows_follow_their_figures(rep)
    loc = rep.finding("locality")
    assert loc.holds is False and loc.worst > 1e-3
    assert f"= {loc.worst:.3g} and the largest off-edge entry of M (per unit of relevance) = 0:" in loc.detail


def test_off_edge_mass_is_the_locality_figure():
    def uniform(model, xb, target, layer, upper):  # spreads every unit's relevance over all lower units
        n = prepare(model, xb).trace().layers[layer - 1].input.shape[1]
        return upper.sum(1, keepdim=True).expand(-1, n) / n

    zero_w = MLPSpec([np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 1.0]])], [None, None])
    rep = validate_rule(uniform, zero_w, np.array([1.0, 2.0]), 0)
    assert_rows_follow_their_figures(rep)
    loc = rep.finding("locality")
    assert loc.holds is False and loc.worst == 0.5  # half of each unit lands off its edge
    assert "off-edge entry of M (per unit of relevance) = 0.5" in loc.detail
    law = rep.finding(LAW_ROW)
    assert law.holds is False and law.worst == 0.5
    assert any(v.startswith("mass off the edges (0.5 >") for v in rep.violated)


@pytest.mark.parametrize("r", [1, 2])
def test_attribution_equilibrium_rows_follow_their_figures(r):
    """The issue's "Markov routing law NO, worst 0": the law program's row now holds exactly when its
    residual is within its tolerance; the maps' verdict (no law) is the summary's, with every reason."""
    model, x = two_sign_cnn()
    rep = validate_rule(AttributionEquilibrium(r), model, x, 0)
    assert_rows_follow_their_figures(rep)
    assert not rep.is_law and rep.nearest is None
    for name in ("conservation (I14)", "linearity in R", "additivity", "homogeneity",
                 "cancellation of + and - mass", "sign consistency", "locality"):
        assert rep.finding(name).holds is False, name
    assert "Markov routing law: no; violated: " in str(rep)


def test_laws_rows_follow_their_figures():
    spec, x = _issue_mlp(2)
    for rule in (AlphaBeta(2, 1), Anchor(RG(), (0.1, 0.3, 0.6)), RiskAverse(RG(), theta=0.5),
                 bp.rules.GradientXInput(), bp.rules.Gradient()):
        rep = validate_rule(rule, spec, x, 0, compare=False)
        assert_rows_follow_their_figures(rep)


def test_rules_without_a_layer_map_are_refused_with_the_reason():
    spec, x = _issue_mlp(0)
    with pytest.raises(TypeError, match="SoftplusGame.*no per-layer map.*GradientXInput on the softplus_eps net"):
        validate_rule(SoftplusGame(), spec, x, 0)


# -- the public layer map ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", [AlphaBeta(2, 1), RG(route_temp=0.5), GradientEquilibrium(), LRP0(),
                                  Anchor(RG(), (0.1, 0.2, 0.4)), RiskAverse(Anchor(RG(), 0.3), theta=0.5),
                                  MyLRP0(), bp.rules.Gradient()], ids=lambda r: r.name)
def test_layer_map_is_the_sweeps_layer_map(rule):
    """Applying ``layer_map`` layer by layer, top down, in any order of calls, reproduces the sweep's
    relevance at every layer and its stopped mass (float64, 1e-12 relative)."""
    model, x = _cnn_case(1)
    tr = prepare(model, x[None]).trace()
    target = torch.tensor([1])
    sweep = rule.sweep(tr, target)
    fn = rule.layer_map(tr, target)
    fn(tr.layers[0], sweep.layers[1])  # an extra call first: the map holds no state between calls
    r, stopped = sweep.layers[-1], 0.0
    for l in range(len(tr.layers), 0, -1):
        r, st = fn(tr.layers[l - 1], r)
        r = r.reshape(sweep.layers[l - 1].shape)
        stopped = stopped + (0.0 if st is None else float(st[0]))
        scale = max(1.0, float(sweep.layers[l - 1].abs().max()))
        assert float((r - sweep.layers[l - 1]).abs().max()) <= 1e-12 * scale, l
    if sweep.stopped is None:
        assert stopped == 0.0
    else:
        assert abs(stopped - float(sweep.stopped[0])) <= 1e-12 * max(1.0, abs(float(sweep.stopped[0])))
