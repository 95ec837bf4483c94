"""Speed and peak memory of ``bp.explain`` per rule, relative to the plain autograd gradient.

Three models, random init (seed 0), eval mode, float32 by default, written as plain ``nn.Module``s
with their own forward (read through torch.export like any user model):
  * cnn: VGG-like, conv64-relu-conv64-relu-maxpool-conv128-relu-conv128-relu-maxpool-conv256-relu-
    maxpool-adaptiveavgpool(1)-flatten-linear256-relu-linear10 (``F.relu``, ``F.max_pool2d``,
    ``torch.flatten``); batch 16 at 3x64x64;
  * resnet18: torchvision-style ResNet-18 (``backplay.testing.zoo.resnet18``, width 64, BasicBlocks
    with ``out += identity`` and conv+BN downsample shortcuts, BatchNorm with random statistics),
    10 classes; batch 16 at 3x64x64;
  * mlp: 784-512-512-10, batch 256.
The reader's export is timed on its own ("read: first call" = torch.export + analysis, on a model
not seen before; "cached call" = the cache lookup), and is not part of the per-rule times (every
timed call after the warm-up hits the cache).
For every rule it times ``bp.explain(model, x, target, rule=rule)`` and divides by the time of the
plain autograd gradient of the same batch (forward + ``torch.autograd.grad`` of the summed target
logits), measured in the same run: ``--warmup`` calls each, then ``--repeat`` interleaved rounds
(one call of every method per round); "ms" is the median over the rounds, "x grad" the median over
the rounds of the per-round ratio (robust to a drifting machine load). zennit's
AlphaBeta(2, 1) (a LayerMapComposite: AlphaBeta on Conv2d/Linear, zennit's default Norm on the avg
pool, Pass on ReLU, default stabiliser 1e-6; hooks registered once, outside the timed calls) is
timed the same way when zennit is installed; "bp/zennit" is backplay's AlphaBeta time over it.

Peak memory ("peak MB": the extra memory one call needs above what is held before it):
  * CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the
    memory allocated before the call (tensor memory of torch's caching allocator).
  * CPU: every method runs in a fresh subprocess, twice on the batch, and the second call is measured
    (the first does the lazy library initialisation and what backplay makes once per model and batch
    size: the reader's export, the batch probe, the folded BatchNorm weights); the peak-RSS mark is reset (``/proc/self/clear_refs`` <- 5, Linux), and
    peak = VmHWM after the call minus VmRSS just before it (/proc/self/status). The child runs with MALLOC_MMAP_THRESHOLD_=65536 so that glibc serves every large tensor by mmap and
    returns it on free (no arena reuse hiding allocations); KiB resolution. This
    is process memory, so it also counts allocator and library overheads; it is the honest
    portable measure on CPU (tracemalloc does not see torch's allocations and the CPU profiler's
    memory events were incomplete here).
Targets (the project's, the "targets" column): AlphaBeta and RG <= 2.3x the gradient's time and
<= 1.5x its peak memory; GradientEquilibrium <= 1.3x / 1.2x; Gradient and GradientXInput <= 1.1x /
1.3x; Anchor <= 1.3x and RiskAverse <= 2x AlphaBeta's time; backplay's AlphaBeta faster than zennit's.

    python benchmarks/rules_speed.py                 # device: cuda if available, else cpu
    python benchmarks/rules_speed.py --device cpu --repeat 9 --models cnn
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
import types

import torch
from torch import nn
from torch.nn import functional as F

import backplay as bp

R = bp.rules
RULES = {
    "Gradient": lambda: R.Gradient(),
    "GradientXInput": lambda: R.GradientXInput(),
    "LRP0": lambda: R.LRP0(),
    "AlphaBeta(2,1)": lambda: R.AlphaBeta(2, 1),
    "AlphaBeta(2,1,fast=True)": lambda: R.AlphaBeta(2, 1, fast=True),
    "RG()": lambda: R.RG(),
    "RG(fast=True)": lambda: R.RG(fast=True),
    "RG(route_temp=0.5)": lambda: R.RG(route_temp=0.5),
    "RGEq()": lambda: R.RGEq(),
    "GradientEquilibrium()": lambda: R.GradientEquilibrium(),
    "Anchor(RG(),0.1)": lambda: R.Anchor(R.RG(), 0.1),
    "RiskAverse(RG(),1.0)": lambda: R.RiskAverse(R.RG(), 1.0),
    "SoftplusGame(0.5)": lambda: R.SoftplusGame(0.5),
}
#: the routing laws among RULES
ROUTING = ["AlphaBeta(2,1)", "AlphaBeta(2,1,fast=True)", "RG()", "RG(fast=True)", "RG(route_temp=0.5)", "RGEq()",
           "GradientEquilibrium()", "Anchor(RG(),0.1)", "RiskAverse(RG(),1.0)"]
GRAD = "autograd gradient"
ZENNIT = "zennit AlphaBeta(2,1)"
#: the project's targets (time x grad, peak memory x grad) on the CNN and the ResNet-18
TARGETS = {"Gradient": (1.1, 1.3), "GradientXInput": (1.1, 1.3), "AlphaBeta(2,1)": (2.3, 1.5), "RG()": (2.3, 1.5),
           "GradientEquilibrium()": (1.3, 1.2)}
#: time targets as multiples of AlphaBeta(2,1)'s time
TARGETS_X_AB = {"Anchor(RG(),0.1)": 1.3, "RiskAverse(RG(),1.0)": 2.0}


def target_flags(method: str, tr: float, mr: float | None, ab: float | None,
                 targets: dict = TARGETS, x_ab: dict = TARGETS_X_AB) -> str:
    """'time ok' / 'time > 2.3x', 'mem ok' / 'mem > 1.5x' / 'mem n/a' for a method with a target
    (``tr``, ``mr``: its time and memory ratios to the gradient; ``ab``: AlphaBeta's time ratio)."""
    out = []
    if method in targets:
        t, m = targets[method]
        out.append("time ok" if tr <= t else f"time > {t}x")
        out.append("mem n/a" if mr is None else ("mem ok" if mr <= m else f"mem > {m}x"))
    if method in x_ab and ab is not None:
        k = x_ab[method]
        out.append(f"time <= {k}x AB" if tr <= k * ab else f"time > {k}x AB ({tr / ab:.2f}x)")
    return ", ".join(out)


# ------------------------------------------------------------------------------------------------
# models and methods
# ------------------------------------------------------------------------------------------------
class PlainCNN(nn.Module):
    """The VGG-like CNN as people write it: modules for the weights, functional ReLU and pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
        self.c3, self.c4 = nn.Conv2d(64, 128, 3, padding=1), nn.Conv2d(128, 128, 3, padding=1)
        self.c5 = nn.Conv2d(128, 256, 3, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2)
        x = F.max_pool2d(F.relu(self.c4(F.relu(self.c3(x)))), 2)
        x = F.max_pool2d(F.relu(self.c5(x)), 2)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc2(F.relu(self.fc1(x)))


def time_read(model, x, repeat: int = 3) -> tuple[float, float]:
    """(first call, cached call) of the reader, seconds: the first on a fresh deep copy each time
    (the cache is keyed on the model object), median of ``repeat``."""
    from backplay.gpu.read import read

    firsts, cached = [], []
    for _ in range(repeat):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        read(m, x)
        t1 = time.perf_counter()
        read(m, x)
        t2 = time.perf_counter()
        firsts.append(t1 - t0)
        cached.append(t2 - t1)
    return statistics.median(firsts), statistics.median(cached)


def build(kind: str, device: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "cnn":
        model = PlainCNN()
        x = torch.randn(16, 3, 64, 64)
    elif kind == "resnet18":
        from backplay.testing.zoo import init_weights, resnet18

        model = init_weights(resnet18(width=64, num_classes=10), seed)
        x = torch.randn(16, 3, 64, 64)
    elif kind == "mlp":
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                              nn.Linear(512, 10))
        x = torch.randn(256, 784)
    else:
        raise ValueError(kind)
    model = model.to(device=device, dtype=dtype).eval()
    x = x.to(device=device, dtype=dtype)
    t = torch.arange(x.shape[0], device=device) % 10
    return model, x, t


def autograd_gradient(model, x, t):
    xx = x.detach().requires_grad_(True)
    out = model(xx)
    (g,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), xx)
    return g


@contextlib.contextmanager
def _torchvision_stub():
    """zennit 0.5.1 imports torchvision.models.resnet.{BasicBlock, Bottleneck}; stand-ins if absent
    (same as tests/_torchvision_stub.py), removed from sys.modules afterwards."""
    names = ("torchvision", "torchvision.models", "torchvision.models.resnet")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "torchvision"}
    try:
        try:
            importlib.import_module("torchvision.models.resnet")
        except Exception:  # noqa: BLE001 - absent, or broken beside this torch
            for k in [k for k in sys.modules if k.split(".")[0] == "torchvision" and k not in saved]:
                del sys.modules[k]
            mods = [types.ModuleType(n) for n in names]
            mods[0].__path__, mods[1].__path__ = [], []
            mods[0].models, mods[1].resnet = mods[1], mods[2]
            mods[2].BasicBlock = type("BasicBlock", (), {})
            mods[2].Bottleneck = type("Bottleneck", (), {})
            sys.modules.update(zip(names, mods))
        yield
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] == "torchvision" and k not in saved]:
            del sys.modules[k]
        sys.modules.update(saved)


def load_zennit():
    if importlib.util.find_spec("zennit") is None:
        return None
    with _torchvision_stub():
        return importlib.import_module("zennit")


def zennit_alphabeta(zennit, model, t, n_out: int = 10):
    """A callable x -> relevance with zennit's AlphaBeta(2, 1) composite registered on ``model``
    (and a closer to remove the hooks)."""
    from zennit.attribution import Gradient as ZGradient
    from zennit.composites import LayerMapComposite
    from zennit.rules import AlphaBeta, Norm, Pass
    from zennit.types import Activation, AvgPool, Convolution, Linear

    composite = LayerMapComposite(layer_map=[
        (Activation, Pass()), (AvgPool, Norm()),
        (Convolution, AlphaBeta(alpha=2.0, beta=1.0)), (Linear, AlphaBeta(alpha=2.0, beta=1.0)),
    ])
    attributor = ZGradient(model=model, composite=composite)
    attributor.__enter__()

    def run(model_, x, t_):  # model_ is ignored: the hooked copy is run
        onehot = nn.functional.one_hot(t_, n_out)
        _, rel = attributor(x, lambda out: out * onehot.to(out.dtype))
        return rel

    return run, lambda: attributor.__exit__(None, None, None)


def method(name: str, zennit=None, model=None, t=None):
    """(fn(model, x, t), close)."""
    if name == GRAD:
        return autograd_gradient, lambda: None
    if name == ZENNIT:
        # on a copy: the composite's hooks stay registered across the interleaved rounds and must
        # not touch the model the other methods run
        return zennit_alphabeta(zennit, copy.deepcopy(model), t)
    rule = RULES[name]()
    return (lambda m, x, tt: bp.explain(m, x, tt, rule=rule)), lambda: None


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    """Reset the peak-RSS mark VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_cuda(fn, model, x, t, device: str) -> float:
    fn(model, x, t)  # warm (cuDNN / cuBLAS workspaces)
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn(model, x, t)
    sync(device)
    del out
    return float(torch.cuda.max_memory_allocated(device) - base)


def print_peak_rss(fn, model, x, t) -> None:
    """In a memory child: one call of fn after one warm-up call on the same batch (the lazy library
    initialisation, and what backplay makes once per model and batch size: the reader's export, timed
    on its own, the batch probe of the layouts, the folded BatchNorm weights); prints the peak RSS
    delta of the second call in bytes as JSON."""
    out = fn(model, x, t)
    del out
    if not _reset_hwm():
        raise RuntimeError("cannot reset the peak RSS mark (/proc/self/clear_refs)")
    base = _status_kib("VmRSS")
    out = fn(model, x, t)
    peak = _status_kib("VmHWM")
    del out
    print(json.dumps({"peak": max(0, peak - base) * 1024}))


def peak_cpu_child(args) -> None:
    """Child process: one method, one call; prints the peak RSS delta in bytes as JSON."""
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    model, x, t = build(args.child_model, "cpu", dtype)
    zennit = load_zennit() if args.child_method == ZENNIT else None
    fn, close = method(args.child_method, zennit, model, t)
    print_peak_rss(fn, model, x, t)
    close()


def run_peak_child(script: str, child_args: list[str]) -> float:
    """Run ``script`` as a fresh memory child (glibc serving large tensors by mmap) and return the
    peak it prints."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    res = subprocess.run([sys.executable, os.path.abspath(script), *child_args], env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or [""])[-1]
        raise RuntimeError(f"memory child exited {res.returncode}: {tail}")
    return float(json.loads(res.stdout.strip().splitlines()[-1])["peak"])


def peak_cpu(name: str, kind: str, args) -> float:
    return run_peak_child(__file__, ["--child-model", kind, "--child-method", name, "--dtype", args.dtype,
                                     "--threads", str(args.threads)])


def time_interleaved(rows: dict, fns: dict, model, x, t, args) -> None:
    """``--warmup`` calls of each method, then ``--repeat`` interleaved rounds (one call of each per
    round), so that a change of machine load hits all methods alike. Sets ``time`` (median over the
    rounds) and ``ratio`` (median over the rounds of the time / the gradient's time that round) in
    each row; a method that raises is reported in its row's ``error`` and dropped."""
    for name, fn in list(fns.items()):
        try:
            for _ in range(args.warmup):
                fn(model, x, t)
            sync(args.device)
        except Exception as e:  # noqa: BLE001 - a failing rule is reported, not fatal
            rows[name]["error"] = _err(e)
            del fns[name]
    for _ in range(args.repeat):
        for name, fn in list(fns.items()):
            t0 = time.perf_counter()
            try:
                fn(model, x, t)
                sync(args.device)
            except Exception as e:  # noqa: BLE001
                rows[name]["error"] = _err(e)
                del fns[name]
                continue
            rows[name]["times"].append(time.perf_counter() - t0)
    g = rows[GRAD]["times"]
    for r in rows.values():
        if "error" not in r:
            r["time"] = statistics.median(r["times"])
            r["ratio"] = statistics.median(a / b for a, b in zip(r["times"], g))


def run_model(kind: str, args, zennit) -> list[dict]:
    """Time every method (:func:`time_interleaved`), then measure each one's peak memory."""
    dtype = getattr(torch, args.dtype)
    model, x, t = build(kind, args.device, dtype)
    first, cached = time_read(model, x)
    print(f"{kind}: read (torch.export + analysis) first call {first * 1e3:.0f} ms, cached call "
          f"{cached * 1e3:.2f} ms", flush=True)
    names = [GRAD, *RULES] + ([ZENNIT] if zennit is not None and kind in args.zennit_models else [])
    rows = {n: {"model": kind, "method": n, "times": []} for n in names}
    fns, closers = {}, []
    for name in names:
        try:
            fn, close = method(name, zennit, model, t)
        except Exception as e:  # noqa: BLE001 - a rule not implemented yet is reported, not fatal
            rows[name]["error"] = _err(e)
            continue
        closers.append(close)
        fns[name] = fn
    try:
        time_interleaved(rows, fns, model, x, t, args)
    finally:
        for close in closers:
            close()
    for name, r in rows.items():
        if "error" in r or args.no_memory:
            continue
        try:
            if args.device.startswith("cuda"):
                fn, close = method(name, zennit, model, t)
                try:
                    r["peak"] = peak_cuda(fn, model, x, t, args.device)
                finally:
                    close()
            else:
                r["peak"] = peak_cpu(name, kind, args)
        except Exception as e:  # noqa: BLE001
            r["mem_error"] = _err(e)
    return list(rows.values())


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[-1][:70] if msg else ''}"


def print_table(rows: list[dict]) -> None:
    base = {r["model"]: r for r in rows if r["method"] == GRAD}
    zen = {r["model"]: r for r in rows if r["method"] == ZENNIT and "time" in r}
    head = (f"{'model':<5} {'method':<24} {'ms':>9} {'x grad':>7} {'peak MB':>9} {'x grad':>7} "
            f"{'bp/zennit':>9}  targets")
    print(head)
    print("-" * len(head))
    for r in rows:
        g = base[r["model"]]
        if "error" in r:
            print(f"{r['model']:<5} {r['method']:<24} {'n/a':>9}  {r['error']}")
            continue
        tr = r["ratio"]
        mem = r.get("peak")
        mr = mem / g["peak"] if mem is not None and g.get("peak") else None
        zr = ""
        if r["method"] == "AlphaBeta(2,1)" and r["model"] in zen:
            zt = zen[r["model"]]["times"]
            zr = f"{statistics.median(a / b for a, b in zip(r['times'], zt)):.2f}"
        ab = next((a["ratio"] for a in rows if a["model"] == r["model"] and a["method"] == "AlphaBeta(2,1)"
                   and "error" not in a), None)
        flags = target_flags(r["method"], tr, mr, ab)
        if zr:
            flags += ", " + ("faster than zennit" if float(zr) < 1 else "SLOWER than zennit")
        if "mem_error" in r:
            flags += f" [memory: {r['mem_error']}]"
        mem_s = f"{mem / 2**20:9.1f}" if mem is not None else f"{'-':>9}"
        mr_s = f"{mr:7.2f}" if mr is not None else f"{'-':>7}"
        print(f"{r['model']:<5} {r['method']:<24} {r['time'] * 1e3:9.2f} {tr:7.2f} {mem_s} {mr_s} "
              f"{zr:>9}  {flags}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--models", default="cnn,resnet18,mlp")
    parser.add_argument("--zennit-models", default="cnn,mlp", help="models on which zennit is timed")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--child-method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_method:
        peak_cpu_child(args)
        return
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    zennit = load_zennit()
    dev = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"device: {args.device} ({dev}); torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.dtype}; median of {args.repeat} interleaved rounds after {args.warmup} warm-up; "
          f"zennit {getattr(zennit, '__version__', 'installed') if zennit else 'not installed'}")
    print("peak memory: " + ("torch.cuda.max_memory_allocated delta" if args.device.startswith("cuda")
                             else "VmHWM (reset) - VmRSS before the call, one fresh subprocess per method"))
    rows = []
    for kind in args.models.split(","):
        rows += run_model(kind, args, zennit)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
