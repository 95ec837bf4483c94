"""Command line: ``backplay verify`` checks every identity of THEORY.md three ways; ``backplay explain``
draws heatmaps; ``backplay bench localisation`` runs the localisation benchmark."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

from tqdm import tqdm

from .testing.identities import TOL_CVXPY, TOL_TORCH, Case
from .testing.registry import IDENTITIES
from .testing.random_nets import random_cases


def verify(seed: int = 0, cases: int = 100, solver: str = "CLARABEL",
           progress: bool = True) -> list[dict[str, Any]]:
    """Run every identity on ``cases`` seeded random nets; one summary row per identity."""
    rows = {i.name: dict(identity=i.name, statement=i.statement, cases=0, exact_failures=0,
                         torch_err=0.0, cvxpy_err=0.0, failures=[]) for i in IDENTITIES}
    for k, (spec, x, target) in enumerate(tqdm(random_cases(seed, cases), desc="verify",
                                               disable=not progress, file=sys.stderr)):
        case = Case(spec, x, target, solver=solver)
        for ident in IDENTITIES:
            if not ident.applies(spec):
                continue
            row = rows[ident.name]
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
        row["passed"] = not row["failures"] and row["cases"] > 0
        out.append(row)
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("identity", "what it states", "cases", "exact", "torch vs exact", "cvxpy vs exact", "result")
    body = [(r["identity"], r["statement"], str(r["cases"]),
             "ok" if r["exact_failures"] == 0 else f"{r['exact_failures']} fail",
             _fmt(r["torch_err"]), _fmt(r["cvxpy_err"]), "PASS" if r["passed"] else "FAIL")
            for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in body]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="backplay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check the identities of THEORY.md: exact == cvxpy == torch")
    v.add_argument("--seed", type=int, default=0, help="seed of the built-in random nets (default 0)")
    v.add_argument("--cases", type=int, default=100, help="number of random nets (default 100)")
    v.add_argument("--solver", default="CLARABEL", help="cvxpy solver (default CLARABEL)")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    t0 = time.perf_counter()
    rows = verify(args.seed, args.cases, args.solver, progress=not args.no_progress)
    ok = all(r["passed"] for r in rows)
    if args.json:
        print(json.dumps(dict(seed=args.seed, cases=args.cases, solver=args.solver, passed=ok,
                              tol_torch=TOL_TORCH, tol_cvxpy=TOL_CVXPY, identities=rows), indent=2))
    else:
        print(f"backplay verify: seed {args.seed}, {args.cases} random nets (ReLU and softplus), "
              f"solver {args.solver}; tolerances torch {TOL_TORCH:g}, cvxpy {TOL_CVXPY:g} "
              "(relative to max(1, |exact|))")
        print(_table(rows))
        for r in rows:
            for f in r["failures"][:3]:
                print(f"  {r['identity']} FAILED on {f}")
        print(f"{'all identities hold' if ok else 'FAILURES'} ({time.perf_counter() - t0:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

