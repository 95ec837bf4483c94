"""Any model: the zoo of architectures written the way people write them (backplay.testing.zoo), read
through the one reader (docs/theory.md section 11).

For each architecture:
* exact: on a tiny instance, every graph rule's per-layer relevance, stopped mass and logit equal
  the exact law on the unrolled graph (routing laws) or the exact layer recursions (Gradient, GxI,
  LRP-0, SoftplusGame), float64, 1e-9 relative (backplay.testing.graph_exact);
* the conservation report (I14) per sample for every conservative rule; a batch of 4 equals four
  single runs; the model is unchanged (parameters, buffers, flags, hooks);
* GradientXInput = x times autograd's input gradient on the piecewise-linear ones (1e-10), and the
  gradient of the model with the frozen quantities detached elsewhere.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import backplay as bp
from backplay.rules import (
    LRP0, RG, AlphaBeta, Anchor, Gradient, GradientEquilibrium, GradientXInput, RGEq, RiskAverse,
    SoftplusGame,
)
from backplay.testing.graph_exact import torch_error
from backplay.testing.zoo import ZOO, zoo_input

D = torch.float64
GRAPH_RULES = [Gradient(), GradientXInput(), LRP0(), AlphaBeta(2, 1), RG(tau=0.5, route_temp=0.7), RGEq(0.3, 0.5),
               GradientEquilibrium(), Anchor(RG(), 0.2), RiskAverse(AlphaBeta(2, 1), 0.5), SoftplusGame(0.5)]
CONSERVATIVE = [AlphaBeta(2, 1), RG(tau=0.5, route_temp=0.7), RGEq(0.3, 0.5), GradientEquilibrium(),
                Anchor(RG(), 0.2), RiskAverse(AlphaBeta(2, 1), 0.5)]
PIECEWISE_LINEAR = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "densenet", "conv1d", "unet"]


def _tiny(name):
    case = ZOO[name]("tiny", seed=0, dtype=D)
    return case, zoo_input(case, seed=1)


def _small(name, batch=4):
    case = ZOO[name]("small", seed=0, dtype=D)
    return case, zoo_input(case, batch=batch, seed=2)


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("rule", GRAPH_RULES, ids=lambda r: type(r).__name__)
def test_tiny_torch_equals_the_exact_law_at_every_layer(name, rule):
    """The exact side runs in mpmath at 50 digits (exact rationals grow with the depth; the random
    models of test_read.py run in rationals)."""
    case, x = _tiny(name)
    assert torch_error(case.model, x, 0, rule, field="mpmath") <= 1e-9


def _state(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()])


def _assert_same(model, snap):
    state, rg, tr, hooks = _state(model)
    assert state.keys() == snap[0].keys() and all(torch.equal(state[k], snap[0][k]) for k in state)
    assert rg == snap[1] and tr == snap[2] and hooks == snap[3]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", list(ZOO))
def test_small_conservation_batch_and_model_unchanged(name):
    case, x = _small(name)
    model = case.model
    target = torch.arange(4) % case.num_classes
    logit = model(x).detach().gather(1, target.view(-1, 1)).squeeze(1)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))  # the user's hooks stay, silent
    snap = _state(model)
    for rule in CONSERVATIVE + [GradientXInput(), LRP0()]:
        R, rep = bp.explain(model, x, target, rule=rule, return_report=True)
        assert R.shape == x.shape and R.dtype == x.dtype
        torch.testing.assert_close(rep.logit, logit, rtol=1e-10, atol=1e-12)
        if rule in CONSERVATIVE:  # I14 per sample: the relevance and the stopped mass make the logit
            # (round-off relative to the largest term: the gradient-equilibrium family carries masses
            # m = (S+ + |S-|)/z that are large where z is small, and the two terms then cancel)
            scale = torch.stack([logit.abs(), rep.relevance_sum.abs(), rep.stopped.abs()]).amax(0).clamp_min(1.0)
            assert ((rep.relevance_sum + rep.stopped - rep.logit).abs() / scale).max() <= 1e-9
        singles = torch.cat([bp.explain(model, x[i:i + 1], int(target[i]), rule=rule) for i in range(4)])
        torch.testing.assert_close(R, singles, rtol=1e-9, atol=1e-12 * float(R.abs().max() + 1))
    _assert_same(model, snap)
    assert calls == []
    handle.remove()


@pytest.mark.parametrize("name", PIECEWISE_LINEAR)
def test_gradient_x_input_is_x_times_autograd(name):
    """Linear maps, sums, ReLU-family gates and selections: the frozen-graph gradient is the gradient."""
    case, x = _small(name)
    m = copy.deepcopy(case.model)
    xg = x.clone().requires_grad_(True)
    m(xg)[:, 1 % case.num_classes].sum().backward()
    R = bp.explain(case.model, x, 1 % case.num_classes, rule=GradientXInput())
    torch.testing.assert_close(R, x * xg.grad, rtol=1e-10, atol=1e-10 * float((x * xg.grad).abs().max()))


def test_mlp_with_norms_and_gates_is_the_detached_gradient(monkeypatch):
    """LayerNorm, GELU, SiLU: GxI is x times the gradient of the model with its std and its gates
    detached (docs/theory.md section 11), computed here by patching the functional ops."""
    case, x = _small("mlp_norm")
    R = bp.explain(case.model, x, 2, rule=GradientXInput())
    plain = F.layer_norm

    def layer_norm(t, shape, weight=None, bias=None, eps=1e-5):
        dims = tuple(range(-len(shape), 0))
        c = t - t.mean(dims, keepdim=True)
        std = torch.sqrt((c * c).mean(dims, keepdim=True) + eps).detach()
        out = c / std
        return out * weight + bias if weight is not None else out

    monkeypatch.setattr(F, "layer_norm", layer_norm)
    monkeypatch.setattr(F, "gelu", lambda z, approximate="none": z * (0.5 * (1 + torch.erf(z / 2 ** 0.5))).detach())
    monkeypatch.setattr(F, "silu", lambda z, inplace=False: z * torch.sigmoid(z).detach())
    m = copy.deepcopy(case.model)
    xg = x.clone().requires_grad_(True)
    m(xg)[:, 2].sum().backward()
    monkeypatch.setattr(F, "layer_norm", plain)
    torch.testing.assert_close(R, x * xg.grad, rtol=1e-10, atol=1e-12)
    # and it is not the plain gradient (the frozen quantities matter)
    m2 = copy.deepcopy(case.model)
    monkeypatch.undo()
    xg2 = x.clone().requires_grad_(True)
    m2(xg2)[:, 2].sum().backward()
    assert (R - x * xg2.grad).abs().max() > 1e-6
