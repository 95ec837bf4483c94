"""The ``backplay explain`` and ``backplay bench localisation`` commands (argument parsing and runs)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

__all__ = ["add_explain_parser", "add_bench_parser", "explain_image", "run_explain", "run_bench"]

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def add_explain_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("explain", help="heatmaps of one image or a folder of images under one or more rules")
    e.add_argument("image", help="an image file, or a folder of images (then --out is a folder)")
    e.add_argument("--model", required=True,
                   help="checkpoint: a backplay bench model (e.g. from `backplay bench localisation`) or a "
                        "timm / Hugging Face / torchvision / backplay ViT checkpoint")
    e.add_argument("--rule", default="Gradient",
                   help="rule(s), comma separated, e.g. 'Gradient,LRP0,RG(tau=0.5, route_temp=2)' "
                        "(default Gradient)")
    e.add_argument("--target", type=int, default=None, help="class to explain (default: the predicted one)")
    e.add_argument("--out", default="heatmap.png", help="output PNG (a folder for a folder of images)")
    e.add_argument("--device", default="cpu", help="torch device (default cpu)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    loc = bsub.add_parser("localisation", help="every rule x localisation metric; hyperparameters chosen on "
                                               "split A, reported on split B (torchrun shards it)")
    loc.add_argument("--quick", action="store_true", help="tiny training, few images (a smoke test)")
    loc.add_argument("--out", default="localisation_out", help="output folder (default ./localisation_out)")
    loc.add_argument("--cache", default=None, help="model cache (default $BACKPLAY_CACHE or ~/.cache/backplay)")
    loc.add_argument("--seed", type=int, default=0)
    loc.add_argument("--n-eval", type=int, default=None, help="images per split (default 300; quick 16)")
    loc.add_argument("--models", default="cnn,vit", help="digits: models to evaluate (default cnn,vit)")
    loc.add_argument("--dataset", default="digits", choices=("digits", "imagenet-s", "voc"))
    loc.add_argument("--data-root", default=None, help="imagenet-s / voc: the data folder")
    loc.add_argument("--model", default=None, help="imagenet-s / voc: the model checkpoint (e.g. ViT-B/16)")
    loc.add_argument("--split", default=None, help="imagenet-s split (default validation) or VOC image set "
                                                  "(default val)")
    loc.add_argument("--year", default="2012", help="VOC year (default 2012)")
    loc.add_argument("--wnids", default=None, help="imagenet-s: file of the model's class wnids in order")
    loc.add_argument("--limit", type=int, default=None, help="imagenet-s / voc: at most this many images")
    loc.add_argument("--chunk", type=int, default=None, help="images per explain call (default 50; real data 8)")
    loc.add_argument("--device", default=None, help="torch device (default cpu; cuda:LOCAL_RANK under torchrun "
                                                   "when --device cuda)")
    loc.add_argument("--no-plots", action="store_true", help="do not write the plots")


def _images_in(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_EXT)


def explain_image(loaded, path: str | os.PathLike, rules: list, target: int | None = None,
                  device: str = "cpu"):
    """Read ``path`` for the model of ``loaded`` (:func:`~backplay.bench.models.load_model`: resized to
    its input size, grey for one channel, normalised) and explain it under every rule.

    Returns ``(x [1, C, H, W] float64, target, logit, {rule label: relevance [C, H, W]})``; the target
    defaults to the predicted class. Raises ValueError for a target out of range or an unsupported
    channel count, TypeError / NotImplementedError when the engine rejects a rule for the model.
    """
    import torch

    import backplay as bp
    from .datasets import read_image
    from .rulespec import rule_label

    model = loaded.model
    img = read_image(path, loaded.size).double()
    if loaded.in_channels == 1:
        img = img.mean(0, keepdim=True)
    elif loaded.in_channels != 3:
        raise ValueError(f"models with {loaded.in_channels} input channels are not supported")
    mean = torch.tensor(loaded.mean, dtype=torch.float64)[:, None, None]
    std = torch.tensor(loaded.std, dtype=torch.float64)[:, None, None]
    x = ((img - mean) / std).unsqueeze(0).to(device=device, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        logits = model(x)[0]
    n_classes = logits.shape[0]
    target = int(logits.argmax()) if target is None else int(target)
    if not 0 <= target < n_classes:
        raise ValueError(f"target {target} is out of range (the model has {n_classes} classes)")
    maps = {}
    for rule in rules:
        try:
            maps[rule_label(rule)] = bp.explain(model, x, target, rule)[0].cpu()
        except (TypeError, NotImplementedError) as e:
            raise type(e)(f"rule {rule_label(rule)} does not run on this model: {e}") from e
    return x, target, float(logits[target]), maps


def run_explain(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..plot import compare, save
    from .models import load_model
    from .rulespec import parse_rules

    try:
        rules = parse_rules(args.rule)
    except ValueError as e:
        print(f"backplay explain: {e}", file=sys.stderr)
        return 2
    src = Path(args.image)
    if not src.exists():
        print(f"backplay explain: {str(src)!r} does not exist", file=sys.stderr)
        return 2
    try:
        loaded = load_model(args.model, dtype=torch.float64)
    except (FileNotFoundError, ValueError) as e:
        print(f"backplay explain: {e}", file=sys.stderr)
        return 2
    loaded.model.to(args.device)
    if src.is_dir():
        files = _images_in(src)
        if not files:
            print(f"backplay explain: no images in folder {str(src)!r}", file=sys.stderr)
            return 2
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        outputs = [out_dir / f"{f.stem}_heatmap.png" for f in files]
    else:
        files, outputs = [src], [Path(args.out)]
        outputs[0].parent.mkdir(parents=True, exist_ok=True)
    for f, out in zip(tqdm(files, desc="explain", file=sys.stderr,
                           disable=args.no_progress or len(files) == 1), outputs):
        try:
            x, target, logit, maps = explain_image(loaded, f, rules, args.target, args.device)
        except (TypeError, NotImplementedError, ValueError) as e:
            print(f"backplay explain: {f.name}: {e}", file=sys.stderr)
            return 2
        save(compare(maps, x[0].cpu(), titles=[f"{f.name}: class {target} (logit {logit:.2f})"]), out, dpi=110)
        if len(files) == 1:
            print(f"wrote {out}")
    if len(files) > 1:
        print(f"wrote {len(files)} heatmaps to {args.out}")
    return 0


def run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .distributed import communicator
    from .localisation import BenchConfig, format_table, run_dataset, run_digits, write_outputs

    device = args.device or "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    if args.n_eval is not None and args.n_eval < 2:
        parser.error("--n-eval must be >= 2")
    comm = communicator(device)
    t0 = time.perf_counter()
    try:
        if args.dataset == "digits":
            models = tuple(m.strip() for m in args.models.split(",") if m.strip())
            cfg = BenchConfig(quick=args.quick, seed=args.seed, n_eval=args.n_eval, models=models,
                              cache=args.cache, chunk=args.chunk or 50, device=device)
            result = run_digits(cfg, comm)
            what = (f"digits canvases (load_digits), {cfg.images_per_split()} images per split, seed {args.seed}"
                    + (", quick" if args.quick else ""))
        else:
            if args.data_root is None or args.model is None:
                parser.error(f"--dataset {args.dataset} needs --data-root and --model")
            from .datasets import ImageNetS, VOCSegmentation
            from .models import load_model

            loaded = load_model(args.model)
            if args.dataset == "imagenet-s":
                data = ImageNetS(args.data_root, args.split or "validation", size=loaded.size, wnids=args.wnids)
            else:
                data = VOCSegmentation(args.data_root, args.year, args.split or "val", size=loaded.size)
            result = run_dataset(data, loaded, limit=args.limit, quick=args.quick, comm=comm,
                                 chunk=args.chunk or 8, device=device)
            what = f"{args.dataset} at {args.data_root}, model {args.model}"
        if comm.rank != 0:
            return 0
        paths = write_outputs(result, args.out, plots=not args.no_plots)
        print(f"backplay bench localisation: {what}; {comm.world} process(es)")
        for name, info in result.models.items():
            if info:
                print(f"  {name}: held-out accuracy {info['heldout_accuracy']:.3f}, accuracy on split B "
                      f"{info['accuracy_split_b']:.3f}, checkpoint {info['checkpoint']}")
        print("split B; hyperparameters chosen on split A by relevance mass accuracy; mean [95% t-interval]")
        print(format_table(result.rows) if result.rows else "(no rows)")
        for note in result.notes:
            print(f"note: {note}")
        print(f"wrote {', '.join(str(p) for p in paths.values())} ({time.perf_counter() - t0:.0f} s)")
        return 0
    finally:
        comm.close()
