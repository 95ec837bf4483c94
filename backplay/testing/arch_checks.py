"""Every rule class through ``bp.explain`` on a tiny instance of every zoo architecture, against the
exact law / recursion on its unrolled graph (docs/theory.md section 11): the second table of
``backplay verify``. The exact side (:mod:`backplay.testing.graph_exact`) never runs the torch rule
code: the routing laws come from :func:`backplay.theory.routing_law` on the FrozenNet, Gradient, GxI,
LRP-0 and SoftplusGame from their layer recursions, in mpmath at 50 digits."""

from __future__ import annotations

import sys
from typing import Any

import torch
from tqdm import tqdm

from ..rules import (
    LRP0, RG, AlphaBeta, Anchor, AttributionEquilibriumLaw, Gradient, GradientEquilibrium, GradientXInput, RGEq,
    RiskAverse, Rule, SoftplusGame,
)
from .graph_exact import torch_error
from .identities import TOL_TORCH
from .zoo import ZOO, zoo_input

__all__ = ["ARCH_RULES", "architecture_table", "verify_architectures"]

#: (label, rule): one instance of every rule class that is a law or a recursion on the frozen graph
ARCH_RULES: tuple = (
    ("Gradient", Gradient()), ("GradientXInput", GradientXInput()), ("LRP0", LRP0()),
    ("AlphaBeta(2, 1)", AlphaBeta(2, 1)), ("RG(tau=0.5, T=0.7)", RG(tau=0.5, route_temp=0.7)),
    ("RGEq(0.3, 0.5)", RGEq(0.3, 0.5)), ("GradientEquilibrium", GradientEquilibrium()),
    ("Anchor(RG, lam=0.2)", Anchor(RG(), 0.2)), ("RiskAverse(AB(2,1), 0.5)", RiskAverse(AlphaBeta(2, 1), 0.5)),
    ("SoftplusGame(0.5)", SoftplusGame(0.5)), ("AttributionEquilibriumLaw(2)", AttributionEquilibriumLaw(2.0)),
)


def verify_architectures(rules: tuple = ARCH_RULES, architectures: list | None = None,
                         progress: bool = True) -> list[dict[str, Any]]:
    """One row per rule: the worst relative error (:func:`backplay.testing.err`) per architecture of
    ``explain``'s per-layer relevance, stopped mass and logit against the exact reference, float64,
    and ``passed`` (every error <= the torch tolerance; an error raised counts as a failure)."""
    names = list(ZOO) if architectures is None else list(architectures)
    rows = [dict(rule=label, errors={}, failures=[]) for label, _ in rules]
    todo = [(a, k) for a in names for k in range(len(rules))]
    cases = {}
    for arch, k in tqdm(todo, desc="verify architectures", disable=not progress, file=sys.stderr):
        if arch not in cases:
            case = ZOO[arch]("tiny", seed=0, dtype=torch.float64)
            cases[arch] = (case.model, zoo_input(case, seed=1))
        model, x = cases[arch]
        rule: Rule = rules[k][1]
        row = rows[k]
        try:
            e = torch_error(model, x, 0, rule, field="mpmath")
        except Exception as exc:  # a crash is a failure of that rule on that architecture
            row["errors"][arch] = None
            row["failures"].append(f"{arch}: {type(exc).__name__}: {exc}")
            continue
        row["errors"][arch] = e
        if not e <= TOL_TORCH:
            row["failures"].append(f"{arch}: error {e:.3g} > {TOL_TORCH:g}")
    for row in rows:
        row["passed"] = not row["failures"]
    return rows


def architecture_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`verify_architectures` as text: rules down, architectures across."""
    archs = list(rows[0]["errors"]) if rows else []
    head = ("rule",) + tuple(archs) + ("result",)
    body = [(r["rule"],) + tuple("error" if r["errors"][a] is None else f"{r['errors'][a]:.1e}" for a in archs)
            + ("PASS" if r["passed"] else "FAIL",) for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body]
    return "\n".join(lines)
