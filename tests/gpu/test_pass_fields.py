"""The pass each rule asks for (``Rule.pass_fields``, ``Rule.pass_temperature``): the engine records
only what the rule reads (the gradient-type rules: no z, and p only where y does not give it; the
LRP recursions: z only where y does not stand for it, docs/theory.md I8, I17; the routing laws:
neither), and every rule's relevance, per-layer relevance and stopped mass are the same numbers as
its sweep over the full pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import backplay as bp
from backplay.gpu.engine import prepare
from backplay.gpu.trace import ALL_FIELDS
from backplay.testing.graph_exact import torch_error
from backplay.rules import (LRP0, RG, AlphaBeta, Anchor, Epsilon, EpsilonPlusFlat, Flat, Gamma, Gradient,
                            GradientEquilibrium, GradientXInput, RiskAverse, SoftplusGame, ZPlus)


class Mixed(nn.Module):
    """Every gate kind the fields depend on: ReLU (p and z read back from y), ReLU6 (p from y, z not),
    LeakyReLU and GELU (neither), a linear layer, a padded conv, a max pool, a residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc0 = nn.Linear(6 * 4 * 4, 24)
        self.fc1 = nn.Linear(24, 24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = F.relu6(2 * self.bn(self.c2(F.pad(h, (1, 1, 1, 1)))) + h)
        h = F.leaky_relu(F.max_pool2d(h, 2), 0.1)
        h = F.gelu(self.fc0(torch.flatten(h, 1)))
        return self.fc(self.fc1(h) + F.relu(h))


RULES = [Gradient(), GradientXInput(), SoftplusGame(0.3), LRP0(), Epsilon(0.1), GradientEquilibrium(),
         AlphaBeta(2, 1), RG(0.5, route_temp=0.7), Anchor(GradientEquilibrium(), 0.2), RiskAverse(RG(), 0.5),
         Gamma(0.25), ZPlus(), Flat(), EpsilonPlusFlat()]


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    model = Mixed().eval().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    x[:2, :, :3] = 0  # dead units: ties z = 0 and zero rows
    return model, x


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name[:30])
def test_the_rules_pass_gives_the_full_pass_numbers(case, rule):
    model, x = case
    R, rep = bp.explain(model, x, 1, rule, return_report=True)
    prep = prepare(model, x)
    full = prep.trace(ALL_FIELDS, temperature=rule.pass_temperature)
    sweep = rule.sweep(full, torch.full((x.shape[0],), 1), keep_layers=True)
    assert torch.equal(R, sweep.relevance)
    assert len(rep.layers) == len(sweep.layers)
    assert all(torch.equal(a.reshape(b.shape), b) for a, b in zip(rep.layers, sweep.layers))
    if sweep.stopped is not None:
        assert torch.equal(rep.stopped, sweep.stopped)


def test_what_the_passes_keep(case):
    model, x = case
    prep = prepare(model, x)
    kinds = {}
    for fields in (ALL_FIELDS, Gradient().pass_fields, LRP0().pass_fields, AlphaBeta(2, 1).pass_fields):
        tr = prep.trace(fields)
        kinds[fields] = [(type(s.gate).__name__, s.z is not None, s.p is not None) for s in tr.layers]
    assert all(z and p for _, z, p in kinds[ALL_FIELDS])
    grad = kinds[frozenset({"p"})]
    assert all(not z for _, z, _ in grad)
    assert {g for g, _, p in grad if p} == {"LeakyReLUGate", "GELUGate"}  # y does not give their p
    lrp = kinds[frozenset({"z"})]
    assert all(not p for _, _, p in lrp)
    assert {g for g, z, _ in lrp if z} == {"ClampGate", "LeakyReLUGate", "GELUGate"}  # y does not stand for z
    assert all(not z and not p for _, z, p in kinds[frozenset()])
    assert GradientXInput().pass_fields == SoftplusGame().pass_fields == frozenset({"p"})
    assert SoftplusGame(0.3).pass_temperature == 0.3 and Gradient().pass_temperature is None


def test_a_pass_without_p_refuses_a_gradient_through_a_gate_that_needs_it(case):
    model, x = case
    tr = prepare(model, x).trace(frozenset())
    gelu = next(s for s in tr.layers if type(s.gate).__name__ == "GELUGate")
    with pytest.raises(ValueError, match="kept no p for the gate"):
        gelu.through_gate(torch.ones_like(gelu.y))


class _DeadUnitThroughSoftplus(torch.nn.Module):
    """A standalone softplus after a ReLU: the gate passes relevance on unchanged, so a dead ReLU unit
    (y = 0, z != 0) carries relevance and the LRP recursions need its z (found by the thorough profile)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.softplus(F.relu(0.5 * x))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("rule", [LRP0(), GradientEquilibrium()], ids=repr)
def test_dead_unit_with_relevance_reads_its_z(rule):
    torch.manual_seed(0)
    model = _DeadUnitThroughSoftplus().double().eval()
    x = torch.zeros(1, 5, 5, dtype=torch.float64)
    x[0, 2, 1] = -0.25
    x[0, 3, 3] = 1.0
    assert torch_error(model, x, 0, rule) <= 1e-9
