"""The backplay command line.

backplay verify checks every identity of docs/theory.md three ways (exact, cvxpy, torch);
backplay verify --rule MODULE:ATTR validates your own rule on the built-in random nets or on your own
model (--model); backplay explain draws heatmaps of images under one or more rules; backplay bench
localisation runs the localisation benchmark. Run backplay COMMAND --help for the options of each.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from tqdm import tqdm

from .testing.identities import TOL_CVXPY, TOL_TORCH, Case
from .testing.registry import IDENTITIES
from .testing.random_nets import random_cases


def verify(seed: int = 0, cases: int = 100, solver: str = "CLARABEL",
           progress: bool = True) -> list[dict[str, Any]]:
    """Run every identity on ``cases`` seeded random nets; one summary row per identity. A row whose
    optional peer library is not installed (``Identity.unavailable``) runs no case: ``skipped`` says
    why, and it is not ``passed``."""
    rows = {i.name: dict(identity=i.name, statement=i.statement, cases=0, exact_failures=0,
                         torch_err=0.0, cvxpy_err=0.0, failures=[], skipped=i.unavailable()) for i in IDENTITIES}
    for k, (spec, x, target) in enumerate(tqdm(random_cases(seed, cases), desc="verify",
                                               disable=not progress, file=sys.stderr)):
        case = Case(spec, x, target, solver=solver)
        for ident in IDENTITIES:
            row = rows[ident.name]
            if row["skipped"] is not None or not ident.applies(spec):
                continue
            row["cases"] += 1
            try:
                res = ident.check(case)
            except Exception as exc:  # a crash is a failure of that identity, reported with its case
                row["failures"].append(f"case {k}: {type(exc).__name__}: {exc}")
                row["exact_failures"] += 1
                continue
            for col in ("torch_err", "cvxpy_err"):
                value = getattr(res, col)
                row[col] = None if value is None else max(row[col] or 0.0, value)
            if not res.exact:
                row["exact_failures"] += 1
            if not res.ok:
                row["failures"].append(f"case {k}: {spec} x={x.tolist()} target={target}")
    out = []
    for row in rows.values():
        row["passed"] = row["skipped"] is None and not row["failures"] and row["cases"] > 0
        out.append(row)
    return out


def _result(row: dict[str, Any]) -> str:
    if row["skipped"] is not None:
        return f"skipped ({row['skipped']})"
    return "PASS" if row["passed"] else "FAIL"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("identity", "what it states", "cases", "exact", "torch vs exact", "cvxpy vs exact", "result")
    body = [(r["identity"], r["statement"], str(r["cases"]), "-", "-", "-", _result(r)) if r["skipped"] is not None
            else (r["identity"], r["statement"], str(r["cases"]),
                  "ok" if r["exact_failures"] == 0 else f"{r['exact_failures']} fail",
                  _fmt(r["torch_err"]), _fmt(r["cvxpy_err"]), _result(r))
            for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in body]
    return "\n".join(lines)


def load_rule(ref: str) -> Any:
    """``module:attr`` -> the rule: a Rule instance, a callable (validate_rule's black-box forms), or a
    Rule class (instantiated with its defaults). The module is looked up in the working directory
    first, then on ``sys.path``. ValueError / ImportError naming the problem."""
    mod, sep, attr = ref.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"--rule must be module:attr (e.g. backplay.rules:AlphaBeta), got {ref!r}")
    from .bench.commands import working_directory_on_path

    with working_directory_on_path():
        try:
            obj: Any = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name is not None and mod.startswith(exc.name):
                raise ImportError(f"no module named {mod!r} in the working directory {os.getcwd()} or on "
                                  "sys.path (run from the folder that holds it, or install it)") from None
            raise
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {mod!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    from .rules import Rule

    if isinstance(obj, type) and issubclass(obj, Rule):
        obj = obj()
    return obj


def load_model(path: str) -> Any:
    """A file written by ``torch.save`` holding an ``nn.Module`` (any model the reader takes) or a
    :class:`backplay.MLPSpec` (unpickled: load only files you trust)."""
    import torch

    from .nets import MLPSpec

    obj = torch.load(path, weights_only=False)
    if not isinstance(obj, (torch.nn.Module, MLPSpec)):
        raise ValueError(f"{path} holds a {type(obj).__name__}; expected an nn.Module or an MLPSpec "
                         "saved with torch.save")
    return obj


def _model_cases(model: Any, seed: int, cases: int, input_path: str | None, target: int | None) -> list:
    """(model, x, target) triples: the inputs of ``input_path`` (torch.save of one sample or a batch), or
    seeded random dyadic inputs for an MLP; the target defaults to the predicted class."""
    import torch

    from .nets import MLPSpec

    if input_path is not None:
        xs = torch.load(input_path, weights_only=False)
        xs = torch.as_tensor(xs, dtype=torch.float64)
        if xs.ndim in (1, 3):  # one sample: a vector (n,) or an image (C, H, W); else a batch
            xs = xs[None]
    else:
        if isinstance(model, MLPSpec):
            n = model.widths[0]
        else:
            first = next((m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))), None)
            if not isinstance(first, torch.nn.Linear):
                raise ValueError("--model with a convolutional first layer needs --input (a torch-saved tensor)")
            n = first.in_features
        rng = np.random.default_rng(seed)
        xs = torch.tensor(rng.integers(-8, 9, size=(cases, n)) / 4, dtype=torch.float64)
    from .gpu.engine import prepare

    net = model.to_torch(torch.float64) if isinstance(model, MLPSpec) else model
    out = []
    for x in xs:
        logits = prepare(net, x[None]).trace().output[0]
        if target is not None and not 0 <= target < len(logits):
            raise ValueError(f"--target {target} out of range: the model has {len(logits)} outputs")
        out.append((model, x.numpy(), int(logits.argmax()) if target is None else target))
    return out


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def verify_rule(rule: Any, seed: int = 0, cases: int = 20, model: Any = None, input_path: str | None = None,
                target: int | None = None, solver: str = "CLARABEL", progress: bool = True) -> dict:
    """Run :func:`backplay.validate_rule` on ``cases`` seeded random nets (ReLU and softplus)
    or on ``model``; per property the number of cases where it holds, and one row per case.

    A case where validate_rule raises TypeError / ValueError is ``skipped`` (the rule does not apply
    to that net, e.g. Attribution Equilibrium on a net without a hidden layer); any other exception is
    an ``error``. ``passed``: at least one case validated, no error, and every property holds (or is
    not checkable) on every validated case; ``failed_properties`` and ``errors`` say what did not."""
    from .validate import validate_rule

    todo = random_cases(seed, cases) if model is None else _model_cases(model, seed, cases, input_path, target)
    rows, props = [], {}
    for k, (net, x, t) in enumerate(tqdm(todo, desc="verify --rule", disable=not progress, file=sys.stderr)):
        try:
            rep = validate_rule(rule, net, x, t, solver=solver)
        except (TypeError, ValueError) as exc:  # the rule does not apply to this net (e.g. no hidden layer)
            rows.append({"case": k, "skipped": _one_line(exc)})
            continue
        except Exception as exc:  # a crash: reported with its case, exit status 1
            rows.append({"case": k, "error": _one_line(exc)})
            continue
        for f in rep.findings:
            p = props.setdefault(f.name, {"holds": 0, "fails": 0, "n/a": 0, "worst": 0.0, "failed_cases": []})
            p["holds" if f.holds else ("n/a" if f.holds is None else "fails")] += 1
            if f.holds is False:
                p["failed_cases"].append(k)
                if f.worst is not None:
                    p["worst"] = max(p["worst"], f.worst)
        rows.append({"case": k, "net": rep.net, "target": t, "is_law": rep.is_law, "violated": rep.violated,
                     "nearest": rep.nearest, "report": rep.to_dict()})
    validated = sum(1 for r in rows if "net" in r)
    errors = [f"case {r['case']}: {r['error']}" for r in rows if "error" in r]
    failed = [name for name, p in props.items() if p["fails"]]
    return {"rule": getattr(rule, "name", getattr(rule, "__name__", type(rule).__name__)), "seed": seed,
            "cases": len(todo), "validated": validated, "skipped": sum(1 for r in rows if "skipped" in r),
            "errors": errors, "failed_properties": failed,
            "passed": validated > 0 and not errors and not failed, "properties": props, "rows": rows}


def _rule_table(res: dict) -> str:
    head = ("property", "holds", "fails", "n/a", "worst figure")
    body = [(name, str(p["holds"]), str(p["fails"]), str(p["n/a"]), f"{p['worst']:.3g}" if p["fails"] else "-")
            for name, p in res["properties"].items()]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in body]
    laws = [r for r in res["rows"] if r.get("is_law")]
    nearest: dict = {}
    for r in laws:
        if r["nearest"]:
            nearest[r["nearest"]["rule"]] = nearest.get(r["nearest"]["rule"], 0) + 1
    lines.append(f"Markov routing law on {len(laws)} of {res['cases']} cases")
    for name, n in sorted(nearest.items(), key=lambda kv: -kv[1])[:5]:
        lines.append(f"  nearest named rule {name}: {n} cases")
    for r in res["rows"]:
        if "skipped" in r:
            lines.append(f"  case {r['case']} skipped: {r['skipped']}")
    lines.append(f"{res['cases']} cases: {res['validated']} validated, {res['skipped']} skipped (the rule does "
                 f"not apply), {len(res['errors'])} errors")
    for name in res["failed_properties"]:
        p = res["properties"][name]
        shown = ", ".join(str(k) for k in p["failed_cases"][:10]) + (" ..." if len(p["failed_cases"]) > 10 else "")
        lines.append(f"  FAILS: {name} on {p['fails']} of {res['validated']} validated cases (worst figure "
                     f"{p['worst']:.3g}; cases {shown})")
    for e in res["errors"]:
        lines.append(f"  ERROR {e}")
    if res["passed"]:
        lines.append("result: PASS (every property holds on every validated case)")
    else:
        why = [f"{len(res['failed_properties'])} properties fail"] if res["failed_properties"] else []
        why += [f"{len(res['errors'])} cases error"] if res["errors"] else []
        why += ["no case validated"] if not res["validated"] else []
        lines.append("result: FAIL (" + "; ".join(why) + ")")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``backplay`` command; returns the exit status (0 success, 1 a check fails, 2 a usage error)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="backplay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser(
        "verify", help="check the identities of docs/theory.md: exact == cvxpy == torch",
        description="Check every identity of docs/theory.md on seeded random nets three ways (the exact "
                    "theory, cvxpy programs, the torch code) and every rule on a tiny instance "
                    "of each architecture. With --rule: validate your own rule instead, on the random nets "
                    "or on your own model (--model). Exit status 0: everything holds; 1: a check fails; "
                    "2: a usage error.")
    v.add_argument("--seed", type=int, default=0, help="seed of the built-in random nets (default 0)")
    v.add_argument("--cases", type=int, default=100, help="number of random nets (default 100)")
    v.add_argument("--solver", default="CLARABEL", help="cvxpy solver (default CLARABEL)")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.add_argument("--rule", metavar="MODULE:ATTR",
                   help="validate this rule instead (a backplay Rule, a Rule class, or a callable, see "
                        "backplay.validate_rule) on the random nets or on --model; MODULE is "
                        "looked up in the working directory first. Exit status 0: every property holds on "
                        "every validated case; 1: a property fails, a case errors, or no case applies; "
                        "2: a usage error")
    v.add_argument("--model", metavar="FILE",
                   help="with --rule: a file written by torch.save holding an nn.Module or an MLPSpec (loading it "
                        "unpickles Python code: use it only for files you trust)")
    v.add_argument("--input", metavar="FILE", help="with --model: a torch.save'd input (one sample or a "
                   "batch); default: --cases random dyadic inputs (MLPs)")
    v.add_argument("--target", type=int, help="with --model: the explained output (default: the argmax)")
    from .bench.commands import add_bench_parser, add_explain_parser, run_bench, run_explain

    add_explain_parser(sub)
    add_bench_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "explain":
        return run_explain(args)
    if args.command == "bench":
        return run_bench(args, parser)
    if args.cases < 1:
        parser.error("--cases must be >= 1")
    if args.rule is None and (args.model or args.input or args.target is not None):
        parser.error("--model, --input and --target need --rule")
    t0 = time.perf_counter()
    if args.rule is not None:
        from .bench.commands import working_directory_on_path

        try:
            with working_directory_on_path():  # the rule's module may import its neighbours when run
                rule = load_rule(args.rule)
                model = load_model(args.model) if args.model else None
                res = verify_rule(rule, args.seed, args.cases, model, args.input, args.target, args.solver,
                                  progress=not args.no_progress)
        except (ValueError, ImportError, OSError) as exc:
            print(f"backplay verify --rule: {exc}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(res, indent=2, default=float))
        else:
            where = args.model or f"{res['cases']} random nets (seed {args.seed})"
            print(f"backplay verify --rule {args.rule}: {res['rule']} on {where}")
            print(_rule_table(res))
            print(f"({time.perf_counter() - t0:.1f} s)")
        return 0 if res["passed"] else 1
    rows = verify(args.seed, args.cases, args.solver, progress=not args.no_progress)
    from .testing.arch_checks import architecture_table, verify_architectures

    arch_rows = verify_architectures(progress=not args.no_progress)
    skipped = [r for r in rows if r["skipped"] is not None]  # not passed: named on the summary line
    ok_ids = all(r["passed"] or r["skipped"] is not None for r in rows)
    ok_arch = all(r["passed"] for r in arch_rows)
    ok = ok_ids and ok_arch
    if args.json:
        print(json.dumps(dict(seed=args.seed, cases=args.cases, solver=args.solver, passed=ok,
                              not_run={r["identity"]: r["skipped"] for r in skipped},
                              tol_torch=TOL_TORCH, tol_cvxpy=TOL_CVXPY, identities=rows,
                              architectures=arch_rows), indent=2))
    else:
        print(f"backplay verify: seed {args.seed}, {args.cases} random nets (ReLU and softplus), "
              f"solver {args.solver}; tolerances torch {TOL_TORCH:g}, cvxpy {TOL_CVXPY:g} "
              "(relative to max(1, |exact|)); each identity is stated, with its code and its test, in "
              "docs/theory.md")
        print(_table(rows))
        for r in rows:
            for f in r["failures"][:3]:
                print(f"  {r['identity']} FAILED on {f}")
        print(("IDENTITY FAILURES" if not ok_ids else "all identities that ran hold" if skipped else "all identities hold")
              + "".join(f"; NOT RUN: {r['identity']} ({r['skipped']})" for r in skipped))
        print()
        print("every rule through bp.explain on a tiny instance of each architecture (backplay.testing.zoo), "
              f"against the exact law / recursion on its unroll (docs/theory.md section 11); worst relative error "
              f"per layer, tolerance {TOL_TORCH:g}")
        print(architecture_table(arch_rows))
        for r in arch_rows:
            for f in r["failures"][:3]:
                print(f"  {r['rule']} FAILED on {f}")
        print(f"{'all architectures hold' if ok_arch else 'ARCHITECTURE FAILURES'}")
        print(f"{'all checks hold' if ok else 'FAILURES'} ({time.perf_counter() - t0:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

