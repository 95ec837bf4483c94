"""Peer-library oracles: backplay's rules against zennit 0.5.1 and captum 0.9, in float64.

Skipped cleanly (``pytest.importorskip``) where zennit or captum is absent. zennit imports
torchvision's ResNet block classes at import time; where torchvision is not importable the zennit
fixture imports it under a scoped two-class stand-in (``tests/_torchvision_stub.py``) and restores
``sys.modules`` afterwards, so no other test sees a ``torchvision`` module.

Nets: random MLPs (Linear/ReLU, with biases and bias-free) and small CNNs
(Conv2d(padding=1)/ReLU/MaxPool2d/AvgPool2d/AdaptiveAvgPool2d/Flatten/Linear, with biases and
bias-free), float64, inputs of both signs.

Conventions compared (and where they differ)
---------------------------------------------
Start measure. backplay starts every LRP-type rule at R^L = f_k(x) on the target. zennit starts at
whatever ``attr_output`` is handed to its attributor; we hand it ``onehot * output`` (the same
start). captum's LRP computes with a unit start and multiplies the result by f_k(x) afterwards
(``relevance * output``), i.e. the same start.

Stabilisers. backplay divides exactly with 0/0 := 0 (``safe_divide``). zennit's default float
stabiliser adds ``eps * sign(z)`` (sign(0) := +1) to every denominator, eps = 1e-6; its rules
also accept a *callable* stabiliser, and ``_safe_den`` (z = 0 replaced by 1, so 0/0 := 0; every
numerator of a zero denominator is zero here) makes zennit's rules exact. captum's rules add
``eps * sign(z)`` (default eps = 1e-9) and take no callable; ``EpsilonRule(1e-300)`` is exact in
float64 (``z + 1e-300 == z`` for every |z| > ~1e-284) and still avoids 0/0 where an output is
exactly 0 (a MaxPool window of zeros). With the stabilisers made exact, agreement is asserted to
1e-9, normwise (max |a - b| <= 1e-9 max |b|; observed ~1e-15). With the *default* epsilons
(zennit 1e-6, captum 1e-9) the difference is not a tolerance question but a different rule
(LRP-eps), and the tests assert (on MLPs) the elementwise bound that follows from it
(``_eps_bound``, ``_alphabeta_eps_bound``): each denominator D (z_i, or S+_i / S-_i for
alpha-beta) is replaced by D + eps sign(D), i.e. each kernel entry is multiplied by
c = |D| / (|D| + eps) in [1 - eps/|D|, 1]; a path's relevance is the exact one times prod c, and
1 - prod c <= sum (1 - c), so |R_eps - R_0|_j <= E_j, E the path sum of |exact path contribution|
times sum_path eps/|D| (one extra backward recursion), plus 1e-12 of the absolute path mass for
round-off. The bound is attained to within a factor ~1-2 on these nets (diff/bound up to 0.99),
so it is not loose; observed normwise gaps: captum default ~1e-7, zennit AlphaBeta default ~1e-4
(an S- made of a few small contributions makes eps/|S-| large).

Biases in alpha-beta. backplay (docs/theory.md section 8) counts a bias b_i as a constant unit in the
branch of its sign: S+_i includes max(b_i, 0), S-_i includes min(b_i, 0), and the share routed to
the bias unit ends in the bias sink (report ``stopped``). zennit's AlphaBeta does the same: its
positive denominator is the output of (W+, b+) on x+ plus (W-, no bias) on x-, its negative one
(W-, b-) on x+ plus (W+, no bias) on x- (``ClampMod`` clamps the bias with the weight, the second
term zeroes it), and its reducer hands down only the x-shares (alpha x+ * dz+/dx+ ...), so the
bias share is absorbed. So zennit and backplay meet exactly *with* biases, not only on bias-free
nets (checked against an independent reference of the formula while writing these tests; both
cases are asserted here). zennit's ``AlphaBeta`` also requires alpha - beta = 1 (backplay's
``conservative=True``).

Biases in LRP-0 / Epsilon. zennit's Epsilon and captum's EpsilonRule divide by the full
pre-activation z (bias included) and hand down only the x_j W_ij share, the bias share is absorbed:
backplay's LRP0 convention (and GradientXInput on a ReLU net, docs/theory.md I8).

ReLU / Flatten. zennit (``Pass`` on activations) and captum (``backward_hook_activation``) pass
the relevance through a ReLU unchanged; backplay folds the ReLU into the layer below (an inactive
neuron has y = 0, so no relevance reaches it): the same numbers. Flatten is a reshape everywhere.

MaxPool. zennit has no rule for MaxPool (plain gradient: all relevance to the argmax); captum
applies an Epsilon rule, which sends R_i * y_j / y_i to the argmax j, i.e. R_i again. backplay:
argmax routing (winner takes all). Ties: torch's max_pool backward picks one index; inputs are
random floats, ties occur only among zeros, which carry no relevance.

Avg pools (the one real difference). zennit applies ``Norm`` (LRP-0 proportional redistribution)
to AvgPool/AdaptiveAvgPool in every built-in composite, also under AlphaBeta; captum an Epsilon
rule (LRP-0). backplay reads an avg pool as a linear layer with weights 1/k and applies the rule to
it like to any other layer. For the alpha-beta comparison the zennit composite puts
``_avgpool_alphabeta`` (zennit's own BasicHook machinery: x+ and x- terms weighted alpha and beta)
on the avg pools, and the two agree exactly. On the nets here the pool inputs are ReLU outputs
(>= 0): backplay's - branch is empty, its q-share is stopped, and the pool multiplies relevance by
alpha where zennit's Norm multiplies it by 1, so backplay = alpha x zennit-with-Norm exactly
(asserted in ``test_alphabeta_avgpool_convention_vs_zennit_norm``); AlphaBeta(1, 0) agrees with
both. For LRP-0 the conventions coincide.

Flatten in captum. captum's LRP has no rule for nn.Flatten and refuses the model; the tests give it
an ``EpsilonRule`` (x * R / x: a reshape, R = 0 where x = 0).

Gradient / GradientXInput. zennit's ``Gradient`` attributor without composite and captum's
``Saliency(abs=False)`` / ``InputXGradient`` are plain autograd; backplay computes them by its own
backward sweep (same numbers to round-off).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import backplay as bp
try:  # tests/ is on sys.path under pytest's default (prepend) import mode
    from _torchvision_stub import torchvision_stub
except ImportError:  # --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _torchvision_stub import torchvision_stub

DT = torch.float64
TOL = 1e-9  # normwise relative agreement where the conventions meet exactly


# ------------------------------------------------------------------------------------------------
# fixtures and nets
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zennit():
    with torchvision_stub():
        z = pytest.importorskip("zennit")  # zennit/__init__ imports every submodule
    return z


@pytest.fixture(scope="module")
def captum_attr():
    return pytest.importorskip("captum.attr")


def mlp(seed: int, bias: bool = True, sizes=(7, 9, 8, 6, 4)) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b, bias=bias).to(DT)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=DT) / math.sqrt(a))
            if bias:
                lin.bias.copy_(0.3 * torch.randn(b, generator=g, dtype=DT))
        mods.append(lin)
        if i < len(sizes) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).eval()


def cnn(seed: int, bias: bool = True, adaptive: bool = False) -> nn.Sequential:
    """3x8x8 -> conv4 -> relu -> maxpool -> conv6 -> relu -> avgpool -> flatten -> 24 -> 10 -> 3."""
    g = torch.Generator().manual_seed(seed)
    pool2 = nn.AdaptiveAvgPool2d(2) if adaptive else nn.AvgPool2d(2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1, bias=bias), nn.ReLU(), pool2, nn.Flatten(),
        nn.Linear(24, 10, bias=bias), nn.ReLU(), nn.Linear(10, 3, bias=bias),
    ).to(DT)
    with torch.no_grad():
        for m in model:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=DT) / math.sqrt(fan_in))
                if bias:
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g, dtype=DT))
    return model.eval()


def inputs(model: nn.Sequential, seed: int, batch: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    first = model[0]
    shape = (batch, first.in_features) if isinstance(first, nn.Linear) else (batch, 3, 8, 8)
    return torch.randn(shape, generator=g, dtype=DT)


def targets(model: nn.Sequential, x: torch.Tensor, seed: int) -> torch.Tensor:
    with torch.no_grad():
        n_out = model(x).shape[1]
    return torch.arange(x.shape[0]) * (seed + 1) % n_out


NETS = [("mlp", True), ("mlp", False), ("cnn", True), ("cnn", False), ("cnn-adaptive", True)]


def make(kind: str, bias: bool, seed: int) -> nn.Sequential:
    if kind == "mlp":
        return mlp(seed, bias)
    return cnn(seed, bias, adaptive=kind == "cnn-adaptive")


def assert_agree(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    """max |a - b| <= tol * max |b| (normwise relative; signed sums cancel, so not elementwise)."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert scale > 0
    assert err <= tol * scale, f"max abs diff {err:.3e} > {tol:g} * {scale:.3e} (rel {err / scale:.3e})"


# ------------------------------------------------------------------------------------------------
# peer helpers
# ------------------------------------------------------------------------------------------------
def _safe_den(d: torch.Tensor) -> torch.Tensor:
    """zennit callable stabiliser: exact division with 0/0 := 0 (a zero denominator -> 1)."""
    return torch.where(d == 0, torch.ones_like(d), d)


def _avgpool_alphabeta(zennit, alpha: float, beta: float, stabilizer=_safe_den):
    """alpha-beta on an avg pool (weights 1/k > 0), built from zennit's BasicHook: positive
    contributions pool(x+), negative pool(x-)."""
    from zennit.core import BasicHook, Stabilizer
    from zennit.rules import NoMod

    stab = Stabilizer.ensure(stabilizer)
    return BasicHook(
        input_modifiers=[lambda x: x.clamp(min=0), lambda x: x.clamp(max=0)],
        param_modifiers=[NoMod(param_keys=[]), NoMod(param_keys=[])],
        output_modifiers=[lambda o: o] * 2,
        gradient_mapper=lambda g, outs: [g / stab(outs[0]), g / stab(outs[1])],
        reducer=lambda ins, gs: alpha * ins[0] * gs[0] - beta * ins[1] * gs[1],
    )


def zennit_alphabeta_composite(zennit, alpha: float, beta: float, stabilizer=_safe_den):
    from zennit.composites import LayerMapComposite
    from zennit.rules import AlphaBeta, Pass
    from zennit.types import Activation, AvgPool, Convolution, Linear

    return LayerMapComposite(layer_map=[
        (Activation, Pass()),
        (AvgPool, _avgpool_alphabeta(zennit, alpha, beta, stabilizer)),
        (Convolution, AlphaBeta(alpha=alpha, beta=beta, stabilizer=stabilizer)),
        (Linear, AlphaBeta(alpha=alpha, beta=beta, stabilizer=stabilizer)),
    ])


def zennit_epsilon_composite(zennit, epsilon=_safe_den):
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon, Norm, Pass
    from zennit.types import Activation, AvgPool, Convolution, Linear

    return LayerMapComposite(layer_map=[
        (Activation, Pass()),
        (AvgPool, Norm(stabilizer=epsilon)),
        (Convolution, Epsilon(epsilon=epsilon)),
        (Linear, Epsilon(epsilon=epsilon)),
    ])


def zennit_relevance(zennit, model, x, target, composite=None, start="logit"):
    """zennit's attribution with the start measure onehot * f (LRP) or onehot (gradient)."""
    from zennit.attribution import Gradient

    with torch.no_grad():
        n_out = model(x).shape[1]
    onehot = F.one_hot(target, n_out).to(x.dtype)
    attr_output = (lambda out: out * onehot) if start == "logit" else onehot
    with Gradient(model=model, composite=composite) as attributor:
        _, rel = attributor(x.clone(), attr_output)
    return rel.detach()


def captum_lrp(captum_attr, model, x, target, epsilon: float | None):
    """captum LRP; ``epsilon=None`` keeps captum's default rules (EpsilonRule(1e-9) on every layer
    with a rule). captum has no rule for Flatten; an EpsilonRule there is a reshape (x * R/x, and
    R = 0 where x = 0), exact with epsilon = 1e-300."""
    from captum.attr._utils.lrp_rules import EpsilonRule

    if epsilon is not None:
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                              nn.Flatten)):
                m.rule = EpsilonRule(epsilon=epsilon)
    rel = captum_attr.LRP(model).attribute(x.clone().requires_grad_(True), target=target)
    for m in model.modules():
        if hasattr(m, "rule"):
            del m.rule
    return rel.detach()


def _eps_bound(model: nn.Sequential, x: torch.Tensor, target: torch.Tensor, eps: float):
    """Elementwise bound on |LRP-eps - LRP-0| for an MLP (Linear/ReLU), stabiliser z + eps sign(z).

    A = absolute LRP-0 path mass (A^L = |f_k|, A^{l-1}_j = |y_j| sum_i |W_ij| A_i / |z_i|),
    E = path mass times the summed relative perturbations eps/|z_i| on the path
    (E^{l-1}_j = |y_j| sum_i |W_ij| (E_i + A_i eps/|z_i|) / |z_i|); then |R_eps - R_0|_j <= E_j,
    since 1 - prod_l c_l <= sum_l (1 - c_l) <= sum_l eps/|z_l| for c_l = |z_l|/(|z_l| + eps).
    Returns (E, A) at the input.
    """
    lins = [m for m in model if isinstance(m, nn.Linear)]
    ys, zs = [x], []
    y = x
    for i, lin in enumerate(lins):
        z = lin(y)
        zs.append(z)
        y = z.clamp(min=0) if i < len(lins) - 1 else z
        ys.append(y)
    out = zs[-1]
    onehot = F.one_hot(target, out.shape[1]).to(x.dtype)
    A = (out * onehot).abs()
    E = torch.zeros_like(A)
    for lin, z, y_low in zip(reversed(lins), reversed(zs), reversed(ys[:-1])):
        inv = torch.where(z == 0, torch.zeros_like(z), 1 / z.abs())
        a = eps * inv
        E = y_low.abs() * (((E + A * a) * inv) @ lin.weight.abs())
        A = y_low.abs() * ((A * inv) @ lin.weight.abs())
    return E.detach(), A.detach()


def _alphabeta_eps_bound(model: nn.Sequential, x: torch.Tensor, target: torch.Tensor,
                         alpha: float, beta: float, eps: float):
    """Elementwise bound on |alpha-beta with stabilised S+- - exact alpha-beta| for an MLP: zennit's
    float stabiliser replaces S+_i by S+_i + eps and S-_i by S-_i - eps (bias included in S+-), so
    each kernel entry alpha Z+_ij/S+_i (beta |Z-_ij|/|S-_i|) is multiplied by c = |S|/(|S| + eps) in
    [1 - eps/|S|, 1]; as in ``_eps_bound``, A is the absolute path mass of the exact kernel and
    E^{l-1}_j = sum_i sum_b K^b_ij (E_i + A_i eps/|S^b_i|). Returns (E, A) at the input."""
    lins = [m for m in model if isinstance(m, nn.Linear)]
    ys, y = [x], x
    for i, lin in enumerate(lins):
        z = lin(y)
        y = z.clamp(min=0) if i < len(lins) - 1 else z
        ys.append(y)
    onehot = F.one_hot(target, y.shape[1]).to(x.dtype)
    A = (y * onehot).abs()
    E = torch.zeros_like(A)
    for lin, y_low in zip(reversed(lins), reversed(ys[:-1])):
        Z = y_low[:, None, :] * lin.weight[None]  # [B, out, in]
        b = lin.bias if lin.bias is not None else torch.zeros(lin.out_features, dtype=x.dtype)
        new_A, new_E = torch.zeros_like(y_low), torch.zeros_like(y_low)
        for coef, Zb, S in ((alpha, Z.clamp(min=0), Z.clamp(min=0).sum(-1) + b.clamp(min=0)),
                            (beta, Z.clamp(max=0).abs(), (Z.clamp(max=0).sum(-1) + b.clamp(max=0)).abs())):
            inv = torch.where(S == 0, torch.zeros_like(S), 1 / S)
            K = coef * Zb * inv[..., None]
            new_A = new_A + torch.einsum("boi,bo->bi", K, A)
            new_E = new_E + torch.einsum("boi,bo->bi", K, E + A * eps * inv)
        A, E = new_A, new_E
    return E.detach(), A.detach()


def explain(model, x, target, rule):
    r, rep = bp.explain(model, x, target, rule=rule, return_report=True)
    return r, rep


# ------------------------------------------------------------------------------------------------
# zennit
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,bias", NETS)
@pytest.mark.parametrize("alpha,beta", [(2.0, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alphabeta_vs_zennit(zennit, kind, bias, alpha, beta, seed):
    """zennit AlphaBeta (exact stabiliser; alpha-beta on the avg pools too) == backplay AlphaBeta,
    with and without biases (both put a bias in the branch of its sign and absorb its share)."""
    model = make(kind, bias, seed)
    x = inputs(model, seed)
    t = targets(model, x, seed)
    r_z = zennit_relevance(zennit, model, x, t, zennit_alphabeta_composite(zennit, alpha, beta))
    r_bp, rep = explain(model, x, t, bp.rules.AlphaBeta(alpha, beta))
    assert_agree(r_bp, r_z)
    with torch.no_grad():
        logit = model(x).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(rep.logit, logit, rtol=1e-12, atol=1e-12)
    # backplay's stopped mass is the rest of the logit (I14), and zennit's sum is the same number
    torch.testing.assert_close(rep.relevance_sum, r_z.flatten(1).sum(1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rep.stopped, logit - r_z.flatten(1).sum(1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("alpha,beta", [(2.0, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alphabeta_vs_zennit_default_stabiliser(zennit, alpha, beta, bias, seed):
    """zennit's AlphaBeta with its *default* stabiliser (1e-6) vs backplay AlphaBeta on MLPs: not
    1e-9 (observed ~1e-4 normwise: S- of a neuron can be a few small contributions), but within the
    path bound of ``_alphabeta_eps_bound`` (+ 1e-12 of the path mass for round-off)."""
    from zennit.composites import LayerMapComposite
    from zennit.rules import AlphaBeta, Pass
    from zennit.types import Activation, Linear

    model = mlp(seed, bias)
    x = inputs(model, seed)
    t = targets(model, x, seed)
    comp = LayerMapComposite(layer_map=[(Activation, Pass()), (Linear, AlphaBeta(alpha=alpha, beta=beta))])
    r_z = zennit_relevance(zennit, model, x, t, comp)
    r_bp = bp.explain(model, x, t, rule=bp.rules.AlphaBeta(alpha, beta))
    E, A = _alphabeta_eps_bound(model, x, t, alpha, beta, 1e-6)
    assert ((r_bp - r_z).abs() <= E + 1e-12 * A.amax(1, keepdim=True)).all()


@pytest.mark.parametrize("kind", ["cnn", "cnn-adaptive"])
@pytest.mark.parametrize("seed", [0, 1])
def test_alphabeta_avgpool_convention_vs_zennit_norm(zennit, kind, seed):
    """The one convention that differs: zennit's built-in composites put ``Norm`` (LRP-0) on avg
    pools, backplay applies the routing law to them like to any linear layer. The pool inputs here
    are ReLU outputs (>= 0), so backplay's - branch is empty (its q-share is stopped) and the pool
    multiplies relevance by alpha, zennit's by 1; everything below is linear in that relevance, so
    backplay AlphaBeta(2, 1) == 2 x zennit's (Norm on the pool) exactly, and AlphaBeta(1, 0) agrees."""
    from zennit.composites import LayerMapComposite
    from zennit.rules import AlphaBeta, Norm, Pass
    from zennit.types import Activation, AvgPool, Convolution, Linear

    model = make(kind, True, seed)
    x = inputs(model, seed)
    t = targets(model, x, seed)
    for alpha, beta in ((2.0, 1.0), (1.0, 0.0)):
        comp = LayerMapComposite(layer_map=[
            (Activation, Pass()), (AvgPool, Norm(stabilizer=_safe_den)),
            (Convolution, AlphaBeta(alpha=alpha, beta=beta, stabilizer=_safe_den)),
            (Linear, AlphaBeta(alpha=alpha, beta=beta, stabilizer=_safe_den)),
        ])
        r_z = zennit_relevance(zennit, model, x, t, comp)
        r_bp = bp.explain(model, x, t, rule=bp.rules.AlphaBeta(alpha, beta))
        assert_agree(r_bp, alpha * r_z)


@pytest.mark.parametrize("kind,bias", NETS)
@pytest.mark.parametrize("seed", [0, 1])
def test_routing_laws_equal_to_alphabeta_vs_zennit(zennit, kind, bias, seed):
    """RG() (tau = 1/ln 2, T = 1) and RGEq(kappa = ln 2, nu = 0) are alpha-beta(2, 1) (docs/theory.md
    I16, I18): compared against zennit's AlphaBeta(2, 1) directly."""
    model = make(kind, bias, seed)
    x = inputs(model, seed)
    t = targets(model, x, seed)
    r_z = zennit_relevance(zennit, model, x, t, zennit_alphabeta_composite(zennit, 2.0, 1.0))
    for rule in (bp.rules.RG(), bp.rules.RGEq(kappa=math.log(2.0), nu=0.0)):
        r_bp, _ = explain(model, x, t, rule)
        assert_agree(r_bp, r_z)


@pytest.mark.parametrize("kind,bias", NETS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lrp0_vs_zennit_epsilon_exact(zennit, kind, bias, seed):
    """zennit Epsilon with the exact (0/0 := 0) stabiliser == backplay LRP0 and, on these ReLU
    nets, GradientXInput (I8) and the gradient equilibrium (I17; with biases the bias unit is one
    more lower unit: m p Z/S+ = Z/z, so it is LRP-0 with biases too)."""
    model = make(kind, bias, seed)
    x = inputs(model, seed)
    t = targets(model, x, seed)
    r_z = zennit_relevance(zennit, model, x, t, zennit_epsilon_composite(zennit))
    r_bp, _ = explain(model, x, t, bp.rules.LRP0())
    assert_agree(r_bp, r_z)


@pytest.mark.parametrize("kind,bias", NETS)
@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_equilibrium_vs_zennit_epsilon_exact(zennit, kind, bias, seed):
    model = make(kind, bias, seed)
    x = inputs(model, seed)
    t = targets(model, x, seed)
    r_z = zennit_relevance(zennit, model, x, t, zennit_epsilon_composite(zennit))
    r_bp, _ = explain(model, x, t, bp.rules.GradientEquilibrium())
    assert_agree(r_bp, r_z)


@pytest.mark.parametrize("eps", [1e-12, 1e-6, 1e-2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lrp0_vs_zennit_epsilon_float(zennit, eps, bias, seed):
    """zennit Epsilon(eps) (float: z + eps sign z) vs backplay LRP0 on MLPs: within the path bound
    of ``_eps_bound`` (plus 1e-12 of the absolute path mass for round-off), and the bound is not
    vacuous: it is below the relevance scale for eps <= 1e-6."""
    model = mlp(seed, bias)
    x = inputs(model, seed)
    t = targets(model, x, seed)
    r_z = zennit_relevance(zennit, model, x, t, zennit_epsilon_composite(zennit, epsilon=eps))
    r_bp, _ = explain(model, x, t, bp.rules.LRP0())
    E, A = _eps_bound(model, x, t, eps)
    slack = 1e-12 * A.amax(1, keepdim=True)
    assert ((r_bp - r_z).abs() <= E + slack).all()
    if eps <= 1e-6:
        assert (E <= 1e-3 * A.amax(1, keepdim=True)).all()


@pytest.mark.parametrize("kind,bias", NETS)
@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_vs_zennit(zennit, kind, bias, seed):
    model = make(kind, bias, seed)
    x = inputs(model, seed)
    t = targets(model, x, seed)
    r_z = zennit_relevance(zennit, model, x, t, composite=None, start="onehot")
    r_bp = bp.explain(model, x, t, rule=bp.rules.Gradient())
    assert_agree(r_bp, r_z, tol=1e-12)


# ------------------------------------------------------------------------------------------------
# captum
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,bias", NETS)
@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_x_input_vs_captum(captum_attr, kind, bias, seed):
    """captum InputXGradient (autograd x * df/dx) == backplay GradientXInput; Saliency(abs=False)
    == backplay Gradient."""
    model = make(kind, bias, seed)
    x = inputs(model, seed)
    t = targets(model, x, seed)
    r_c = captum_attr.InputXGradient(model).attribute(x.clone().requires_grad_(True), target=t).detach()
    assert_agree(bp.explain(model, x, t, rule=bp.rules.GradientXInput()), r_c, tol=1e-12)
    g_c = captum_attr.Saliency(model).attribute(x.clone().requires_grad_(True), target=t, abs=False).detach()
    assert_agree(bp.explain(model, x, t, rule=bp.rules.Gradient()), g_c, tol=1e-12)


@pytest.mark.parametrize("kind,bias", NETS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lrp0_vs_captum_lrp_exact(captum_attr, kind, bias, seed):
    """captum LRP with EpsilonRule(1e-300) on every Linear/Conv2d/pool (exact in float64, see the
    module docstring) == backplay LRP0. captum divides by the full z (bias included) and absorbs
    the bias share, starts at 1 and scales by f_k(x) at the end: backplay's convention."""
    model = make(kind, bias, seed)
    x = inputs(model, seed)
    t = targets(model, x, seed)
    r_c = captum_lrp(captum_attr, model, x, t, epsilon=1e-300)
    r_bp, rep = explain(model, x, t, bp.rules.LRP0())
    assert_agree(r_bp, r_c)
    torch.testing.assert_close(rep.relevance_sum, r_c.flatten(1).sum(1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lrp0_vs_captum_lrp_default(captum_attr, bias, seed):
    """captum LRP with its default rules (EpsilonRule(1e-9) on Linear, pass-through ReLU) vs
    backplay LRP0 on MLPs: within the LRP-eps path bound of ``_eps_bound``."""
    model = mlp(seed, bias)
    x = inputs(model, seed)
    t = targets(model, x, seed)
    r_c = captum_lrp(captum_attr, model, x, t, epsilon=None)
    r_bp = bp.explain(model, x, t, rule=bp.rules.LRP0())
    E, A = _eps_bound(model, x, t, 1e-9)
    slack = 1e-12 * A.amax(1, keepdim=True)
    assert ((r_bp - r_c).abs() <= E + slack).all()
    assert (E <= 1e-6 * A.amax(1, keepdim=True)).all()


def test_stub_does_not_leak(zennit):
    """The torchvision stand-in is gone from sys.modules once zennit is imported."""
    import sys

    stubs = [k for k, m in sys.modules.items()
             if (k == "torchvision" or k.startswith("torchvision.")) and getattr(m, "__backplay_test_stub__", False)]
    assert stubs == []
