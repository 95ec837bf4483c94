"""How the three computations scale with width and depth (issue 3).

For random ReLU nets (dyadic weights, biases) of growing width at fixed depths it times
  * exact: ``ReLUNetGame(spec).solve(x, k)`` in sympy rationals (graph construction included),
  * cvxpy: ``certify_equilibrium`` (two best-response LPs, Clarabel); "LP st." is the number of
    states in the two programs (states the opponent's policy makes unreachable are dropped),
  * torch: ``backplay.gpu.occupation`` (one batched float64 pass, batch 64) and, as the baseline
    of the same run, the plain autograd gradient of the same batch; the ratio is printed.
A method is no longer run at larger widths once one size took more than ``--limit`` seconds (10).

    python benchmarks/exact_scaling.py            # the table quoted in the README
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import backplay as bp


def random_spec(rng: np.random.Generator, width: int, depth: int) -> bp.MLPSpec:
    ws = [rng.integers(-8, 9, size=(width, width)) / 4 for _ in range(depth)]
    ws[-1] = ws[-1][:2]  # two outputs
    bs = [rng.integers(-8, 9, size=w.shape[0]) / 4 for w in ws]
    return bp.MLPSpec(ws, bs)


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=float, default=10.0, help="seconds; larger sizes are skipped after")
    parser.add_argument("--depths", default="2,4,6")
    parser.add_argument("--widths", default="4,8,16,32,64,128,256,512")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; limit {args.limit:g} s per cell")
    head = f"{'depth':>5} {'width':>5} {'states':>7} {'edges':>8} | {'exact s':>8} | {'cvxpy s':>8} " \
           f"{'exploit.':>8} {'LP st.':>6} | {'torch s':>8} {'grad s':>8} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    rng = np.random.default_rng(0)
    for depth in (int(d) for d in args.depths.split(",")):
        over = {"exact": False, "cvxpy": False, "torch": False}
        for width in (int(w) for w in args.widths.split(",")):
            spec = random_spec(rng, width, depth)
            x = rng.integers(-8, 9, size=width) / 4
            states = 2 * sum(spec.widths) + 2
            edges = int(sum(np.count_nonzero(w) for w in spec.weights)) * 2
            cells = {}
            if not over["exact"]:
                cells["exact"] = timed(lambda: bp.theory.ReLUNetGame(spec).solve(x, 0))
                over["exact"] = cells["exact"] > args.limit
            if not over["cvxpy"]:
                t0 = time.perf_counter()
                cert = bp.numerics.certify_equilibrium(spec, x, 0)
                cells["cvxpy"] = time.perf_counter() - t0
                cells["exploit"] = cert.exploitability
                cells["lp_states"] = cert.max_response.n_states + cert.min_response.n_states
                over["cvxpy"] = cells["cvxpy"] > args.limit
            if not over["torch"]:
                model = spec.to_torch()
                xb = torch.tensor(rng.integers(-8, 9, size=(64, width)) / 4)

                def grad() -> None:
                    xg = xb.clone().requires_grad_(True)
                    model(xg)[:, 0].sum().backward()

                grad()
                cells["grad"] = timed(grad, repeat=5)
                cells["torch"] = timed(lambda: bp.gpu.occupation(model, xb, 0), repeat=5)
                over["torch"] = cells["torch"] > args.limit

            def f(key: str, fmt: str = "{:8.4f}") -> str:
                return fmt.format(cells[key]) if key in cells else f"{'-':>8}"

            ratio = f"{cells['torch'] / cells['grad']:6.2f}" if "torch" in cells else f"{'-':>6}"
            print(f"{depth:>5} {width:>5} {states:>7} {edges:>8} | {f('exact')} | {f('cvxpy')} "
                  f"{f('exploit', '{:8.1e}')} {f('lp_states', '{:6d}').strip():>6} | {f('torch')} {f('grad')} {ratio}", flush=True)
            if all(over.values()):
                break


if __name__ == "__main__":
    main()
