"""Routing rules in torch (docs/theory.md section 8) on MLPs, CNNs and residual blocks: backplay.gpu.

Independent references: closed-form alpha-beta written here layer by layer on dense matrices, an
alpha-beta law on the unrolled FrozenNet, torch autograd (Gradient x Input), hand-folded BatchNorm.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from backplay.gpu import Add, Residual, explain, unroll
from backplay.testing.graph_exact import torch_error
from backplay.rules import (
    RG, AlphaBeta, Anchor, GradientEquilibrium, GradientXInput, RGEq, RiskAverse, SoftplusGame,
)

from _factories import relu_net  # noqa: E402

F64 = torch.float64


def SEEDED(seed: int = 11) -> torch.Generator:  # noqa: N802  every random input is reproducible
    return torch.Generator().manual_seed(seed)
TOL = dict(rtol=1e-10, atol=1e-10)


def _randomize(model, seed, bias_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=F64) * 0.7)
                if m.bias is not None:
                    m.bias.copy_(bias_scale * torch.randn(m.bias.shape, generator=g, dtype=F64))
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                n = m.num_features
                m.running_mean.copy_(0.3 * torch.randn(n, generator=g, dtype=F64))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g, dtype=F64))
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g, dtype=F64))
                m.bias.copy_(0.2 * torch.randn(n, generator=g, dtype=F64))
    return model.eval()


def cnn(seed, bias=True, bn=True, maxpool=True):
    """conv-(bn)-relu-maxpool-conv-relu-avgpool-flatten-linear on [2, 8, 8]."""
    mods = [nn.Conv2d(2, 3, 3, padding=1, bias=bias)]
    if bn:
        mods.append(nn.BatchNorm2d(3))
    mods += [nn.ReLU(), nn.MaxPool2d(2) if maxpool else nn.AvgPool2d(2),
             nn.Conv2d(3, 4, 3, bias=bias), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
             nn.Linear(4, 3, bias=bias)]
    return _randomize(nn.Sequential(*mods).to(F64), seed)


def cnn_adaptive(seed):
    return _randomize(nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 2), nn.Softplus(beta=2.0),
        nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5), nn.ReLU(),
        nn.Linear(5, 3)).to(F64), seed)


def res_net(seed):
    return _randomize(nn.Sequential(
        nn.Linear(5, 6), nn.ReLU(),
        Residual(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))), nn.ReLU(),
        Residual(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Dropout(0.1), nn.Linear(6, 6))),
        nn.Linear(6, 3)).to(F64), seed)


def res_cnn(seed):
    return _randomize(nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                               nn.Conv2d(3, 3, 1))), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)).to(F64), seed)


CONSERVATIVE = [
    AlphaBeta(2, 1), AlphaBeta(1, 0), RG(), RG(tau=0.7, route_temp=2.0), RG(tau=3.0, route_temp=0.5),
    RGEq(0.3, 0.5, 1.5), RGEq(0.0, 1.0, 1.0), RGEq(-0.5, 0.0, 1.0), GradientEquilibrium(),
    Anchor(RG(), 0.3), Anchor(RGEq(0.2, 1.0, 2.0), 1.0), Anchor(AlphaBeta(3, 2), 0.5),
    RiskAverse(RG(), 0.5, 1.0), RiskAverse(GradientEquilibrium(), 0.2, 0.7),
    RiskAverse(Anchor(AlphaBeta(2, 1), 0.2), 1.0, 0.5),
]
ids = lambda r: r.name  # noqa: E731


def check_i14(model, x, target, rule):
    R, rep = explain(model, x, target, rule=rule, return_report=True)
    assert torch.isfinite(R).all()
    torch.testing.assert_close(rep.relevance_sum, R.flatten(1).sum(1), **TOL)
    scale = 1 + rep.logit.abs().max()
    torch.testing.assert_close(rep.relevance_sum + rep.stopped, rep.logit, rtol=0, atol=1e-10 * scale)
    return R, rep


# ----------------------------------------------------------------------------------------------
# conservation (I14): the stopped mass is accumulated by the law, so this is a real check
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", CONSERVATIVE, ids=ids)
def test_i14_mlp_cnn_residual(rule):
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 1, 2, 0])
    check_i14(relu_net([5, 7, 6, 3], 0), torch.randn(4, 5, generator=g, dtype=F64), t, rule)
    check_i14(cnn(1), torch.randn(4, 2, 8, 8, generator=g, dtype=F64), t, rule)
    check_i14(cnn_adaptive(2), torch.randn(4, 2, 7, 7, generator=g, dtype=F64), t, rule)
    check_i14(res_net(3), torch.randn(4, 5, generator=g, dtype=F64), t, rule)
    check_i14(res_cnn(4), torch.randn(4, 2, 6, 6, generator=g, dtype=F64), t, rule)


def test_stopped_is_accumulated_not_the_difference():
    model = relu_net([5, 7, 6, 3], 0)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    R, rep = explain(model, x, 1, rule=AlphaBeta(2, 0.5, conservative=False), return_report=True)
    assert (rep.relevance_sum + rep.stopped - rep.logit).abs().max() > 1e-3  # I14 fails: m(p-q) != 1
    R1, rep1 = explain(model, x, 1, rule=AlphaBeta(1, 1, conservative=False), return_report=True)
    assert torch.isfinite(R1).all()
    with pytest.raises(ValueError, match="conservative"):
        AlphaBeta(1, 1)


# ----------------------------------------------------------------------------------------------
# I15: alpha-beta closed form, per layer, computed here on dense matrices
# ----------------------------------------------------------------------------------------------
def alpha_beta_reference(Ws, bs, ys, k, alpha, beta):
    """Per-layer alpha-beta relevance (torch order, [0] input) and the stopped mass, numpy."""
    L = len(Ws)
    R = np.zeros_like(ys[L])
    R[k] = ys[L][k]
    rel, stopped = [None] * (L + 1), 0.0
    rel[L] = R
    for l in range(L, 0, -1):
        W, b, y = Ws[l - 1], bs[l - 1], ys[l - 1]
        Z = W * y[None, :]
        bb = np.zeros(W.shape[0]) if b is None else b
        Zb = np.concatenate([Z, bb[:, None]], axis=1)
        Sp, Sn = np.clip(Zb, 0, None).sum(1), np.clip(Zb, None, 0).sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            fp = np.where(Sp > 0, R / np.where(Sp > 0, Sp, 1), 0.0)
            fn = np.where(Sn < 0, R / np.where(Sn < 0, Sn, 1), 0.0)
        Rb = alpha * np.clip(Zb, 0, None) * fp[:, None] - beta * np.clip(Zb, None, 0) * fn[:, None]
        R = Rb[:, :-1].sum(0)
        stopped += Rb[:, -1].sum() + (alpha * R_empty(Sp, R_in=rel[l])) - (beta * R_empty(Sn, R_in=rel[l], neg=True))
        rel[l - 1] = R
    return rel, stopped


def R_empty(S, R_in, neg=False):
    """Mass handed to an empty branch (stopped with its sign), per I15's law: p*m = alpha on + ..."""
    return float(np.where(S == 0, R_in, 0.0).sum())


@pytest.mark.parametrize("ab", [(2.0, 1.0), (1.0, 0.0), (3.0, 2.0), (1.5, 1.5)])
def test_alpha_beta_closed_form_per_layer(ab):
    alpha, beta = ab
    model = relu_net([5, 7, 6, 3], 2)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(4), dtype=F64)
    x[0, 1] = 0.0  # a zero input
    rule = AlphaBeta(alpha, beta, conservative=alpha - beta == 1)
    R, rep = explain(model, x, 1, rule=rule, return_report=True)
    lins = [m for m in model if isinstance(m, nn.Linear)]
    Ws = [m.weight.detach().numpy() for m in lins]
    bs = [m.bias.detach().numpy() for m in lins]
    for i in range(3):
        ys = [x[i].numpy()]
        for l, (W, b) in enumerate(zip(Ws, bs), start=1):
            z = W @ ys[-1] + b
            ys.append(np.maximum(z, 0) if l < len(Ws) else z)
        rel, stopped = alpha_beta_reference(Ws, bs, ys, 1, alpha, beta)
        for l in range(len(rel)):
            np.testing.assert_allclose(rep.layers[l][i].numpy(), rel[l], rtol=1e-12, atol=1e-12)
        assert abs(float(rep.stopped[i]) - stopped) <= 1e-10 * (1 + abs(stopped))


@pytest.mark.parametrize("tau", [1 / math.log(2), 0.5, 2.0])
def test_rg_t1_is_alpha_beta(tau):
    alpha, beta = 1 / (1 - math.exp(-1 / tau)), 1 / (math.exp(1 / tau) - 1)
    ab = AlphaBeta(alpha, beta, conservative=False)
    for model, x in ((relu_net([4, 6, 5, 3], 1), torch.randn(3, 4, generator=SEEDED(), dtype=F64)),
                     (cnn(2), torch.randn(3, 2, 8, 8, generator=SEEDED(), dtype=F64))):
        R1, r1 = explain(model, x, 2, rule=RG(tau=tau), return_report=True)
        R2, r2 = explain(model, x, 2, rule=ab, return_report=True)
        torch.testing.assert_close(R1, R2, **TOL)
        torch.testing.assert_close(r1.stopped, r2.stopped, **TOL)
        for a, b in zip(r1.layers, r2.layers):
            torch.testing.assert_close(a, b, **TOL)


# ----------------------------------------------------------------------------------------------
# I17, lam = 0, theta = 0, softplus limit
# ----------------------------------------------------------------------------------------------
def test_gradient_equilibrium_is_gxi_on_bias_free_relu():
    g = torch.Generator().manual_seed(5)
    cases = [(relu_net([5, 7, 6, 3], 3, bias=False), torch.randn(4, 5, generator=g, dtype=F64)),
             (cnn(6, bias=False, bn=False), torch.randn(4, 2, 8, 8, generator=g, dtype=F64)),
             (cnn(7, bias=False, bn=False, maxpool=False), torch.randn(4, 2, 8, 8, generator=g, dtype=F64))]
    for model, x in cases:
        t = torch.tensor([0, 1, 2, 1])
        ge, rep = explain(model, x, t, rule=GradientEquilibrium(), return_report=True)
        gxi, rep2 = explain(model, x, t, rule=GradientXInput(), return_report=True)
        xg = x.clone().requires_grad_(True)
        copy.deepcopy(model)(xg).gather(1, t.view(-1, 1)).sum().backward()
        torch.testing.assert_close(gxi, x * xg.grad, **TOL)
        torch.testing.assert_close(ge, gxi, **TOL)
        for a, b in zip(rep.layers, rep2.layers):
            torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(rep.stopped, torch.zeros_like(rep.stopped), **TOL)


@pytest.mark.parametrize("base", [RG(), RGEq(0.4, 0.7, 1.3), AlphaBeta(2, 1), GradientEquilibrium()], ids=ids)
def test_anchor_zero_and_risk_neutral_are_the_base(base):
    for model, x in ((relu_net([4, 6, 5, 3], 1), torch.randn(3, 4, generator=SEEDED(), dtype=F64)),
                     (cnn(2), torch.randn(3, 2, 8, 8, generator=SEEDED(), dtype=F64)), (res_net(3), torch.randn(3, 5, generator=SEEDED(), dtype=F64))):
        R0, r0 = explain(model, x, 0, rule=base, return_report=True)
        for rule in (Anchor(base, 0.0), RiskAverse(base, 0.0, 1.0), RiskAverse(Anchor(base, 0.0), 0.0, 2.0)):
            R, r = explain(model, x, 0, rule=rule, return_report=True)
            torch.testing.assert_close(R, R0, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(r.stopped, r0.stopped, rtol=1e-12, atol=1e-12)


def test_anchor_per_layer_lam_and_risk_aversion_change_the_law():
    model, x = relu_net([4, 6, 5, 3], 1), torch.randn(3, 4, generator=SEEDED(), dtype=F64)
    base = explain(model, x, 0, rule=RG())
    a = explain(model, x, 0, rule=Anchor(RG(), (0.0, 0.5, 0.0)))
    b = explain(model, x, 0, rule=RiskAverse(RG(), 2.0, 1.0))
    assert not torch.allclose(a, base) and not torch.allclose(b, base)
    with pytest.raises(ValueError, match="3 layers"):
        explain(model, x, 0, rule=Anchor(RG(), (0.1, 0.2)))


def test_softplus_game():
    model = relu_net([4, 6, 5, 3], 4)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    gxi = explain(model, x, 1, rule=GradientXInput())
    torch.testing.assert_close(explain(model, x, 1, rule=SoftplusGame(1e-7)), gxi, rtol=1e-6, atol=1e-6)
    # eps > 0: GxI of the hand-built softplus surrogate, by autograd
    eps = 0.3
    sur = copy.deepcopy(model)
    for i, m in enumerate(sur):
        if isinstance(m, nn.ReLU):
            sur[i] = nn.Softplus(beta=1 / eps, threshold=1e9)
    xg = x.clone().requires_grad_(True)
    sur(xg)[:, 1].sum().backward()
    torch.testing.assert_close(explain(model, x, 1, rule=SoftplusGame(eps)), x * xg.grad, **TOL)
    c = cnn(3)
    xc = torch.randn(2, 2, 8, 8, generator=SEEDED(), dtype=F64)
    torch.testing.assert_close(explain(c, xc, 0, rule=SoftplusGame(1e-8)),
                               explain(c, xc, 0, rule=GradientXInput()), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# BatchNorm, batches, model untouched
# ----------------------------------------------------------------------------------------------
def test_batchnorm_merge_equals_hand_folded():
    model = cnn(8)
    folded = copy.deepcopy(model)
    conv, bn = folded[0], folded[1]
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        conv.weight.mul_(s.view(-1, 1, 1, 1))
        conv.bias.copy_((conv.bias - bn.running_mean) * s + bn.bias)
    folded = nn.Sequential(*[m for i, m in enumerate(folded) if i != 1]).eval()
    x = torch.randn(3, 2, 8, 8, generator=SEEDED(), dtype=F64)
    torch.testing.assert_close(folded(x), model(x), **TOL)
    for rule in (RG(), GradientEquilibrium(), GradientXInput(), Anchor(AlphaBeta(), 0.2)):
        torch.testing.assert_close(explain(model, x, 2, rule=rule), explain(folded, x, 2, rule=rule), **TOL)


@pytest.mark.parametrize("rule", [RG(route_temp=0.7), RiskAverse(Anchor(RGEq(), 0.3), 0.5, 1.0),
                                  SoftplusGame(0.2), GradientEquilibrium()], ids=ids)
def test_batch_equals_single_runs(rule):
    for model, x in ((cnn(9), torch.randn(4, 2, 8, 8, generator=SEEDED(), dtype=F64)), (res_net(2), torch.randn(4, 5, generator=SEEDED(), dtype=F64))):
        t = torch.tensor([2, 0, 1, 2])
        R, rep = explain(model, x, t, rule=rule, return_report=True)
        for i in range(4):
            Ri, repi = explain(model, x[i], int(t[i]), rule=rule, return_report=True)
            assert Ri.shape == x[i].shape and repi.logit.shape == ()
            torch.testing.assert_close(R[i], Ri, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(rep.stopped[i], repi.stopped, rtol=1e-12, atol=1e-12)
            for a, b in zip(rep.layers, repi.layers):
                torch.testing.assert_close(a[i], b, rtol=1e-12, atol=1e-12)


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()])


def test_model_unchanged():
    for model, x in ((cnn(1), torch.randn(2, 2, 8, 8, generator=SEEDED(), dtype=F64)), (res_cnn(2), torch.randn(2, 2, 6, 6, generator=SEEDED(), dtype=F64))):
        model.train()
        next(model.parameters()).requires_grad_(False)
        calls = []
        handle = model.register_forward_hook(lambda *a: calls.append(1))
        state, rg, tr = snapshot(model)
        for rule in CONSERVATIVE[:4] + [SoftplusGame(0.5), GradientXInput()]:
            R = explain(model, x, 1, rule=rule)
            assert not R.requires_grad
        handle.remove()
        new_state, new_rg, new_tr = snapshot(model)
        assert all(torch.equal(state[k], new_state[k]) for k in state) and state.keys() == new_state.keys()
        assert rg == new_rg and tr == new_tr and calls == []
        assert all(p.grad is None for p in model.parameters())
        for m in model.modules():
            assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


# ----------------------------------------------------------------------------------------------
# residual blocks
# ----------------------------------------------------------------------------------------------
def test_residual_add_module_and_report():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(Add()(a, b), a + b)
    model = res_net(5)
    x = torch.randn(3, 5, generator=SEEDED(), dtype=F64)
    R, rep = check_i14(model, x, 2, RG())
    torch.testing.assert_close(rep.logit, model(x)[:, 2].detach(), **TOL)
    assert len(rep.layers) == 5  # Linear, add, add, Linear: input + 4 layers
    # a residual block whose body is zero passes the skip: the add node has one contribution (the
    # skip, >= 0 here), so laws with p = 1 on an empty - branch pass it on unchanged
    zero = res_net(5)
    with torch.no_grad():
        for blk in (zero[2], zero[4]):
            blk.body[-1].weight.zero_()
            blk.body[-1].bias.zero_()
    plain = nn.Sequential(zero[0], zero[1], zero[5])
    for rule in (GradientEquilibrium(), RGEq(0.3, 1.0, 2.0), Anchor(RGEq(-0.2, 0.5), 0.3)):
        torch.testing.assert_close(explain(zero, x, 1, rule=rule), explain(plain, x, 1, rule=rule), **TOL)
    # GE equals GxI through bias-free residual blocks
    bf = copy.deepcopy(model)
    with torch.no_grad():
        for m in bf.modules():
            if isinstance(m, nn.Linear):
                m.bias.zero_()
    xg = x.clone().requires_grad_(True)
    bf(xg)[:, 0].sum().backward()
    torch.testing.assert_close(explain(bf, x, 0, rule=GradientEquilibrium()), x * xg.grad, **TOL)
    # a residual model unrolls (the skips carried by copy rows) and the exact law equals torch
    frozen = unroll(model, x[0])
    assert any("copy" in k for k in frozen.kinds if not isinstance(k, str))
    for rule in (RG(), GradientEquilibrium(), Anchor(AlphaBeta(2, 1), 0.3)):
        assert torch_error(model, x[0], 2, rule) <= 1e-9


# ----------------------------------------------------------------------------------------------
# unroll
# ----------------------------------------------------------------------------------------------
def law_on_frozen(net, k, p, m):
    """A constant-hand-over routing law (route temperature 1) on a FrozenNet, numpy, per layer."""
    L = net.depth
    R = np.zeros(net.widths[L])
    R[k] = net.ys[L][k]
    rel = [None] * (L + 1)
    rel[L] = R
    for l in range(L, 0, -1):
        W, b, y = net.weights[l - 1], net.biases[l - 1], net.ys[l - 1]
        Zb = np.concatenate([W * y[None, :], (np.zeros(W.shape[0]) if b is None else b)[:, None]], 1)
        Sp, Sn = np.clip(Zb, 0, None).sum(1), np.clip(Zb, None, 0).sum(1)
        fp = np.divide(m * p * R, Sp, out=np.zeros_like(R), where=Sp > 0)
        fn = np.divide(m * (1 - p) * R, Sn, out=np.zeros_like(R), where=Sn < 0)
        R = (np.clip(Zb, 0, None) * fp[:, None] - np.clip(Zb, None, 0) * fn[:, None])[:, :-1].sum(0)
        rel[l - 1] = R
    return rel


@pytest.mark.parametrize("which", ["mlp", "cnn", "cnn_avg", "adaptive"])
def test_unroll_reproduces_the_model_and_the_layers(which):
    model, x = {"mlp": (relu_net([4, 6, 5, 3], 1), torch.randn(4, generator=SEEDED(), dtype=F64)),
                "cnn": (cnn(2), torch.randn(2, 8, 8, generator=SEEDED(), dtype=F64)),
                "cnn_avg": (cnn(3, maxpool=False), torch.randn(2, 8, 8, generator=SEEDED(), dtype=F64)),
                "adaptive": (cnn_adaptive(4), torch.randn(2, 7, 7, generator=SEEDED(), dtype=F64))}[which]
    net = unroll(model, x)
    y = x.flatten().numpy()
    np.testing.assert_array_equal(net.ys[0], y)
    for l in range(1, net.depth + 1):
        z = net.weights[l - 1] @ net.ys[l - 1] + (0 if net.biases[l - 1] is None else net.biases[l - 1])
        # the activation is frozen into ys: y = act(z) elementwise (ReLU, softplus, pool: identity)
        assert np.allclose(net.ys[l], np.maximum(z, 0)) or np.allclose(net.ys[l], z) or \
            np.allclose(net.ys[l], 0.5 * np.logaddexp(0, 2 * z), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(net.ys[-1], model(x.unsqueeze(0))[0].detach().numpy(), rtol=1e-12, atol=1e-12)
    if which in ("mlp", "cnn_avg"):  # no max pool: the law on the FrozenNet is the torch law layer by layer
        _, rep = explain(model, x, 1, rule=AlphaBeta(2, 1), return_report=True)
        ref = law_on_frozen(net, 1, 2 / 3, 3.0)
        assert len(rep.layers) == net.depth + 1
        for l in range(net.depth + 1):
            np.testing.assert_allclose(rep.layers[l].flatten().numpy(), ref[l], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# edge cases and errors
# ----------------------------------------------------------------------------------------------
def test_zero_inputs_and_empty_branches():
    model = relu_net([3, 4, 2], 0)
    x = torch.zeros(2, 3, dtype=F64)
    for rule in CONSERVATIVE:
        R, rep = check_i14(model, x, 1, rule)
        assert torch.equal(R, torch.zeros_like(R))
    c = cnn(1)
    for rule in CONSERVATIVE[:5]:
        check_i14(c, torch.zeros(1, 2, 8, 8, dtype=F64), 0, rule)
    # p = q: RGEq(0, 0) hands over with 1/2 each: every token is stopped
    R, rep = check_i14(relu_net([3, 4, 2], 1), torch.randn(2, 3, generator=SEEDED(), dtype=F64), 0, RGEq(0.0, 0.0))
    assert torch.equal(R, torch.zeros_like(R))
    torch.testing.assert_close(rep.stopped, rep.logit, **TOL)


def test_errors():
    class Recurrent(nn.Module):  # an LSTM as people write it
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.fc(out[:, -1])

    with pytest.raises(TypeError, match="unsupported operation lstm .*module lstm"):
        explain(Recurrent().double(), torch.zeros(2, 5, 3, dtype=F64), 0, rule=RG())
    with pytest.raises(ValueError, match="channels"):
        explain(cnn(0), torch.zeros(1, 3, 8, 8, dtype=F64), 0)
    with pytest.raises(ValueError, match="shape"):
        explain(cnn(0), torch.zeros(2, 16, dtype=F64), 0)
    with pytest.raises(ValueError, match="alpha - beta"):
        AlphaBeta(1, 1)
    assert AlphaBeta(1, 1, conservative=False).conservative is False
