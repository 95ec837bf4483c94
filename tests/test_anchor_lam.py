"""Per-layer parameters (issue 15, part 6): ``Anchor(rule, lam)`` with one lam per layer, all entries
different, so that a lam applied one layer off (``lam[-1]`` is silent in Python) fails. torch
(``bp.explain`` with its report) equals the exact law on the unrolled graph at every layer and in its
stopped mass, float64, 1e-9, on an MLP and a small CNN written the usual way; the verify row
``per-layer lam`` checks the same on the random nets and catches a shifted index."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backplay.gpu.engine import explain, prepare
from backplay.nets import MLPSpec
from backplay.rules import RG, AlphaBeta, Anchor, GradientEquilibrium, RGEq, RiskAverse
from backplay.testing import err
from backplay.testing.graph_exact import exact_report, torch_error
from backplay.testing.identities import Case
from backplay.testing.registry import IDENTITIES
from backplay.testing.routing_identities import check_per_layer_lam, distinct_lams

D = torch.float64
TOL = 1e-9


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 4), nn.Linear(4, 3)
        with torch.no_grad():
            self.fc2.weight[1, 2] = 0.0  # a zero weight

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.out(F.relu(self.fc3(x)))


def _cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 3, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)).double().eval()


def _models():
    x_mlp = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=D)
    x_cnn = torch.rand((1, 4, 4), generator=torch.Generator().manual_seed(2), dtype=D) - 0.3
    return [("mlp", MLP().double().eval(), x_mlp), ("cnn", _cnn(), x_cnn)]


def _depth(model, x):
    return prepare(model, x[None]).trace().n_layers


BASES = [AlphaBeta(2, 1), RG(), RG(tau=0.5, route_temp=0.5), RGEq(0.5, 0.5), GradientEquilibrium()]


def test_lam_at_takes_layer_l_from_entry_l_minus_1():
    a = Anchor(RG(), (0.1, 0.2, 0.3))
    assert [a.lam_at(l, 3) for l in (1, 2, 3)] == [0.1, 0.2, 0.3]
    assert Anchor(RG(), 0.25).lam_at(2, 3) == 0.25
    with pytest.raises(ValueError, match="lam has 3 entries, the net has 4 layers"):
        a.lam_at(1, 4)


@pytest.mark.parametrize("name,model,x", _models(), ids=["mlp", "cnn"])
@pytest.mark.parametrize("base", BASES, ids=lambda r: r.name)
def test_distinct_per_layer_lams_torch_equals_exact_law_at_every_layer(name, model, x, base):
    depth = _depth(model, x)
    lams = distinct_lams(depth)
    assert len(set(lams)) == depth >= 3
    for lam in (lams, lams[::-1]):
        rule = Anchor(base, lam)
        for target in (0, 2):
            assert torch_error(model, x, target, rule) <= TOL, (lam, target)


@pytest.mark.parametrize("name,model,x", _models(), ids=["mlp", "cnn"])
def test_risk_averse_over_per_layer_anchor(name, model, x):
    rule = RiskAverse(Anchor(RG(), distinct_lams(_depth(model, x))), theta=0.5)
    assert torch_error(model, x, 1, rule, field="mpmath") <= TOL


@pytest.mark.parametrize("name,model,x", _models(), ids=["mlp", "cnn"])
def test_the_check_sees_a_lam_one_layer_off(name, model, x):
    """The power of the test above: the exact law with the lams rotated by one layer (what an index
    off by one computes) differs from torch's at some layer by far more than the tolerance."""
    lams = distinct_lams(_depth(model, x))
    _, rep = explain(model, x[None], 0, rule=Anchor(AlphaBeta(2, 1), lams), return_report=True)
    for shifted in (lams[1:] + lams[:1], lams[-1:] + lams[:-1]):
        layers, _, _ = exact_report(model, x, 0, Anchor(AlphaBeta(2, 1), shifted))
        worst = max(err(rep.layers[k][0].reshape(-1), layers[k]) for k in range(len(layers)))
        assert worst > 1e-4, shifted


def test_verify_row_passes_and_catches_a_shifted_index(monkeypatch):
    rng = np.random.default_rng(3)
    W = [rng.integers(-8, 9, size=s) / 4 for s in [(4, 3), (4, 4), (3, 4), (2, 3)]]
    B = [rng.integers(-4, 5, size=s) / 4 for s in [4, 4, 3, 2]]
    case = Case(MLPSpec(W, B, "relu"), np.array([1.0, -0.5, 2.0]), 0)
    row = {i.name: i for i in IDENTITIES}["per-layer lam"]
    assert row.check is check_per_layer_lam and "all entries distinct" in row.statement
    res = row.check(case)
    assert res.exact and res.torch_err <= TOL and res.cvxpy_err <= 1e-6, res
    # an engine that reads lam one layer off (both engines share lam_at: the exact column, which
    # holds the law to the definition lam_l = lam[l - 1], fails)
    monkeypatch.setattr(Anchor, "lam_at", lambda self, layer, depth: self.lam[layer - 2]
                        if isinstance(self.lam, tuple) else self.lam)
    bad = check_per_layer_lam(Case(case.spec, case.x, case.target))
    assert not bad.exact
