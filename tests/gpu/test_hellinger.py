"""bp.hellinger / bp.hellinger_matrix (docs/theory.md I21) on any model: the one-sweep Bhattacharyya
kernel equals the exact Hellinger distance of the two laws on the unrolled graph
(backplay.theory.hellinger of backplay.theory.routing_law on backplay.gpu.unroll), float64, 1e-9:
an MLP with biases, a CNN with max pooling, a model with a residual add, random small nets
(hypothesis); the single-branch laws Flat and WSquare and the composites; H(a, a) = 0, symmetry, a
batch of 4 = four single runs; errors for rules that are not laws here."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import backplay as bp
from backplay.rules import (
    LRP0, RG, AlphaBeta, Anchor, Epsilon, Gradient, GradientEquilibrium, GradientXInput, RGEq, RiskAverse,
)
from backplay.rules.lrp import (
    Composite, EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat, Flat, Gamma, WSquare, ZBox, ZPlus,
)
from backplay.testing import dyadics
from backplay.theory import hellinger as exact_hellinger
from backplay.theory import routing_law, to_float

TOL = 1e-9

LAWS = [
    AlphaBeta(2, 1), AlphaBeta(1, 0), GradientEquilibrium(), RG(0.7), RG(1.0, route_temp=0.5),
    RGEq(0.3, 0.8), RGEq(0.5, 1.0, route_temp=2.0), Anchor(RG(), 0.2),
    RiskAverse(RG(), theta=0.5), RiskAverse(Anchor(GradientEquilibrium(), 0.3), theta=0.3),
]
PAIRS = [(a, b) for i, a in enumerate(LAWS) for b in LAWS[i + 1:]]
ZOO = [Epsilon(0.25), Gamma(0.25), ZPlus()]  # LRP0: see test_lrp0_is_the_gradient_equilibrium...
ZOO_PAIRS = [(a, b) for a in ZOO for b in ZOO + [AlphaBeta(2, 1), RG(1.0, route_temp=0.5),
                                                 Anchor(GradientEquilibrium(), 0.3)] if a is not b]


def exact(model, x, target, a, b):
    """The exact Hellinger distance of the two laws at one sample (mpmath, 50 digits)."""
    net = bp.gpu.unroll(model, x)
    la = routing_law(net, target=target, rule=a, field="mpmath")
    lb = routing_law(net, target=target, rule=b, field="mpmath")
    return float(to_float(exact_hellinger(la, lb)))


def worst(model, x, target, a, b):
    h = bp.hellinger(model, x, target, a, b)
    ts = [target] * x.shape[0] if isinstance(target, int) else list(target)
    return max(abs(float(h[k]) - exact(model, x[k], int(ts[k]), a, b)) for k in range(x.shape[0]))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 5), nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def mlp():
    torch.manual_seed(1)
    m = MLP().double()
    with torch.no_grad():
        m.fc2.weight[0, 1] = 0.0  # a zero weight
    return m


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(torch.flatten(x, 1))


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.body, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.inp(x))
        h = F.relu(self.body(h)) + h
        return self.out(h)


class PadCNN(nn.Module):
    """F.pad then Conv2d(padding=0) (TF-SAME, as EfficientNet writes it), F.relu, a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(F.pad(x, (0, 1, 0, 1)))), 2)
        return self.fc(torch.flatten(x, 1))


def pad_cnn():
    torch.manual_seed(4)
    return PadCNN().double().eval()


def cnn():
    torch.manual_seed(2)
    return SmallCNN().double().eval()


def residual():
    torch.manual_seed(3)
    return ResidualNet().double()


@pytest.mark.parametrize("a,b", PAIRS, ids=lambda r: r.name[:24])
def test_mlp_with_biases_equals_exact(a, b):
    x = torch.randn(2, 4, dtype=torch.float64)
    assert worst(mlp(), x, 1, a, b) <= TOL


@pytest.mark.parametrize("a,b", PAIRS[::3], ids=lambda r: r.name[:24])
def test_cnn_with_max_pool_equals_exact(a, b):
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    assert worst(cnn(), x, torch.tensor([0, 2]), a, b) <= TOL


@pytest.mark.parametrize("a,b", PAIRS[1::3], ids=lambda r: r.name[:24])
def test_residual_add_equals_exact(a, b):
    x = torch.randn(2, 3, dtype=torch.float64)
    assert worst(residual(), x, 1, a, b) <= TOL


@pytest.mark.parametrize("a,b", ZOO_PAIRS, ids=lambda r: r.name[:24])
def test_zoo_laws_equal_exact(a, b):
    """The LRP zoo's sign-branch laws (docs/theory.md section 12): Epsilon (the gradient equilibrium with
    its stop), Gamma (I22, both signs of z), ZPlus (AlphaBeta(1, 0))."""
    assert worst(mlp(), torch.randn(2, 4, dtype=torch.float64), 1, a, b) <= TOL
    assert worst(cnn(), torch.randn(1, 1, 4, 4, dtype=torch.float64), 2, a, b) <= TOL


def test_lrp0_is_the_gradient_equilibrium_and_zplus_is_alpha1_beta0():
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    assert float(bp.hellinger(cnn(), x, 0, LRP0(), GradientEquilibrium()).abs().max()) == 0.0
    assert float(bp.hellinger(cnn(), x, 0, ZPlus(), AlphaBeta(1, 0)).abs().max()) == 0.0
    assert float(bp.hellinger(cnn(), x, 0, Epsilon(0.25), LRP0()).min()) > 0


def test_tuple_anchor_per_layer_equals_exact():
    x = torch.randn(2, 4, dtype=torch.float64)
    a = Anchor(GradientEquilibrium(), (0.1, 0.4, 0.7))
    assert worst(mlp(), x, 0, a, RG(0.7)) <= TOL
    assert worst(mlp(), x, 0, a, Anchor(AlphaBeta(2, 1), (0.5, 0.0, 0.25))) <= TOL


def test_ties_and_empty_branches_equal_exact():
    """z = 0 (the gradient equilibrium stops the token), a zero row and a zero input."""
    m = mlp()
    with torch.no_grad():
        m.fc1.weight[2] = 0.0
        m.fc1.bias[2] = 0.0
    x = torch.tensor([[1.0, -2.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    for a, b in [(GradientEquilibrium(), AlphaBeta(2, 1)), (RGEq(0.0, 1.0), RiskAverse(RG(), 0.5)),
                 (Anchor(GradientEquilibrium(), 0.3), RGEq(0.0, 0.0))]:
        assert worst(m, x, 2, a, b) <= TOL


@st.composite
def random_nets(draw):
    """Linear(+bias or not)-ReLU stacks of width 1-4, depth 1-3, dyadic weights (zeros and ties
    possible), with one input; a law pair."""
    widths = [draw(st.integers(1, 4)) for _ in range(draw(st.integers(2, 4)))]
    layers = []
    for k, (i, o) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(i, o, bias=draw(st.booleans())))
        if k < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in model.parameters():
            vals = draw(st.lists(dyadics(), min_size=p.numel(), max_size=p.numel()))
            p.copy_(torch.tensor(vals, dtype=torch.float64).reshape(p.shape))
    x = torch.tensor(draw(st.lists(dyadics(), min_size=widths[0], max_size=widths[0])),
                     dtype=torch.float64).reshape(1, -1)
    a, b = draw(st.sampled_from(PAIRS))
    return model, x, draw(st.integers(0, widths[-1] - 1)), a, b


@given(case=random_nets())
def test_random_small_nets_equal_exact(case):
    model, x, target, a, b = case
    assert worst(model, x, target, a, b) <= TOL


def test_distance_to_itself_is_zero_and_symmetric():
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    model = cnn()
    for rule in LAWS:
        assert float(bp.hellinger(model, x, 1, rule, rule).abs().max()) <= TOL
    for a, b in PAIRS[:6]:
        assert torch.equal(bp.hellinger(model, x, 1, a, b), bp.hellinger(model, x, 1, b, a))


def test_batch_of_four_equals_four_single_runs():
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 1])
    model = cnn()
    a, b = RiskAverse(RG(), theta=0.5), Anchor(AlphaBeta(2, 1), 0.3)
    batch = bp.hellinger(model, x, t, a, b)
    assert batch.shape == (4,)
    single = torch.stack([bp.hellinger(model, x[k], int(t[k]), a, b) for k in range(4)])
    assert float((batch - single).abs().max()) <= TOL


def test_matrix_equals_the_pairs():
    x = torch.randn(2, 3, dtype=torch.float64)
    model = residual()
    rules = [AlphaBeta(2, 1), GradientEquilibrium(), Anchor(RG(), 0.2), RiskAverse(RG(), theta=0.5)]
    res = bp.hellinger_matrix(model, x, 0, rules)
    assert res.rules == tuple(r.name for r in rules)
    assert res.values.shape == (2, 4, 4)
    assert torch.equal(res.values, res.values.transpose(1, 2))
    assert float(res.values.diagonal(dim1=1, dim2=2).abs().max()) == 0.0
    for i, a in enumerate(rules):
        for j, b in enumerate(rules[i + 1:], start=i + 1):
            assert float((res.values[:, i, j] - bp.hellinger(model, x, 0, a, b)).abs().max()) <= TOL
    assert torch.equal(res.mean(), res.values.mean(0))
    part = bp.hellinger_matrix(model, x, 0, rules, pairs=[(2, 0), (1, 3)])  # a share of the matrix
    for i in range(4):
        for j in range(4):
            if i == j or {i, j} in ({0, 2}, {1, 3}):
                assert float((part.values[:, i, j] - res.values[:, i, j]).abs().max()) <= TOL
            else:
                assert bool(part.values[:, i, j].isnan().all())
    with pytest.raises(ValueError, match=r"rule indices in 0..3, got \(1, 4\)"):
        bp.hellinger_matrix(model, x, 0, rules, pairs=[(1, 4)])


SINGLE = [Flat(), WSquare(), EpsilonPlus(), EpsilonPlusFlat(), EpsilonAlpha2Beta1Flat()]
SINGLE_PAIRS = [(a, b) for i, a in enumerate(SINGLE) for b in SINGLE[i + 1:]] + \
    [(a, b) for a in SINGLE for b in (AlphaBeta(2, 1), GradientEquilibrium(), Gamma(0.25), Anchor(RG(), 0.2))]


@pytest.mark.parametrize("a,b", SINGLE_PAIRS, ids=lambda r: r.name[:24])
def test_single_branch_laws_and_composites_equal_exact(a, b):
    """Flat and WSquare (single-branch laws: p = 1, sign kept, routing along the edges W != 0,
    docs/theory.md section 12; compared edge by edge) and the composites (the law changes per layer) against
    the exact law, on an MLP with biases, a CNN with max pooling and a residual model."""
    assert worst(mlp(), torch.randn(2, 4, dtype=torch.float64), 1, a, b) <= TOL
    assert worst(cnn(), torch.randn(1, 1, 4, 4, dtype=torch.float64), 2, a, b) <= TOL
    assert worst(residual(), torch.randn(1, 3, dtype=torch.float64), 0, a, b) <= TOL


@pytest.mark.parametrize("a,b", [(Flat(), AlphaBeta(2, 1)), (WSquare(), Flat()), (EpsilonPlusFlat(), Gamma(0.25))],
                         ids=lambda r: r.name[:24])
def test_single_branch_laws_skip_the_zeros_a_pad_writes(a, b):
    """The zeros an explicit F.pad writes are constants, not units (docs/theory.md section 11): the
    single-branch laws route along the edges from real units only, as the exact law on the unroll."""
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert worst(pad_cnn(), x, torch.tensor([0, 2]), a, b) <= TOL


@pytest.mark.parametrize("a,b", [(ZBox(-4.0, 4.0), Flat()), (EpsilonGammaBox(-4.0, 4.0), AlphaBeta(2, 1)),
                                 (EpsilonGammaBox(-4.0, 4.0), Composite(first=ZBox(-5.0, 4.0), default=Gamma(0.5)))],
                         ids=lambda r: r.name[:24])
def test_box_rule_and_its_composites_equal_exact(a, b):
    """ZBox (a single-branch law at the first layer: routing c_ij / D_i, docs/theory.md section 12) and
    the composites that use it; a ZBox reaching a layer that does not read the input is an error."""
    x = (torch.rand(2, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) - 0.5) * 6
    first_only = a if isinstance(a, Composite) else Composite(first=a, default=Epsilon(0.1))
    assert worst(mlp(), x, 1, first_only, b) <= TOL
    xc = (torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64) - 0.5) * 6
    assert worst(cnn(), xc, 2, first_only, b) <= TOL
    if not isinstance(a, Composite):
        with pytest.raises(ValueError, match="first-layer rule"):
            bp.hellinger(mlp(), x, 1, a, b)
    with pytest.raises(ValueError, match="outside"):  # the first conv (zennit's presets: not a dense layer)
        bp.hellinger(cnn(), xc * 10, 2, first_only, b)


@pytest.mark.parametrize("rule", [Gradient(), GradientXInput()], ids=lambda r: r.name[:24])
def test_rules_that_are_not_laws_are_rejected(rule):
    with pytest.raises(TypeError, match="is not a trajectory law.*AlphaBeta"):
        bp.hellinger(mlp(), torch.randn(2, 4, dtype=torch.float64), 0, rule, AlphaBeta(2, 1))


def test_model_is_not_modified_and_token_anchor_needs_attention():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bp.hellinger_matrix(model, torch.randn(2, 4, dtype=torch.float64), 0, LAWS[:3])
    with pytest.raises(ValueError, match="attention"):
        bp.hellinger(model, torch.randn(2, 4, dtype=torch.float64), 0, Anchor(RG(), 0.1, anchor="token"), RG())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tiny_vit_with_token_anchor_equals_exact():
    """A ViT (patch conv, cls token, LayerNorm, attention with the token anchor, GELU, residual adds)
    small enough for the exact law."""
    from backplay.bench.models import small_vit

    torch.manual_seed(4)
    model = small_vit(in_channels=1, num_classes=3, size=8, dim=4, depth=1, heads=1, patch_size=4,
                      mlp_ratio=1).double().eval()
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    assert worst(model, x, 1, Anchor(RG(), 0.3, anchor="token"), AlphaBeta(2, 1)) <= TOL
    assert worst(model, x, 2, GradientEquilibrium(), RiskAverse(Anchor(RG(), 0.2), theta=0.5)) <= TOL


def test_tiny_vit_every_layer_edge_by_edge_equals_exact():
    """The edge lists of every map kind of a ViT (patch conv, dense per token, LayerNorm, attention,
    residual sums) carry the laws compared edge by edge at every layer: the uniform anchor and the
    single-branch laws against the exact law."""
    from backplay.bench.models import small_vit

    torch.manual_seed(4)
    model = small_vit(in_channels=1, num_classes=3, size=8, dim=4, depth=1, heads=1, patch_size=4,
                      mlp_ratio=1).double().eval()
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    assert worst(model, x, 1, Anchor(RG(), 0.3), Flat()) <= TOL
    assert worst(model, x, 0, WSquare(), RiskAverse(GradientEquilibrium(), theta=0.5)) <= TOL
