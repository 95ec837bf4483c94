"""Cost of ``bp.hellinger`` (docs/theory.md I21) as a ratio to one rule's sweep, on the benchmark CNN.

The model is ``rules_speed.py``'s VGG-like CNN (random init, seed 0, float32, batch 16 at 3x64x64;
``build("cnn")``). For each pair of laws it times ``bp.hellinger(model, x, t, a, b)`` and
``bp.explain(model, x, t, rule=a)`` (the sweep of the first rule of the pair) in the same run:
``--warmup`` calls each, then ``--repeat`` interleaved rounds; "ms" is the median over the rounds and
"x sweep" the median over the rounds of the per-round ratio. The matrix row times
``bp.hellinger_matrix`` over four laws (six pairs, one sweep) against the same AlphaBeta sweep.
Anchored laws are compared edge by edge (small models only) and are not timed here.

    python benchmarks/hellinger_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import backplay as bp
from backplay.rules import RG, AlphaBeta, GradientEquilibrium, RGEq, RiskAverse
from rules_speed import build  # the shared benchmark models (benchmarks/ is the script's folder)

PAIRS = [
    (AlphaBeta(2, 1), GradientEquilibrium()),
    (RG(0.5), RGEq(0.5, 1.0)),
    (RG(), RG(route_temp=2.0)),
    (RG(), RiskAverse(RG(), theta=1.0)),
]
MATRIX = [AlphaBeta(2, 1), AlphaBeta(1, 0), GradientEquilibrium(), RG(0.5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, x, t = build("cnn", "cpu", torch.float32)
    jobs = {}
    for a, b in PAIRS:
        jobs[f"H({a.name}, {b.name})"] = ((lambda a=a, b=b: bp.hellinger(model, x, t, a, b)),
                                          (lambda a=a: bp.explain(model, x, t, rule=a)), a.name)
    jobs["matrix of 4 laws (6 pairs)"] = ((lambda: bp.hellinger_matrix(model, x, t, MATRIX)),
                                          (lambda: bp.explain(model, x, t, rule=MATRIX[0])), MATRIX[0].name)
    for h, s, _ in jobs.values():
        for _ in range(args.warmup):
            h()
            s()
    times = {k: ([], []) for k in jobs}
    for _ in range(args.repeat):
        for k, (h, s, _) in jobs.items():
            t0 = time.perf_counter()
            h()
            t1 = time.perf_counter()
            s()
            t2 = time.perf_counter()
            times[k][0].append(t1 - t0)
            times[k][1].append(t2 - t1)
    print(f"cnn (batch {x.shape[0]}, 3x64x64, float32), torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s); median of {args.repeat} interleaved rounds after {args.warmup} warm-up")
    head = f"{'comparison':<62} {'ms':>9} {'sweep ms':>9} {'x sweep':>8}  sweep of"
    print(head)
    print("-" * len(head))
    for k, (hs, ss) in times.items():
        ratio = statistics.median(a / b for a, b in zip(hs, ss))
        print(f"{k[:62]:<62} {statistics.median(hs) * 1e3:9.1f} {statistics.median(ss) * 1e3:9.1f} "
              f"{ratio:8.2f}  {jobs[k][2]}")


if __name__ == "__main__":
    main()
