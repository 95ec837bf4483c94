"""torch == exact law at every layer, for every routing rule, on small random CNNs (float64, 1e-9).

The CNN's extended graph is built from the unrolled convolution (``backplay.gpu.unroll``: dense
conv / pooling matrices, max-pool as a frozen winner-takes-all selection) and the exact law of
``backplay.theory.routing_law`` runs on it. Also: SoftplusGame against the exact entropic game.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given
from hypothesis import strategies as st

import backplay as bp
from backplay.rules import SoftplusGame
from backplay.testing import ROUTING_RULES, dyadics, nets_with_inputs, torch_matches_law
from backplay.theory import ReLUNetGame, to_float

TOL = 1e-9


def _fill(module, draw):
    with torch.no_grad():
        for p in module.parameters():
            vals = draw(st.lists(dyadics(), min_size=p.numel(), max_size=p.numel()))
            p.copy_(torch.tensor(vals, dtype=torch.float64).reshape(p.shape))


@st.composite
def small_cnns(draw):
    """conv(k 2-3, padding 0-1, bias on/off) - ReLU - [max | avg | adaptive-avg pool | none]
    - [BatchNorm-merged conv - ReLU] - Flatten - Linear, with dyadic weights; and an input."""
    c_in, size = draw(st.integers(1, 2)), draw(st.integers(4, 6))
    c1, k, pad = draw(st.integers(1, 3)), draw(st.integers(2, 3)), draw(st.integers(0, 1))
    layers = [nn.Conv2d(c_in, c1, k, padding=pad, bias=draw(st.booleans())), nn.ReLU()]
    side = size + 2 * pad - k + 1
    pool = draw(st.sampled_from(["max", "avg", "adaptive", "none"]))
    if pool == "max" and side >= 2:
        layers.append(nn.MaxPool2d(2))
        side //= 2
    elif pool == "avg" and side >= 2:
        layers.append(nn.AvgPool2d(2))
        side //= 2
    elif pool == "adaptive":
        layers.append(nn.AdaptiveAvgPool2d(2))
        side = 2
    channels = c1
    if draw(st.booleans()) and side >= 2:
        bn = nn.BatchNorm2d(2)
        layers += [nn.Conv2d(c1, 2, 2, bias=True), bn, nn.ReLU()]
        side, channels = side - 1, 2
    out = draw(st.integers(1, 3))
    layers += [nn.Flatten(), nn.Linear(channels * side * side, out)]
    model = nn.Sequential(*layers).double().eval()
    _fill(model, draw)
    for m in model:
        if isinstance(m, nn.BatchNorm2d):  # running statistics: dyadic, variance > 0
            m.running_mean.copy_(torch.tensor([0.25, -0.5], dtype=torch.float64))
            m.running_var.copy_(torch.tensor([4.0, 0.25], dtype=torch.float64))
    x = torch.tensor(draw(st.lists(dyadics(), min_size=c_in * size * size, max_size=c_in * size * size)),
                     dtype=torch.float64).reshape(c_in, size, size)
    return model, x, draw(st.integers(0, out - 1))


@pytest.mark.parametrize("rule", ROUTING_RULES, ids=lambda r: r.name)
@given(case=small_cnns())
def test_cnn_torch_equals_exact_law_at_every_layer(rule, case):
    model, x, target = case
    frozen = bp.gpu.unroll(model, x)
    assert torch_matches_law(model, x, target, rule, frozen) <= TOL


@given(case=small_cnns())
def test_unrolled_cnn_reproduces_the_model(case):
    model, x, _ = case
    frozen = bp.gpu.unroll(model, x)
    y = x.reshape(-1).numpy()
    for w, b, y_next in zip(frozen.weights, frozen.biases, frozen.ys[1:]):
        z = w @ y + (0 if b is None else b)
        assert np.all(np.abs(y_next - z) <= 1e-12) or np.all(np.abs(y_next - np.maximum(z, 0)) <= 1e-12)
        y = y_next
    assert np.allclose(y, model(x[None])[0].detach().numpy(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("eps", [1.0, 0.25])
@given(case=nets_with_inputs(activation="relu", max_depth=3, max_width=4))
def test_softplus_game_rule_is_the_entropic_occupation(eps, case):
    """SoftplusGame(eps) = x * (nu+ - nu-) of the eps-entropic game of the same weights (I10-I11)."""
    spec, x, target = case
    exact = to_float(ReLUNetGame(spec.with_eps(eps)).solve(x, target).gxi)
    got = bp.explain(spec.to_torch(), torch.tensor(x)[None], target, rule=SoftplusGame(eps))[0].numpy()
    assert np.max(np.abs(got - exact)) <= 1e-10 * max(1.0, np.max(np.abs(exact)))


@given(case=nets_with_inputs(activation="relu", max_depth=3, max_width=4, ties=False))
def test_softplus_game_tends_to_gradient_x_input(case):
    """I12: eps -> 0 recovers the ReLU attribution (away from ties)."""
    spec, x, target = case
    zs = [z for z, _ in spec.forward(x)]
    margin = min((abs(v) for z in zs for v in z if v != 0), default=1.0)
    assume(all(v != 0 for z in zs for v in z))  # at a tie sigmoid(0) = 1/2, not the ReLU convention
    model, xt = spec.to_torch(), torch.tensor(x)[None]
    gxi = bp.explain(model, xt, target, rule=bp.rules.GradientXInput())
    sg = bp.explain(model, xt, target, rule=SoftplusGame(margin / 80))
    assert torch.allclose(sg, gxi, atol=1e-6 * max(1.0, float(gxi.abs().max())), rtol=0)
