"""Rules from other libraries validated (docs/theory.md sections 13 and 12, I23): zennit composites and
captum LRP read as black boxes (``backplay.validate.external``) are classified by validate_rule
exactly as backplay's rules of the same definition.

Conventions made to meet: zennit's stabiliser is the callable ``_exact`` (a zero denominator -> 1,
i.e. 0/0 := 0, backplay's ``safe_divide``) where the claim is exact agreement; zennit's Epsilon
keeps its float eps (the stop it defines). captum's rules keep their own stabiliser
(``STABILITY_FACTOR`` = 1e-9) in the derivation of what captum computes, and 1e-300 (exact in
float64 where no denominator is 0) in the one test that claims agreement with backplay's ZPlus.
Nets: a user-written MLP with biases of both signs (``F.relu`` in ``forward``; one shared
``nn.ReLU`` module for captum, which needs module activations) and small CNNs (Conv2d, ReLU,
MaxPool2d, Flatten, Linear), float64, inputs of both signs.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import backplay as bp
from backplay.validate import validate_rule
from backplay.validate import as_layer_map, black_box, captum_rule, zennit_rule

try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    from _torchvision_stub import import_zennit, torchvision_stub
except ImportError:  # --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _torchvision_stub import import_zennit, torchvision_stub

D = torch.float64
TOL = 1e-9


@pytest.fixture(scope="module")
def zennit():
    with torchvision_stub():  # zennit imports torchvision's ResNet blocks at import time
        pytest.importorskip("zennit")
    return import_zennit()


@pytest.fixture(scope="module")
def captum():
    pytest.importorskip("captum.attr")
    import captum.attr  # noqa: F401 - the LRP class and its rules

    from captum.attr._utils import lrp_rules
    return captum.attr, lrp_rules


def _exact(d: torch.Tensor) -> torch.Tensor:
    """zennit callable stabiliser: exact division, 0/0 := 0."""
    return torch.where(d == 0, torch.ones_like(d), d)


class MLP(nn.Module):
    """5-6-6-3 with biases of both signs; ``shared_relu``: one nn.ReLU module used twice."""

    def __init__(self, seed: int = 0, shared_relu: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1, self.fc2, self.out = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.act = nn.ReLU() if shared_relu else None
        with torch.no_grad():
            for lin in (self.fc1, self.fc2, self.out):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
                lin.bias.copy_(0.5 * torch.randn(lin.bias.shape, generator=g))
            self.fc2.weight[1, 2] = 0.0  # a zero weight
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = self.act if self.act is not None else F.relu
        return self.out(relu(self.fc2(relu(self.fc1(x)))))


def cnn(seed: int = 0, pool: bool = True) -> nn.Sequential:
    """1x6x6 -> conv(2) -> ReLU -> [maxpool 2] -> conv(3) -> ReLU -> Flatten -> Linear(., 3)."""
    g = torch.Generator().manual_seed(seed)
    side = 3 if pool else 6
    mods = [nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()] + ([nn.MaxPool2d(2)] if pool else []) + \
        [nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * side * side, 3)]
    model = nn.Sequential(*mods).to(D).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=D) / math.sqrt(m.weight[0].numel()))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g, dtype=D))
    return model


def mlp_input(seed: int = 3) -> torch.Tensor:
    return torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=D)


def cnn_input(seed: int = 4) -> torch.Tensor:
    return torch.randn(1, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=D)


def zennit_alphabeta(alpha: float, beta: float):
    from zennit.composites import LayerMapComposite
    from zennit.rules import AlphaBeta, Pass
    from zennit.types import Activation, Convolution, Linear

    return LayerMapComposite(layer_map=[(Activation, Pass()),
                                        (Convolution, AlphaBeta(alpha, beta, stabilizer=_exact)),
                                        (Linear, AlphaBeta(alpha, beta, stabilizer=_exact))])


def zennit_epsilon(eps):
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon, Pass
    from zennit.types import Activation, Convolution, Linear

    return LayerMapComposite(layer_map=[(Activation, Pass()), (Convolution, Epsilon(epsilon=eps)),
                                        (Linear, Epsilon(epsilon=eps))])


def nets():
    return [("mlp", MLP(), mlp_input()), ("cnn", cnn(), cnn_input())]


def _verdicts(report) -> list:
    """(name, holds) of every finding but conservation: a black box that reports its defect as the
    stopped mass makes conservation true by construction, so validate_rule reports it n/a."""
    return [(f.name, f.holds) for f in report.findings if not f.name.startswith("conservation")]


def _holds_but_conservation(report) -> bool:
    cons = [f for f in report.findings if f.name.startswith("conservation")]
    return all(f.holds is None for f in cons) and all(h for _, h in _verdicts(report))


def assert_same_report(a, b, tol: float = TOL) -> None:
    """Same findings (verdicts), same law (hand-over, multiplier and flows per neuron, to tol), same
    nearest named rule (name, and Hellinger to tol)."""
    assert _verdicts(a) == _verdicts(b)
    assert a.is_law == b.is_law and a.violated == b.violated
    assert (a.law is None) == (b.law is None)
    if a.law is not None:
        for l in range(1, len(a.law.sigma) + 1):
            assert (a.law.sigma[l - 1] is None) == (b.law.sigma[l - 1] is None)
            if a.law.sigma[l - 1] is None:
                continue
            for u, v in zip(a.law.handover(l) + tuple(a.law.routing(l)), b.law.handover(l) + tuple(b.law.routing(l))):
                np.testing.assert_array_equal(np.isnan(u), np.isnan(v))
                scale = max(1.0, float(np.nanmax(np.abs(v))) if np.isfinite(v).any() else 1.0)
                assert np.nanmax(np.abs(u - v), initial=0.0) <= tol * scale
            for u, v in ((a.law.flow_plus, b.law.flow_plus), (a.law.flow_minus, b.law.flow_minus)):
                assert np.abs(u[l - 1] - v[l - 1]).max() <= tol * max(1.0, np.abs(v[l - 1]).max())
    if a.nearest is not None or b.nearest is not None:
        assert a.nearest["rule"] == b.nearest["rule"]
        assert abs(a.nearest["hellinger"] - b.nearest["hellinger"]) <= tol


# -- zennit ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_zennit_alphabeta_is_backplay_alphabeta(zennit, kind):
    """zennit AlphaBeta(2, 1) (exact stabiliser) is a Markov law whose nearest named rule is backplay's
    AlphaBeta(2, 1) at Hellinger < 1e-9, and its report is backplay's own AlphaBeta(2, 1) report (I23)."""
    _, model, x = next(n for n in nets() if n[0] == kind)
    before = copy.deepcopy(model.state_dict())
    theirs = validate_rule(zennit_rule(zennit_alphabeta(2.0, 1.0)), model, x, 0)
    ours = validate_rule(bp.rules.AlphaBeta(2, 1), model, x, 0)
    assert theirs.is_law and theirs.violated == []
    assert _holds_but_conservation(theirs), str(theirs)
    assert theirs.nearest["rule"].startswith("AlphaBeta(alpha=2.0, beta=1.0")
    assert theirs.nearest["hellinger"] < 1e-9
    assert_same_report(theirs, ours)
    # the user's model is untouched: same parameters, no hooks left
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_zennit_epsilon_is_backplay_epsilon(zennit, kind):
    """zennit Epsilon(0.25): the gradient equilibrium with the stabiliser's stop eps/(|z| + eps);
    validate_rule finds a law and the same report as backplay's Epsilon(0.25) (I23); with the exact
    stabiliser (LRP-0 with biases) the nearest named rule is the gradient equilibrium at Hellinger
    < 1e-9 (I17, bias share in the bias sink)."""
    _, model, x = next(n for n in nets() if n[0] == kind)
    theirs = validate_rule(zennit_rule(zennit_epsilon(0.25)), model, x, 0)
    ours = validate_rule(bp.rules.Epsilon(0.25), model, x, 0)
    assert theirs.is_law and _holds_but_conservation(theirs), str(theirs)
    assert_same_report(theirs, ours)
    # the stop: per probed unit i, the stopped share is (b_i + eps sign z_i) / (z_i + eps sign z_i)
    lrp0 = validate_rule(zennit_rule(zennit_epsilon(_exact)), model, x, 0)
    assert lrp0.is_law
    assert lrp0.nearest["rule"] == "GradientEquilibrium" and lrp0.nearest["hellinger"] < 1e-9
    assert theirs.nearest["hellinger"] > 1e-3  # eps = 0.25 is not the gradient equilibrium


def test_zennit_epsilon_stop_is_the_stabiliser_share(zennit):
    """The layer map of zennit's Epsilon probed on unit vectors: column i sums to (z_i - b_i) /
    (z_i + eps sign z_i), so the reported stop is the bias share plus eps/(|z_i| + eps) of the rest
    (docs/theory.md section 12), computed here from the weights, not from zennit."""
    model, x, eps = MLP(), mlp_input(), 0.25
    box = zennit_rule(zennit_epsilon(eps))
    y = x[None]
    for l, lin in enumerate((model.fc1, model.fc2, model.out), start=1):
        z = lin(y).detach()[0]
        lower, stopped = box(model, x[None], 0, l, torch.eye(z.numel(), dtype=D))
        den = z + eps * torch.where(z >= 0, 1.0, -1.0).to(D)
        expect_map = (lin.weight * y.detach()).T / den  # M_ki = y_k W_ik / (z_i + eps sign z_i)
        assert (lower.T - expect_map).abs().max() <= TOL * expect_map.abs().max()
        assert (stopped - (lin.bias.detach() + den - z) / den).abs().max() <= TOL
        y = F.relu(lin(y)) if lin is not model.out else None


# -- captum --------------------------------------------------------------------------------------------
def _captum_expected(model: MLP, x: torch.Tensor, eps: float, target: int):
    """What captum's Alpha1_Beta0_Rule computes, derived from its definition (captum 0.9 lrp_rules:
    weights w -> w+, bias kept, output hook R / (z' + eps sign z'), sign(0) := 1, input hook x *
    grad), from the weights and a plain forward pass: per layer the map M (n_{l-1} x n_l),
    M_ki = y_k w+_ik / den_i, den_i = sum_k y_k w+_ik + b_i + eps sign(.), the layer's input y, and the
    sweep's relevances R^L..R^0 from R^L = f_target e_target. Returns (maps, den per layer, ys, R)."""
    ys, y = [], x[None]
    lins = (model.fc1, model.fc2, model.out)
    for lin in lins:
        ys.append(y[0].detach())
        z = lin(y)
        y = F.relu(z) if lin is not model.out else z
    maps, dens = [], []
    for lin, yin in zip(lins, ys):
        Wp = lin.weight.detach().clamp(min=0)
        d = Wp @ yin + lin.bias.detach()
        den = d + eps * torch.where(d >= 0, 1.0, -1.0).to(D)
        maps.append(((Wp * yin[None, :]) / den[:, None]).T)  # (n_{l-1}, n_l)
        dens.append(den)
    R = torch.zeros(3, dtype=D)
    R[target] = y[0, target].detach()
    rel = [R]
    for M in reversed(maps):
        rel.insert(0, M @ rel[0])
    return maps, dens, ys, rel


def test_captum_alpha1beta0_with_signed_bias(captum):
    """captum's Alpha1_Beta0_Rule with signed biases and inputs of both signs, classified from the
    derivation (``_captum_expected``). Each layer map is linear in R with one column per unit: the
    flows x_k w+_ik / den_i sit on edges with w_ik > 0, of the sign of x_k (a + branch edge where
    x_k > 0, a - branch edge where x_k < 0, the first layer's only), times sign(den_i). So every
    functional property holds and the maps are a Markov law of the family with sigma_i = sign(den_i):
    + branch flows |x_k w+_ik / den_i| (x_k > 0), - branch flows the same where x_k < 0. The column
    sum c_i = sum_k x_k w+_ik / den_i is not 1: a bias b_i < 0 with den_i > 0 makes c_i > 1 (mass
    created), den_i < 0 reverses the unit (multiplier < 0). So conservation fails (stopped mass not
    reported) by the per-layer defect sum R^l - sum R^(l-1) = sum_i R_i (1 - c_i), worst at the layer
    where it is largest; with the defect reported as stopped mass the law is found with hand-over
    a = A + sigma s (s = 1 - c_i, on the + side when sigma s > 0), c = C (- side otherwise), and it is
    not ZPlus = AlphaBeta(1, 0) (multiplier 1): its nearest named rule is at Hellinger > 1e-3."""
    attr, rules = captum
    model, x, target = MLP(shared_relu=True), mlp_input(), 0
    for lin in (model.fc1, model.fc2, model.out):
        lin.rule = rules.Alpha1_Beta0_Rule()
    eps = rules.Alpha1_Beta0_Rule().STABILITY_FACTOR
    lrp = attr.LRP(model)
    maps, dens, ys, rel = _captum_expected(model, x, eps, target)

    box = as_layer_map(lrp, model)
    for l, M in enumerate(maps, start=1):  # the adapter reads captum's map exactly
        n = M.shape[1]
        U = torch.randn(n + 3, n, generator=torch.Generator().manual_seed(l), dtype=D)
        lower, stopped = box(model, x[None], target, l, U)
        assert (lower - U @ M.T).abs().max() <= TOL * max(1.0, float((U @ M.T).abs().max()))
        assert (stopped - (U.sum(1) - lower.sum(1))).abs().max() == 0

    # stopped mass not reported: conservation fails by the derived defect, where it is largest
    raw = validate_rule(captum_rule(lrp, stopped=False), model, x, target)
    defects = [float(rel[l].sum() - rel[l - 1].sum()) for l in range(1, 4)]
    worst = int(np.argmax(np.abs(defects))) + 1
    cons = raw.finding("conservation (I14)")
    assert cons.holds is False and cons.where["layer"] == worst
    assert abs(cons.worst - abs(defects[worst - 1])) <= TOL * max(1.0, abs(defects[worst - 1]))
    for name in ("linearity in R", "homogeneity", "cancellation of + and - mass", "sign consistency", "locality"):
        assert raw.finding(name).holds, name

    # defect reported as stopped mass: the law of the derivation
    rep = validate_rule(captum_rule(lrp), model, x, target)
    assert rep.is_law and rep.violated == [], str(rep)
    created = reversed_units = 0
    for l, (M, den, yin, lin) in enumerate(zip(maps, dens, ys, (model.fc1, model.fc2, model.out)), start=1):
        Mn, xs, W = M.numpy(), yin.numpy(), lin.weight.detach().numpy()
        live = np.abs(Mn).sum(0) > 0  # units that pass some mass down (the others: nothing to identify)
        sigma = np.sign(den.numpy())
        Fp = np.where((xs[None, :] > 0) & (W > 0), np.abs(Mn.T), 0.0)
        Fm = np.where((xs[None, :] < 0) & (W > 0), np.abs(Mn.T), 0.0)
        assert np.array_equal(rep.law.sigma[l - 1][live], sigma[live])
        assert np.abs(rep.law.flow_plus[l - 1][live] - Fp[live]).max() <= TOL * np.abs(Fp).max()
        assert np.abs(rep.law.flow_minus[l - 1][live] - Fm[live]).max(initial=0.0) <= TOL * np.abs(Fp).max()
        c = Mn.sum(0)
        s = sigma * (1 - c)
        a = Fp.sum(1) + np.where(s > 0, s, 0.0)
        cm = Fm.sum(1) + np.where(s < 0, -s, 0.0)
        p, _, m = rep.law.handover(l)
        assert np.abs(p[live] - (a / (a + cm))[live]).max() <= TOL
        assert np.abs(m[live] - (sigma * (a + cm))[live]).max() <= TOL * np.abs(a + cm).max()
        b = lin.bias.detach().numpy()
        reached = rel[l].numpy() != 0
        created += int(np.sum(reached & live & (b < 0) & (sigma * c > 1)))
        reversed_units += int(np.sum(reached & live & (sigma < 0)))
    assert created + reversed_units > 0  # the signed bias is visible on this pass
    assert rep.nearest["hellinger"] > 1e-3
    assert not rep.nearest["rule"].startswith("AlphaBeta(alpha=1.0, beta=0.0")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_captum_alpha1beta0_meets_zplus_without_negative_parts(captum, kind):
    """With x >= 0, biases >= 0 and captum's stabiliser 1e-300 (exact in float64), w+ x = S+ and the
    bias is in the + branch: captum's Alpha1_Beta0_Rule is backplay's ZPlus = AlphaBeta(1, 0), and the
    two reports agree (I23)."""
    attr, rules = captum
    if kind == "mlp":
        model, x = MLP(shared_relu=True), mlp_input().abs()
        lins = [model.fc1, model.fc2, model.out]
    else:  # captum has no rule for nn.Flatten: give it captum's own reshape rule
        model, x = cnn(pool=False), cnn_input().abs()
        lins = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
        model[4].rule = rules.EpsilonRule(epsilon=1e-300)
    with torch.no_grad():
        for lin in lins:
            lin.bias.abs_()
    for lin in lins:
        lin.rule = rules.Alpha1_Beta0_Rule()
        lin.rule.STABILITY_FACTOR = 1e-300
    theirs = validate_rule(captum_rule(attr.LRP(model)), model, x, 0)
    ours = validate_rule(bp.rules.AlphaBeta(1, 0), model, x, 0)
    assert theirs.is_law and theirs.nearest["hellinger"] < 1e-9
    assert_same_report(theirs, ours)


# -- the generic black box, integration, errors ----------------------------------------------------------
def test_black_box_of_a_hand_written_hook_rule():
    """A user's own modified-gradient LRP-0 (hooks that divide by z at each Linear output and multiply
    by the input): the generic black box reads it, and validate_rule finds backplay's LRP0 report."""
    @contextlib.contextmanager
    def lrp0_hooks(model, x):
        handles = []

        def fwd(module, args, out):
            inp = args[0]
            inp.register_hook(lambda g, v=inp.detach(): g * v)
            out.register_hook(lambda g, z=out.detach(): torch.where(z == 0, torch.zeros_like(g), g / z))
        try:
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    handles.append(m.register_forward_hook(fwd))
            yield None
        finally:
            for h in handles:
                h.remove()

    model, x = MLP(), mlp_input()
    theirs = validate_rule(black_box(lrp0_hooks, name="my LRP-0"), model, x, 1)
    ours = validate_rule(bp.rules.LRP0(), model, x, 1)
    assert theirs.rule == "my LRP-0"
    assert theirs.is_law and theirs.nearest["rule"] == "GradientEquilibrium" and theirs.nearest["hellinger"] < 1e-9
    assert_same_report(theirs, ours)


def test_model_untouched_when_the_implementation_raises():
    @contextlib.contextmanager
    def breaks(model, x):
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.data.mul_(0)  # vandalises the copy it is given
        raise RuntimeError("broken implementation")
        yield  # pragma: no cover

    model, x = MLP(), mlp_input()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="broken implementation"):
        validate_rule(black_box(breaks), model, x, 0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_layer_not_computed_by_a_module_is_named():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 5, dtype=D))
            self.out = nn.Linear(4, 2).double()

        def forward(self, x):
            return self.out(F.relu(x @ self.w.T))

    model = Functional()
    box = black_box(lambda m, x: contextlib.nullcontext())
    with pytest.raises(ValueError, match="layer 1 .*not computed by the model's modules"):
        box(model, mlp_input()[None], 0, 1, torch.eye(4, dtype=D))


def test_as_layer_map_recognises_peer_objects(zennit, captum):
    attr, _ = captum
    model = MLP(shared_relu=True)
    assert as_layer_map(bp.rules.AlphaBeta(2, 1), model) is None
    assert as_layer_map(lambda m, x, t, l, u: u, model) is None
    assert as_layer_map(zennit_alphabeta(2.0, 1.0), model).__name__ == "zennit LayerMapComposite"
    assert as_layer_map(attr.LRP(model), model).__name__ == "captum LRP"
    with pytest.raises(ValueError, match="wraps another model"):
        as_layer_map(attr.LRP(MLP(shared_relu=True)), model)
    with pytest.raises(TypeError, match="zennit Composite"):
        zennit_rule(object())


def test_validate_rule_takes_peer_objects_directly(zennit, captum):
    """validate_rule(composite) and validate_rule(LRP(model)) as the rule argument (through
    ``as_layer_map`` in validate_rule's probe): the same reports as the wrapped black boxes."""
    attr, rules = captum
    model, x = MLP(), mlp_input()
    comp = zennit_alphabeta(2.0, 1.0)
    assert_same_report(validate_rule(comp, model, x, 0), validate_rule(zennit_rule(comp), model, x, 0))
    cmodel = MLP(shared_relu=True)
    for lin in (cmodel.fc1, cmodel.fc2, cmodel.out):
        lin.rule = rules.Alpha1_Beta0_Rule()
    lrp = attr.LRP(cmodel)
    assert_same_report(validate_rule(lrp, cmodel, x, 0), validate_rule(captum_rule(lrp), cmodel, x, 0))
