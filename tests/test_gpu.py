"""Tests of backplay.gpu (occupation, explain, interval_bounds) and backplay.rules.

Every check is against an independent computation: torch autograd (on a deep copy of the model),
hand-computed values, MLPSpec.forward, or the identities of docs/theory.md (I3, I4, I5, I7, I8, I11, I13).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from backplay.gpu import explain, interval_bounds, mlp_spec, occupation
from backplay.nets import MLPSpec
from backplay.rules import LRP0, Gradient, GradientXInput, Rule

from _factories import relu_net

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = dict(rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def softplus_spec(widths, seed, eps=0.5):
    # float32-representable entries, so that the spec and spec.to_torch(float64) hold the same
    # numbers whatever precision MLPSpec.to_torch copies the weights through
    rng = np.random.default_rng(seed)
    f32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731
    ws = [f32(rng.normal(size=(b, a))) for a, b in zip(widths[:-1], widths[1:])]
    bs = [f32(0.5 * rng.normal(size=b)) for b in widths[1:]]
    return MLPSpec(ws, bs, activation="softplus", eps=eps)


def autograd_reference(model, x, target):
    """Gradient wrt x and wrt every bias, from torch autograd on a deep copy of the model."""
    m = copy.deepcopy(model)
    xg = x.detach().clone().requires_grad_(True)
    out = m(xg)
    t = torch.as_tensor(target, device=x.device).expand(x.shape[0])
    out.gather(1, t.view(-1, 1)).sum().backward()
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    bias_grads = [None if lin.bias is None else lin.bias.grad for lin in linears]
    return out.detach(), xg.grad, bias_grads


def per_sample_bias_grads(model, x, target):
    """df/db^l per sample (autograd on the biases, one sample at a time)."""
    rows = []
    for i in range(x.shape[0]):
        t = target if isinstance(target, int) else int(target[i])
        rows.append(autograd_reference(model, x[i : i + 1], t)[2])
    return [torch.stack([r[l] for r in rows]) for l in range(len(rows[0]))]


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "grads": [p.grad for p in model.parameters()],
    }


def assert_unchanged(model, snap):
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(state[k], v), k
    assert [p.requires_grad for p in model.parameters()] == snap["requires_grad"]
    assert [m.training for m in model.modules()] == snap["training"]
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not m._backward_hooks and not m._backward_pre_hooks


# ----------------------------------------------------------------------------------------------
# hand-computed example
# ----------------------------------------------------------------------------------------------
def hand_net():
    lin1 = nn.Linear(2, 2)
    lin2 = nn.Linear(2, 1)
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 1.0]]))
        lin1.bias.copy_(torch.tensor([0.5, -1.0]))
        lin2.weight.copy_(torch.tensor([[2.0, -1.0]]))
        lin2.bias.copy_(torch.tensor([0.25]))
    return nn.Sequential(lin1, nn.ReLU(), lin2).double()


def test_hand_computed_two_layer():
    # z1 = (-0.5, 3) -> y1 = (0, 3), p1 = (0, 1); z2 = -3 + 0.25 = -2.75
    o = occupation(hand_net(), torch.tensor([[1.0, 1.0]], dtype=F64), 0)
    exact = lambda v: torch.tensor([v], dtype=F64)  # noqa: E731
    assert torch.equal(o.value, exact(-2.75))
    assert torch.equal(o.gates[0], exact([0.0, 1.0]))
    assert torch.equal(o.layers_signed[1], exact([2.0, -1.0]))
    assert torch.equal(o.gradient, exact([-3.0, -1.0]))
    assert torch.equal(o.layers_abs[1], exact([2.0, 1.0]))
    assert torch.equal(o.abs_mass, exact([3.0, 1.0]))
    assert torch.equal(o.nu_plus, exact([0.0, 0.0]))
    assert torch.equal(o.nu_minus, exact([3.0, 1.0]))
    assert torch.equal(o.gxi, exact([-3.0, -1.0]))
    assert torch.equal(o.bias_share, exact(1.25))  # 0.25 + (-1)*(-1)
    assert torch.equal(o.entropy_share, exact(0.0))
    # rho: R^1 = (2/3, 1/3); the first neuron stops; R^0 = (1/3)/4 * (3, 1)
    torch.testing.assert_close(o.layers_rho[1], exact([2 / 3, 1 / 3]), **TOL)
    torch.testing.assert_close(o.rho, exact([1 / 4, 1 / 12]), **TOL)
    torch.testing.assert_close(o.stopped, exact(2 / 3), **TOL)
    assert torch.equal(o.sink, exact(0.0))
    assert torch.equal(o.bias_gradient[1], exact([1.0]))
    assert torch.equal(o.bias_gradient[0], exact([0.0, -1.0]))
    assert len(o.layers_signed) == len(o.layers_abs) == len(o.layers_rho) == 3
    assert len(o.gates) == len(o.bias_gradient) == 2


# ----------------------------------------------------------------------------------------------
# against autograd, identities
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("output_relu", [False, True])
def test_relu_matches_autograd_and_identities(seed, output_relu, device):
    model = relu_net([5, 7, 6, 3], seed, output_relu=output_relu, device=device)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(6, 5, generator=g, dtype=F64).to(device)
    target = torch.tensor([0, 1, 2, 0, 1, 2], device=device)
    o = occupation(model, x, target)
    out, grad, _ = autograd_reference(model, x, target)
    torch.testing.assert_close(o.output, out, **TOL)
    torch.testing.assert_close(o.value, out.gather(1, target.view(-1, 1)).squeeze(1), **TOL)
    torch.testing.assert_close(o.gradient, grad, **TOL)  # I3
    for mine, ref in zip(o.bias_gradient, per_sample_bias_grads(model, x, target)):  # I5
        torch.testing.assert_close(mine, ref, **TOL)
    torch.testing.assert_close(o.value, o.gxi.sum(1) + o.bias_share + o.entropy_share, **TOL)  # I4
    assert torch.equal(o.entropy_share, torch.zeros_like(o.entropy_share))
    ones = torch.ones_like(o.value)
    torch.testing.assert_close(o.rho.sum(1) + o.stopped + o.sink, ones, **TOL)
    # occupation measures are measures; |S| <= A; rho within [0, 1]
    assert (o.nu_plus >= -1e-12).all() and (o.nu_minus >= -1e-12).all()
    for S, A, R in zip(o.layers_signed, o.layers_abs, o.layers_rho):
        assert (S.abs() <= A + 1e-12).all()
        assert (R >= 0).all() and (R <= 1 + 1e-12).all()
    torch.testing.assert_close(o.abs_mass, o.nu_plus + o.nu_minus, **TOL)
    torch.testing.assert_close(o.gradient, o.nu_plus - o.nu_minus, **TOL)


@pytest.mark.parametrize("seed", range(3))
def test_abs_mass_is_path_sum(seed):
    """A^0 = sum over active paths of the product of |W| (I6/I7), by brute-force path enumeration."""
    model = relu_net([3, 4, 3, 2], seed)
    x = torch.randn(1, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    o = occupation(model, x, 1)
    lins = [m for m in model if isinstance(m, nn.Linear)]
    W = [lin.weight.detach() for lin in lins]
    p = [g[0] for g in o.gates]
    n0 = 3
    abs_ref, sgn_ref, rho_ref = torch.zeros(n0, dtype=F64), torch.zeros(n0, dtype=F64), torch.zeros(n0, dtype=F64)
    for i2 in range(4):
        for i1 in range(3):
            for j in range(n0):
                path = [(2, 1, i1), (1, i1, i2), (0, i2, j)]  # (layer index, row, col)
                prob, wprod = p[2][1] * p[1][i1] * p[0][i2], 1.0
                rho_w = prob.clone()
                for l, r, c in path:
                    wprod = wprod * W[l][r, c]
                    rho_w = rho_w * W[l][r, c].abs() / W[l][r].abs().sum()
                abs_ref[j] += prob * abs(wprod)
                sgn_ref[j] += prob * wprod
                rho_ref[j] += rho_w
    torch.testing.assert_close(o.abs_mass[0], abs_ref, **TOL)
    torch.testing.assert_close(o.gradient[0], sgn_ref, **TOL)
    torch.testing.assert_close(o.rho[0], rho_ref, **TOL)


def test_bias_free_is_euler():
    model = relu_net([4, 5, 3], 7, bias=False)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    o = occupation(model, x, 2)
    assert torch.equal(o.bias_share, torch.zeros(3, dtype=F64))
    torch.testing.assert_close(o.value, o.gxi.sum(1), **TOL)


# ----------------------------------------------------------------------------------------------
# ties, zero rows, zero weights
# ----------------------------------------------------------------------------------------------
def test_ties_stop_like_torch_relu():
    lin1, lin2 = nn.Linear(2, 2), nn.Linear(2, 1)
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[1.0, -1.0], [1.0, 2.0]]))
        lin1.bias.zero_()
        lin2.weight.copy_(torch.tensor([[3.0, 1.0]]))
        lin2.bias.zero_()
    model = nn.Sequential(lin1, nn.ReLU(), lin2).double()
    x = torch.tensor([[2.0, 2.0]], dtype=F64)  # z1 = (0, 6): a tie at neuron 0
    o = occupation(model, x, 0)
    assert o.gates[0][0, 0] == 0 and o.gates[0][0, 1] == 1
    _, grad, bgrads = autograd_reference(model, x, 0)
    assert torch.equal(o.gradient, grad)  # (1, 2): nothing through the tied neuron
    assert torch.equal(o.gradient, torch.tensor([[1.0, 2.0]], dtype=F64))
    assert torch.equal(o.bias_gradient[0][0], bgrads[0])
    assert o.bias_gradient[0][0, 0] == 0
    # the tied neuron stops: R^1 = (3/4, 1/4) and 3/4 is stopped
    torch.testing.assert_close(o.stopped, torch.tensor([0.75], dtype=F64), **TOL)
    torch.testing.assert_close(explain(model, x, 0, rule=LRP0()), explain(model, x, 0, rule=GradientXInput()), **TOL)


def test_zero_row_goes_to_sink():
    lin1, lin2 = nn.Linear(2, 2), nn.Linear(2, 1)
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))  # row 0 is zero, bias 1: active
        lin1.bias.copy_(torch.tensor([1.0, 0.0]))
        lin2.weight.copy_(torch.tensor([[1.0, 3.0]]))
        lin2.bias.zero_()
    model = nn.Sequential(lin1, nn.ReLU(), lin2).double()
    x = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=F64)
    o = occupation(model, x, 0)
    # sample 0: both active; R^1 = (1/4, 3/4): 1/4 in the sink, 3/4 reaches the input
    torch.testing.assert_close(o.sink, torch.tensor([0.25, 0.25], dtype=F64), **TOL)
    torch.testing.assert_close(o.rho[0], torch.tensor([0.375, 0.375], dtype=F64), **TOL)
    # sample 1: neuron 1 inactive (z = -3), stops with 3/4
    torch.testing.assert_close(o.stopped, torch.tensor([0.0, 0.75], dtype=F64), **TOL)
    torch.testing.assert_close(o.rho.sum(1) + o.stopped + o.sink, torch.ones(2, dtype=F64), **TOL)
    torch.testing.assert_close(o.value, o.gxi.sum(1) + o.bias_share, **TOL)
    _, grad, _ = autograd_reference(model, x, 0)
    torch.testing.assert_close(o.gradient, grad, **TOL)
    assert torch.isfinite(o.rho).all()


def test_explicit_pad_is_conv_padding():
    """The zeros F.pad writes are constants, not units (docs/theory.md section 11): F.pad then
    Conv2d(padding=0) has the occupation measures of Conv2d(padding=1); rho + stopped + sink = 1."""
    torch.manual_seed(5)
    same = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)).double()
    padded = copy.deepcopy(same)
    padded[0].padding = (0, 0)
    padded.insert(0, nn.ZeroPad2d(1))
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(6), dtype=F64)
    a, b = occupation(same, x, 1), occupation(padded, x, 1)
    for name in ("value", "rho", "stopped", "sink", "gradient", "abs_mass"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), **TOL)
    torch.testing.assert_close(b.rho.flatten(1).sum(1) + b.stopped + b.sink, torch.ones(2, dtype=F64), **TOL)


def test_all_zero_weights():
    model = relu_net([3, 4, 2], 0)
    with torch.no_grad():
        model[2].weight.zero_()
        model[0].weight[1].zero_()
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    o = occupation(model, x, 1)
    torch.testing.assert_close(o.value, model[2].bias[1].detach().expand(3), **TOL)
    assert torch.equal(o.gradient, torch.zeros_like(x))
    assert torch.equal(o.rho, torch.zeros_like(x))
    torch.testing.assert_close(o.sink, torch.ones(3, dtype=F64), **TOL)
    assert torch.equal(o.stopped, torch.zeros(3, dtype=F64))
    torch.testing.assert_close(o.value, o.bias_share, **TOL)
    for rule in (Gradient(), GradientXInput(), LRP0()):
        R = explain(model, x, 1, rule=rule)
        assert torch.equal(R, torch.zeros_like(x)) and torch.isfinite(R).all()


# ----------------------------------------------------------------------------------------------
# softplus
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_softplus_net(seed):
    spec = softplus_spec([4, 6, 5, 3], seed, eps=0.5)
    model = spec.to_torch(dtype=F64)
    x = torch.as_tensor(np.random.default_rng(50 + seed).normal(size=(5, 4)) * 3)
    target = torch.tensor([0, 1, 2, 1, 0])
    o = occupation(model, x, target)
    for i in range(5):
        ref = spec.forward(x[i].numpy())[-1][1][int(target[i])]
        assert abs(float(o.value[i]) - ref) <= 1e-13 * max(1.0, abs(ref))
    _, grad, _ = autograd_reference(model, x, target)
    torch.testing.assert_close(o.gradient, grad, **TOL)  # I11
    for mine, ref in zip(o.bias_gradient, per_sample_bias_grads(model, x, target)):
        torch.testing.assert_close(mine, ref, **TOL)
    torch.testing.assert_close(o.value, o.gxi.sum(1) + o.bias_share + o.entropy_share, **TOL)
    assert (o.entropy_share != 0).all()
    torch.testing.assert_close(o.rho.sum(1) + o.stopped + o.sink, torch.ones(5, dtype=F64), **TOL)
    for p in o.gates[:-1]:
        assert ((p >= 0) & (p <= 1)).all() and ((p > 0) & (p < 1)).any()
    assert torch.equal(o.gates[-1], torch.ones_like(o.gates[-1]))
    # the report's stopped mass for GxI is the bias and entropy shares (I11)
    R, rep = explain(spec, x, target, rule=GradientXInput(), return_report=True)
    torch.testing.assert_close(R, o.gxi, **TOL)
    torch.testing.assert_close(rep.stopped, o.bias_share + o.entropy_share, **TOL)


def test_softplus_exact_beyond_torch_threshold():
    """z/eps far above torch's default threshold 20: our softplus stays exact (no identity switch)."""
    spec = MLPSpec([np.array([[1.0]]), np.array([[1.0]])], [np.array([-9.0]), None],
                   activation="softplus", eps=0.5)
    model = nn.Sequential(nn.Linear(1, 1), nn.Softplus(beta=2.0), nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(-9.0)
        model[2].weight.fill_(1.0)
    x = torch.tensor([[19.25]], dtype=F64)  # z = 10.25, beta*z = 20.5 > 20: torch returns z
    o = occupation(model, x, 0)
    ref = spec(np.array([19.25]))[0]
    assert float(o.value[0]) == pytest.approx(ref, rel=1e-15)
    assert float(o.value[0]) != float(model(x).detach()[0, 0])  # torch's module returns z there
    torch.testing.assert_close(o.value, o.gxi.sum(1) + o.bias_share + o.entropy_share, **TOL)


def test_softplus_entropy_saturated_gates():
    """p -> 0 or 1 in float64: H(p) = 0 log 0 terms stay finite and the identities hold."""
    spec = softplus_spec([3, 4, 2], 3, eps=0.01)
    x = torch.tensor([[50.0, -40.0, 30.0], [-60.0, 70.0, 5.0]], dtype=F64)
    o = occupation(spec, x, 1)
    for f in (o.value, o.entropy_share, o.gradient, o.rho):
        assert torch.isfinite(f).all()
    torch.testing.assert_close(o.value, o.gxi.sum(1) + o.bias_share + o.entropy_share, rtol=1e-12, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# rules and explain
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_lrp0_equals_gradient_x_input_on_relu(seed):
    """I8: LRP-0 with biases (computed by the LRP recursion) equals Gradient x Input."""
    model = relu_net([6, 8, 8, 4], seed, output_relu=seed % 2 == 1)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(seed), dtype=F64)
    target = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    lrp, rep = explain(model, x, target, rule=LRP0(), return_report=True)
    gxi = explain(model, x, target, rule=GradientXInput())
    _, grad, _ = autograd_reference(model, x, target)
    torch.testing.assert_close(lrp, gxi, **TOL)
    torch.testing.assert_close(gxi, x * grad, **TOL)
    o = occupation(model, x, target)
    torch.testing.assert_close(rep.logit, o.value, **TOL)
    torch.testing.assert_close(rep.relevance_sum, lrp.sum(1), **TOL)
    torch.testing.assert_close(rep.stopped, o.bias_share, **TOL)  # I4
    torch.testing.assert_close(rep.stopped, rep.logit - rep.relevance_sum, **TOL)


def test_lrp0_recursion_is_not_autograd():
    """On a softplus net LRP-0 (y != z) differs from GxI: the recursion is genuinely layer-wise."""
    spec = softplus_spec([3, 4, 2], 0, eps=1.0)
    x = torch.tensor([[0.3, -0.2, 0.5]], dtype=F64)
    assert not torch.allclose(explain(spec, x, 0, rule=LRP0()), explain(spec, x, 0, rule=GradientXInput()))


def test_explain_default_rule_is_gradient():
    model = relu_net([4, 5, 2], 1)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    _, grad, _ = autograd_reference(model, x, 1)
    torch.testing.assert_close(explain(model, x, 1), grad, **TOL)
    R, rep = explain(model, x, 1, return_report=True)
    assert rep.rule == "Gradient"
    torch.testing.assert_close(rep.stopped, rep.logit - R.sum(1), **TOL)


def test_rule_names_and_docs():
    for rule, ident in ((Gradient(), "I3"), (GradientXInput(), "I4"), (LRP0(), "I8")):
        assert isinstance(rule, Rule)
        assert rule.name == type(rule).__name__
        assert ident in type(rule).__doc__


@pytest.mark.parametrize("rule", [Gradient(), GradientXInput(), LRP0()], ids=lambda r: r.name)
def test_batch_equals_single_runs(rule):
    model = relu_net([5, 6, 3], 4)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(9), dtype=F64)
    target = torch.tensor([2, 0, 1, 2])
    R, rep = explain(model, x, target, rule=rule, return_report=True)
    for i in range(4):
        Ri, repi = explain(model, x[i], int(target[i]), rule=rule, return_report=True)
        assert Ri.shape == (5,) and repi.logit.shape == ()
        torch.testing.assert_close(R[i], Ri, **TOL)
        torch.testing.assert_close(rep.logit[i], repi.logit, **TOL)
        torch.testing.assert_close(rep.stopped[i], repi.stopped, **TOL)
    o = occupation(model, x, target)
    for i in range(4):
        oi = occupation(model, x[i : i + 1], target[i : i + 1])
        for name in ("gradient", "rho", "nu_plus", "nu_minus", "bias_share", "stopped", "sink"):
            torch.testing.assert_close(getattr(o, name)[i], getattr(oi, name)[0], **TOL)


def test_target_forms():
    model = relu_net([3, 4, 3], 2)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    a = explain(model, x, 1)
    for t in (torch.tensor(1), torch.tensor([1, 1]), np.int64(1), [1, 1], torch.tensor([1, 1], dtype=torch.int32)):
        torch.testing.assert_close(explain(model, x, t), a, **TOL)


def test_mlpspec_and_dtype():
    spec = mlp_spec(relu_net([3, 5, 2], 5))
    x64 = torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    R64 = explain(spec, x64, 1, rule=GradientXInput())
    assert R64.dtype == F64
    torch.testing.assert_close(R64, explain(spec.to_torch(), x64, 1, rule=GradientXInput()), **TOL)
    x32 = x64.float()
    R32 = explain(spec, x32, 1, rule=GradientXInput())
    assert R32.dtype == torch.float32 and R32.shape == x32.shape
    torch.testing.assert_close(R32, R64.float(), rtol=1e-4, atol=1e-5)
    # a float64 input on a float32 model is computed in float64 and returned in float64
    m32 = spec.to_torch(dtype=torch.float32)
    R = explain(m32, x64, 1)
    assert R.dtype == F64


def test_nested_sequential_identity_dropout():
    base = relu_net([4, 5, 3], 6)
    nested = nn.Sequential(
        nn.Sequential(base[0], nn.Identity(), nn.Sequential(base[1], nn.Dropout(0.5))), base[2]
    )
    nested.train()  # dropout is read as the identity: the explained function is the eval net
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    snap = snapshot(nested)
    torch.testing.assert_close(explain(nested, x, 0, rule=LRP0()), explain(base, x, 0, rule=LRP0()), **TOL)
    assert_unchanged(nested, snap)


# ----------------------------------------------------------------------------------------------
# the model is never modified
# ----------------------------------------------------------------------------------------------
def test_model_unchanged():
    model = relu_net([4, 6, 5, 3], 8)
    model.train()
    model[0].weight.requires_grad_(False)  # mixed flags must survive
    model[2].eval()
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    n_hooks = len(model._forward_hooks)
    snap = snapshot(model)
    handle_ok = {k: v for k, v in model._forward_hooks.items()}
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=F64, requires_grad=True)
    for rule in (Gradient(), GradientXInput(), LRP0()):
        R, _ = explain(model, x, 2, rule=rule, return_report=True)
        assert not R.requires_grad
    occupation(model, x, 1)
    interval_bounds(model, x.detach() - 0.1, x.detach() + 0.1)
    assert len(model._forward_hooks) == n_hooks and dict(model._forward_hooks) == handle_ok
    handle.remove()
    assert_unchanged(model, snap)
    assert x.grad is None
    assert calls == []  # the model's forward is never run


# ----------------------------------------------------------------------------------------------
# interval bounds (I13)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("output_relu", [False, True])
def test_interval_bounds(output_relu, device):
    model = relu_net([4, 6, 5, 3], 11, output_relu=output_relu, device=device)
    g = torch.Generator().manual_seed(12)
    c = torch.randn(5, 4, generator=g, dtype=F64).to(device)
    r = (0.3 * torch.rand(5, 4, generator=g, dtype=F64)).to(device)
    lower, upper = interval_bounds(model, c - r, c + r)
    assert lower.shape == upper.shape == (5, 3)
    # center/radius IBP as an independent formulation
    mu, rad = c, r
    for m in model:
        if isinstance(m, nn.Linear):
            mu, rad = m(mu), rad @ m.weight.abs().T
        else:
            lo_, hi_ = torch.relu(mu - rad), torch.relu(mu + rad)
            mu, rad = (lo_ + hi_) / 2, (hi_ - lo_) / 2
    torch.testing.assert_close(lower, (mu - rad).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(upper, (mu + rad).detach(), rtol=1e-12, atol=1e-12)
    # soundness on samples of the box
    u = torch.rand(200, 5, 4, generator=g, dtype=F64).to(device)
    pts = (c - r) + 2 * r * u
    with torch.no_grad():
        vals = model(pts)
    assert (vals >= lower - 1e-12).all() and (vals <= upper + 1e-12).all()
    # degenerate box: the bounds are the output
    lo_pt, hi_pt = interval_bounds(model, c[0], c[0])
    assert lo_pt.shape == (3,)
    torch.testing.assert_close(lo_pt, model(c[:1]).detach()[0], **TOL)
    torch.testing.assert_close(hi_pt, lo_pt, **TOL)


def test_interval_bounds_errors():
    model = relu_net([2, 3, 1], 0)
    with pytest.raises(ValueError, match="empty"):
        interval_bounds(model, torch.ones(1, 2, dtype=F64), torch.zeros(1, 2, dtype=F64))
    with pytest.raises(ValueError, match="same shape"):
        interval_bounds(model, torch.zeros(1, 2, dtype=F64), torch.zeros(2, 2, dtype=F64))


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_models_with_their_own_forward_and_unsupported_operations():
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)

    class MyLinear(nn.Linear):  # a subclass with its own forward is read through that forward
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(MyLinear(3, 2)).double()
    torch.testing.assert_close(explain(model, x, 1), 2 * model[0].weight[1].detach().expand(2, 3), **TOL)
    # tanh is a frozen gate: the frozen-graph gradient is the gradient with the gate tanh(z)/z detached
    tanh = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    z = tanh[0](x).detach()
    g = (torch.tanh(z) / z) * tanh[2].weight[0].detach()
    torch.testing.assert_close(explain(tanh, x, 0), g @ tanh[0].weight.detach(), **TOL)

    class Sorted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return torch.sort(self.lin(x), dim=1).values

    with pytest.raises(TypeError, match=r"unsupported operation sort .*test_gpu.py:\d+ `return torch.sort"):
        explain(Sorted().double(), x, 0)
    with pytest.raises(TypeError, match="nn.Module or a backplay.MLPSpec"):
        explain("not a model", x, 0)


def test_bad_inputs():
    model = relu_net([3, 4, 2], 0)
    good = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="expects 3"):
        explain(model, torch.zeros(2, 4, dtype=F64), 0)
    with pytest.raises(ValueError, match="shape"):
        explain(model, torch.zeros(2, 3, 1, dtype=F64), 0)
    for bad in (float("nan"), float("inf")):
        x = good.clone()
        x[1, 2] = bad
        with pytest.raises(ValueError, match="non-finite"):
            explain(model, x, 0)
        with pytest.raises(ValueError, match="non-finite"):
            occupation(model, x, 0)
    with pytest.raises(TypeError, match="floating"):
        explain(model, torch.zeros(2, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="out of range"):
        explain(model, good, 2)
    with pytest.raises(ValueError, match="out of range"):
        occupation(model, good, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="one class per sample"):
        explain(model, good, torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="integers"):
        explain(model, good, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="bool"):
        explain(model, good, True)
    with pytest.raises(TypeError, match="Rule"):
        explain(model, good, 0, rule="lrp")


def test_device_mismatch_is_a_clear_error():
    model = nn.Sequential(nn.Linear(3, 2, device="meta", dtype=F64))
    with pytest.raises(ValueError, match="meta"):
        explain(model, torch.zeros(1, 3, dtype=F64), 0)
