"""validate_rule names each LRP zoo rule as the law it is (issue 15 item 2; docs/theory.md section 12).

The probed layer maps decide which named rule a rule is (``nearest["maps"]``, the largest difference
of the named law's layer maps from the probed ones); the path law behind equal maps is identified up
to how stopped mass is handed over, which the report states. Flat and WSquare are single-branch laws
(p = 1, routing along the edges W != 0 whatever the sign of Z), fitted in their own family; a
composite mixes the two families layer by layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import backplay as bp
from backplay.validate import validate_rule
from backplay.validate import SIGNED, SINGLE

R = bp.rules
D = torch.float64


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = torch.nn.Linear(5, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(2, 2, 2)
        self.fc = torch.nn.Linear(2 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.relu(self.conv2(h))
        return self.fc(h.flatten(1))


def case(kind: str, seed: int) -> tuple:
    torch.manual_seed(seed)
    if kind == "mlp":
        return MLP().to(D), torch.randn(5, dtype=D)
    return CNN().to(D), torch.randn(1, 6, 6, dtype=D)


NAMED = [  # (rule, the names validate_rule must give it: its own or an identical law's)
    (R.LRP0(), {"GradientEquilibrium"}),
    (R.Epsilon(0.25), {"Epsilon(eps=0.25)"}),
    (R.Gamma(0.25), {"Gamma(gamma=0.25)"}),
    (R.ZPlus(), {"ZPlus", "AlphaBeta(alpha=1.0, beta=0.0, conservative=False)"}),
    (R.Flat(), {"Flat"}),
    (R.WSquare(), {"WSquare"}),
]


@pytest.mark.parametrize("kind,seed", [("mlp", 0), ("mlp", 1), ("cnn", 0)])
@pytest.mark.parametrize("rule,names", NAMED, ids=[r.name for r, _ in NAMED])
def test_zoo_rules_are_named_as_the_laws_they_are(kind, seed, rule, names):
    model, x = case(kind, seed)
    rep = validate_rule(rule, model, x, 0)
    assert rep.is_law, str(rep)
    n = rep.nearest
    assert n["maps"] <= n["maps_tol"], str(rep)
    same = {c["rule"] for c in rep.candidates if c["maps"] <= c["maps_tol"]}
    assert n["rule"] in names and names & same == names & {c["rule"] for c in rep.candidates}, str(rep)
    assert rep.family == (SINGLE if isinstance(rule, (R.Flat, R.WSquare)) else SIGNED)
    # a rule whose maps differ is never called by another name
    for c in rep.candidates:
        if c["rule"] not in names and c["maps"] <= c["maps_tol"]:
            assert c["rule"] in {"EpsilonPlus(epsilon=1e-06)", "EpsilonAlpha2Beta1(epsilon=1e-06)",
                                 "RGEq(kappa=0.0, nu=1.0, route_temp=1.0)"} or c["hellinger"] <= 1e-9, c


def test_composite_mixes_families_per_layer_and_is_named():
    model, x = case("mlp", 0)
    rep = validate_rule(R.EpsilonPlusFlat(), model, x, 0)
    assert rep.is_law, str(rep)
    assert SINGLE in rep.family and SIGNED in rep.family and "at layers [1]" in rep.family
    assert rep.nearest["rule"] in {"EpsilonPlusFlat(epsilon=1e-06)", "EpsilonAlpha2Beta1Flat(epsilon=1e-06)"}
    assert rep.nearest["maps"] <= rep.nearest["maps_tol"]
    assert "the rule's layer maps are those of" in str(rep)


def test_equal_maps_different_handover_is_stated():
    """Epsilon's stop is a direct cemetery move (multiplier 1); the law the program finds puts it in
    a branch: the same maps, a different path law, and the report says so."""
    model, x = case("mlp", 0)
    rep = validate_rule(R.Epsilon(0.25), model, x, 0)
    assert rep.nearest["rule"] == "Epsilon(eps=0.25)" and rep.nearest["hellinger"] > 1e-3
    assert "hands over the stopped mass another way" in str(rep)


def test_flat_is_not_a_signed_branch_law():
    """Flat routes to units with Z = W y = 0 and against the sign of Z: no law of the signed family
    has its maps; validate_rule says which family fits."""
    model, x = case("cnn", 0)
    rep = validate_rule(R.Flat(), model, x, 0)
    assert rep.family == SINGLE and rep.is_law
    assert "single branch" in str(rep)


def test_box_rule_is_named_at_its_own_bounds():
    """EpsilonGammaBox at bounds other than the defaults, on the CNN (its first conv is the box
    layer): validate_rule reads the bounds off the first layer's map and names the preset at them;
    ZBox alone on a one-layer model likewise."""
    model, x = case("cnn", 0)
    lo, hi = round(float(x.min()) - 0.5, 1), round(float(x.max()) + 0.75, 1)
    rep = validate_rule(R.EpsilonGammaBox(lo, hi), model, x, 0)
    assert rep.is_law, str(rep)
    assert rep.nearest["rule"] == R.EpsilonGammaBox(lo, hi).name and rep.nearest["maps"] <= rep.nearest["maps_tol"]
    torch.manual_seed(3)
    one = torch.nn.Linear(5, 3).to(D)
    xo = torch.randn(5, dtype=D)
    rep = validate_rule(R.ZBox(-3.0, 3.5), one, xo, 1)
    assert rep.nearest["rule"] == "ZBox(low=-3.0, high=3.5)" and rep.nearest["maps"] <= rep.nearest["maps_tol"]
