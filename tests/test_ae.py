"""Attribution Equilibrium (docs/theory.md section 13): every term on hand-checked cases, the layer sums,
r = 1 and 2; and its closest law, AttributionEquilibriumLaw, exact-checked and conservative (I14)."""

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import backplay as bp
from backplay.gpu.engine import prepare
from backplay.rules import AlphaBeta, AttributionEquilibrium, AttributionEquilibriumLaw
from backplay.testing import nets_with_inputs, torch_matches_law
from backplay.theory import routing_law

D = torch.float64


def _trace(model, x):
    prep = prepare(nn.Sequential(model, nn.Flatten()), x)  # the reader explains outputs [B, classes]
    return prep.trace()


def _linear(w, b=None):
    w = torch.tensor(w, dtype=D)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None).double()
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(torch.tensor(b, dtype=D))
    return lin


def _hidden_layer(w2, x_hidden):
    """A net whose layer 2 has weight w2 and input x_hidden (layer 1 is the identity + ReLU)."""
    n = len(x_hidden)
    model = nn.Sequential(_linear(np.eye(n)), nn.ReLU(), _linear(w2), nn.ReLU(), _linear(np.ones((1, len(w2)))))
    return model, _trace(model, torch.tensor([x_hidden], dtype=D)).layers[1]


def _f(t):
    return [Fraction(v).limit_denominator(1000) for v in t.reshape(-1).tolist()]


# The hand-checked dense layer: W = [[1, -2, 0], [0, 1, 1]], x = [1, 2, 0], R = [3, -1]:
# P = [1, 0], N = [0, -1]; z = [1 + 4, 2] = [5, 2]; C_i = x_i sum_j |w_ji| (r P_j + N_j)/z_j;
# shift 1/2 on the two units with C != 0; A: denominators [3, 1] (active units 0, 1), A = [1/3, 2/3, 0];
# B: denominators [0, 1] (inactive unit 2), B = [0, 0, -1].
W2, X2, R2 = [[1.0, -2.0, 0.0], [0.0, 1.0, 1.0]], [1.0, 2.0, 0.0], [[3.0, -1.0]]
HAND = {
    2: {"C": [Fraction(2, 5), Fraction(3, 5), 0], "R": [Fraction(7, 30), Fraction(23, 30), -1]},
    1: {"C": [Fraction(1, 5), Fraction(-1, 5), 0], "R": [Fraction(1, 30), Fraction(-1, 30), -1]},
}


@pytest.mark.parametrize("r", [1, 2])
def test_terms_by_hand(r):
    _, layer = _hidden_layer(W2, X2)
    rule = AttributionEquilibrium(r)
    R = torch.tensor(R2, dtype=D)
    t = rule.terms(layer, R)
    assert _f(t["C"]) == HAND[r]["C"]
    assert _f(t["shift"]) == [Fraction(1, 2), Fraction(1, 2), 0]
    assert _f(t["A"]) == [Fraction(1, 3), Fraction(2, 3), 0]
    assert _f(t["B"]) == [0, 0, -1]
    low = rule.backward(layer, R)
    assert _f(low) == HAND[r]["R"]
    assert np.allclose(low.numpy(), np.array([[float(v) for v in HAND[r]["R"]]]), atol=1e-15, rtol=0)
    assert float(low.sum()) == pytest.approx(r - 2, abs=1e-15)
    # the rule reads R only through its normalised sign classes: scale-free
    assert torch.allclose(rule.backward(layer, 5 * R), low, atol=1e-15, rtol=0)


def test_first_layer_zb_by_hand():
    # w = [1, -1], x = [2, 1]: L = 1, H = 2, z^B = 1 - 1*1 - 2*(-1) = 2;
    # R_0 = (2 - 1)/2 R, R_1 = (-1 + 2)/2 R
    model = nn.Sequential(_linear([[1.0, -1.0]]), nn.ReLU(), _linear([[1.0]]))
    layer = _trace(model, torch.tensor([[2.0, 1.0]], dtype=D)).layers[0]
    low = AttributionEquilibrium().backward(layer, torch.tensor([[4.0]], dtype=D))
    assert low.tolist() == [[2.0, 2.0]]


def test_start_map_mlp_by_hand():
    # h = relu(x) = [1, 2]; dy_0/dh = [1, 1]: R0 = [1, 2] / |3|
    model = nn.Sequential(_linear(np.eye(2)), nn.ReLU(), _linear([[1.0, 1.0], [5.0, -5.0]]))
    tr = _trace(model, torch.tensor([[1.0, 2.0]], dtype=D))
    k, R0 = AttributionEquilibrium().start_map(tr, torch.tensor([0]))
    assert k == 1 and _f(R0) == [Fraction(1, 3), Fraction(2, 3)]
    _, R1 = AttributionEquilibrium().start_map(tr, torch.tensor([1]))
    assert _f(R1) == [1, -2]  # [5, -10] / |-5|


def test_start_map_cnn_by_hand():
    # A = (x, 2x) with x = [[1, 2], [3, 4]]; head weights: channel 0 [1, 0, 0, 0], channel 1 [0, 0, 0, -2];
    # spatial means 1/4 and -1/2: R0 = (x/4, -x), sum -7.5
    conv = nn.Conv2d(1, 2, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0], dtype=D).view(2, 1, 1, 1))
    head = _linear([[1.0, 0, 0, 0, 0, 0, 0, -2.0]])
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), head)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=D)
    k, R0 = AttributionEquilibrium().start_map(_trace(model, x), torch.tensor([0]))
    expect = torch.cat([x / 4, -x], 1) / 7.5
    assert k == 1 and torch.allclose(R0, expect, atol=1e-15, rtol=0)


def test_pools_by_hand():
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(1, 1)).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    x = torch.tensor([[[[1.0, 0.0], [3.0, -1.0]]]], dtype=D)
    layer = _trace(model, x).layers[1]  # avg pool, input relu(x) = [1, 0, 3, 0]
    low = AttributionEquilibrium().backward(layer, torch.tensor([[[[2.0]]]], dtype=D))
    e = 1e-9
    expect = 2 * torch.tensor([1 + e, e, 3 + e, e], dtype=D) / (4 + 4 * e)
    assert torch.allclose(low.reshape(-1), expect, atol=1e-15, rtol=0)
    mp = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                       nn.Linear(1, 1)).double()
    with torch.no_grad():
        mp[0].weight.fill_(1.0)
    layer = _trace(mp, x).layers[1]
    low = AttributionEquilibrium().backward(layer, torch.tensor([[[[2.0]]]], dtype=D))
    assert low.reshape(-1).tolist() == [0.0, 0.0, 2.0, 0.0]


def _checker_layer(kernel, seed):
    """A conv layer (index 2) whose input has active and inactive units in every window."""
    g = torch.Generator().manual_seed(seed)
    c1 = nn.Conv2d(2, 2, 1, bias=False).double()
    c2 = nn.Conv2d(2, 3, kernel, bias=False).double()
    with torch.no_grad():
        c1.weight.copy_(torch.eye(2, dtype=D).view(2, 2, 1, 1))
        c2.weight.copy_(torch.rand(c2.weight.shape, generator=g, dtype=D) + 0.5)  # no zero weight
    x = torch.rand((1, 2, 5, 5), generator=g, dtype=D) + 0.5
    if kernel == 1:
        x[:, 1] = 0  # at every pixel: channel 0 active, channel 1 inactive
    else:
        ii, jj = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
        x[:, :, (ii + jj) % 2 == 0] = 0  # checkerboard
    prep = prepare(nn.Sequential(c1, nn.ReLU(), c2, nn.Flatten()), x)
    return prep.trace().layers[1], g


@pytest.mark.parametrize("r", [1, 1.5, 2])
@pytest.mark.parametrize("kernel", [1, 3])
def test_layer_sums(r, kernel):
    """sum R_lower = r - 2 at a kernel > 1 layer, 0 at 1x1, whatever R came in (both signs)."""
    layer, g = _checker_layer(kernel, seed=kernel)
    rule = AttributionEquilibrium(r)
    for _ in range(3):
        R = torch.randn(layer.y.shape, generator=g, dtype=D) * 10
        low = rule.backward(layer, R)
        assert float(low.sum()) == pytest.approx((r - 2) if kernel > 1 else 0.0, abs=1e-12)
        t = rule.terms(layer, R)
        assert float(t["A"].sum()) == pytest.approx(1, abs=1e-12)
        assert float(t["B"].sum()) == pytest.approx(-1, abs=1e-12)
        assert float(t["shift"].sum()) == pytest.approx(1.0 if kernel > 1 else 0.0, abs=1e-12)


def test_dense_layer_sums_r_minus_2():
    g = torch.Generator().manual_seed(3)
    w = torch.rand((4, 6), generator=g, dtype=D) + 0.1
    x = [0.0, 1.0, 2.0, 0.0, 0.5, 3.0]
    _, layer = _hidden_layer(w.tolist(), x)
    for r in (1, 2):
        R = torch.tensor([[2.0, -1.0, 0.5, -3.0]], dtype=D)
        assert float(AttributionEquilibrium(r).backward(layer, R).sum()) == pytest.approx(r - 2, abs=1e-12)


def test_batchnorm_merged_equals_passing_through():
    """BN merged into the conv weights gives the same layer map as the conv alone (per-channel scale)."""
    g = torch.Generator().manual_seed(1)
    c1, c2 = nn.Conv2d(1, 2, 2).double(), nn.Conv2d(2, 3, 2).double()
    bn = nn.BatchNorm2d(3).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        bn.weight.copy_(torch.tensor([-2.0, 0.5, 3.0]))
    x = torch.randn((1, 1, 6, 6), generator=g, dtype=D)
    plain = nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU())
    with_bn = nn.Sequential(c1, nn.ReLU(), c2, bn, nn.ReLU())
    la, lb = _trace(plain, x).layers[1], _trace(with_bn, x).layers[1]
    assert not torch.equal(la.map.weight, lb.map.weight)
    R = torch.randn(la.y.shape, generator=g, dtype=D)
    for r in (1, 2):
        rule = AttributionEquilibrium(r)
        assert torch.allclose(rule.backward(la, R), rule.backward(lb, R), atol=1e-14, rtol=1e-12)


def test_vgg_like_end_to_end_and_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 5)).double().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 8, 8, dtype=D)
    R, rep = bp.explain(model, x, torch.tensor([0, 1, 4]), AttributionEquilibrium(), return_report=True)
    assert R.shape == x.shape and torch.isfinite(R).all()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # the head (two Linear layers) is not propagated: NaN above the start (layer 5, the avg pool output)
    assert torch.isnan(rep.layers[7]).all() and torch.isnan(rep.layers[6]).all()
    assert torch.allclose(rep.layers[5].flatten(1).sum(1).abs(), torch.ones(3, dtype=D))
    # batched = one by one
    for b in range(3):
        Rb = bp.explain(model, x[b], int([0, 1, 4][b]), AttributionEquilibrium())
        assert torch.allclose(Rb, R[b], atol=1e-13, rtol=1e-10)


def test_rejects_bad_parameters_and_models():
    with pytest.raises(ValueError, match="r must lie in"):
        AttributionEquilibrium(3)
    with pytest.raises(ValueError, match="hidden layer"):
        bp.explain(nn.Linear(2, 2).double(), torch.ones(1, 2, dtype=D), 0, AttributionEquilibrium())
    with pytest.raises(ValueError, match="Linear head"):
        bp.explain(nn.Sequential(nn.Conv2d(1, 1, 2), nn.ReLU(), nn.Conv2d(1, 1, 2), nn.Flatten()).double(),
                   torch.ones(1, 1, 3, 3, dtype=D), 0, AttributionEquilibrium())
    with pytest.raises(TypeError, match="Residual"):
        body = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        bp.explain(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), bp.gpu.Residual(body), nn.Linear(2, 1)).double(),
                   torch.ones(1, 2, dtype=D), 0, AttributionEquilibrium())


# -- the law ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [1, 2, 1.5])
def test_law_parameters(r):
    law = AttributionEquilibriumLaw(r)
    assert law.alpha == (r + 1) / r and law.beta == 1 / r
    assert law.alpha / (law.alpha + law.beta) == pytest.approx((r + 1) / (r + 2), rel=1e-15)
    assert law.name == f"AttributionEquilibriumLaw(r={r!r})"
    with pytest.raises(ValueError):
        AttributionEquilibriumLaw(0)


@pytest.mark.parametrize("r", [1, 2, 1.5])
def test_law_exact_hand_over(r):
    """theory: p = (r+1)/(r+2), q = 1/(r+2), m = (r+2)/r exactly; m (p - q) = 1 (I14's condition)."""
    from backplay.nets import MLPSpec
    import sympy as sp

    spec = MLPSpec([np.array([[1.0, -0.5], [0.25, 1.0]]), np.array([[1.0, -1.0]])], [None, None])
    law = routing_law(spec, np.array([1.0, 0.5]), 0, AttributionEquilibriumLaw(r))
    k = law.kernel(2, 0)
    rr = sp.Rational(r)
    assert (k.p, k.q, k.m) == ((rr + 1) / (rr + 2), 1 / (rr + 2), (rr + 2) / rr)
    assert k.m * (k.p - k.q) == 1


@given(case=nets_with_inputs(activation="relu"), r=st.sampled_from([1, 2, 1.5]))
def test_law_torch_equals_exact_and_conservative(case, r):
    spec, x, target = case
    rule = AttributionEquilibriumLaw(r)
    model = spec.to_torch(dtype=D)
    xt = torch.tensor(x, dtype=D)
    frozen = bp.gpu.unroll(model, xt)
    assert torch_matches_law(model, xt, target, rule, frozen) < 1e-9
    law = routing_law(spec, x, target, rule)
    assert sum(law.relevance()[0]) + law.stopped()["total"] == law.w0  # I14, exact
    R, rep = bp.explain(model, xt[None], target, rule, return_report=True)
    assert abs(float(rep.relevance_sum[0] + rep.stopped[0] - rep.logit[0])) <= 1e-9 * max(1, abs(float(rep.logit[0])))
    # the law is alpha-beta with alpha = (r+1)/r, beta = 1/r (exactly the same torch computation)
    R_ab = bp.explain(model, xt[None], target, AlphaBeta((r + 1) / r, 1 / r, conservative=False))
    assert torch.equal(R, R_ab)
