"""The LRP rule zoo (docs/theory.md section 12; backplay/rules/lrp.py, Epsilon in backplay/rules/gradient.py)
as laws on the extended graph of any model the reader takes.

(a) torch = the exact law on the unrolled graph at every report layer (relevance, stopped mass,
    logit; float64, 1e-9, exact rationals) for every zoo rule and composite, on an MLP with biases, a
    CNN (Conv2d + ReLU + MaxPool / AvgPool + Linear, biases), a residual ``x + y`` model and, with
    hypothesis, random small DAG models (ties z = 0, zero rows, zero weights, mixed signs); and the
    law's layer map = the rule's own formula (an independent recursion) at every layer of the
    unrolled graph.
(b) I22: Gamma(gamma) = RGEq(kappa = log(1 + gamma), nu = 1) exactly (sympy) on units with z > 0,
    with and without a bias: p, q, m and the routing per neuron; on units with z < 0 (zennit's
    convention) it is RGEq(kappa = -log(1 + gamma), nu = 1), tested the same way.
(c) I14 for Epsilon: sum R^0 + stopped = logit exactly with the stop eps/(|z| + eps); Epsilon(0) is
    the gradient equilibrium (I17) kernel by kernel; ZPlus = AlphaBeta(1, 0) (I15) and its closed form.
(d) zennit 0.5.1's rules and composites, float64, 1e-9 where the conventions meet:
    * zennit's stabiliser adds 1e-6 sign(z) (sign(0) = +1) to every denominator. For Epsilon this is
      the rule's own eps: same numbers wherever z != 0 (backplay stops the token at z = 0, zennit
      divides by eps). For the other rules (Gamma, ZPlus, AlphaBeta, ZBox, Flat, WSquare, Norm) zennit
      takes a callable stabiliser: ``_safe_den`` (a zero denominator -> 1, so 0/0 := 0) makes it exact,
      as backplay divides.
    * Flat: zennit sets every weight to 1, an exact zero weight included; the law routes along the
      edges, 1{W != 0} (asserted: each side equals its own formula, and they differ there).
    * Biases: Gamma and ZPlus count the bias as a unit of the branch of its sign in both libraries;
      WSquare squares the bias in both (its share goes to the bias sink); Flat zeroes it in both;
      ZBox: the bias cancels in zennit's denominator, backplay gives it no share.
    * A functional ReLU (``F.relu``): zennit hooks modules only, so the gradient of F.relu zeroes the
      relevance that WSquare / Flat send to an inactive unit; backplay's law does not depend on how
      the ReLU is written (the comparisons use nn.ReLU modules).
    * "First layer": zennit's first module of the matching type in registration order; backplay's
      layers that read the input (the same layer on these models).
    * Average pools and sum nodes: zennit's Norm = LRP-0 = backplay's LRP0 in the presets; a
      BatchNorm after a convolution: backplay merges it, zennit with ``SequentialMergeBatchNorm``.
(e) ``bp.explain(model, x, target, rule=EpsilonPlusFlat())`` on a ResNet-style model (BatchNorm, a
    projection shortcut) and a small ViT: relevance sum + stopped = logit per sample.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

import backplay as bp
from backplay.gpu.read import UnsupportedOperation
from backplay.gpu.unroll import unroll_graph
from backplay.nets import to_rational
from backplay.rules import (
    LRP0, AlphaBeta, Composite, Epsilon, EpsilonAlpha2Beta1, EpsilonAlpha2Beta1Flat, EpsilonGammaBox,
    EpsilonPlus, EpsilonPlusFlat, Flat, Gamma, GradientEquilibrium, RGEq, WSquare, ZBox, ZPlus,
)
from backplay.testing import random_models
from backplay.testing.graph_exact import torch_error
from backplay.theory import routing_law
from backplay.theory.routing import BIAS, alpha_beta_lrp

from _torchvision_stub import import_zennit

D = torch.float64
TOL = 1e-9
BOX = (-3.0, 3.0)  # inputs of the hand-written models lie inside

ZOO_RULES = [Epsilon(0.1), Epsilon(0.0), Gamma(0.25), Gamma(1.0), ZPlus(), Flat(), WSquare()]
COMPOSITES = [
    EpsilonPlus(0.1), EpsilonPlusFlat(0.05), EpsilonAlpha2Beta1(0.1), EpsilonAlpha2Beta1Flat(0.1),
    EpsilonGammaBox(*BOX, epsilon=0.1, gamma=0.5),
    Composite(first=ZBox(*BOX), kinds={"conv": Gamma(0.5), ("pool", "add"): WSquare()}, default=Epsilon(0.2)),
    Composite(first={"linear": Flat()}, kinds=[("linear", Gamma(0.1))], default=ZPlus()),
]


# ------------------------------------------------------------------------------------------------
# models written the way people write them
# ------------------------------------------------------------------------------------------------
def _init(model: nn.Module, seed: int, zero: bool = True) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=D) / math.sqrt(m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g, dtype=D))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g, dtype=D))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=D))
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g, dtype=D))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g, dtype=D))
        if zero:  # an exact zero weight in a hidden layer
            hidden = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][1:]
            if hidden:
                hidden[0].weight.view(-1)[1] = 0.0
    return model.to(D).eval()


class MLP(nn.Module):
    def __init__(self, sizes=(5, 6, 6, 3)) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = (nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


class SmallCNN(nn.Module):
    def __init__(self, c: int = 2, h: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(c, h, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(h, h, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(h, 4), nn.ReLU(), nn.Linear(4, 3))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class Residual(nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.inp, self.f, self.out = nn.Linear(n, n), nn.Linear(n, n), nn.Linear(n, 3)

    def forward(self, x):
        h = F.relu(self.inp(x))
        y = F.relu(self.f(h))
        return self.out(h + y)


class Block(nn.Module):
    """A ResNet basic block with a projection shortcut (1x1 conv + BatchNorm)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b)
        self.conv2, self.bn2 = nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b)
        self.shortcut = nn.Sequential(nn.Conv2d(a, b, 1, bias=False), nn.BatchNorm2d(b))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetish(nn.Module):
    def __init__(self, c: int = 3, w: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layer1 = Block(w, w + 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w + 2, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer1(self.stem(x))), 1))


class PadCNN(nn.Module):
    """Explicit padding as TF-SAME convolutions are written (EfficientNet): ``F.pad`` then
    ``Conv2d(padding=0)``, F.relu, a channel of constants concatenated (``fill``: zeros, which stay
    constants of a layout step, or a nonzero constant, a copy layer's bias units), a max pool of a
    padded tensor, a Linear head."""

    def __init__(self, fill: float = 0.0, value: float = 0.0) -> None:
        super().__init__()
        self.fill, self.value = fill, value
        self.conv1, self.conv2, self.fc = nn.Conv2d(2, 3, 3), nn.Conv2d(4, 3, 2), nn.Linear(12, 3)

    def forward(self, x):
        h = F.relu(self.conv1(F.pad(x, (0, 1, 0, 1), value=self.value)))
        h = torch.cat([h, torch.full_like(h[:, :1], self.fill)], dim=1)
        h = F.relu(self.conv2(F.pad(h, (1, 0, 1, 0))))
        h = F.max_pool2d(F.pad(h, (1, 0, 1, 0)), 2)
        return self.fc(torch.flatten(h, 1))


def _case(name: str, seed: int = 0):
    g = torch.Generator().manual_seed(100 + seed)
    if name == "mlp":
        return _init(MLP(), seed), torch.randn(5, generator=g, dtype=D)
    if name == "cnn":
        return _init(SmallCNN(), seed), torch.randn(2, 4, 4, generator=g, dtype=D)
    if name == "residual":
        return _init(Residual(), seed), torch.randn(4, generator=g, dtype=D)
    raise KeyError(name)


CASES = ["mlp", "cnn", "residual"]


# ------------------------------------------------------------------------------------------------
# (a) torch = the exact law at every layer; the law = the rule's formula
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("rule", ZOO_RULES + COMPOSITES, ids=lambda r: r.name)
def test_torch_equals_the_exact_law_at_every_layer(name, rule):
    model, x = _case(name)
    for target in range(3):
        assert torch_error(model, x, target, rule) <= TOL, (name, rule.name, target)


@pytest.mark.parametrize("fill", [0.0, 0.5])
@pytest.mark.parametrize("rule", [Flat(), WSquare(), EpsilonPlusFlat(0.05), EpsilonGammaBox(-2.0, 2.0, epsilon=0.1),
                                  Composite(first=Flat(), default=WSquare())], ids=lambda r: r.name)
def test_explicit_padding_adds_no_units(rule, fill):
    """The zeros that F.pad (or a cat with zeros) writes are constants, not units of the graph
    (docs/theory.md section 11): Flat and WSquare, whose routing ignores the values, route nothing to
    them, as with Conv2d(padding=1); torch = the exact law at every layer and relevance + stopped =
    logit. A max pool whose winner is a padded zero (a dead channel: ties go to the first index)
    and nonzero constants concatenated (a copy layer's bias units) send their share to the bias sink.
    A pad with a nonzero value is refused by the reader (only zero padding is a layout step)."""
    model = _init(PadCNN(fill), seed=3, zero=False)
    with torch.no_grad():
        model.conv2.bias[2] = -50.0
    x = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(4), dtype=D) * 4 - 2
    for target in range(3):
        assert torch_error(model, x[target], target, rule) <= TOL, (rule.name, target)
    assert _conserves(model, x, rule, torch.arange(3)) <= TOL
    with pytest.raises(UnsupportedOperation, match="constant padding with value 0.5"):
        bp.explain(_init(PadCNN(fill, value=0.5), seed=3), x, 0, rule=rule)


def _formula_layer(rule, net, l: int, upper: np.ndarray) -> np.ndarray:
    """R^{l-1} from R^l by the rule's formula (its docstring), in rationals; copy / max-pool rows pass
    relevance to their unit."""
    W = np.vectorize(to_rational, otypes=[object])(net.weights[l - 1])
    y = np.vectorize(to_rational, otypes=[object])(net.ys[l - 1])
    b = net.biases[l - 1]
    b = np.zeros(W.shape[0], dtype=object) if b is None else np.vectorize(to_rational, otypes=[object])(b)
    zero = sp.Integer(0)
    lower = np.array([zero] * W.shape[1], dtype=object)
    for i, r in enumerate(upper):
        if r == 0:
            continue
        if net.selects(l, i):
            lower[[j for j in range(W.shape[1]) if W[i, j] != 0][0]] += r
            continue
        Z = W[i] * y
        Zp = np.array([max(v, zero) for v in Z], dtype=object)
        Zn = np.array([min(v, zero) for v in Z], dtype=object)
        Sp, Sn = sum(Zp) + max(b[i], zero), sum(Zn) + min(b[i], zero)
        z = Sp + Sn
        if isinstance(rule, (Epsilon, LRP0, GradientEquilibrium)):
            eps = to_rational(rule.eps) if isinstance(rule, Epsilon) else zero
            if z != 0:
                lower += Z / (z + eps * sp.sign(z)) * r
        elif isinstance(rule, Gamma):
            g = to_rational(rule.gamma)
            if z > 0:
                lower += (Z + g * Zp) / (z + g * Sp) * r
            elif z < 0:
                lower += (Z + g * Zn) / (z + g * Sn) * r
        elif isinstance(rule, AlphaBeta):
            a, be = to_rational(rule.alpha), to_rational(rule.beta)
            lower += np.array([a * zp / Sp if zp != 0 else zero for zp in Zp], dtype=object) * r
            lower -= np.array([be * zn / Sn if zn != 0 else zero for zn in Zn], dtype=object) * r
        elif isinstance(rule, Flat):
            nz = np.array([sp.Integer(int(w != 0)) for w in W[i]], dtype=object)
            if sum(nz) != 0:
                lower += nz / sum(nz) * r
        elif isinstance(rule, WSquare):
            sq = W[i] ** 2
            if sum(sq) + b[i] ** 2 != 0:
                lower += sq / (sum(sq) + b[i] ** 2) * r
        elif isinstance(rule, ZBox):
            assert l == 1, "the formula oracle takes ZBox on layer 1 (its columns are the inputs)"
            lo, hi = (t.reshape(-1).tolist() for t in rule.bounds(net.in_shape))
            c = np.array([y[j] * W[i, j] - to_rational(lo[j]) * max(W[i, j], zero)
                          - to_rational(hi[j]) * min(W[i, j], zero) for j in range(W.shape[1])], dtype=object)
            if sum(c) != 0:
                lower += c / sum(c) * r
        else:
            raise AssertionError(rule)
    return lower


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("rule", ZOO_RULES + COMPOSITES, ids=lambda r: r.name)
def test_the_law_is_the_rules_formula_at_every_layer(name, rule):
    """The exact law's layer map (p, q, m, routing, stops) reproduces the rule's LRP formula at every
    layer of the unrolled graph (an independent recursion; a composite picks its rule per layer)."""
    model, x = _case(name)
    net = unroll_graph(model, x).net
    law = routing_law(net, target=0, rule=rule)
    rel = law.relevance()
    for l in range(net.depth, 0, -1):
        sub = rule.rule_at(net.ops[l - 1], net.modules[l - 1], net.first[l - 1]) \
            if isinstance(rule, Composite) else rule
        assert list(_formula_layer(sub, law.net, l, rel[l])) == list(rel[l - 1]), (rule.name, l)


@given(case=random_models(max_nodes=4))
def test_random_models_torch_equals_the_exact_law(case):
    """Random DAGs of supported operations (residual sums, cats, pools, norms, gates; zero weights,
    zero rows, ties z = 0, mixed signs; inputs in [-2, 2]) in exact rationals."""
    rules = [Epsilon(0.25), Gamma(0.5), ZPlus(), Flat(), WSquare(), EpsilonPlusFlat(0.25),
             EpsilonGammaBox(-2.0, 2.0, epsilon=0.25, gamma=0.5),
             Composite(first=ZBox(-2.0, 2.0), default=Gamma(0.25))]
    for rule in rules:
        assert torch_error(case.model, case.x, case.target, rule) <= TOL, (rule.name, case.description)


def test_composite_picks_by_name_first_and_kind():
    """names > first > kinds > default, with the reader's module names and kinds."""
    model, x = _case("cnn")
    net = unroll_graph(model, x).net
    assert net.modules[:2] == ("features.0", "features.2") and net.ops[:2] == ("conv", "maxpool")
    assert net.first[0] and not any(net.first[1:])
    flat, gam, eps = Flat(), Gamma(0.5), Epsilon(0.1)
    comp = Composite(names={"features.3": eps}, first=flat, kinds={"conv": gam})
    assert comp.rule_at("conv", "features.0", True) is flat
    assert comp.rule_at("conv", "features.3", False) is eps
    assert comp.rule_at("conv", "features.0", False) is gam
    assert isinstance(comp.rule_at("linear", "classifier.0", False), LRP0)
    # the same composite written out by hand, layer by layer, is the same law
    explicit = Composite(names={"features.0": flat, "features.3": eps, "classifier.0": LRP0(),
                                "classifier.2": LRP0(), "features.5": LRP0()})
    a, b = routing_law(net, target=1, rule=comp), routing_law(net, target=1, rule=explicit)
    assert all(list(u) == list(v) for u, v in zip(a.relevance(), b.relevance()))


def test_composite_errors():
    with pytest.raises(ValueError, match="unknown layer kind 'dense'"):
        Composite(kinds={"dense": Epsilon()})
    with pytest.raises(TypeError, match="per-layer law"):
        Composite(default=bp.rules.Anchor(AlphaBeta(2, 1), 0.1))
    with pytest.raises(TypeError, match="per-layer law"):
        Composite(kinds={"conv": bp.rules.GradientXInput()})
    with pytest.raises(ValueError, match="eps must be"):
        Epsilon(-1.0)
    with pytest.raises(ValueError, match="low <= high"):
        ZBox(1.0, 0.0)
    model, x = _case("mlp")
    with pytest.raises(ValueError, match="first-layer rule"):
        bp.explain(model, x, 0, rule=ZBox(*BOX))
    with pytest.raises(ValueError, match="outside"):
        bp.explain(model, x, 0, rule=Composite(first=ZBox(-0.01, 0.01)))


# ------------------------------------------------------------------------------------------------
# (b) I22: Gamma = RGEq(log(1 + gamma), 1) on units with z > 0; RGEq(-log(1 + gamma), 1) on z < 0
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gamma", [0.25, 1.0, 3.5])
def test_i22_gamma_is_rgeq_log_one_plus_gamma(bias, gamma):
    model = _init(MLP((5, 6, 6, 4)), seed=3)
    if not bias:
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias = None
    g = sp.Rational(to_rational(gamma))
    kappa = sp.log(1 + g)
    seen = {1: 0, -1: 0}
    for seed in range(4):
        x = torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=D)
        net = unroll_graph(model, x).net
        law = routing_law(net, target=0, rule=Gamma(gamma))
        plus = routing_law(net, target=0, rule=RGEq(kappa=kappa, nu=1))
        minus = routing_law(net, target=0, rule=RGEq(kappa=-kappa, nu=1))
        assert plus.field == "sympy" and law.field == "rational"
        for l in range(1, net.depth + 1):
            for i in range(net.widths[l]):
                k = law.kernel(l, i)
                if k.z == 0:
                    assert k.stopped
                    continue
                ref = (plus if k.z > 0 else minus).kernel(l, i)
                seen[1 if k.z > 0 else -1] += 1
                for a, b in ((k.p, ref.p), (k.q, ref.q), (k.m, ref.m)):
                    assert sp.simplify(a - b) == 0, (l, i, a, b)
                assert k.routing == ref.routing and k.stop == 0
                if bias and net.biases[l - 1][i] != 0:
                    assert BIAS in k.routing[1 if net.biases[l - 1][i] > 0 else -1]
    assert seen[1] > 10 and seen[-1] > 10  # both signs of z occur


# ------------------------------------------------------------------------------------------------
# (c) I14 for Epsilon, I17, I15
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_i14_epsilon_stop_is_the_stabilisers_share(name):
    model, x = _case(name)
    net = unroll_graph(model, x).net
    eps = sp.Rational(1, 8)
    law = routing_law(net, target=0, rule=Epsilon(0.125))
    rel, st = law.relevance(), law.stopped()
    assert sum(rel[0]) + st["total"] == law.w0  # exactly (rationals)
    # the cemetery: per layer sum_i R_i eps/(|z_i| + eps) (+ R_i where z_i = 0; + empty copies)
    per = law.stopped_per_layer()
    for l in range(1, net.depth + 1):
        want, sink = sp.Integer(0), sp.Integer(0)
        for i, r in enumerate(rel[l]):
            k = law.kernel(l, i)
            if net.selects(l, i):
                continue
            if k.stopped:
                want += r
            else:
                assert k.stop == eps / (abs(k.z) + eps) and k.m * (k.p - k.q) + k.stop == 1
                want += r * k.stop
                b = net.biases[l - 1]
                if b is not None:
                    sink += r * to_rational(b[i]) / (k.z + eps * sp.sign(k.z))
        assert per[l - 1]["cemetery"] == want and per[l - 1]["bias_sink"] == sink, l
    _, rep = bp.explain(model, x, 0, rule=Epsilon(0.125), return_report=True)
    assert abs(float(rep.relevance_sum + rep.stopped - rep.logit)) <= TOL * max(1.0, abs(float(rep.logit)))


@pytest.mark.parametrize("name", CASES)
def test_epsilon_zero_is_the_gradient_equilibrium_and_zplus_is_alphabeta_1_0(name):
    model, x = _case(name)
    net = unroll_graph(model, x).net
    e0, ge = routing_law(net, target=1, rule=Epsilon(0.0)), routing_law(net, target=1, rule=GradientEquilibrium())
    zp, ab = routing_law(net, target=1, rule=ZPlus()), routing_law(net, target=1, rule=AlphaBeta(1, 0))
    for l in range(1, net.depth + 1):
        for i in range(net.widths[l]):
            a, b = e0.kernel(l, i), ge.kernel(l, i)
            assert (a.p, a.q, a.m, a.stopped, a.routing, a.stop) == (b.p, b.q, b.m, b.stopped, b.routing, 0)
            a, b = zp.kernel(l, i), ab.kernel(l, i)
            assert (a.p, a.q, a.m, a.routing) == (b.p, b.q, b.m, b.routing)
    if not net.has_selections:  # I15's closed form (no winner-takes-all rows)
        assert [list(r) for r in zp.relevance()] == [list(r) for r in alpha_beta_lrp(net, 1, 1, 0)]


# ------------------------------------------------------------------------------------------------
# (d) zennit 0.5.1
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zennit():
    try:
        return import_zennit()
    except ImportError:
        pytest.skip("zennit is not installed")


def _safe_den(d: torch.Tensor) -> torch.Tensor:
    """zennit callable stabiliser: exact division with 0/0 := 0."""
    return torch.where(d == 0, torch.ones_like(d), d)


def _zennit(model, x, target, composite):
    from zennit.attribution import Gradient

    xb = x[None]
    with torch.no_grad():
        n_out = model(xb).shape[1]
    onehot = F.one_hot(torch.tensor([target]), n_out).to(D)
    with Gradient(model=model, composite=composite) as attributor:
        _, rel = attributor(xb.clone(), lambda out: out * onehot)
    return rel.detach()[0]


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def _zennit_rule(zennit, rule):
    zr = zennit.rules
    if isinstance(rule, Epsilon):
        return zr.Epsilon(epsilon=rule.eps)
    if isinstance(rule, Gamma):
        return zr.Gamma(gamma=rule.gamma, stabilizer=_safe_den)
    if isinstance(rule, ZPlus):
        return zr.ZPlus(stabilizer=_safe_den)
    if isinstance(rule, WSquare):
        return zr.WSquare(stabilizer=_safe_den)
    if isinstance(rule, Flat):
        return zr.Flat(stabilizer=_safe_den)
    raise AssertionError(rule)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("rule", [Epsilon(0.1), Epsilon(1e-6), Gamma(0.25), Gamma(2.0), ZPlus(), WSquare(), Flat()],
                         ids=lambda r: r.name)
def test_rules_agree_with_zennit(zennit, name, rule):
    """One rule on every dense / conv layer (zennit: ``Pass`` on activations, plain gradient on max
    pools, ``Norm`` = LRP-0 on average pools; backplay: the same rule on the pool). Flat on models
    without an exact zero weight (see the next test)."""
    from zennit.composites import LayerMapComposite
    from zennit.rules import Norm, Pass
    from zennit.types import Activation, AvgPool, Convolution, Linear

    model, x = _case(name, seed=1)
    if name == "mlp":  # zennit hooks nn.ReLU modules only (see the module docstring)
        model = _init(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)), seed=1,
                      zero=not isinstance(rule, Flat))
    elif isinstance(rule, Flat):
        model = _init(SmallCNN(), seed=1, zero=False)
    ours = Composite(kinds={("linear", "conv"): rule}, default=LRP0())
    comp = LayerMapComposite(layer_map=[(Activation, Pass()), (AvgPool, Norm(stabilizer=_safe_den)),
                                        ((Convolution, Linear), _zennit_rule(zennit, rule))])
    for target in range(3):  # the output layer has units with z > 0 and z < 0
        r_z = _zennit(model, x, target, comp)
        r_b = bp.explain(model, x, target, rule=ours)
        assert _agree(r_b, r_z) <= TOL, (rule.name, target)
        if isinstance(rule, (Gamma, ZPlus)) or name == "mlp":  # the rule alone (= LRP-0 on the ReLU-fed pool)
            assert _agree(bp.explain(model, x, target, rule=rule), r_z) <= TOL


def test_flat_differs_from_zennit_at_a_zero_weight_only(zennit):
    """zennit's Flat sets every weight to 1 (an exact zero included); backplay's law routes along
    the edges 1{W != 0}: on a first layer with one zero weight each equals its own formula."""
    from zennit.composites import EpsilonPlusFlat as ZEpsilonPlusFlat

    model = _init(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)), seed=2,
                  zero=False)
    with torch.no_grad():
        model[0].weight[2, 1] = 0.0
    for seed in range(20):  # an input whose relevance reaches unit 2 of the first layer
        x = torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=D)
        r_b, rep = bp.explain(model, x, 0, rule=EpsilonPlusFlat(0.1), return_report=True)
        upper = rep.layers[1]  # the relevance at the first layer's output: the same in both libraries
        if abs(float(upper[2])) > 1e-2:
            break
    r_z = _zennit(model, x, 0, ZEpsilonPlusFlat(epsilon=0.1, stabilizer=_safe_den))
    W = model[0].weight.detach()
    nz = (W != 0).to(D)
    assert _agree(r_b, (upper / nz.sum(1)) @ nz) <= TOL
    assert _agree(r_z, (upper / W.shape[1]) @ torch.ones_like(W)) <= TOL
    assert float((r_b - r_z).abs().max()) > 1e-3


def _zennit_cnn(seed: int, bn: bool):
    layers = [nn.Conv2d(3, 4, 3, padding=1)] + ([nn.BatchNorm2d(4, eps=0.0)] if bn else []) + [
        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3, padding=1)] + ([nn.BatchNorm2d(5, eps=0.0)] if bn else []) + [
        nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(20, 6), nn.ReLU(), nn.Linear(6, 3)]
    return _init(nn.Sequential(*layers), seed, zero=False)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("preset", ["EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat",
                                    "EpsilonGammaBox"])
def test_presets_agree_with_zennit(zennit, preset, bn):
    """zennit's composites with its stabiliser made exact (callable) and the same epsilon; a
    BatchNorm after a convolution merged by zennit's SequentialMergeBatchNorm canonizer (backplay
    merges it when reading). The canonizer leaves the BatchNorm dividing by sqrt(1 + eps) (running
    var reset to 1, eps kept): with torch's default eps = 1e-5 zennit's canonised model is off by
    (1 + eps)^(-1/2) per BatchNorm (~1e-7 relative here), so the BatchNorms here have eps = 0."""
    import zennit.composites as zc
    from zennit.canonizers import SequentialMergeBatchNorm

    model = _zennit_cnn(seed=4, bn=bn)
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(9), dtype=D) * 2 - 1
    kw = dict(epsilon=0.1, stabilizer=_safe_den, canonizers=[SequentialMergeBatchNorm()] if bn else None)
    if preset == "EpsilonGammaBox":
        comp = zc.EpsilonGammaBox(low=-1.0, high=1.0, gamma=0.5, **kw)
        ours = EpsilonGammaBox(-1.0, 1.0, epsilon=0.1, gamma=0.5)
    else:
        comp = getattr(zc, preset)(**kw)
        ours = getattr(bp.rules, preset)(0.1)
    for target in range(3):
        r_z = _zennit(model, x, target, comp)
        r_b, rep = bp.explain(model, x, target, rule=ours, return_report=True)
        assert _agree(r_b, r_z) <= TOL, (preset, target)
        assert abs(float(rep.relevance_sum + rep.stopped - rep.logit)) <= TOL * max(1.0, abs(float(rep.logit)))


def test_box_bounds_per_channel_agree_with_zennit_and_the_law(zennit):
    """ZBox with per-channel bounds of shape (1, C, 1, 1), as zennit takes them."""
    import zennit.composites as zc

    model = _zennit_cnn(seed=6, bn=False)
    low = torch.tensor([-1.0, -0.5, -2.0], dtype=D).view(1, 3, 1, 1)
    high = torch.tensor([1.0, 1.5, 0.5], dtype=D).view(1, 3, 1, 1)
    u = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=D)
    x = low[0] + u * (high[0] - low[0])
    comp = zc.EpsilonGammaBox(low=low, high=high, epsilon=0.1, gamma=0.25, stabilizer=_safe_den)
    ours = EpsilonGammaBox(low, high, epsilon=0.1, gamma=0.25)
    assert _agree(bp.explain(model, x, 1, rule=ours), _zennit(model, x, 1, comp)) <= TOL
    small, _ = _case("cnn")  # the same bounds form on the exact law
    lo, hi = low[:, :2], high[:, :2]
    xs = lo[0] + torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=D) * (hi[0] - lo[0])
    assert torch_error(small, xs, 1, EpsilonGammaBox(lo, hi, epsilon=0.1, gamma=0.25)) <= TOL


# ------------------------------------------------------------------------------------------------
# (e) any model the reader takes: conservation
# ------------------------------------------------------------------------------------------------
def _conserves(model, x, rule, targets):
    R, rep = bp.explain(model, x, targets, rule=rule, return_report=True)
    gap = (rep.relevance_sum + rep.stopped - rep.logit).abs()
    return float((gap / rep.logit.abs().clamp_min(1.0)).max())


@pytest.mark.parametrize("rule", [EpsilonPlusFlat(), EpsilonPlus(0.1), EpsilonGammaBox(-3.0, 3.0), Gamma(0.25),
                                  Flat(), WSquare(), Epsilon(0.25)], ids=lambda r: r.name)
def test_resnet_style_model_conserves_and_is_exact(rule):
    model = _init(ResNetish(), seed=0, zero=False)
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(4, 3, 6, 6, generator=g, dtype=D) * 4 - 2)
    assert _conserves(model, x, rule, torch.arange(4) % 3) <= TOL
    tiny = _init(ResNetish(c=2, w=2), seed=1, zero=False)
    assert torch_error(tiny, torch.rand(2, 3, 3, generator=g, dtype=D) * 2 - 1, 0, rule, field="mpmath") <= TOL


def test_vit_conserves_and_is_exact():
    """torchvision-style ViT (patch conv, cls token, LayerNorm, attention, GELU MLP, residual adds):
    conservation under the presets; torch = the exact law (mpmath, 50 digits) on a tiny one."""
    from _transformers import tv_vit

    model = tv_vit(seed=0, image=8, patch=4, dim=8, heads=2, layers=1, mlp=16).to(D).eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=D)
    for rule in (EpsilonPlusFlat(), EpsilonGammaBox(0.0, 1.0, epsilon=0.1)):
        assert _conserves(model, x, rule, torch.tensor([0, 2])) <= TOL, rule.name
    tiny = tv_vit(seed=0, image=4, patch=2, dim=4, heads=1, layers=1, mlp=4, classes=2).to(D).eval()
    xt = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=D)
    for rule in (Epsilon(0.1), Gamma(0.25), Flat(), WSquare(), EpsilonPlusFlat(0.1)):
        assert torch_error(tiny, xt, 0, rule, field="mpmath") <= TOL, rule.name
