"""Speed and peak memory of ``bp.explain`` on ViT-B/16 per rule, relative to the plain gradient.

ViT-B/16 as users hold it: the Hugging Face ``transformers.ViTForImageClassification`` object
(``ViTConfig()``: 12 layers, dim 768, 12 heads, patch 16, 1000 classes; random init, seed 0, eval,
its default sdpa attention), read by the one reader (docs/theory.md sections 10 and 11: attention as
token-mixing edges with the frozen weights); ``--model backplay`` takes backplay's own ViT
(``bp.gpu.vit.vit_b_16(seed=0)``) instead. A batch of ``--batch`` images at 224 x 224 (default 8),
float32 by default. The baseline is the plain autograd gradient of the model's own forward for the
same batch: forward + ``torch.autograd.grad`` of the summed target logits. The reader's export is
paid once per model and input signature: it is timed on its own (first call on a fresh copy, and the
cached call) and warmed before the rule timings. Timing and memory as in
``benchmarks/rules_speed.py``: ``--warmup`` calls each, then ``--repeat`` interleaved rounds (one call
of every method per round); "ms" is the median over the rounds, "x grad" the median of the per-round
ratios. Peak memory: on CUDA ``max_memory_allocated`` above what is allocated before the call; on CPU
one fresh subprocess per method, the second of two calls (VmHWM reset, minus VmRSS before the call).
Targets (the project's): the routing laws within 4.0x the gradient's time and 1.5x its peak memory.

    python benchmarks/vit_speed.py                        # device: cuda if available, else cpu
    python benchmarks/vit_speed.py --device cpu --batch 1 --repeat 1 --warmup 0 --rules 'AttnLRP;GradientXInput'
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import backplay as bp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rules_speed import (  # noqa: E402
    GRAD, ROUTING, _err, peak_cuda, print_peak_rss, run_peak_child, time_interleaved, time_read,
)
from rules_speed import RULES as _CNN_RULES  # noqa: E402
from rules_speed import target_flags  # noqa: E402

R = bp.rules
#: the routing laws' targets on ViT-B/16 (time x grad, peak memory x grad)
TARGETS = {m: (4.0, 1.5) for m in ROUTING + ["Anchor(RG(),0.1,token)"]}
RULES = {**_CNN_RULES, "Anchor(RG(),0.1,token)": lambda: R.Anchor(R.RG(), 0.1, anchor="token"),
         "AttnLRP": lambda: R.AttnLRP(), "CPLRP": lambda: R.CPLRP()}


class Logits(torch.nn.Module):
    """The baseline's view of a model returning an output object: its logits (the gradient of the
    model's own forward; backplay reads the HF object itself)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.logits if hasattr(out, "logits") else out


def build(device: str, dtype: torch.dtype, batch: int, kind: str = "hf"):
    if kind == "hf":
        import transformers

        torch.manual_seed(0)
        model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000))
        model = model.to(device=device, dtype=dtype).eval()
    else:
        model = bp.gpu.vit.vit_b_16(seed=0, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=g).to(device=device, dtype=dtype)
    t = torch.arange(batch, device=device) % 1000
    return model, x, t


def autograd_gradient(model, x, t):
    xx = x.detach().requires_grad_(True)
    out = Logits(model)(xx)
    (g,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), xx)
    return g


def method(name: str):
    if name == GRAD:
        return autograd_gradient
    rule = RULES[name]()
    return lambda m, x, tt: bp.explain(m, x, tt, rule=rule)


def peak_cpu_child(args) -> None:
    """Child process: one method, one call; prints the peak RSS delta in bytes as JSON."""
    torch.set_num_threads(args.threads)
    model, x, t = build("cpu", getattr(torch, args.dtype), args.batch, args.model)
    print_peak_rss(method(args.child_method), model, x, t)


def peak_cpu(name: str, args) -> float:
    return run_peak_child(__file__, ["--child-method", name, "--dtype", args.dtype, "--threads",
                                     str(args.threads), "--batch", str(args.batch), "--model", args.model])


def run(args) -> list[dict]:
    model, x, t = build(args.device, getattr(torch, args.dtype), args.batch, args.model)
    first, cached = time_read(model, x)
    print(f"reader: export {first * 1e3:.0f} ms on the first call (once per model and input signature), "
          f"{cached * 1e3:.1f} ms cached")
    bp.gpu.engine.prepare(model, x)  # the export is paid before the rule timings
    names = [GRAD] + args.rules
    rows = {n: {"method": n, "times": []} for n in names}
    fns = {}
    for name in names:
        try:
            fns[name] = method(name)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            rows[name]["error"] = _err(e)
    time_interleaved(rows, fns, model, x, t, args)
    for name, r in rows.items():
        if "error" in r or args.no_memory:
            continue
        try:
            r["peak"] = (peak_cuda(method(name), model, x, t, args.device)
                         if args.device.startswith("cuda") else peak_cpu(name, args))
        except Exception as e:  # noqa: BLE001
            r["mem_error"] = _err(e)
    return list(rows.values())


def print_table(rows: list[dict]) -> None:
    g = next(r for r in rows if r["method"] == GRAD)
    head = f"{'method':<24} {'ms':>10} {'x grad':>7} {'peak MB':>9} {'x grad':>7}  targets"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<24} {'n/a':>10}  {r['error']}")
            continue
        mem = r.get("peak")
        mr = mem / g["peak"] if mem is not None and g.get("peak") else None
        flags = target_flags(r["method"], r["ratio"], mr, None, targets=TARGETS, x_ab={})
        if "mem_error" in r:
            flags += f" [memory: {r['mem_error']}]"
        mem_s = f"{mem / 2**20:9.1f}" if mem is not None else f"{'-':>9}"
        mr_s = f"{mr:7.2f}" if mr is not None else f"{'-':>7}"
        print(f"{r['method']:<24} {r['time'] * 1e3:10.1f} {r['ratio']:7.2f} {mem_s} {mr_s}  {flags}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--model", default="hf", choices=["hf", "backplay"],
                        help="hf: the transformers ViTForImageClassification object; backplay: bp.gpu.vit.vit_b_16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rules", default=";".join(RULES),
                        help="';'-separated subset of: " + "; ".join(RULES))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child-method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_method:
        peak_cpu_child(args)
        return
    args.rules = [r for r in args.rules.split(";") if r]
    unknown = [r for r in args.rules if r not in RULES]
    if unknown:
        parser.error(f"unknown rules {unknown}; choose from {list(RULES)}, separated by ';'")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    dev = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"device: {args.device} ({dev}); torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"ViT-B/16 ({args.model}), batch {args.batch} at 224, {args.dtype}; median of {args.repeat} interleaved "
          f"rounds after {args.warmup} warm-up")
    print("peak memory: " + ("torch.cuda.max_memory_allocated delta" if args.device.startswith("cuda")
                             else "VmHWM (reset) - VmRSS before the call, one fresh subprocess per method"))
    rows = run(args)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
