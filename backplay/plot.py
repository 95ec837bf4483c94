"""Heatmap figures of attributions: one map or a batch (:func:`heatmap`), several rules side by
side (:func:`compare`), and :func:`save`.

Every heatmap panel draws the relevance on a symmetric diverging scale, ``vmin = -v`` and
``vmax = v`` with ``v = max |R|`` of that panel (an all-zero map gets ``v = 1``), with a colour
bar showing the scale; over a grey copy of the image when one is given; with an optional mask
contour (lime). Titles (e.g. full rule labels with their hyperparameters) are wrapped onto as many
lines as the panel width needs, never truncated: removing the newlines gives the label back.

Figures are built with matplotlib's object API (:class:`matplotlib.figure.Figure`), not pyplot's
global state: no backend is selected, pyplot keeps nothing open, and it works headless. In a
notebook, a returned figure is displayed as the cell's result (with the inline backend, the
default in Jupyter); elsewhere, write it with :func:`save`.

Shapes (numpy arrays or torch tensors, real dtypes; lists of equal-shape arrays are stacked):

* ``R``: one map ``[H, W]`` or ``[C, H, W]``, or a batch ``[B, C, H, W]``. A 3-D ``R`` is one
  ``[C, H, W]`` map, except beside a batch of images ``x`` ``[B, C, H, W]``, where it is
  ``[B, H, W]``; for a batch of one-channel maps without images pass ``[B, 1, H, W]``. Channels
  are reduced by ``channel_reduction`` as in :mod:`backplay.metrics` (default ``"sum"``, signed).
* ``x``: one image ``[H, W]`` or ``[C, H, W]`` (C = 1 grey, C = 3 RGB) or a batch
  ``[B, C, H, W]``; shown rescaled to [0, 1] (min-max per image).
* masks: ``[H, W]`` for one map, ``[B, H, W]`` or ``[B, 1, H, W]`` for a batch; bool or 0/1.
"""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .metrics import reduce_channels

__all__ = ["heatmap", "compare", "save"]

# Layout, in inches. A cell is one panel: the heatmap (centred in a region of _REGION_IN, where its
# title is centred too) and, to its right, the colour bar and its tick labels (_BAR_IN).
_PANEL_IN = 2.4
_BAR_IN = 0.6
_REGION_IN = _PANEL_IN - _BAR_IN
_MAP_IN = 1.75  # largest height (and width) of a map
_PAD_IN = 0.06
_BAR_GAP_IN, _BAR_WIDTH_IN = 0.07, 0.1
_TITLE_PT = 8
_LINE_IN = 1.3 * _TITLE_PT / 72  # height of one title line
# A glyph of the title font is at most this wide on average, in em (DejaVu Sans, matplotlib's
# default, averages about 0.5 em over code-like labels): wrapped titles fit their region.
_CHAR_EM = 0.62
_MAX_COLS = 4  # panels per row of a batch heatmap
_PIECES = re.compile(r"[^\s,(]+[\s,(]*|[\s,(]+")  # text up to and including a break opportunity

Array = Any  # numpy array, torch tensor, or a list of equal-shape ones


# ---------------------------------------------------------------------------------------------
# input handling
# ---------------------------------------------------------------------------------------------


def _numpy(a: Array, name: str) -> np.ndarray:
    """``a`` as a numpy array (torch: detached, on the CPU); lists of arrays/tensors are stacked."""
    if isinstance(a, (list, tuple)) and a and all(isinstance(e, (np.ndarray, torch.Tensor)) for e in a):
        parts = [_numpy(e, name) for e in a]
        if len({p.shape for p in parts}) > 1:
            raise ValueError(f"{name}: the items have different shapes {[p.shape for p in parts]}; "
                             f"give equal-shape items (or one stacked array)")
        return np.stack(parts)
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.is_complex():
            raise TypeError(f"{name} must be real-valued, got complex dtype {a.dtype}")
        return a.numpy() if a.dtype == torch.bool else a.to(torch.float64).numpy()
    arr = np.asarray(a)
    if arr.dtype != np.bool_ and not (np.issubdtype(arr.dtype, np.integer)
                                      or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name} must be a real numeric array or tensor, got dtype {arr.dtype}")
    return arr


def _finite(a: Array, name: str) -> np.ndarray:
    arr = _numpy(a, name).astype(np.float64)
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"{name} has {bad} NaN/inf value(s); heatmaps need finite values")
    return arr


def _maps(R: Array, name: str, batch: bool | None, channel_reduction: str) -> tuple[np.ndarray, bool]:
    """``(maps [B, H, W], is a batch)``; ``batch``: whether the images beside ``R`` are a batch
    (None: no images), which decides a 3-D ``R`` (module docstring)."""
    r = _finite(R, name)
    if r.ndim == 2:
        if batch:
            raise ValueError(f"{name} is one map {tuple(r.shape)} [H, W] but x is a batch of images; "
                             f"give one map per image, [B, H, W] or [B, C, H, W]")
        out, is_batch = r[None], False
    elif r.ndim == 3:
        out, is_batch = (r, True) if batch else (reduce_channels(r[None], channel_reduction), False)
    elif r.ndim == 4:
        if batch is False:
            raise ValueError(f"{name} is a batch {tuple(r.shape)} [B, C, H, W] but x is one image; "
                             f"give x as a batch [B, C, H, W] too")
        out, is_batch = reduce_channels(r, channel_reduction), True
    else:
        raise ValueError(f"{name} must have shape [H, W], [C, H, W] or [B, C, H, W], got shape "
                         f"{tuple(r.shape)}")
    if out.shape[1] * out.shape[2] == 0:
        raise ValueError(f"{name} has no pixels (shape {tuple(r.shape)})")
    return out, is_batch


def _images(x: Array) -> tuple[np.ndarray, bool]:
    """``(display [B, H, W] or [B, H, W, 3] in [0, 1], is a batch)``."""
    a = _finite(x, "x")
    if a.ndim not in (2, 3, 4):
        raise ValueError(f"x must have shape [H, W], [C, H, W] or [B, C, H, W], got shape {tuple(a.shape)}")
    is_batch = a.ndim == 4
    a = a.reshape((-1,) + a.shape[-3:]) if a.ndim >= 3 else a[None, None]
    if a.shape[1] not in (1, 3):
        raise ValueError(f"x has {a.shape[1]} channels (shape {tuple(a.shape)}); images need 1 (grey) "
                         f"or 3 (RGB) channels first, [C, H, W]")
    lo = a.min(axis=(1, 2, 3), keepdims=True)
    span = a.max(axis=(1, 2, 3), keepdims=True) - lo
    a = np.divide(a - lo, span, out=np.zeros_like(a), where=span > 0)
    return (a[:, 0] if a.shape[1] == 1 else np.moveaxis(a, 1, -1)), is_batch


def _masks(mask: Array | None, name: str, n: int, hw: tuple[int, int]) -> list[np.ndarray | None]:
    """``n`` masks [H, W] (bool), or ``n`` Nones."""
    if mask is None:
        return [None] * n
    given = _numpy(mask, name)
    m = given
    if m.ndim == 2:
        m = m[None]
    elif m.ndim == 4:
        if m.shape[1] != 1:
            raise ValueError(f"{name} of shape {tuple(m.shape)} has {m.shape[1]} channels; a mask has one, "
                             f"[B, H, W] or [B, 1, H, W]")
        m = m[:, 0]
    if m.ndim != 3 or m.shape != (n,) + hw:
        raise ValueError(f"{name} of shape {tuple(given.shape)} does not match {n} map(s) of shape {hw}; "
                         f"give [H, W] for one map, [B, H, W] or [B, 1, H, W] for a batch")
    if m.dtype != np.bool_ and not np.all((m == 0) | (m == 1)):
        raise ValueError(f"{name} must be binary (bool or values in {{0, 1}})")
    return list(m.astype(bool))


def _check_images(imgs: np.ndarray, n: int, hw: tuple[int, int], what: str) -> None:
    if imgs.shape[0] != n or imgs.shape[1:3] != hw:
        raise ValueError(f"x holds {imgs.shape[0]} image(s) of {imgs.shape[1:3]} pixels but {what} holds "
                         f"{n} map(s) of {hw}; give one image per map, of the maps' height and width")


def _titles(title: str | Sequence[str] | None, n: int, name: str) -> list[str | None]:
    if title is None:
        return [None] * n
    if isinstance(title, str):
        return [title] * n
    out = [str(t) for t in title]
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} entries for {n} sample(s); give one per sample")
    return out


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------


def _chars(width_in: float, pt: float = _TITLE_PT) -> int:
    """Characters of a ``pt``-point title that fit on one line ``width_in`` inches wide."""
    return max(4, int(width_in * 72 / (pt * _CHAR_EM)))


def _wrap(text: str, width: int) -> str:
    """``text`` on lines of at most ``width`` characters (trailing spaces not counted), broken after
    spaces, commas and opening parentheses, longer runs cut; every character is kept, so removing
    the newlines gives ``text`` back."""
    lines, line = [], ""
    for piece in _PIECES.findall(text):
        if line and len(line + piece.rstrip()) > width:
            lines.append(line)
            line = ""
        while len(piece.rstrip()) > width:
            lines.append(piece[:width])
            piece = piece[width:]
        line += piece
    lines.append(line)
    return "\n".join(lines)


def _root(ax: Axes) -> Figure:
    fig = ax.figure
    while not isinstance(fig, Figure):  # a SubFigure: up to the figure that holds it
        fig = fig.figure
    return fig


def _contour(ax: Axes, mask: np.ndarray | None) -> None:
    if mask is not None and mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors="lime", linewidths=0.8)


def _lines(text: str | None, chars: int) -> int:
    return 0 if not text else _wrap(text, chars).count("\n") + 1


class _Grid:
    """A figure of ``len(row_lines)`` rows by ``ncols`` cells for maps of ``hw`` pixels, laid out
    by hand (no layout engine: fast, and every size known): row ``i`` leaves ``row_lines[i]``
    title lines above its maps; ``top_in`` / ``left_in`` inches are kept free for a heading / row
    labels."""

    def __init__(self, row_lines: Sequence[int], ncols: int, hw: tuple[int, int], top_in: float = 0.0,
                 left_in: float = 0.0) -> None:
        aspect = hw[1] / hw[0]
        self.map_w = min(_MAP_IN, _MAP_IN * aspect)
        self.map_h = self.map_w / aspect
        self.left_in, self.top_in = left_in, top_in
        self.row_lines = list(row_lines)
        self.row_h = [_PAD_IN + k * _LINE_IN + (_PAD_IN if k else 0) + self.map_h + 2 * _PAD_IN
                      for k in self.row_lines]
        self.size = (left_in + ncols * _PANEL_IN, top_in + sum(self.row_h))
        self.fig = Figure(figsize=self.size)

    def _rect(self, x0: float, y0: float, w: float, h: float) -> list[float]:
        W, H = self.size
        return [x0 / W, y0 / H, w / W, h / H]

    def axes(self, i: int, j: int) -> Axes:
        """The map axes of cell (row ``i``, column ``j``), centred in the cell's title region."""
        x0 = self.left_in + j * _PANEL_IN + (_REGION_IN - self.map_w) / 2
        y0 = self.size[1] - self.top_in - sum(self.row_h[:i + 1]) + 2 * _PAD_IN
        return self.fig.add_axes(self._rect(x0, y0, self.map_w, self.map_h))

    def bar(self, ax: Axes) -> Axes:
        """The colour-bar axes beside ``ax``, as tall as the map."""
        W, H = self.size
        x0, y0, w, h = ax.get_position().bounds
        return self.fig.add_axes(self._rect((x0 + w) * W + _BAR_GAP_IN, y0 * H, _BAR_WIDTH_IN, h * H))


def _panel(ax: Axes, r: np.ndarray, grey: np.ndarray | None, mask: np.ndarray | None,
           title: str | None, cmap: str, chars: int, bar: Axes | bool | None) -> None:
    """One heatmap panel: ``r`` [H, W] on the symmetric scale, over ``grey`` when given. ``bar``:
    the colour bar's axes, True (take the room from ``ax``) or None (no colour bar)."""
    v = float(np.abs(r).max()) or 1.0
    if grey is not None:
        ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    im = ax.imshow(r, cmap=cmap, vmin=-v, vmax=v, alpha=0.7 if grey is not None else 1.0,
                   interpolation="nearest")
    _contour(ax, mask)
    if title:
        ax.set_title(_wrap(title, chars), fontsize=_TITLE_PT)
    ax.set_xticks([])
    ax.set_yticks([])
    if bar is not None:
        cb = ax.figure.colorbar(im, ax=ax, shrink=0.85) if bar is True else ax.figure.colorbar(im, cax=bar)
        cb.ax.tick_params(labelsize=6)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def heatmap(R: Array, x: Array | None = None, *, mask: Array | None = None,
            title: str | Sequence[str] | None = None, ax: Axes | None = None, cmap: str = "bwr",
            channel_reduction: str = "sum", colorbar: bool = True) -> Figure:
    """Draw relevance ``R`` as heatmap(s) on a symmetric diverging scale with a colour bar.

    One map gives one panel, a batch one panel per sample (up to 4 per row). With ``x`` (the
    image, or a batch of images matching ``R``), each map is drawn over a grey copy of its image;
    ``mask`` adds a contour of the ground-truth region. Shapes: see the module docstring.

    ``title``: one map: its title; a batch: one title per sample, or one string shown above all
    panels (panels are then titled ``sample i``). ``ax``: draw one map into these axes (of any
    figure, e.g. from ``plt.subplots``; the colour bar takes its room from them) instead of a new
    figure. ``cmap``: a diverging colour map (default ``"bwr"``: blue negative, white zero, red
    positive). ``colorbar``: draw the scale.

    Returns the figure (the one holding ``ax`` when given). Raises ValueError for shapes that do not
    fit together, an unknown ``channel_reduction``, non-finite values, a non-binary mask, or ``ax``
    with a batch; TypeError for non-numeric input or a non-string title with ``ax``.
    """
    imgs, x_batch = (None, None) if x is None else _images(x)
    maps, batch = _maps(R, "R", x_batch, channel_reduction)
    n, hw = maps.shape[0], maps.shape[1:]
    if imgs is not None:
        _check_images(imgs, n, hw, "R")
    greys = [None] * n if imgs is None else [im if im.ndim == 2 else im.mean(-1) for im in imgs]
    masks = _masks(mask, "mask", n, hw)
    if ax is not None:
        if batch:
            raise ValueError(f"ax draws one panel but R holds a batch of {n} maps; pass ax=None (one "
                             f"panel per sample) or one map")
        if not (title is None or isinstance(title, str)):
            raise TypeError(f"title must be a string for one map, got {type(title).__name__}")
        fig = _root(ax)
        width = ax.get_position().width * fig.get_figwidth()
        _panel(ax, maps[0], greys[0], masks[0], title, cmap, _chars(width), True if colorbar else None)
        return fig
    chars = _chars(_REGION_IN)
    heading = title if batch and isinstance(title, str) else None
    titles = ([f"sample {i}" for i in range(n)] if heading is not None or (title is None and batch)
              else _titles(title, n, "title"))
    ncols = min(n, _MAX_COLS)
    nrows = math.ceil(n / ncols)
    head_pt = _TITLE_PT + 1
    head_chars = _chars(_PANEL_IN * ncols, head_pt)
    head_in = _lines(heading, head_chars) * _LINE_IN * head_pt / _TITLE_PT + (_PAD_IN if heading else 0)
    grid = _Grid([max(_lines(t, chars) for t in titles[i * ncols:(i + 1) * ncols]) for i in range(nrows)],
                 ncols, hw, top_in=head_in)
    axes = [grid.axes(i // ncols, i % ncols) for i in range(n)]
    for i, a in enumerate(axes):
        _panel(a, maps[i], greys[i], masks[i], titles[i], cmap, chars, grid.bar(a) if colorbar else None)
    if heading is not None:
        grid.fig.suptitle(_wrap(heading, head_chars), fontsize=head_pt, y=1 - _PAD_IN / grid.size[1],
                          va="top")
    return grid.fig


def compare(maps: Mapping[str, Array] | Sequence[Mapping[str, Array]], x: Array | None = None, *,
            masks: Array | None = None, titles: Sequence[str] | None = None, cmap: str = "bwr",
            channel_reduction: str = "sum") -> Figure:
    """A grid of several rules' heatmaps: one row per sample; columns: the image (when ``x`` is
    given), then each rule, titled with its full label (wrapped to fit the panel, never cut).

    ``maps``: either one mapping ``rule label -> relevance`` whose values are all one map, or all a
    batch matching ``x`` (the same samples for every rule); or a sequence of such mappings, one per
    row, each value one map (rows may then show different rules, e.g. each model's chosen
    hyperparameters; a shorter row leaves its last cells empty). ``x``: the image(s), one per row.
    ``masks``: ground-truth regions, drawn as contours on every panel of their row. ``titles``: one
    per row (a string: the same for every row), shown above the image (default ``"image"``), or as
    the row's label left of it without ``x``. Each heatmap panel has its own symmetric scale and
    colour bar. Shapes: module docstring.

    Returns the figure. Raises ValueError for empty ``maps``, shapes that do not fit together,
    an unknown ``channel_reduction``, non-finite values, or a wrong number of titles; TypeError
    when ``maps`` is neither a mapping nor a sequence of mappings, or for non-numeric input.
    """
    imgs, x_batch = (None, None) if x is None else _images(x)
    if isinstance(maps, Mapping):
        if not maps:
            raise ValueError("maps is empty; give at least one rule label -> relevance")
        arrays = {str(k): _maps(v, f"maps[{k!r}]", x_batch, channel_reduction)[0] for k, v in maps.items()}
        first = next(iter(arrays))
        for k, a in arrays.items():
            if a.shape != arrays[first].shape:
                raise ValueError(f"maps[{k!r}] gives maps of shape {a.shape} [B, H, W] but maps[{first!r}] "
                                 f"gives {arrays[first].shape}; every rule needs the same samples")
        rows = [{k: a[b] for k, a in arrays.items()} for b in range(arrays[first].shape[0])]
    elif (isinstance(maps, Sequence) and not isinstance(maps, str)
          and all(isinstance(m, Mapping) for m in maps)):
        if not maps or not any(maps):
            raise ValueError("maps is empty; give at least one rule label -> relevance")
        rows = []
        for i, row in enumerate(maps):
            cells = {}
            for k, v in row.items():
                a, is_batch = _maps(v, f"maps[{i}][{k!r}]", None, channel_reduction)
                if is_batch:
                    raise ValueError(f"maps[{i}][{k!r}] is a batch of shape {tuple(np.shape(v))}; with one "
                                     f"mapping per row each value is one map, [H, W] or [C, H, W]")
                cells[str(k)] = a[0]
            rows.append(cells)
    else:
        raise TypeError(f"maps must be a mapping rule label -> relevance, or a sequence of such mappings "
                        f"(one per row); got {type(maps).__name__}")
    shapes = {a.shape for row in rows for a in row.values()}
    if len(shapes) > 1:
        raise ValueError(f"the maps have different shapes {sorted(shapes)}; every map needs the same [H, W]")
    n, hw = len(rows), shapes.pop()
    if imgs is not None:
        _check_images(imgs, n, hw, "maps")
    greys = [None] * n if imgs is None else [im if im.ndim == 2 else im.mean(-1) for im in imgs]
    row_masks = _masks(masks, "masks", n, hw)
    row_titles = _titles(titles, n, "titles")
    chars = _chars(_REGION_IN)
    lead = imgs is not None
    label_chars = _chars(_MAP_IN)
    left_in = 0.0 if lead else max(_lines(t, label_chars) for t in row_titles) * _LINE_IN
    grid = _Grid([max([_lines(k, chars) for k in row] + ([_lines(t or "image", chars)] if lead else []))
                  for row, t in zip(rows, row_titles)],
                 lead + max(len(row) for row in rows), hw, left_in=left_in + (_PAD_IN if left_in else 0))
    cells = [[grid.axes(i, j) for j in range(lead + len(row))] for i, row in enumerate(rows)]
    for i, row in enumerate(rows):
        if lead:
            a = cells[i][0]
            a.imshow(imgs[i], cmap="gray" if imgs[i].ndim == 2 else None, vmin=0.0, vmax=1.0,
                     interpolation="nearest")
            _contour(a, row_masks[i])
            a.set_title(_wrap(row_titles[i] or "image", chars), fontsize=_TITLE_PT)
            a.set_xticks([])
            a.set_yticks([])
        for j, (label, r) in enumerate(row.items()):
            a = cells[i][lead + j]
            _panel(a, r, greys[i], row_masks[i], label, cmap, chars, grid.bar(a))
        if not lead and row_titles[i]:
            cells[i][0].set_ylabel(_wrap(row_titles[i], label_chars), fontsize=_TITLE_PT)
    return grid.fig


def save(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> None:
    """Write ``fig`` to ``path`` (the format from its extension: .png, .pdf, .svg, ...) at ``dpi``
    and close it: a figure made through pyplot (e.g. ``plt.subplots`` passed to
    :func:`heatmap` as ``ax``) is released from pyplot's figure manager; the figures of this
    module are held by nothing else and go with their last reference.

    Raises TypeError when ``fig`` is not a matplotlib Figure.
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure (as heatmap / compare return), got "
                        f"{type(fig).__name__}")
    fig.savefig(path, dpi=dpi)
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:  # only pyplot can hold the figure open; never import it here
        pyplot.close(fig)
