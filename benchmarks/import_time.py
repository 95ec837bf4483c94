"""Time of ``import backplay`` as a ratio to ``import torch`` (issue target: <= 1.5x).

Each round starts two fresh interpreters, one running ``import torch`` and one ``import backplay``
(which imports torch), in alternating order; the time is the interpreter's wall time from start to
exit, so the fixed start-up cost is in both. "ratio" is the median over the rounds of the per-round
ratio backplay / torch. The heavy parts (sympy, cvxpy, networkx, hypothesis, matplotlib) load on
first use of ``bp.theory``, ``bp.numerics``, ``bp.testing``, ``bp.validate_rule``, ``bp.plot``: the
last column shows which of them ``import backplay`` loaded (none expected).

    python benchmarks/import_time.py --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

HEAVY = ("sympy", "cvxpy", "networkx", "hypothesis", "matplotlib", "mpmath", "scipy")


def _wall(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    _wall("import backplay")  # warm the file cache (.pyc files) before timing
    torch_s, bp_s, ratios = [], [], []
    for r in range(args.rounds):
        order = ("torch", "backplay") if r % 2 == 0 else ("backplay", "torch")
        t = {name: _wall(f"import {name}") for name in order}
        torch_s.append(t["torch"])
        bp_s.append(t["backplay"])
        ratios.append(t["backplay"] / t["torch"])
    loaded = subprocess.run([sys.executable, "-c", "import sys, backplay; print(' '.join(m for m in "
                             f"{HEAVY!r} if m in sys.modules) or 'none')"],
                            check=True, capture_output=True, text=True).stdout.strip()
    print(f"| import torch | import backplay | ratio (median of {args.rounds}) | heavy modules loaded |")
    print("|---|---|---|---|")
    print(f"| {statistics.median(torch_s):.2f} s | {statistics.median(bp_s):.2f} s | "
          f"{statistics.median(ratios):.2f}x | {loaded} |")


if __name__ == "__main__":
    main()
