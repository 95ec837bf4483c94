"""``fast=True`` on AlphaBeta and RG: the sum/difference form on inputs of both signs, against the exact
form, within the bound of docs/theory.md section 8 ("fast: the sum/difference form").

The bound, for one layer with a constant hand-over (p, q, m), relevance R at its neurons, branch masses
a_{i,+} = m p R_i and a_{i,-} = m q R_i, weight parts S_{i,+-} of the branch sums and A_i = sum_j |Z_ij|:

    ||R_fast - R_law||_1 <= rho m ||R||_1 + sum over the branches with 0 < |S_{i,b}| <= (kappa + g_f)(1 + g_f) A_i
                                            of |a_{i,b}|,
    rho = (g_f + 2 g_b + 3u) / (kappa (1 - g_f)),

g_f = gamma(n_in + 2), g_b = gamma(n_out + 1), gamma(n) = n u / (1 - n u), n_in / n_out the entries of
one sample's input / output (at least any sum's number of terms), u the unit round-off, kappa
:func:`backplay.rules.routing.fast_tolerance`. The exact form computed in floating point is itself within
(g_f + 2 g_b + 3u) / (1 - g_f) m ||R||_1 of the law, so the comparison below allows both. float64 only:
the bound assumes the standard model of summation (|error| <= gamma(n) sum |terms|), which float64 CPU
kernels satisfy (reduced-precision kernels, TF32 or Winograd convolutions, need not).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import backplay as bp
from backplay.gpu.engine import prepare
from backplay.rules import RG, AlphaBeta, Anchor, RGEq, RiskAverse, ZPlus
from backplay.rules.routing import fast_tolerance
from backplay.testing.model_strategies import random_models

LAWS = [AlphaBeta(2, 1), RG(0.5), ZPlus(), AlphaBeta(1.5, 0.5)]


def _fast(rule):
    return dataclasses.replace(rule, fast=True)


def _gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


def _layer_bound(layer, upper: torch.Tensor, rule) -> torch.Tensor:
    """Per sample: the bound on ||R_fast - R_exact||_1 at this layer (module docstring), both forms'
    round-off included."""
    y, M = layer.input, layer.map
    u = torch.finfo(y.dtype).eps / 2
    n_in, n_out = math.prod(y.shape[1:]), math.prod(layer.y.shape[1:])
    g_f, g_b = _gamma(n_in + 2, u), _gamma(n_out + 1, u)
    kappa = fast_tolerance(y.dtype)
    h = rule.handover(torch.zeros(1, dtype=y.dtype), torch.zeros(1, dtype=y.dtype))
    m, p, q = float(h.mult), float(h.plus), float(h.minus)
    R = upper.reshape(layer.y.shape).abs()
    c = (g_f + 2 * g_b + 3 * u) / (1 - g_f)
    bound = (c / kappa + c) * m * R.flatten(1).sum(1)
    Sp, Sn = M.cross(y.clamp_min(0), y.clamp_max(0))  # the weight parts, exact form (positive terms)
    A = M.apply(y.abs(), "abs")
    near = (kappa + g_f) * (1 + g_f) * A + g_f * A  # the exact form's own sums are within g_f A
    for S, share in ((Sp.abs(), m * p), (Sn.abs(), m * q)):
        dropped = (S > 0) & (S <= near)
        bound = bound + (torch.where(dropped, R, 0.0) * share).flatten(1).sum(1)
    return bound


def _signed_layers(trace):
    return [s for s in trace.layers if not s.map.pass_through and bool((s.input < 0).any())]


def _check_layers(model, x, target, rule) -> int:
    """Every routed layer with a signed input, probed with a random relevance: fast within the bound of
    exact. Returns the number of layers checked."""
    trace = prepare(model, x).trace(frozenset())
    t = torch.full((x.shape[0],), int(target))
    exact, fast = rule.layer_map(trace, t), _fast(rule).layer_map(trace, t)
    gen = torch.Generator().manual_seed(0)
    layers = _signed_layers(trace)
    for layer in layers:
        upper = torch.randn(layer.y.shape, generator=gen, dtype=x.dtype)
        upper[..., ::3] = 0  # units with no relevance
        lo_e, st_e = exact(layer, upper)
        lo_f, st_f = fast(layer, upper)
        dev = (lo_f - lo_e).flatten(1).abs().sum(1)
        bound = _layer_bound(layer, upper, rule)
        assert bool((dev <= bound).all()), (layer.kind, dev.tolist(), bound.tolist())
        # conservation: what is not handed down is reported as stopped, in both forms alike
        tot = upper.flatten(1).sum(1)
        assert torch.allclose(lo_f.flatten(1).sum(1) + st_f, lo_e.flatten(1).sum(1) + st_e,
                              rtol=0, atol=float(2 * bound.max()) + 1e-12 * float(tot.abs().max()))
    return len(layers)


class SignedNet(nn.Module):
    """Inputs of both signs at most layers: a conv on the raw image, a conv without a gate, LayerNorm,
    GELU, a residual sum and a Linear head (Gaussian weights: the sums are not exact in floating point)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.ln = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = self.c2(h)
        h = h + self.c3(F.gelu(h))
        h = F.adaptive_avg_pool2d(h, 2).flatten(1)
        h = self.ln(h)
        return self.fc(F.gelu(self.fc1(h)) + h)


def _signed_case(seed: int):
    torch.manual_seed(seed)
    model = SignedNet().double().eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    x[0, :, :2] = 0  # zero rows: ties z = 0
    return model, x


@pytest.mark.parametrize("rule", LAWS, ids=lambda r: r.name)
@given(seed=st.integers(0, 2**16))
@settings(deadline=None)
def test_one_layer_deviation_within_the_bound(rule, seed):
    model, x = _signed_case(seed)
    assert _check_layers(model, x, seed % 5, rule) >= 4


@given(rm=random_models())
@settings(deadline=None)
def test_one_layer_deviation_within_the_bound_on_random_models(rm):
    model = rm.model.double()
    x = rm.x[None].double()
    for rule in (AlphaBeta(2, 1), RG(0.5)):
        _check_layers(model, x, rm.target, rule)


class _OneLayer(nn.Module):
    def __init__(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        super().__init__()
        self.fc = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            self.fc.weight.copy_(w)
            if b is not None:
                self.fc.bias.copy_(b)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("bias", [False, True])
def test_empty_branches_stop_what_the_exact_law_stops(bias):
    """Rows whose contributions W_ij y_j all have one sign (the other branch exactly empty; values whose
    sums round: 0.1, 0.7, ...) and a mixed row: the sum/difference form finds the empty branches empty,
    and the mass handed to them is stopped exactly as the exact law stops it (I14)."""
    y = torch.tensor([[0.1, -0.7, 0.3, -0.9]], dtype=torch.float64)
    w = torch.tensor([[0.3, -0.1, 0.7, -0.3],     # every Z > 0: the - branch empty
                      [-0.3, 0.1, -0.7, 0.3],     # every Z < 0: the + branch empty
                      [0.3, 0.1, -0.7, 0.3]], dtype=torch.float64)
    Z = w * y
    assert bool((Z[0] > 0).all()) and bool((Z[1] < 0).all())
    b = torch.tensor([0.2, -0.1, 0.05], dtype=torch.float64) if bias else None
    model = _OneLayer(w, b).double().eval()
    for rule in (AlphaBeta(2, 1), RG(0.5)):
        e, re_ = bp.explain(model, y, 0, rule, return_report=True)
        f, rf = bp.explain(model, y, 0, _fast(rule), return_report=True)
        scale = float(re_.logit.abs().max())
        assert float((e - f).abs().max()) <= 1e-14 * scale
        assert float((re_.stopped - rf.stopped).abs().max()) <= 1e-14 * scale
        assert float(re_.stopped.abs().max()) > 0.1 * scale  # the beta share was handed to an empty branch


def test_a_near_empty_branch_is_dropped_and_the_bound_says_so():
    """A - branch holding 1e-12 of the row's |Z| mass: below kappa = 2 sqrt(eps), so the fast form takes
    it as empty and stops its mass (the exact law routes it): a deviation the bound's second term allows."""
    y = torch.tensor([[1.0, 1.0, -1.0]], dtype=torch.float64)
    w = torch.tensor([[0.5, 0.25, -1e-12]], dtype=torch.float64)  # Z = 0.5, 0.25, 1e-12: all in +
    w2 = torch.tensor([[0.5, 0.25, 1e-12]], dtype=torch.float64)  # Z_3 = -1e-12: a near-empty - branch
    for weights, dropped in ((w, False), (w2, True)):
        model = _OneLayer(weights, None).double().eval()
        rule = AlphaBeta(2, 1)
        e, re_ = bp.explain(model, y, 0, rule, return_report=True)
        f, rf = bp.explain(model, y, 0, _fast(rule), return_report=True)
        dev = float((e - f).abs().sum())
        beta_mass = float(re_.logit.abs()) * 1.0  # m q R = beta R at the one neuron
        if dropped:
            assert dev == pytest.approx(beta_mass, rel=1e-9)  # the whole - share moved to the stopped mass
            assert float(rf.stopped - re_.stopped) == pytest.approx(-beta_mass, rel=1e-9)
            assert dev <= float(_layer_bound(prepare(model, y).trace(frozenset()).layers[0],
                                             torch.ones(1, 1, dtype=torch.float64) * re_.logit, rule))
        else:
            assert dev <= 1e-15


def test_fast_changes_only_layers_with_a_signed_input():
    """A ReLU CNN on a nonnegative image: every routed layer reads a nonnegative input, so the fast form is
    the exact form, bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16, 3)).double().eval()
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    for rule in (AlphaBeta(2, 1), RG(0.5)):
        assert torch.equal(bp.explain(model, x, 1, rule), bp.explain(model, x, 1, _fast(rule)))


def test_fast_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="route_temp=1"):
        RG(route_temp=0.5, fast=True)
    with pytest.raises(ValueError, match="takes an exact law"):
        Anchor(RG(fast=True), 0.1)
    with pytest.raises(ValueError, match="takes an exact law"):
        RiskAverse(Anchor(AlphaBeta(2, 1, fast=True), 0.1))
    with pytest.raises(TypeError, match="fast must be True or False"):
        AlphaBeta(2, 1, fast=1)
    with pytest.raises(TypeError):
        RGEq(fast=True)  # the hand-over depends on the sums: no fast form (no uniform bound near p = q)
    with pytest.raises(TypeError):
        AlphaBeta(2, 1, True, True)  # keyword only
    assert AlphaBeta(2, 1).name == "AlphaBeta(alpha=2, beta=1, conservative=True)"
    assert RG(fast=True).name.endswith("fast=True)") and ZPlus(fast=True).name == "ZPlus(fast=True)"
