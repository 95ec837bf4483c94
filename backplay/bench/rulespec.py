"""Rules written as text: ``"RG(tau=0.5, route_temp=2)"``, ``"Anchor(RG(), lam=0.1)"``, ``"lrp0"``.

:func:`parse_rules` splits a comma list at depth 0 and builds each rule; a name is looked up (case
insensitive) among the :class:`backplay.rules.Rule` classes of :mod:`backplay.rules` and
:mod:`backplay.rules`; arguments are Python literals or nested rules. :func:`rule_label`
writes a rule back in that syntax (numbers with 4 significant digits).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect

from backplay import rules as rules_mod
from backplay.rules import Rule

__all__ = ["available_rules", "find_rule", "parse_rule", "parse_rules", "rule_label"]

_HIDDEN_FIELDS = ("conservative", "anchor", "sigma", "kinds", "names", "first", "default", "fast")  # shown only when not at their default


def available_rules() -> dict[str, type]:
    """``{lower-case name: class}`` of every public concrete rule class found."""
    out: dict[str, type] = {}
    for name, obj in vars(rules_mod).items():
        if (inspect.isclass(obj) and issubclass(obj, Rule) and not name.startswith("_")
                and name not in ("Rule", "LayerRule", "TransformerRule")):
            out[name.lower()] = obj
    return out


def find_rule(name: str) -> type | None:
    """The rule class named ``name`` (case insensitive), or None."""
    return available_rules().get(name.lower())


def _build(node: ast.AST, text: str) -> Rule:
    if isinstance(node, ast.Name):
        node = ast.Call(func=node, args=[], keywords=[])
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"cannot read rule {text!r}: expected NAME or NAME(args)")
    cls = find_rule(node.func.id)
    if cls is None:
        raise ValueError(f"unknown rule {node.func.id!r} in {text!r}; known: "
                         f"{', '.join(sorted(c.__name__ for c in available_rules().values()))}")

    def value(v: ast.AST):
        if isinstance(v, (ast.Call, ast.Name)) and not (isinstance(v, ast.Name) and v.id in ("True", "False")):
            return _build(v, text)
        try:
            return ast.literal_eval(v)
        except ValueError as e:
            raise ValueError(f"cannot read argument {ast.unparse(v)!r} of rule {text!r}") from e

    args = [value(a) for a in node.args]
    kwargs = {k.arg: value(k.value) for k in node.keywords}
    try:
        return cls(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for rule {text!r}: {e}") from e


def parse_rule(text: str) -> Rule:
    """One rule from its text, e.g. ``"AlphaBeta(1, 0)"`` or ``"RiskAverse(RG(tau=0.5), theta=2)"``."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot read rule {text!r}: {e.msg}") from e
    return _build(tree.body, text)


def parse_rules(text: str) -> list[Rule]:
    """Rules from a comma separated list (commas inside parentheses belong to a rule)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    parts = [p for p in (p.strip() for p in parts) if p]
    if not parts:
        raise ValueError("no rule given")
    return [parse_rule(p) for p in parts]


def _fmt(v) -> str:
    if isinstance(v, Rule):
        return rule_label(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return repr(v)


def rule_label(rule: Rule) -> str:
    """The rule in the syntax :func:`parse_rule` reads (defaults of technical fields left out)."""
    if not dataclasses.is_dataclass(rule):
        return type(rule).__name__
    parts = []
    for f in dataclasses.fields(rule):
        if not f.init:  # derived from the other fields (e.g. AttributionEquilibriumLaw's alpha, beta)
            continue
        v = getattr(rule, f.name)
        if f.name in _HIDDEN_FIELDS and f.default is not dataclasses.MISSING and v == f.default:
            continue
        parts.append(f"{f.name}={_fmt(v)}")
    return f"{type(rule).__name__}({', '.join(parts)})" if parts else type(rule).__name__
