"""Small models for the digits localisation benchmark: training on the CPU, a cache, checkpoints.

* :func:`small_cnn`: an ``nn.Sequential`` of Conv2d / ReLU / MaxPool2d / Flatten / Linear, the
  modules :func:`backplay.explain` reads.
* :func:`small_vit`: a :class:`backplay.gpu.vit.ViT` (one input channel, patch 4, PyTorch init).
* :func:`train_or_load`: trains a model on digit canvases (Adam or AdamW with a one-cycle schedule:
  warm-up then cosine decay; cross-entropy, optional label smoothing) and caches it under
  ``<cache>/models/<kind>-<hash>.pt`` where the hash covers the whole training configuration and
  seed; a later call with the same configuration loads the file.
* Checkpoints are plain ``torch.save`` dicts (``format == CHECKPOINT_FORMAT``, the architecture, the
  state dict, preprocessing and accuracies); :func:`load_model` reads them and also ViT checkpoints
  of timm / Hugging Face / torchvision / backplay (via :func:`backplay.gpu.vit.load`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .digits import CanvasConfig, digit_pools, make_canvases

__all__ = ["CHECKPOINT_FORMAT", "TrainConfig", "cache_dir", "small_cnn", "small_vit",
           "train_or_load", "save_checkpoint", "load_model", "LoadedModel"]

CHECKPOINT_FORMAT = "backplay-bench-model/1"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: ``override``, else ``$BACKPLAY_CACHE``, else ``~/.cache/backplay``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("BACKPLAY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "backplay"


def small_cnn(in_channels: int = 1, num_classes: int = 10, size: int = 32, width: int = 16) -> nn.Sequential:
    """Conv(3x3)-BatchNorm-ReLU-MaxPool(2) three times (width, 2 width, 4 width channels), then
    Flatten-Linear(., 64)-ReLU-Linear(64, num_classes). ``size`` must be a multiple of 8."""
    if size % 8:
        raise ValueError(f"size must be a multiple of 8, got {size}")
    w = width

    def stage(a: int, b: int) -> list[nn.Module]:
        return [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *stage(in_channels, w), *stage(w, 2 * w), *stage(2 * w, 4 * w),
        nn.Flatten(), nn.Linear(4 * w * (size // 8) ** 2, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )


def small_vit(in_channels: int = 1, num_classes: int = 10, size: int = 32, dim: int = 48,
              depth: int = 3, heads: int = 3, patch_size: int = 4, mlp_ratio: int = 2,
              init: str = "torch") -> nn.Module:
    """A small :class:`backplay.gpu.vit.ViT` (MLP ``mlp_ratio * dim``).

    ``init="torch"`` (default) re-draws every Linear and the patch-embedding Conv2d with PyTorch's
    default init (Kaiming-uniform, std about ``1 / sqrt(3 fan_in)``) and keeps the ViT init of the
    cls token and position embedding (truncated normal, std 0.02); ``init="vit"`` keeps the ViT /
    timm init (std 0.02 everywhere). On the digit canvases the std-0.02 init stays at chance for
    hundreds of steps (the patch tokens are tiny next to the position embedding), the PyTorch init
    learns at once."""
    from backplay.gpu.vit import ViT, ViTConfig

    if init not in ("torch", "vit"):
        raise ValueError(f"unknown init {init!r} (known: 'torch', 'vit')")
    cfg = ViTConfig(image_size=size, patch_size=patch_size, in_channels=in_channels, dim=dim,
                    depth=depth, heads=heads, mlp_dim=mlp_ratio * dim, num_classes=num_classes)
    model = ViT(cfg)
    if init == "torch":
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.reset_parameters()
    return model


def build_model(kind: str, arch: dict) -> nn.Module:
    """A fresh bench model of ``kind`` ("cnn" or "vit") with the architecture parameters ``arch``."""
    if kind == "cnn":
        return small_cnn(**arch)
    if kind == "vit":
        return small_vit(**arch)
    raise ValueError(f"unknown model kind {kind!r} (known: 'cnn', 'vit')")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained model (its hash names the cache file)."""

    kind: str = "cnn"
    arch: dict = field(default_factory=dict)
    canvas: dict = field(default_factory=lambda: CanvasConfig().to_dict())
    n_train: int = 6000
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    fresh_canvases: bool = True  # draw new training canvases every epoch (same digit pool)
    optimizer: str = "adam"  # "adam" or "adamw"
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (on matrices only; not biases, norms, embeddings)
    warmup: float = 0.3  # share of the steps the learning rate rises (then cosine decay; OneCycleLR)
    label_smoothing: float = 0.0

    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def save_checkpoint(path: str | os.PathLike, model: nn.Module, kind: str, arch: dict,
                    meta: dict | None = None) -> None:
    """Write ``model`` as a backplay bench checkpoint (a plain dict, loadable with weights_only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": CHECKPOINT_FORMAT, "kind": kind, "arch": dict(arch),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "meta": dict(meta or {})}
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)


@dataclass
class LoadedModel:
    """A model read from a checkpoint: the module (eval mode), its kind ("cnn" or "vit"), the input
    size and channels it expects, and the preprocessing ``(mean, std)`` per channel."""

    model: nn.Module
    kind: str
    in_channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    meta: dict


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Read a backplay bench checkpoint, or any ViT checkpoint :func:`backplay.gpu.vit.load`
    understands (then the preprocessing is ImageNet's mean and std)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint {str(path)!r} does not exist")
    blob = None
    if path.suffix != ".safetensors":
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # not a torch pickle of plain tensors: let the ViT loader try
            blob = None
    if isinstance(blob, dict) and blob.get("format") == CHECKPOINT_FORMAT:
        model = build_model(blob["kind"], blob["arch"])
        model.load_state_dict(blob["state_dict"])
        model = model.to(dtype).eval()
        meta = blob.get("meta", {})
        c = int(blob["arch"].get("in_channels", 1))
        return LoadedModel(model, blob["kind"], c, int(blob["arch"].get("size", 32)),
                           tuple(meta.get("mean", (0.0,) * c)), tuple(meta.get("std", (1.0,) * c)), meta)
    from backplay.gpu import vit as vit_mod

    try:
        model = vit_mod.load(path, dtype=dtype)
    except Exception as e:
        raise ValueError(f"{str(path)!r} is neither a backplay bench checkpoint nor a ViT checkpoint "
                         f"backplay.gpu.vit.load reads: {e}") from e
    cfg = model.config
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.in_channels == 3 else ((0.0,) * cfg.in_channels,
                                                                            (1.0,) * cfg.in_channels)
    return LoadedModel(model.eval(), "vit", cfg.in_channels, cfg.image_size, mean, std, {})


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([model(images[i:i + 256]).argmax(1) for i in range(0, len(images), 256)])
    return float((pred == labels).double().mean())


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if cfg.optimizer == "adamw":
        named = list(model.named_parameters())
        decay = [p for n, p in named if p.dim() >= 2 and not n.endswith(("cls_token", "pos_embed"))]
        ids = {id(p) for p in decay}
        rest = [p for _, p in named if id(p) not in ids]
        return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (known: 'adam', 'adamw')")


def train_or_load(cfg: TrainConfig, cache: str | os.PathLike | None = None,
                  log: Any = sys.stderr) -> tuple[nn.Module, dict, Path]:
    """The model trained with ``cfg``, from the cache when present (else trained and cached).

    Returns ``(model in eval mode, meta, checkpoint path)``; ``meta`` holds the training and held-out
    accuracies and the training time. Training draws from private generators and restores the global
    torch RNG state, so a call has no effect on the caller's random numbers.
    """
    path = cache_dir(cache) / "models" / f"{cfg.kind}-{cfg.digest()}.pt"
    if path.is_file():
        loaded = load_model(path)
        print(f"[bench] {cfg.kind}: cached model {path}", file=log)
        return loaded.model, loaded.meta, path
    canvas = CanvasConfig(**cfg.canvas)
    pools = digit_pools(canvas, cfg.seed)
    train = make_canvases(canvas, *pools["train"], n=cfg.n_train, seed=cfg.seed + 1)
    held = make_canvases(canvas, *pools["eval"], n=500, seed=cfg.seed + 2)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.kind, cfg.arch)
        opt = _optimizer(model, cfg)
        steps = cfg.epochs * ((cfg.n_train + cfg.batch_size - 1) // cfg.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps,
                                                    pct_start=cfg.warmup)
        g = torch.Generator().manual_seed(cfg.seed + 3)
        model.train()
        for epoch in range(cfg.epochs):
            if cfg.fresh_canvases and epoch > 0:
                train = make_canvases(canvas, *pools["train"], n=cfg.n_train, seed=cfg.seed + 1 + 1000 * epoch)
            perm = torch.randperm(cfg.n_train, generator=g)
            total = 0.0
            for k in range(0, cfg.n_train, cfg.batch_size):
                idx = perm[k:k + cfg.batch_size]
                loss = nn.functional.cross_entropy(model(train.images[idx]), train.labels[idx],
                                                   label_smoothing=cfg.label_smoothing)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            print(f"[bench] {cfg.kind}: epoch {epoch + 1}/{cfg.epochs} loss {total / cfg.n_train:.3f}",
                  file=log)
        model.eval()
    meta = {"train_accuracy": _accuracy(model, train.images, train.labels),
            "heldout_accuracy": _accuracy(model, held.images, held.labels),
            "train_seconds": time.perf_counter() - t0, "config": asdict(cfg),
            "mean": [0.0], "std": [1.0]}
    save_checkpoint(path, model, cfg.kind, cfg.arch, meta)
    print(f"[bench] {cfg.kind}: trained in {meta['train_seconds']:.0f} s, held-out accuracy "
          f"{meta['heldout_accuracy']:.3f}; cached at {path}", file=log)
    return model, meta, path
