"""The LRP zoo identities I22 and I23 (docs/theory.md section 12), checked on one (net, input, target).

Same contract as :mod:`backplay.testing.identities`: ``exact`` is the identity in exact arithmetic,
``torch_err`` the worst float64 error of ``backplay.explain`` against the exact law (every layer),
``cvxpy_err`` a cvxpy figure (None: no cvxpy counterpart).

* I22: Gamma(gamma) = RGEq(kappa = +-log(1 + gamma), nu = 1) kernel by kernel (sympy, exact).
* I23: a rule implemented in zennit, read as a black box (:func:`backplay.validate.external.zennit_rule`),
  gets the report of backplay's rule of the same definition from ``validate_rule``. zennit is an
  optional extra (:mod:`backplay.testing.peers`): without it the check raises ImportError, and the
  row of :mod:`backplay.testing.registry` (``requires="zennit"``) is skipped, never passed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sympy as sp
import torch

from ..rules import AlphaBeta, Epsilon, Gamma, RGEq
from ..theory import routing_law
from .identities import Case, IdentityCheck
from .routing_identities import torch_matches_law

#: the two gamma values of I22 (dyadic, so the law is rational): a small boost and a large one
I22_GAMMAS = (sp.Rational(1, 4), sp.Integer(3))
#: I23's tolerance on the found laws and the Hellinger distances of the two reports (float64 reads)
I23_TOL = 1e-9
#: I23's epsilon (dyadic)
I23_EPS = 0.25


def _equal(a: Any, b: Any) -> bool:
    """Exact equality of two sympy numbers (rational, or expressions such as log(1 + gamma))."""
    if a is None or b is None:
        return a is b
    return a == b or sp.simplify(a - b) == 0


def check_i22(c: Case) -> IdentityCheck:
    """I22: at every unit with z_i != 0 the kernel of Gamma(gamma) (p, q, m, routing, stop) is that of
    RGEq(kappa = sign(z_i) log(1 + gamma), nu = 1), exactly (sympy), for gamma in
    :data:`I22_GAMMAS`, with or without biases (the bias a unit of the branch of its sign); at z_i = 0
    the whole token stops (the convention of ``backplay.rules.Gamma``). torch: ``explain`` with
    Gamma(gamma) equals the exact law at every layer and in its stopped mass (float64)."""
    ok, t_err, n = True, 0.0, {1: 0, -1: 0, 0: 0}
    for g in I22_GAMMAS:
        rule = Gamma(float(g))
        law = c.law(rule)
        refs = {s: routing_law(c.frozen, target=c.target, rule=RGEq(kappa=s * sp.log(1 + g), nu=1)) for s in (1, -1)}
        for l in range(1, c.spec.depth + 1):
            for i in range(c.spec.widths[l]):
                k = law.kernel(l, i)
                s = 1 if k.z > 0 else -1 if k.z < 0 else 0
                n[s] += 1
                if s == 0:
                    ok = ok and k.stopped
                    continue
                r = refs[s].kernel(l, i)
                ok = ok and k.stopped == r.stopped and k.stop == 0 and k.routing == r.routing and \
                    all(_equal(a, b) for a, b in ((k.p, r.p), (k.q, r.q), (k.m, r.m)))
        t_err = max(t_err, torch_matches_law(c.model, c.xt[0], c.target, rule, c.frozen))
    return IdentityCheck("I22", ok, t_err, None,
                         f"gamma = {', '.join(str(g) for g in I22_GAMMAS)}: units z > 0: {n[1]}, z < 0: {n[-1]}, "
                         f"z = 0: {n[0]}")


def _verdicts(report: Any) -> list:
    """(name, holds) of every finding but conservation: a black box that reports its defect as the
    stopped mass makes conservation hold by construction, so validate_rule reports it n/a."""
    return [(f.name, f.holds) for f in report.findings if not f.name.startswith("conservation")]


def report_difference(a: Any, b: Any, tol: float = I23_TOL) -> str | None:
    """None when two :class:`backplay.numerics.RuleReport` say the same (I23): the same verdict on
    every row but conservation, the same law (sign, hand-over p, q, m, routing and branch flows per
    neuron, to ``tol`` relative), the same nearest named rule (name, and H^2 = 1 - BC to ``tol``: the
    squared distance is what a float64 read of the maps determines to ``tol``; H = sqrt(1 - BC) turns
    a 1e-17 difference of BC near a match into 3e-9); otherwise the first difference, in words."""
    if _verdicts(a) != _verdicts(b):
        diff = [(x, y) for x, y in zip(_verdicts(a), _verdicts(b)) if x != y]
        return f"verdicts differ: {diff[:2]}"
    if a.is_law != b.is_law or (a.law is None) != (b.law is None):
        return f"law found: {a.is_law} vs {b.is_law}"
    if a.law is not None:
        for l in range(1, len(a.law.sigma) + 1):
            sa, sb = a.law.sigma[l - 1], b.law.sigma[l - 1]
            if (sa is None) != (sb is None):
                return f"layer {l} examined in one report only"
            if sa is None:
                continue
            parts = list(zip(a.law.handover(l) + tuple(a.law.routing(l)), b.law.handover(l) + tuple(b.law.routing(l))))
            parts += [(a.law.flow_plus[l - 1], b.law.flow_plus[l - 1]), (a.law.flow_minus[l - 1], b.law.flow_minus[l - 1])]
            for name, (u, v) in zip(("p", "q", "m", "routing +", "routing -", "flows +", "flows -"), parts):
                if not np.array_equal(np.isnan(u), np.isnan(v)):
                    return f"layer {l}: {name} identified at different neurons"
                finite = np.isfinite(v)
                scale = max(1.0, float(np.abs(v[finite]).max())) if finite.any() else 1.0
                gap = float(np.nanmax(np.abs(u - v), initial=0.0))
                if gap > tol * scale:
                    return f"layer {l}: {name} differs by {gap:.2e}"
    if (a.nearest is None) != (b.nearest is None):
        return "nearest named rule in one report only"
    if a.nearest is not None:
        if a.nearest["rule"] != b.nearest["rule"]:
            return f"nearest named rule {a.nearest['rule']} vs {b.nearest['rule']}"
        ha, hb = a.nearest["hellinger"], b.nearest["hellinger"]
        if abs(ha * ha - hb * hb) > tol:
            return f"Hellinger to the nearest rule {ha:.3e} vs {hb:.3e}"
    return None


def _exact_division(d: torch.Tensor) -> torch.Tensor:
    """zennit stabiliser (a callable): exact division with 0/0 := 0, as backplay's ``safe_divide``."""
    return torch.where(d == 0, torch.ones_like(d), d)


def _epsilon_stabiliser(eps: float) -> Any:
    """zennit stabiliser (a callable) of backplay's Epsilon definition: z + eps sign(z) with sign(0) = 0
    and 0/0 := 0, so a unit with z = 0 passes nothing down (the token stops; zennit's own stabiliser
    takes sign(0) = +1 and divides by eps there)."""
    def stabilise(d: torch.Tensor) -> torch.Tensor:
        return torch.where(d == 0, torch.full_like(d, torch.inf), d + eps * torch.sign(d))
    return stabilise


def i23_pairs(eps: float = I23_EPS) -> list[tuple[str, Any, Any]]:
    """(label, zennit composite, backplay rule) of I23, zennit's rule on every Linear (``Pass`` on
    activation modules): zennit's AlphaBeta(2, 1) with the exact stabiliser (0/0 := 0) and backplay's
    AlphaBeta(2, 1); zennit's Epsilon with the stabiliser z + eps sign(z), sign(0) = 0 (backplay's
    definition: at z = 0 the token stops, where zennit's default divides by eps) and backplay's
    Epsilon(eps). ImportError without zennit."""
    from .peers import import_zennit, missing_peer

    missing = missing_peer("zennit")
    if missing is not None:
        raise ImportError(f"I23 needs {missing}")
    zennit = import_zennit()
    zr, zt = zennit.rules, zennit.types

    def composite(rule: Any) -> Any:
        return zennit.composites.LayerMapComposite(layer_map=[(zt.Activation, zr.Pass()), (zt.Linear, rule)])

    return [("AlphaBeta(2, 1)", composite(zr.AlphaBeta(2.0, 1.0, stabilizer=_exact_division)), AlphaBeta(2, 1)),
            (f"Epsilon({eps})", composite(zr.Epsilon(epsilon=_epsilon_stabiliser(eps))), Epsilon(eps))]


def check_i23(c: Case) -> IdentityCheck:
    """I23: zennit's AlphaBeta(2, 1) and Epsilon(eps) composites, read as black boxes by
    :func:`backplay.validate.external.zennit_rule`, get from ``validate_rule`` the report of
    backplay's AlphaBeta(2, 1) and Epsilon(eps) on the case's MLP (:func:`report_difference`: same
    verdicts, same law to 1e-9, same nearest named rule). ImportError without zennit.

    The black box finds layer l among the model's leaf module calls by value; where a layer's input
    and output are both 0 (a dead layer) another module can match and the report differs: that is a
    failure of the adapter, reported here as a difference."""
    from ..validate import validate_rule
    from ..validate.external import zennit_rule

    problems, laws = [], 0
    for label, composite, ours in i23_pairs():
        theirs = validate_rule(zennit_rule(composite), c.model, c.x, c.target, solver=c.solver)
        mine = validate_rule(ours, c.model, c.x, c.target, solver=c.solver)
        diff = report_difference(theirs, mine)
        laws += theirs.is_law
        if diff is not None:
            problems.append(f"{label}: {diff}")
    detail = "; ".join(problems) if problems else f"zennit = backplay on 2 rules ({laws} laws found)"
    return IdentityCheck("I23", not problems, None, None, detail)
