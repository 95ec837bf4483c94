"""Heatmap figures (matplotlib, Agg backend): relevance over the image, several rules side by side."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

__all__ = ["to_display", "relevance_map", "draw_relevance", "save_rule_grid"]


def to_display(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] tensor -> [H, W] (grey) or [H, W, 3] array rescaled to [0, 1] for ``imshow``."""
    a = image.detach().cpu().double().numpy()
    a = a[0] if a.shape[0] == 1 else np.moveaxis(a[:3], 0, -1)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def relevance_map(R: torch.Tensor) -> np.ndarray:
    """[C, H, W] relevance -> [H, W], summed over channels (signed)."""
    return R.detach().cpu().double().sum(0).numpy()


def draw_relevance(ax, image: torch.Tensor, R: torch.Tensor, title: str, mask=None) -> None:
    """The signed relevance (blue negative, red positive, symmetric colour scale) over a grey copy of
    the image; ``mask`` (optional [H, W] bool) drawn as a contour."""
    disp = to_display(image)
    grey = disp if disp.ndim == 2 else disp.mean(-1)
    r = relevance_map(R)
    v = float(np.abs(r).max()) or 1.0
    ax.imshow(grey, cmap="gray", interpolation="nearest")
    ax.imshow(r, cmap="bwr", vmin=-v, vmax=v, alpha=0.7, interpolation="nearest")
    if mask is not None:
        ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors="lime", linewidths=0.8)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def save_rule_grid(path: str | os.PathLike, images: Sequence[torch.Tensor],
                   maps: Sequence[dict[str, torch.Tensor]], titles: Sequence[str] | None = None,
                   masks: Sequence | None = None, dpi: int = 110) -> None:
    """One row per image: the image, then each rule's heatmap (``maps[i]``: label -> [C, H, W]);
    saved at ``dpi``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rules = max(len(m) for m in maps)
    fig, axes = plt.subplots(len(images), 1 + n_rules, squeeze=False,
                             figsize=(1.9 * (1 + n_rules), 2.0 * len(images)))
    for i, (img, rel) in enumerate(zip(images, maps)):
        ax = axes[i, 0]
        disp = to_display(img)
        ax.imshow(disp, cmap="gray" if disp.ndim == 2 else None, interpolation="nearest")
        if masks is not None and masks[i] is not None:
            ax.contour(np.asarray(masks[i], dtype=float), levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(titles[i] if titles else "image", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        for j, (label, R) in enumerate(rel.items()):
            draw_relevance(axes[i, 1 + j], img, R, label, None if masks is None else masks[i])
        for j in range(len(rel), n_rules):
            axes[i, 1 + j].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
