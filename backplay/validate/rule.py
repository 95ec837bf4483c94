"""``validate_rule``: check a backward attribution rule against the routing game (docs/theory.md sections 8, 13).

A tool, not an oracle: it composes the three parts (ARCHITECTURE: ``validate`` sits above them). It
runs the rule with the torch engine (:mod:`backplay.gpu`), probes its layer maps, solves cvxpy
feasibility programs (:mod:`backplay.numerics`) and compares the law it finds with the exact named
laws of :mod:`backplay.theory` (imported when called).

What the probing extracts. Fix the explained forward pass of one input x. At layer l the rule maps the
relevance of y^l (the upper relevance R, n_l numbers) to the relevance of y^{l-1}: F_l(R), read through
the rule's public :meth:`~backplay.rules.LayerRule.layer_map` (the sweep's own map of one layer, with
the context the sweep sets up). The probe feeds F_l a batch of upper relevances at once (the forward
pass repeated): the unit vectors e_i (their images are the columns of the extracted matrix M_l, the
linear map the rule would be if it were linear), the actual relevance R^l of the sweep, 3 R^l, -R^l, the
sign parts R^l+ and R^l-, an independent probe R' (seeded normal, of the size of R^l) and R^l + R', and
for every lower unit k the restriction of R^l to the upper units joined to k by an edge (W^l_ik != 0).

The stopped-mass API (docs/theory.md I14). A rule stops mass where it absorbs relevance: the bias sink, the
cemetery of an empty branch, a stabiliser. Its ``backward(layer, upper)`` then returns ``(lower,
stopped)`` with ``stopped`` the signed mass absorbed per sample (shape [B]), so that sum(upper) =
sum(lower) + stopped; a user's :class:`~backplay.rules.LayerRule` does the same. Every backplay rule
that stops mass reports it: the routing laws (cemetery, bias sink) and LRP0 (its bias share and the
whole R_i where z_i = 0, so that LRP-0 with biases is found to be the gradient equilibrium, I17).
Gradient, GradientXInput (probed on the gradient it sweeps) and AttributionEquilibrium report none:
they are not conservative by nature (the gradient is not a relevance mass; AE's layer sum is r - 2
whatever comes in), and their conservation row measures that. SoftplusGame sweeps a surrogate net,
not the explained pass, and has no layer map here (TypeError: validate GradientXInput on the
softplus_eps net).

Each property is a row with its figure, the tolerance it is held to and where the figure is worst;
the row holds exactly when figure <= tolerance (``tol`` relative to max(1, max |R^l|), and for
conservation ``tol`` times max(1, sum |R^top|) in relevance units):

* conservation (I14): per layer, |sum R^l - sum R^{l-1} - stopped|; per neuron (its own row),
  |R_i (1 - column sum of M_l - stopped(e_i))|;
* linearity in R: |F_l(R^l) - M_l R^l|;
* additivity: |F_l(R + R') - F_l(R) - F_l(R')| on the independent probes: a rule that renormalises per
  layer fails, also a renormalisation that keeps the layer's total (which is homogeneous);
* homogeneity: |F_l(3R) - 3 F_l(R)|: degree 1; a scale-free map (each sign class renormalised to unit
  mass, as Attribution Equilibrium does) fails;
* cancellation of the sign classes: |F_l(R+) + F_l(R-) - F_l(R)| (a rule that moves + and - mass
  separately and lets them annihilate, or renormalises each class, fails); the opposite-sign mass
  landing on one unit is reported beside it (not a violation: a law keeps both copies);
* sign consistency of the two branches: |F_l(-R) + F_l(R)| (the - copy follows the law of the + copy);
* locality: the larger of |F_l(R restricted to k's upper neighbours)_k - F_l(R)_k| and the largest
  entry of M_l off the edges (both are shown; the larger decides); vacuous on a dense layer (every
  lower unit is joined to every upper one): a rule's non-local parts show on convolutions;
* ``Markov law fits M (LP)``: an LP (cvxpy) in the flows of a law of the section 5 family, per layer:
  nonnegative flows on the + branch edges (Z_ik = W_ik y_k > 0, sign kept) and on the - branch edges
  (Z_ik < 0, sign flipped) and nonnegative stopped masses (cemetery or bias sink) per neuron, minimising
  the L1 distance of the signed flows to M_l. The law is the solution: a_i = m_i p_i (the + branch flow
  and its stops), c_i = m_i q_i, so m_i = a_i + c_i, p_i = a_i / m_i, routing pi(k | i, b) = flow / a_i
  or c_i. Figure: the largest entry of M not reproduced; tolerance ``law_tol`` times max(1, max |M|).

The maps are a Markov routing law (``is_law``, the summary) when the LP row and every functional row
(linearity to locality) hold; otherwise ``violated`` lists every failing condition with its figure and
tolerance: the functional ones and the parts of the program's residual (mass off the edges, to units
with no contribution, against the branch sign). Each is necessary for a law, so each listed one is a
reason on its own. Conservation is not: a law need not be conservative (AlphaBeta with alpha - beta
!= 1).

When a law is found, it is compared with the named rules of section 5 fitted to it (AlphaBeta from the
mean hand-over and multiplier, RG(tau) with sigmoid(1/tau) = p, and RG(tau, T) with the route
temperature T fitted by least squares on log pi = (1/T) log|y| + const, RGEq(kappa, nu) by least squares on
logit p = kappa + nu log(S+/|S-|), GradientEquilibrium, AttributionEquilibriumLaw(r)) and with the LRP
zoo (docs/theory.md section 12: Gamma with gamma read off the hand-overs, Epsilon with eps read off the
column sums, ZPlus, Flat, WSquare and zennit's presets), each built exactly by
:func:`backplay.theory.routing_law` on the unrolled net. The named rules whose layer maps equal the
probed ones (``maps``, relative ``tol``) come first: the maps decide which rule it is; among them, and
then among the rest, the nearest is the one with the smallest Hellinger distance (I21, mpmath at 30
digits), ties broken by the smallest hand-over and multiplier differences. Equal maps do not fix how
a stopped mass is handed over (Epsilon's direct stop against a stop in a branch), so a rule can have
a named rule's maps at a Hellinger distance > 0 from it; the summary says so.

Families. The program fits each layer in the signed-branch family of section 5 (:data:`SIGNED`)
and, where that leaves a residual, in the single-branch family (:data:`SINGLE`: p = 1, sign kept,
flows on the edges W != 0 whatever y, as Flat, WSquare and the z^B rule); ``RuleReport.family``
names the family of each layer. Probing and the maps are float64 (the rule's own numbers); the law program's residual is
exact given the probed maps (its entries are entries of M: the minimiser keeps or drops each one, no
arithmetic), the named laws are exact (:mod:`backplay.theory`, rationals or mpmath) and the found
law's kernel rows are normalised in mpmath at 30 digits, so an equal law is at distance 0 to that
precision (not sqrt(float64 eps)). The fitted parameters are reported to 6 decimals.

Identification. The maps fix each neuron's flows and its signed stopped mass, not always which branch
stopped it: a neuron with a bias in one branch and the other branch empty (:attr:`FoundLaw.ambiguous`)
could stop in either, and a rule that reports no stopped mass hides every stop (an empty branch, a
bias). The summary then says at how many neurons the hand-over is not identified, and that the
Hellinger distances are upper bounds: they are computed for the split of the stops closest to each
named rule among those tried (``nearest["bound"]``).

Cost: per layer one batched pass of n_l + 7 + n_{l-1} probes and an LP with one variable per branch
edge: small nets (the unrolled graph of a CNN of a few thousand units is fine).

Rules: any :class:`backplay.rules.LayerRule` (the routing laws, Gradient-type rules, LRP-0,
AttributionEquilibrium whose head is not propagated: those layers are listed as skipped, a user's
rule). A black box is a callable in one of two forms:

* ``fn(model, x, target, layer, upper) -> lower`` (five parameters): the layer map; ``layer`` is the
  torch index l (1..L), ``upper`` a float64 tensor [B, n_l] (a batch of upper relevances), the result
  [B, n_{l-1}]; ``x`` the input with a batch dimension of 1. The sweep starts at R^L = f_target(x)
  e_target. It may return ``(lower, stopped)`` with the signed stopped mass per probe ([B]); without
  it, conservation is the per-layer defect (a stopped mass or a leak) and the hand-over of neurons
  that can stop is not identified (above).
* ``fn(model, x, target) -> [R^0, ..., R^L]`` (three parameters): per-layer relevances only. Checked:
  conservation per layer and support locality (R^{l-1}_k != 0 only where k is joined to a unit with
  R^l_i != 0); the other rows need the layer map and are reported as not checkable.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field
from typing import Any

import cvxpy as cp
import numpy as np
import scipy.sparse as sps
import torch

from ..nets import MLPSpec
from ..rules import (RG, AlphaBeta, AttributionEquilibriumLaw, Epsilon, EpsilonAlpha2Beta1,
                     EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat, Flat, Gamma,
                     GradientEquilibrium, LayerRule, RGEq, Rule, WSquare, ZBox, ZPlus)
from ..numerics.game_programs import solve_problem

__all__ = ["Finding", "FoundLaw", "RuleReport", "validate_rule", "LAW_ROW"]

D = torch.float64
#: the two families of laws validate_rule fits (RuleReport.family)
SIGNED = "signed branches: + on Z > 0 kept, - on Z < 0 flipped (docs/theory.md section 8)"
SINGLE = "single branch: p = 1, sign kept, routing along the edges W != 0 (docs/theory.md section 12)"
LAW_ROW = "Markov law fits M (LP)"  # the finding of the law program (the maps' verdict is is_law)


@dataclass
class Finding:
    """One property: ``holds`` (None: not checkable with this kind of rule), its figure ``worst`` (the
    number the verdict is decided on), the tolerance ``tol`` it is compared with (``holds`` is
    ``worst <= tol``; both in the units the ``detail`` line states), ``where`` the figure occurs (a
    dict: layer = torch index, neuron = flat index, and for CNN layers its (channel, row, col)), and a
    ``detail`` line (what is tested, and any other figure, which never decides the verdict)."""

    name: str
    holds: bool | None
    worst: float | None
    tol: float | None
    where: dict | None
    detail: str
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"property": self.name, "holds": self.holds, "worst": self.worst, "tol": self.tol,
                "where": self.where, "detail": self.detail, **self.extra}


@dataclass
class FoundLaw:
    """The Markov routing law found by the feasibility program, per layer l = 1..L (index l-1; None
    for a layer not examined). Per neuron i of layer l: ``sigma`` the sign of the multiplier,
    ``flow_plus`` / ``flow_minus`` (n_l, n_{l-1}) the flows |m| p pi(k | i, +) and |m| q pi(k | i, -)
    on the branch edges, ``stop_plus`` / ``stop_minus`` (n_l) the stopped masses (times |m|) in the +
    branch (sign kept) and the - branch (sign flipped): cemetery for an empty branch, bias sink for the
    branch of the bias. ``ambiguous``: neurons whose stopped mass could come from either branch (a
    bias in one, the other empty): the maps do not identify their hand-over (the comparison with a
    named rule uses the split closest to it). ``residual``: the program's L1 residual, all layers.

    Derived: :meth:`handover` (p, q, m) and :meth:`routing` (pi(. | i, +), pi(. | i, -))."""

    sigma: list
    flow_plus: list
    flow_minus: list
    stop_plus: list
    stop_minus: list
    ambiguous: list
    residual: float

    def __repr__(self) -> str:
        shown = [l + 1 for l, s in enumerate(self.sigma) if s is not None]
        return f"FoundLaw(layers {shown}, residual {self.residual:.3g})"

    def handover(self, l: int, stop_plus: np.ndarray | None = None, stop_minus: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p, q, m) at layer l, NaN where nothing moves (optionally with other stop splits)."""
        sp_ = self.stop_plus[l - 1] if stop_plus is None else stop_plus
        sm_ = self.stop_minus[l - 1] if stop_minus is None else stop_minus
        a, c = self.flow_plus[l - 1].sum(1) + sp_, self.flow_minus[l - 1].sum(1) + sm_
        m = a + c
        with np.errstate(invalid="ignore", divide="ignore"):
            return (np.where(m > 0, a / m, np.nan), np.where(m > 0, c / m, np.nan),
                    np.where(m > 0, self.sigma[l - 1] * m, np.nan))

    def routing(self, l: int) -> tuple[np.ndarray, np.ndarray]:
        """(pi(k | i, +), pi(k | i, -)) at layer l, rows i (the stops take the rest of each row)."""
        out = []
        for F, st in ((self.flow_plus[l - 1], self.stop_plus[l - 1]), (self.flow_minus[l - 1], self.stop_minus[l - 1])):
            tot = F.sum(1) + st
            out.append(np.where(tot[:, None] > 0, F / np.where(tot > 0, tot, 1)[:, None], 0.0))
        return out[0], out[1]

    def to_dict(self) -> dict:
        def lst(v: np.ndarray) -> list:
            return np.where(np.isfinite(v), v, None).tolist()

        layers = []
        for l in range(1, len(self.sigma) + 1):
            if self.sigma[l - 1] is None:
                layers.append(None)
                continue
            p, q, m = self.handover(l)
            layers.append({"p": lst(p), "q": lst(q), "m": lst(m), "ambiguous": np.nonzero(self.ambiguous[l - 1])[0].tolist()})
        return {"layers": layers, "residual": self.residual}


@dataclass
class RuleReport:
    """The result of :func:`validate_rule`: ``findings`` (one per property), ``law`` (a
    :class:`FoundLaw`: the program's solution, for a rule that is not a law the law closest to its probed
    maps in L1; None without layer maps), ``is_law``, ``nearest`` (dict: rule, hellinger, max_dp, max_dm,
    bound; None when no law), ``candidates`` (every fitted named rule with its distance), ``violated``
    (the conditions that stop the maps from being a law, each with its figure and tolerance, empty
    when they are one), ``skipped`` layers and ``notes``.

    Identification: ``stops_reported`` (the rule reports its stopped mass per layer) and
    ``unidentified`` (how many neurons reached by the probes have a hand-over the maps do not
    identify: with reported stops, the :attr:`FoundLaw.ambiguous` ones; without, every neuron with a
    place to stop mass, an empty branch or a bias, since its stop is invisible). When it is not 0 the
    Hellinger distances are upper bounds (``bound``): they are computed for the split of the stops
    closest to each named rule among those tried, and another law with the same maps may be nearer.

    ``family``: the family of laws the maps were fitted in: :data:`SIGNED` (section 5: + branch on
    the edges with Z_ij > 0, - branch on Z_ij < 0) or, when the maps are not one of those but keep the
    sign on every edge, :data:`SINGLE` (docs/theory.md section 12: p = 1, routing along the edges
    W_ij != 0 whatever Z_ij, as Flat and WSquare)."""

    rule: str
    net: str
    target: int
    findings: list
    law: FoundLaw | None
    nearest: dict | None
    candidates: list = field(default_factory=list)
    violated: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    stops_reported: bool = False
    unidentified: int = 0
    family: str = SIGNED

    def finding(self, name: str) -> Finding:
        """The finding called ``name`` (KeyError otherwise)."""
        for f in self.findings:
            if f.name == name:
                return f
        raise KeyError(f"no finding {name!r}; have {[f.name for f in self.findings]}")

    @property
    def is_law(self) -> bool:
        return self.law is not None and not self.violated

    def to_dict(self) -> dict:
        return {"rule": self.rule, "net": self.net, "target": self.target,
                "findings": [f.to_dict() for f in self.findings], "is_law": self.is_law,
                "violated": self.violated, "law": None if self.law is None else self.law.to_dict(),
                "nearest": self.nearest, "candidates": self.candidates, "skipped": self.skipped,
                "stops_reported": self.stops_reported, "unidentified": self.unidentified,
                "family": self.family, "notes": self.notes}

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **{"indent": 2, **kw})

    def _rows(self) -> list[tuple[str, ...]]:
        rows = []
        for f in self.findings:
            status = "n/a" if f.holds is None else ("yes" if f.holds else "NO")
            worst = "-" if f.worst is None else f"{f.worst:.3g}"
            tol = "-" if f.tol is None else f"{f.tol:.3g}"
            where = "-" if not f.where else ", ".join(f"{k} {v}" for k, v in f.where.items())
            rows.append((f.name, status, worst, tol, where, f.detail))
        return rows

    def _summary(self) -> list[str]:
        out = []
        if self.is_law:
            n = self.nearest
            rel = "<=" if n is not None and n.get("bound") else "="
            out.append(f"Markov routing law: yes ({self.family})" + ("" if n is None else
                       f"; nearest named rule {n['rule']} (Hellinger {rel} {n['hellinger']:.3g}, "
                       f"max |dp| {n['max_dp']:.3g}, max |dm| {n['max_dm']:.3g}, "
                       f"max |dM| {n['maps']:.3g})"))
            if n is not None and n["maps"] <= n["maps_tol"]:
                out.append(f"  the rule's layer maps are those of {n['rule']} (max |dM| {n['maps']:.3g} <= "
                           f"{n['maps_tol']:.3g})" + ("" if n["hellinger"] <= 1e-9 else
                           "; the path law the program found hands over the stopped mass another way "
                           "(the maps do not identify it), hence Hellinger > 0"))
            same = [c["rule"] for c in self.candidates[1:] if n is not None
                    and ((n["maps"] <= n["maps_tol"] and c["maps"] <= c["maps_tol"])
                         or (abs(c["hellinger"] - n["hellinger"]) <= 1e-9 and c["max_dp"] <= n["max_dp"] + 1e-6
                             and c["max_dm"] <= n["max_dm"] + 1e-6))]
            if same:
                out.append("  the same law: " + ", ".join(same))
            if self.unidentified:
                why = ("stopped mass that could come from either branch: a bias in one, the other empty"
                       if self.stops_reported else "the rule reports no stopped mass, so a stop at an empty "
                       "branch or a bias is invisible")
                out.append(f"  hand-over not identified at {self.unidentified} neuron(s) ({why}): the "
                           "Hellinger distances are upper bounds (the split of the stops closest to each "
                           "named rule among those tried; another law with the same maps may be nearer)")
        else:
            out.append("Markov routing law: no; violated: " + (", ".join(self.violated) or "-"))
        if self.skipped:
            out.append("skipped layers: " + "; ".join(self.skipped))
        out += self.notes
        return out

    def __str__(self) -> str:
        head = ("property", "holds", "figure", "tol", "where", "detail")
        rows = self._rows()
        widths = [max(len(r[c]) for r in [head] + rows) for c in range(5)]
        fmt = "  ".join("{:<%d}" % w for w in widths) + "  {}"
        lines = [f"validate_rule: {self.rule} on {self.net}, target {self.target} "
                 "(holds: figure <= tol)",
                 fmt.format(*head), fmt.format(*("-" * w for w in widths), "-" * 6)]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines + self._summary())

    def __repr__(self) -> str:
        held = sum(f.holds is True for f in self.findings)
        if self.is_law:
            n = self.nearest
            verdict = "a Markov routing law" + ("" if n is None else f", nearest {n['rule']} (Hellinger "
                                                                  f"{'<=' if n.get('bound') else '='} "
                                                                  f"{n['hellinger']:.3g})")
        else:
            verdict = f"not a law ({len(self.violated)} condition(s) violated)"
        return (f"RuleReport(rule={self.rule!r}, net={self.net!r}, target={self.target}: {verdict}; "
                f"{held} of {len(self.findings)} properties hold; print() it for the table)")

    def _repr_markdown_(self) -> str:
        lines = [f"**validate_rule**: `{self.rule}` on {self.net}, target {self.target} (holds: figure <= tol)",
                 "", "| property | holds | figure | tol | where | detail |", "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(r) + " |" for r in self._rows()]
        return "\n".join(lines + [""] + [f"- {s}" for s in self._summary()])


# -- the probe ---------------------------------------------------------------------------------------
class _Probe:
    """The rule's layer maps on the explained pass, batched (see the module docstring)."""

    def __init__(self, rule: Any, model: Any, x: torch.Tensor, target: int) -> None:
        from ..gpu.engine import prepare
        from .external import LayerMap, as_layer_map

        rule = as_layer_map(rule, model) or rule  # a zennit Composite / captum LRP -> its layer maps (I23)
        # a black box that reports its per-probe defect as the stopped mass: conservation is then
        # true by construction and is not a finding
        self.stops_inferred = isinstance(rule, LayerMap) and rule.stopped
        self.rule, self.model, self.target = rule, model, target
        self.prep = prepare(model, x)
        self.x = self.prep.x  # [1, ...]
        self.kind = "layer_rule" if isinstance(rule, LayerRule) else _callable_kind(rule)
        # rules that report a transformed view of the swept measure (GradientXInput: y times the
        # gradient) are probed on the swept measure, the thing their layer maps move
        self.transformed = self.kind == "layer_rule" and (
            type(rule).view is not LayerRule.view or type(rule).finish is not LayerRule.finish)
        self._traces: dict = {}
        self._maps: dict = {}
        if self.kind == "layer_rule":
            try:
                self.layer_map(1)
            except NotImplementedError as exc:
                raise TypeError(f"{exc}: validate_rule needs the rule's layer maps on the explained pass "
                                "(for SoftplusGame: validate GradientXInput on the softplus_eps net)") from None

    def layer_map(self, n: int) -> Any:
        """The rule's public layer map (:meth:`LayerRule.layer_map`) on the pass repeated n times."""
        if n not in self._maps:
            self._maps[n] = self.rule.layer_map(self.trace(n), torch.full((n,), self.target, dtype=torch.long))
        return self._maps[n]

    def trace(self, n: int) -> Any:
        if n not in self._traces:
            self._traces[n] = self.prep.trace(x=self.x.expand((n,) + tuple(self.x.shape[1:])).clone())
        return self._traces[n]

    def sweep(self) -> tuple[list, float | None]:
        """(R^0..R^L flattened, numpy, NaN where not propagated; total stopped or None)."""
        tr = self.trace(1)
        if self.kind == "layer_rule":
            t = torch.tensor([self.target])
            if self.transformed:  # the swept measure itself, layer by layer (not the reported view)
                r = self.rule.start(tr, t).reshape(1, -1)
                rel = [r.reshape(-1).numpy().copy()]
                for l in range(len(tr.layers), 0, -1):
                    r, _ = self.apply(l, r)
                    rel.insert(0, r.reshape(-1).numpy().copy())
                return rel, None
            sw = self.rule.sweep(tr, t, keep_layers=True)
            rel = [r.reshape(-1).detach().numpy().astype(np.float64) for r in sw.layers]
            return rel, None if sw.stopped is None else float(sw.stopped[0])
        if self.kind == "relevances":
            rel = [np.asarray(torch.as_tensor(r, dtype=D).reshape(-1)) for r in
                   self.rule(self.model, self.x, self.target)]
            if len(rel) != len(tr.layers) + 1:
                raise ValueError(f"the rule returned {len(rel)} layers, the net has {len(tr.layers) + 1}")
            return rel, None
        r = torch.zeros_like(tr.output)
        r[0, self.target] = tr.output[0, self.target]
        rel = [r.reshape(-1).numpy().copy()]
        for l in range(len(tr.layers), 0, -1):
            r, _ = self.apply(l, r.reshape(1, -1))
            rel.insert(0, r.reshape(-1).numpy().copy())
        return rel, None

    def apply(self, l: int, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """F_l on a batch U [N, n_l]: (lower [N, n_{l-1}], stopped [N] or None)."""
        N = U.shape[0]
        if self.kind == "layer_map":
            out = self.rule(self.model, self.x, self.target, l, U)
            st = None
            if isinstance(out, tuple):
                out, st = out
                st = torch.as_tensor(st, dtype=D).reshape(N)
            return torch.as_tensor(out, dtype=D).reshape(N, -1), st
        low, st = self.layer_map(N)(self.trace(N).layers[l - 1], U.clone())
        return low.reshape(N, -1), (None if st is None else st.reshape(N))


def _selection_rows(frozen: Any, l: int) -> np.ndarray:
    """Rows of layer l that select one unit (max-pool and copy rows): relevance goes there whatever y."""
    n = np.asarray(frozen.weights[l - 1]).shape[0]
    return np.array([frozen.selects(l, i) for i in range(n)], dtype=bool)


def _contributions(frozen: Any, l: int) -> np.ndarray:
    """Z_ij = W_ij y_j of layer l, with the selection rows' weights themselves (a selection routes to
    its unit whatever the value there)."""
    W = np.asarray(frozen.weights[l - 1], dtype=np.float64)
    Z = W * np.asarray(frozen.ys[l - 1], dtype=np.float64)[None, :]
    sel = _selection_rows(frozen, l)
    Z[sel] = W[sel]
    return Z


def _stop_places(frozen: Any, l: int) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron of layer l: whether its + branch, its - branch can stop mass (an empty branch: the
    cemetery; the branch of its bias: the bias sink), docs/theory.md section 8."""
    Z = _contributions(frozen, l)
    b = frozen.biases[l - 1]
    b = np.zeros(Z.shape[0]) if b is None else np.asarray(b, dtype=np.float64)
    return ~(Z > 0).any(1) | (b > 0), ~(Z < 0).any(1) | (b < 0)


def _callable_kind(rule: Any) -> str:
    if isinstance(rule, Rule):
        raise TypeError(f"{type(rule).__name__} is not a LayerRule: validate_rule needs its layer maps "
                        "(wrap it as a callable, see the docstring)")
    if not callable(rule):
        raise TypeError(f"rule must be a backplay LayerRule or a callable, got {type(rule).__name__}")
    n = len([p for p in inspect.signature(rule).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
    if n == 5:
        return "layer_map"
    if n == 3:
        return "relevances"
    raise TypeError("a callable rule takes (model, x, target, layer, upper) -> lower or "
                    f"(model, x, target) -> [R^0, ..., R^L]; got {n} parameters")


def _where(l: int, k: int, shape: tuple) -> dict:
    out: dict = {"layer": int(l), "neuron": int(k)}
    if len(shape) > 1:
        out["index"] = tuple(int(v) for v in np.unravel_index(int(k), shape))
    return out


def _worst(diffs: list) -> tuple[float, dict | None]:
    """diffs: (layer, vector, shape) -> (max |v|, where)."""
    best, where = 0.0, None
    for l, v, shape in diffs:
        if v.size == 0:
            continue
        k = int(np.argmax(np.abs(v)))
        if where is None or abs(v[k]) > best:
            best, where = float(abs(v[k])), _where(l, k, shape)
    return best, where


# -- the law program ---------------------------------------------------------------------------------
def _law_program(Ms: dict, stops: dict, frozen: Any, solver: str) -> tuple[FoundLaw, dict, float]:
    """Per layer l in Ms: the LP of the module docstring (cvxpy). Returns the law, the per-layer
    residual matrices E_l (n_{l-1}, n_l) and the total L1 residual.

    The program is separable: each entry of M is matched by the flow on its edge (or not at all), and
    the stopped masses only have to add up to the reported ones. So the solver's flows are polished to
    the exact minimiser (the projection of M on the branch signs) once the program has certified the
    residual, and the stops are split in closed form (the natural stops of each neuron first)."""
    L = frozen.depth
    law = FoundLaw(*([None] * L for _ in range(6)), residual=0.0)
    residuals: dict = {}
    total = 0.0
    for l in range(1, L + 1):
        if l not in Ms:
            continue
        M = Ms[l]  # (n_{l-1}, n_l): column i = F_l(e_i)
        W = np.asarray(frozen.weights[l - 1], dtype=np.float64)
        Z = _contributions(frozen, l)  # (n_l, n_{l-1})
        n_up, n_low = W.shape
        ep, em = np.argwhere(Z > 0), np.argwhere(Z < 0)  # branch edges (i, k)
        # the orientation of each neuron: the sign of its multiplier (negative where p < q, e.g. the
        # gradient equilibrium at z_i < 0), read off the column
        plus_mass = np.where((Z > 0).T, M, 0.0).sum(0)
        minus_mass = np.where((Z < 0).T, M, 0.0).sum(0)
        sigma = np.where(plus_mass - minus_mass < 0, -1.0, 1.0)
        cols = []
        for e, sgn in ((ep, 1.0), (em, -1.0)):
            cols.append(sps.csr_matrix((sgn * sigma[e[:, 0]], (e[:, 1] * n_up + e[:, 0], np.arange(len(e)))),
                                       shape=(n_low * n_up, len(e))))
        A = sps.hstack(cols).tocsr()
        f = cp.Variable(A.shape[1], nonneg=True)
        problem = cp.Problem(cp.Minimize(cp.norm1(M.ravel() - A @ f)))
        solve_problem(problem, solver, None, f"law program, layer {l}")
        # polish: the exact minimiser on the same support
        SM = sigma[None, :] * M  # oriented columns
        Fp = np.where((Z > 0) & (SM.T > 0), SM.T, 0.0)
        Fm = np.where((Z < 0) & (SM.T < 0), -SM.T, 0.0)
        E = M - (sigma[:, None] * (Fp - Fm)).T
        lp_res = float(problem.value)
        if abs(lp_res - np.abs(E).sum()) > 1e-6 * max(1.0, float(np.abs(M).sum())):
            raise RuntimeError(f"law program, layer {l}: solver residual {lp_res} differs from the exact "
                               f"minimiser's {np.abs(E).sum()}")
        residuals[l] = E
        total += float(np.abs(E).sum())
        nat_p, nat_m = _stop_places(frozen, l)
        s_or = np.zeros(n_up) if stops.get(l) is None else sigma * stops[l]  # oriented stopped mass
        st_p = np.where(s_or > 0, s_or, 0.0)
        st_m = np.where(s_or < 0, -s_or, 0.0)
        # a stop of the wrong side for a neuron with only the other natural side: the whole token
        # stopped (p = q); kept on the side of its sign
        law.sigma[l - 1], law.flow_plus[l - 1], law.flow_minus[l - 1] = sigma, Fp, Fm
        law.stop_plus[l - 1], law.stop_minus[l - 1] = st_p, st_m
        law.ambiguous[l - 1] = nat_p & nat_m & (s_or != 0)
    law.residual = total
    return law, residuals, total


def _single_branch(Ms: dict, stops: dict, frozen: Any) -> tuple[FoundLaw, dict]:
    """The single-branch law of the probed maps (docs/theory.md section 12, Flat and WSquare): per neuron
    the orientation sigma_i (the sign of its column sum), p = 1, flows sigma_i M_ki >= 0 on the edges
    W_ik != 0, the stopped mass (times |m|) in the + branch; the residual is what such flows cannot
    reproduce (mass off the edges, mass of the other sign). Closed form: the program separates per
    entry."""
    L = frozen.depth
    law = FoundLaw(*([None] * L for _ in range(6)), residual=0.0)
    residuals: dict = {}
    for l, M in Ms.items():
        W = np.asarray(frozen.weights[l - 1], dtype=np.float64)  # (n_up, n_low)
        sigma = np.where(M.sum(0) < 0, -1.0, 1.0)
        SM = (sigma[None, :] * M).T  # (n_up, n_low), oriented
        Fp = np.where((W != 0) & (SM > 0), SM, 0.0)
        residuals[l] = M - (sigma[:, None] * Fp).T
        st = np.zeros(W.shape[0]) if stops.get(l) is None else sigma * stops[l]
        law.sigma[l - 1], law.flow_plus[l - 1], law.flow_minus[l - 1] = sigma, Fp, np.zeros_like(Fp)
        law.stop_plus[l - 1], law.stop_minus[l - 1] = np.clip(st, 0, None), np.clip(-st, 0, None)
        law.ambiguous[l - 1] = np.zeros(W.shape[0], dtype=bool)
    law.residual = sum(float(np.abs(E).sum()) for E in residuals.values())
    return law, residuals


# -- named rules ---------------------------------------------------------------------------------------
def _split_for(law: FoundLaw, l: int, p_target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stops of layer l with the ambiguous neurons split so that p is closest to ``p_target``: with
    F+, F- the branch flows and s = stop+ - stop- fixed, stop- = t solves (1-p)(F+ + s + t) = p(F- + t)."""
    sp_, sm_ = law.stop_plus[l - 1].copy(), law.stop_minus[l - 1].copy()
    Fp, Fm = law.flow_plus[l - 1].sum(1), law.flow_minus[l - 1].sum(1)
    for i in np.nonzero(law.ambiguous[l - 1])[0]:
        p = p_target[i]
        s = sp_[i] - sm_[i]
        if not np.isfinite(p) or p == 0.5:
            continue
        t = (p * Fm[i] - (1 - p) * (Fp[i] + s)) / (1 - 2 * p)
        t = max(t, 0.0, -s)
        sp_[i], sm_[i] = s + t, t
    return sp_, sm_


def _trajectory(law: FoundLaw, frozen_exact: Any, target: int, splits: dict) -> Any:
    """The found law as a :class:`backplay.theory.routing.TrajectoryLaw` (mpmath), for I21;
    ``splits[l]`` the stops of layer l (see :func:`_split_for`)."""
    from ..theory.routing import BIAS_SINK, CEMETERY, Move, TrajectoryLaw, LawArith

    class Found(TrajectoryLaw):
        def __init__(self) -> None:
            self.net, self.target, self.arith = frozen_exact, target, LawArith("mpmath", 30)

        def moves(self, state: tuple) -> list:
            l, i, s = state
            A = self.arith
            if law.sigma[l - 1] is None:
                return [Move(CEMETERY, A.num(1), A.num(0), s)]
            sp_, sm_ = splits[l]
            Fp, Fm = law.flow_plus[l - 1][i], law.flow_minus[l - 1][i]
            # the flows as numbers of the field, normalised there: each row of the kernel sums to 1
            # to the field's precision (not float64's), so that the distance to an equal named law is 0
            # to that precision, not sqrt(float64 eps)
            b = frozen_exact.biases[l - 1]
            flows = []
            for sgn, F, st in ((1, Fp, sp_[i]), (-1, Fm, sm_[i])):
                flows += [((l - 1, int(k), s * sgn), A.num(F[k]), s * sgn) for k in np.nonzero(F)[0]]
                if st > 0:
                    sink = b is not None and b[i] != 0 and (b[i] > 0) == (sgn > 0)
                    flows.append((BIAS_SINK if sink else CEMETERY, A.num(st), s * sgn))
            m = sum((v for _, v, _ in flows), A.num(0))
            if m == 0:
                return [Move(CEMETERY, A.num(1), A.num(0), s)]
            mult = A.num(law.sigma[l - 1][i]) * m
            return [Move(to, v / m, mult, sign) for to, v, sign in flows]

    return Found()


def _candidates(law: FoundLaw, frozen: Any, Ms: dict) -> list:
    """Named rules to compare with the found law: those of section 5 fitted to it (identified neurons
    with both branches), Gamma with gamma read off the hand-overs (I22), Epsilon with eps read off
    the column sums (:func:`_epsilon_fit`), the zoo's parameter-free laws and zennit's presets at
    their defaults, and ZBox / EpsilonGammaBox at the bounds read off the first layers
    (:func:`_box_fit`) (docs/theory.md section 12)."""
    ps, ms, lo_x, lo_y, gam = [], [], [], [], []
    for l in Ms:
        W = np.asarray(frozen.weights[l - 1], dtype=np.float64)
        Z = W * np.asarray(frozen.ys[l - 1], dtype=np.float64)[None, :]
        b = frozen.biases[l - 1]
        if b is not None:
            Z = np.concatenate([Z, np.asarray(b, dtype=np.float64)[:, None]], 1)
        Sp, Sn = np.clip(Z, 0, None).sum(1), np.clip(Z, None, 0).sum(1)
        p, _, m = law.handover(l)
        both = (Sp > 0) & (Sn < 0) & np.isfinite(p) & ~law.ambiguous[l - 1] & (np.abs(Ms[l]).sum(0) > 0)
        ps += list(p[both])
        ms += list(m[both])
        inner = both & (p > 0) & (p < 1)
        lo_x += list(np.log(Sp[inner] / -Sn[inner]))
        lo_y += list(np.log(p[inner] / (1 - p[inner])))
        # LRP-gamma (I22): log-odds(p) = sign(z) log(1 + gamma) + log(S+/|S-|), bias in its branch
        odds = p[inner] / (1 - p[inner]) * (-Sn[inner] / Sp[inner])
        gam += list(np.where(Sp[inner] + Sn[inner] > 0, odds, 1 / odds) - 1)
    # route temperature: log(pi(k | i, b) / |W_ik|) = (1/T) log|y_k| + c_(i,b), pooled within groups
    gx, gy = [], []
    for l in Ms:
        if frozen.kinds[l - 1] == "maxpool":
            continue
        W = np.asarray(frozen.weights[l - 1], dtype=np.float64)
        W = W * ~_selection_rows(frozen, l)[:, None]  # selection and copy rows route by no temperature
        ly = np.log(np.abs(np.asarray(frozen.ys[l - 1], dtype=np.float64)) + (frozen.ys[l - 1] == 0))
        for F in law.flow_plus[l - 1], law.flow_minus[l - 1]:
            for i in range(F.shape[0]):
                ks = np.nonzero(F[i] > 0)[0]
                if len(ks) >= 2 and np.ptp(ly[ks]) > 0:
                    v = np.log(F[i, ks] / np.abs(W[i, ks]))
                    gx += list(ly[ks] - ly[ks].mean())
                    gy += list(v - v.mean())
    temp = 1.0
    if gx and np.dot(gx, gx) > 0:
        slope = float(np.dot(gx, gy) / np.dot(gx, gx))
        if slope > 0 and abs(slope - 1) > 1e-6:
            temp = round(1 / slope, 6)
    out: list = [GradientEquilibrium()]
    if ps:
        pbar, mbar = float(np.mean(ps)), float(np.mean(ms))
        a, b = mbar * pbar, mbar * (1 - pbar)
        if a >= 0 and b >= 0 and a + b > 0:
            out.append(AlphaBeta(round(a, 6), round(b, 6), conservative=False))
        if 0.5 < pbar < 1:
            out.append(RG(tau=round(1 / math.log(pbar / (1 - pbar)), 6)))
            if temp != 1.0:
                out.append(RG(tau=round(1 / math.log(pbar / (1 - pbar)), 6), route_temp=temp))
            r = (2 * pbar - 1) / (1 - pbar)
            if r > 0:
                out.append(AttributionEquilibriumLaw(round(r, 6)))
    if len(lo_x) >= 2 and np.ptp(lo_x) > 0:
        nu, kappa = np.polyfit(lo_x, lo_y, 1)
        if nu >= 0:
            out.append(RGEq(kappa=round(float(kappa), 6), nu=round(float(nu), 6)))
    if gam and float(np.median(gam)) > 1e-9:
        out.append(Gamma(gamma=_sig6(float(np.median(gam)))))
    eps = _epsilon_fit(frozen, Ms)
    if eps is not None:
        out.append(Epsilon(eps))
    # the zoo's parameter-free laws and zennit's presets at their defaults (docs/theory.md section 12)
    out += [ZPlus(), Flat(), WSquare(), EpsilonPlus(), EpsilonPlusFlat(), EpsilonAlpha2Beta1(),
            EpsilonAlpha2Beta1Flat()]
    box = _box_fit(frozen, Ms)
    if box is not None:  # the box rule at the bounds read off the first layers' maps
        out.append(EpsilonGammaBox(*box))
        if all(frozen.first):  # ZBox alone applies only where every layer reads the input
            out.append(ZBox(*box))
    return out


def _box_fit(frozen: Any, Ms: dict) -> tuple[float, float] | None:
    """(low, high) of the z^B rule read off the maps of the first layers (docs/theory.md section 12): its
    column i is c_ij / D_i with c_ij = y_j W_ij - low W+_ij - high W-_ij, so M_ji D_i + low W+_ij +
    high W-_ij = y_j W_ij is linear in (D_i, low, high); least squares over the first layers' units
    with a nonzero column. Scalar bounds only (per-channel bounds do not fit and are not named). None
    when no first layer has such units, the fit leaves a residual (relative 1e-9), or the input is not
    inside the fitted box."""
    rows, rhs, n_units, cols = [], [], 0, []
    for l, M in Ms.items():
        if not frozen.first[l - 1]:
            continue
        W = np.asarray(frozen.weights[l - 1], dtype=np.float64)
        y = np.asarray(frozen.ys[l - 1], dtype=np.float64)
        for i in np.nonzero(np.abs(M).sum(0) > 0)[0]:
            for j in np.nonzero(W[i] != 0)[0]:
                rows.append((n_units, M[j, i], max(W[i, j], 0.0), min(W[i, j], 0.0)))
                rhs.append(y[j] * W[i, j])
            n_units += 1
        cols.append(y)
    if not rows or n_units + 2 > len(rows):
        return None
    A = np.zeros((len(rows), n_units + 2))
    for r, (u, m, wp, wn) in enumerate(rows):
        A[r, u], A[r, -2], A[r, -1] = m, wp, wn
    sol, *_ = np.linalg.lstsq(A, np.array(rhs), rcond=None)
    if np.abs(A @ sol - rhs).max() > 1e-9 * max(1.0, np.abs(rhs).max()):
        return None
    low, high = _sig6(float(sol[-2])), _sig6(float(sol[-1]))
    ys = np.concatenate(cols)
    if not low <= high or ys.min() < low or ys.max() > high:
        return None
    return low, high


def _sig6(v: float) -> float:
    return float(f"{v:.6g}")


def _epsilon_fit(frozen: Any, Ms: dict) -> float | None:
    """eps of LRP-epsilon from the probed maps (docs/theory.md section 12): a unit's column of M sums to
    (z_i - b_i) / (z_i + eps sign z_i), so eps_i = sign(z_i) ((z_i - b_i) / colsum_i - z_i); the median
    over the units with z_i != 0 and a nonzero column (None when no unit gives a positive eps)."""
    found = []
    for l, M in Ms.items():
        W = np.asarray(frozen.weights[l - 1], dtype=np.float64)
        b = np.zeros(W.shape[0]) if frozen.biases[l - 1] is None else np.asarray(frozen.biases[l - 1], dtype=np.float64)
        zb = W @ np.asarray(frozen.ys[l - 1], dtype=np.float64)
        z, col = zb + b, M.sum(0)
        ok = (z != 0) & (np.abs(col) > 1e-12) & ~_selection_rows(frozen, l)
        found += list(np.sign(z[ok]) * (zb[ok] / col[ok] - z[ok]))
    if not found:
        return None
    eps = float(np.median(found))
    return _sig6(eps) if eps > 1e-12 else None


def _compare(law: FoundLaw, frozen: Any, target: int, Ms: dict, maps_tol: float) -> tuple[dict | None, list]:
    """Every fitted named rule with its Hellinger distance (I21) to the found law, the largest
    hand-over and multiplier differences at the neurons the probes reach and the largest difference
    of its layer maps from the probed ones (``maps``); the named rules whose maps are the probed ones
    (``maps <= maps_tol``) first, then the nearest."""
    from ..theory.routing import exact_net, hellinger, routing_law

    exact = exact_net(frozen)
    rows = []
    for cand in _candidates(law, frozen, Ms):
        named = routing_law(frozen, target=target, rule=cand, field="mpmath", dps=30)
        splits, dp, dm = {}, 0.0, 0.0
        for l in range(1, frozen.depth + 1):
            if law.sigma[l - 1] is None:
                continue
            ks = [named.kernel(l, i) for i in range(frozen.widths[l])]
            p_named = np.array([np.nan if k.stopped else float(k.p) for k in ks])
            splits[l] = _split_for(law, l, p_named)
            p, _, m = law.handover(l, *splits[l])
            for i, k in enumerate(ks):
                if k.stopped or not np.isfinite(p[i]) or not np.abs(Ms[l][:, i]).sum() > 0:
                    continue
                dp = max(dp, abs(float(k.p) - p[i]))
                dm = max(dm, abs(float(k.m) - m[i]))
        found = _trajectory(law, exact, target, splits)
        maps = max((float(np.abs(M - _law_map(named, l, M.shape)).max(initial=0.0)) for l, M in Ms.items()),
                   default=0.0)
        rows.append({"rule": cand.name, "hellinger": float(hellinger(found, named)), "max_dp": dp, "max_dm": dm,
                     "maps": maps, "maps_tol": maps_tol})
    # the named rules whose layer maps are the probed ones first (the maps decide which rule it is;
    # the path law behind them is identified up to how stopped mass is handed over), then by distance
    rows.sort(key=lambda r: (r["maps"] > r["maps_tol"], round(r["hellinger"], 6), r["max_dm"] + r["max_dp"]))
    return (rows[0] if rows else None), rows


def _law_map(named: Any, l: int, shape: tuple) -> np.ndarray:
    """The layer map of an exact law at layer l as a matrix (n_{l-1}, n_l): column i is
    m_i (p_i pi(. | i, +) - q_i pi(. | i, -)) (the bias sink, the cemetery and the stop are not in it)."""
    from ..theory.routing import BIAS

    M = np.zeros(shape)
    for i in range(shape[1]):
        k = named.kernel(l, i)
        if k.stopped:
            continue
        for b, pb in ((1, k.p), (-1, k.q)):
            for unit, pr in k.routing[b].items():
                if unit != BIAS:
                    M[unit, i] += float(b * k.m * pb * pr)
    return M


# -- the entry point -----------------------------------------------------------------------------------
def validate_rule(rule: Any, spec_or_model: Any, x: Any, target: int, tol: float = 1e-9,
                  law_tol: float = 1e-6, solver: str = "CLARABEL", compare: bool = True) -> RuleReport:
    """Validate ``rule`` on one explained forward pass (docs/theory.md section 13, "Rule validation").

    Args:
        rule: a :class:`backplay.rules.LayerRule` or a callable (two forms, module docstring).
        spec_or_model: an :class:`backplay.MLPSpec` or an ``nn.Module`` the reader takes whose layers
            form a chain (no residual sum, no branch: ValueError); run in float64, never modified.
        x: ONE input (the shape of a single sample).
        target: the explained output.
        tol: relative tolerance (times max(1, |scale|)) of the float64 checks.
        law_tol: relative tolerance of the law program's residual (the solver's accuracy).
        solver: the cvxpy solver of the law program.
        compare: fit the named rules and compute the Hellinger distances when a law is found.

    Returns:
        A :class:`RuleReport` (print it, or ``to_dict()`` / ``to_json()``).
    """
    from ..gpu.engine import check_rule_instance
    from ..gpu.unroll import unroll

    check_rule_instance(rule)
    if isinstance(spec_or_model, MLPSpec):
        model = spec_or_model.to_torch(dtype=D)
        net_name = f"MLP {list(spec_or_model.widths)}"
    elif isinstance(spec_or_model, torch.nn.Module):
        model = spec_or_model
        net_name = type(model).__name__
    else:
        raise TypeError(f"spec_or_model must be an MLPSpec or an nn.Module, got {type(spec_or_model).__name__}")
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64) if not isinstance(x, torch.Tensor) else x).to(D)
    if not isinstance(target, (int, np.integer)) or isinstance(target, bool):
        raise TypeError(f"target must be an int, got {type(target).__name__}")
    frozen = unroll(model, xt)
    if not 0 <= int(target) < frozen.widths[-1]:
        raise ValueError(f"target {target} out of range for {frozen.widths[-1]} outputs")
    target = int(target)
    probe = _Probe(rule, model, xt[None], target)
    chain = probe.trace(1)
    if frozen.depth != len(chain.layers) or len(chain.cuts) != len(chain.layers) - 1:
        raise ValueError("validate_rule probes the layer maps of a chain of layers (MLPs, VGG-like CNNs); "
                         f"{net_name} has skips or branches (a residual sum, a cat): check the rule on it with "
                         "backplay.testing.torch_error (a law of backplay's) or validate it on a chain")
    rule = probe.rule
    name = rule.name if isinstance(rule, Rule) else getattr(rule, "__name__", type(rule).__name__)
    rel, stopped_total = probe.sweep()
    L = frozen.depth
    shapes = [tuple(probe.trace(1).x.shape[1:])] + [tuple(it.y.shape[1:]) for it in probe.trace(1).layers]
    edges = [None] + [np.asarray(frozen.weights[l - 1]) != 0 for l in range(1, L + 1)]  # (n_l, n_{l-1})
    layers = [l for l in range(1, L + 1) if np.all(np.isfinite(rel[l]))]
    skipped = [f"layer {l} (the rule does not propagate it: relevance above its start)"
               for l in range(1, L + 1) if l not in layers]
    report = RuleReport(name, net_name, target, [], None, None, skipped=skipped)
    if probe.transformed:
        report.notes.append("the rule reports a transformed view of its swept measure (view / finish): "
                            "the layer maps are probed on the swept measure, e.g. the gradient for "
                            "GradientXInput")

    # the probes, per layer (module docstring)
    cons = []
    Ms: dict = {}
    stops: dict = {}
    checks: dict = {k: [] for k in ("lin", "add", "hom", "canc", "sign", "loc", "loc_unit", "neuron",
                                    "annihilated")}
    for l in layers:
        R = rel[l]
        scale = max(1.0, float(np.abs(R).max()))
        if probe.kind == "relevances":
            low = rel[l - 1]
            support = edges[l][R != 0].any(0) if R.any() else np.zeros(len(low), dtype=bool)
            checks["loc"].append((l - 1, np.where(support, 0.0, low) / scale, shapes[l - 1]))
            cons.append((l, float(R.sum() - low.sum()), None))
            continue
        n_up = len(R)
        Rt = torch.tensor(R, dtype=D)
        # an independent probe of the same size (seeded: the report reproduces), for additivity
        Ra = torch.tensor(np.random.default_rng(l).standard_normal(n_up) * scale, dtype=D)
        restrict = torch.tensor(edges[l].T, dtype=D) * Rt[None, :]  # (n_low, n_up): R on k's neighbours
        U = torch.cat([torch.eye(n_up, dtype=D), Rt[None], 3 * Rt[None], -Rt[None], Rt.clamp_min(0)[None],
                       Rt.clamp_max(0)[None], Ra[None], (Rt + Ra)[None], restrict])
        low, st = probe.apply(l, U)
        low = low.detach().numpy()
        st = None if st is None else st.detach().numpy()
        M, (F, F3, Fneg, Fp, Fn, Fa, FRa) = low[:n_up].T, low[n_up:n_up + 7]
        Floc = low[n_up + 7:]
        Ms[l], stops[l] = M, (None if st is None else st[:n_up])
        s_R = 0.0 if st is None else float(st[n_up])
        cons.append((l, float(R.sum() - F.sum() - s_R), None if st is None else s_R))
        col = 1 - M.sum(0) - (0 if st is None else st[:n_up])
        checks["neuron"].append((l, R * col, shapes[l]))
        checks["lin"].append((l - 1, (F - M @ R) / scale, shapes[l - 1]))
        checks["add"].append((l - 1, (FRa - F - Fa) / scale, shapes[l - 1]))
        checks["hom"].append((l - 1, (F3 - 3 * F) / scale, shapes[l - 1]))
        checks["canc"].append((l - 1, (Fp + Fn - F) / scale, shapes[l - 1]))
        checks["annihilated"].append((l - 1, (np.abs(Fp) + np.abs(Fn) - np.abs(Fp + Fn)) / 2, shapes[l - 1]))
        checks["sign"].append((l - 1, (Fneg + F) / scale, shapes[l - 1]))
        checks["loc"].append((l - 1, (np.diagonal(Floc) - F) / scale, shapes[l - 1]))
        off = np.where(edges[l].T, 0.0, M)
        checks["loc_unit"].append((l - 1, np.abs(off).max(1, initial=0.0), shapes[l - 1]))
        if not np.all(np.isfinite(low)):
            report.notes.append(f"layer {l}: the layer map returned non-finite values")

    # conservation (I14): per layer, and per neuron (the unit probes)
    top = rel[max(layers)] if layers else rel[L]
    c_tol = tol * max(1.0, float(np.abs(top).sum()))
    w = max(cons, key=lambda c: abs(c[1])) if cons else None
    detail = "|sum R^l - sum R^(l-1) - stopped| per layer (relevance units)"
    if w is not None:
        detail += (f"; worst at layer {w[0]}: in {rel[w[0]].sum():.6g}, out {rel[w[0] - 1].sum():.6g}, "
                   + (f"stopped {w[2]:.6g}" if w[2] is not None else "stopped mass not reported by the rule"))
        if stopped_total is not None:
            detail += f"; total stopped {stopped_total:.6g}"
    if probe.stops_inferred and cons:  # the defect is the "stopped" figure: conservation holds by construction
        d = max(cons, key=lambda c: abs(c[2] or 0.0))
        report.findings.append(Finding(
            "conservation (I14)", None, abs(d[2] or 0.0), None, {"layer": d[0]},
            "not checkable: the black box reports its defect sum(upper) - sum(lower) as the stopped mass "
            f"(LayerMap stopped=True); the figure is the largest per-layer defect (mass the rule absorbs "
            f"or creates), at layer {d[0]}; use stopped=False to test conservation itself"))
        report.findings.append(Finding("conservation per neuron (I14)", None, None, None, None,
                                       "not checkable: the stopped mass is inferred from the defect"))
    else:
        report.findings.append(Finding("conservation (I14)", None if w is None else abs(w[1]) <= c_tol,
                                       None if w is None else abs(w[1]), c_tol,
                                       None if w is None or abs(w[1]) <= c_tol else {"layer": w[0]}, detail))
        if probe.kind == "relevances" or not checks["neuron"]:
            report.findings.append(Finding("conservation per neuron (I14)", None, None, None, None,
                                           "not checkable without the layer maps"))
        else:
            nv, nw = _worst(checks["neuron"])
            report.findings.append(Finding(
                "conservation per neuron (I14)", nv <= c_tol, nv, c_tol, nw if nv > c_tol else None,
                "|R_i (1 - column sum of M - stopped(e_i))| per neuron i (relevance units): each unit of "
                "relevance reaches the layer below or is reported stopped"))

    def add(key: str, title: str, what: str) -> Finding:
        if probe.kind == "relevances" and key != "loc":
            f = Finding(title, None, None, None, None, "not checkable from per-layer relevances (needs the layer map)")
        else:
            v, where = _worst(checks[key])
            f = Finding(title, v <= tol, v, tol, where if v > tol else None, what)
        report.findings.append(f)
        return f

    rel_to = " (relative to max(1, max |R^l|))"
    lin = add("lin", "linearity in R", "|F(R) - M R|, M the map probed with unit vectors" + rel_to)
    adt = add("add", "additivity", "|F(R + R') - F(R) - F(R')| with R' an independent seeded probe" + rel_to
              + ": a per-layer renormalisation, even one that keeps the layer's total, fails")
    hom = add("hom", "homogeneity", "|F(3R) - 3 F(R)|" + rel_to + ": degree-1 homogeneity; a scale-free "
              "map (e.g. each sign class renormalised to unit mass) fails, a renormalisation that keeps "
              "the total passes (see additivity)")
    canc = add("canc", "cancellation of + and - mass", "|F(R+) + F(R-) - F(R)|" + rel_to + ": the two sign "
               "classes move independently (a law keeps both copies of a unit; their cancellation in the "
               "signed relevance then loses nothing)")
    if probe.kind != "relevances":
        av, aw = _worst(checks["annihilated"])
        tot = sum(float(v.sum()) for _, v, _ in checks["annihilated"])
        canc.extra = {"annihilated_total": tot, "annihilated_worst": av, "annihilated_where": aw}
        canc.detail += f"; opposite-sign mass landing on one unit (not a violation): {tot:.3g} in all, worst " \
            f"{av:.3g}" + (f" at layer {aw['layer']} neuron {aw['neuron']}" if aw and av > 0 else "")
    sign = add("sign", "sign consistency", "|F(-R) + F(R)|" + rel_to + ": the - branch mirrors the + branch")
    if probe.kind == "relevances":
        loc = add("loc", "locality", "|R^(l-1)_k| where k is joined to no unit with R^l != 0 (support)" + rel_to)
    else:
        rv_, rw_ = _worst(checks["loc"])
        uv, uw = _worst(checks["loc_unit"])
        v, where = (rv_, rw_) if rv_ >= uv else (uv, uw)
        loc = Finding("locality", v <= tol, v, tol, where if v > tol else None,
                      "the larger of |F(R restricted to k's upper neighbours)_k - F(R)_k|" + rel_to
                      + f" = {rv_:.3g} and the largest off-edge entry of M (per unit of relevance) = {uv:.3g}: "
                      "F(R)_k depends only on the upper units joined to k by an edge (vacuous on a dense layer)")
        report.findings.append(loc)

    if probe.kind == "relevances" or not Ms:
        report.findings.append(Finding(LAW_ROW, None, None, None, None,
                                       "not checkable without the layer maps" if not Ms else "-"))
        report.violated = ["layer maps unavailable"]
        return report
    law, residuals, total = _law_program(Ms, stops, frozen, solver)
    l_tol = law_tol * max(1.0, max(float(np.abs(M).max()) for M in Ms.values()))
    rv, rw = _worst([(l - 1, np.abs(E).max(1), shapes[l - 1]) for l, E in residuals.items()])
    if rv > l_tol:  # layers that are not laws of the signed family: single-branch laws (Flat, WSquare)?
        single, s_residuals = _single_branch(Ms, stops, frozen)
        fits = {l: (np.abs(E).max(initial=0.0) <= l_tol, np.abs(s_residuals[l]).max(initial=0.0) <= l_tol)
                for l, E in residuals.items()}  # (signed, single) per layer: selections fit both
        switched = [l for l, (sg, sb) in fits.items() if sb and not sg]
        for l in switched:
            for part in ("sigma", "flow_plus", "flow_minus", "stop_plus", "stop_minus", "ambiguous"):
                getattr(law, part)[l - 1] = getattr(single, part)[l - 1]
            residuals[l] = s_residuals[l]
        if switched:
            total = sum(float(np.abs(E).sum()) for E in residuals.values())
            law.residual = total
            rv, rw = _worst([(l - 1, np.abs(E).max(1), shapes[l - 1]) for l, E in residuals.items()])
            signed = [l for l, (sg, sb) in fits.items() if sg and not sb]
            report.family = SINGLE if not signed else (
                f"{SIGNED} at layers {signed}; {SINGLE} at layers {switched}")
    violated = [f"{label} ({f.worst:.3g} > {f.tol:.3g})" for f, label in (
        (lin, "linearity"), (adt, "additivity"), (hom, "homogeneity"), (canc, "sign classes interact"),
        (sign, "sign consistency"), (loc, "locality")) if f.holds is False]
    parts = {"mass off the edges": 0.0, "mass to units with Z = W y = 0": 0.0, "mass against the branch sign": 0.0}
    for l, E in residuals.items():  # every entry of E is in exactly one part: the worst part is rv
        W = np.asarray(frozen.weights[l - 1], dtype=np.float64).T  # (n_low, n_up)
        Z = _contributions(frozen, l).T
        for key, mask in zip(parts, (W == 0, (W != 0) & (Z == 0), Z != 0)):
            parts[key] = max(parts[key], float(np.abs(E[mask]).max(initial=0.0)))
    violated += [f"{label} ({v:.3g} > {l_tol:.3g})" for label, v in parts.items() if v > l_tol]
    report.violated = violated
    report.law = law
    how = ("signed flows of a routing law on the branch edges (LP" if report.family == SIGNED else
           "the flows of the family of each layer (signed branches: LP; single branch: sign-keeping flows "
           "on the edges W != 0, closed form)")
    report.findings.append(Finding(
        LAW_ROW, rv <= l_tol, rv, l_tol, rw if rv > l_tol else None,
        f"largest entry of M not reproduced by {how}; L1 residual, all layers, {total:.3g}); the maps "
        "are a law when this row and the rows linearity to locality hold (summary)"))
    report.stops_reported = all(stops[l] is not None for l in Ms)
    count = 0
    for l, M in Ms.items():
        moved = np.abs(M).sum(0) > 0
        nat_p, nat_m = _stop_places(frozen, l)
        count += int((moved & (law.ambiguous[l - 1] if report.stops_reported else nat_p | nat_m)).sum())
    report.unidentified = count
    if not violated and compare:
        report.nearest, report.candidates = _compare(law, frozen, target, Ms, tol * max(1.0, max(
            float(np.abs(M).max()) for M in Ms.values())))
        for c in report.candidates:
            c["bound"] = count > 0
    return report
