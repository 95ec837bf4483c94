"""backplay.plot: heatmap / compare / save, checked on the structure of the drawn figures (Agg)."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from backplay import plot

LONG = "TransformerAttribution(relevance='attnlrp', eps=1e-06)"


def _draw(fig):
    """Render ``fig`` on an Agg canvas; returns the renderer."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _heat_axes(fig):
    """The heatmap panels: axes whose last image is drawn on a colour bar's scale."""
    return [ax for ax in fig.axes if ax.images and ax.images[-1].colorbar is not None]


def _scale(ax):
    im = ax.images[-1]
    return im.get_clim(), im.colorbar.ax.get_ylim()


def _rng():
    return np.random.default_rng(7)


# ---------------------------------------------------------------------------------------------
# heatmap
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_one_map_symmetric_scale_with_colour_bar(kind):
    R = _rng().normal(size=(3, 6, 5))
    v = float(np.abs(R.sum(0)).max())
    fig = plot.heatmap(R if kind == "numpy" else torch.from_numpy(R), title="Gradient")
    assert isinstance(fig, Figure)
    _draw(fig)
    assert len(fig.axes) == 2  # the panel and its colour bar
    (ax,) = _heat_axes(fig)
    (clim, bar_lim) = _scale(ax)
    assert clim == (-v, v) and bar_lim == (-v, v)
    assert [t.get_text() for t in ax.images[-1].colorbar.ax.get_yticklabels()]  # the scale is labelled
    np.testing.assert_array_equal(ax.images[-1].get_array(), R.sum(0))
    assert len(ax.images) == 1 and ax.get_title() == "Gradient"


def test_channel_reduction_and_two_dim_map():
    R = _rng().normal(size=(3, 4, 4))
    fig = plot.heatmap(R, channel_reduction="l2")
    np.testing.assert_allclose(_heat_axes(fig)[0].images[-1].get_array(), np.sqrt((R**2).sum(0)))
    fig = plot.heatmap(R[0])
    v = float(np.abs(R[0]).max())
    assert _scale(_heat_axes(fig)[0])[0] == (-v, v)


def test_all_zero_map_gets_unit_scale():
    fig = plot.heatmap(torch.zeros(1, 4, 4))
    _draw(fig)
    assert _scale(_heat_axes(fig)[0]) == ((-1.0, 1.0), (-1.0, 1.0))


def test_overlay_on_grey_image():
    rng = _rng()
    x, R = rng.random((3, 5, 5)), rng.normal(size=(3, 5, 5))
    fig = plot.heatmap(R, x)
    (ax,) = _heat_axes(fig)
    assert len(ax.images) == 2  # grey image below, relevance above
    grey, heat = ax.images
    assert grey.get_cmap().name == "gray" and grey.get_clim() == (0.0, 1.0)
    ref = (x - x.min()) / (x.max() - x.min())
    np.testing.assert_allclose(grey.get_array(), ref.mean(0), rtol=1e-12)
    assert heat.get_alpha() == 0.7 and heat.get_cmap().name == "bwr"
    assert len(_heat_axes(plot.heatmap(R))[0].images) == 1  # no image: no overlay


def test_mask_contour():
    R = _rng().normal(size=(1, 6, 6))
    m = np.zeros((6, 6), dtype=bool)
    m[1:4, 2:5] = True
    assert _heat_axes(plot.heatmap(R, mask=m))[0].collections  # the contour
    assert not _heat_axes(plot.heatmap(R))[0].collections
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for blank in (np.zeros((6, 6)), np.ones((6, 6))):  # nothing to outline: no contour
            assert not _heat_axes(plot.heatmap(R, mask=blank))[0].collections


def test_batch_gives_one_panel_per_sample():
    rng = _rng()
    R = rng.normal(size=(5, 3, 4, 4))
    fig = plot.heatmap(torch.from_numpy(R))
    _draw(fig)
    panels = _heat_axes(fig)
    assert len(panels) == 5 and len(fig.axes) == 10  # five panels, five colour bars
    assert [ax.get_title() for ax in panels] == [f"sample {i}" for i in range(5)]
    for ax, r in zip(panels, R.sum(1)):
        v = float(np.abs(r).max())
        assert _scale(ax) == ((-v, v), (-v, v))  # each panel on its own scale
    titles = [f"image {i}" for i in range(5)]
    assert [ax.get_title() for ax in _heat_axes(plot.heatmap(R, title=titles))] == titles
    fig = plot.heatmap(R, title="five samples")
    assert fig.get_suptitle() == "five samples" and len(_heat_axes(fig)) == 5


def test_three_dim_maps_follow_the_images():
    rng = _rng()
    R3 = rng.normal(size=(2, 4, 4))
    assert len(_heat_axes(plot.heatmap(R3))) == 1  # [C, H, W]: one map
    fig = plot.heatmap(R3, rng.random((2, 1, 4, 4)), mask=np.ones((2, 1, 4, 4)))  # [B, H, W]
    panels = _heat_axes(fig)
    assert len(panels) == 2
    for ax, r in zip(panels, R3):
        np.testing.assert_array_equal(ax.images[-1].get_array(), r)


def test_into_given_axes():
    fig = Figure()
    axes = fig.subplots(1, 2)
    out = plot.heatmap(_rng().normal(size=(4, 4)), ax=axes[1], title=LONG)
    assert out is fig and _heat_axes(fig) == [axes[1]]
    assert axes[1].get_title().replace("\n", "") == LONG
    with pytest.raises(ValueError, match="ax draws one panel"):
        plot.heatmap(np.zeros((2, 1, 4, 4)), ax=axes[0])
    with pytest.raises(TypeError, match="title must be a string"):
        plot.heatmap(np.zeros((4, 4)), ax=axes[0], title=["a"])


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------


LABELS = [LONG, "Gradient", "RG(tau=0.5, route_temp=2)", "A" * 70]


def test_compare_grid():
    rng = _rng()
    x = torch.from_numpy(rng.random((2, 3, 6, 6)))
    maps = {lab: torch.from_numpy(rng.normal(size=(2, 3, 6, 6))) for lab in LABELS}
    masks = rng.random((2, 6, 6)) < 0.4
    fig = plot.compare(maps, x, masks=masks, titles=["one", "two"])
    r = _draw(fig)
    assert len(fig.axes) == 2 * (1 + 4) + 2 * 4  # image + 4 rules per row, a colour bar per heatmap
    grid, bars = fig.axes[:10], fig.axes[10:]  # the subplots row by row, then the colour bars
    assert bars == [p.images[-1].colorbar.ax for p in _heat_axes(fig)]
    for i in range(2):
        row = grid[5 * i:5 * (i + 1)]
        assert row[0].get_title() == ["one", "two"][i] and row[0].images[0].get_array().shape == (6, 6, 3)
        assert row[0].collections  # the mask contour on the image
        for ax, lab in zip(row[1:], LABELS):
            assert ax.get_title().replace("\n", "") == lab  # the full label, never cut
            R = maps[lab][i].numpy().sum(0)
            v = float(np.abs(R).max())
            assert _scale(ax) == ((-v, v), (-v, v))
            assert len(ax.images) == 2 and ax.collections
    long_title = grid[1].get_title()
    assert long_title.count("\n") >= 1 and max(len(s.rstrip()) for s in long_title.split("\n")) < len(LONG)
    # the titles fit their panels: no wider than a column, inside the figure, not overlapping
    col = fig.bbox.width / 5
    spans = []
    for ax in grid[:5]:
        box = ax.title.get_window_extent(r)
        assert box.width <= col and 0 <= box.x0 and box.x1 <= fig.bbox.width
        spans.append((box.x0, box.x1))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    top_row_bottom = min(ax.get_window_extent(r).y0 for ax in grid[:5])
    for ax in grid[5:]:  # the second row's titles stay below the first row's panels
        box = ax.title.get_window_extent(r)
        assert ax.get_window_extent(r).y1 <= box.y0 and box.y1 <= top_row_bottom
    assert max(ax.title.get_window_extent(r).y1 for ax in grid[:5]) <= fig.bbox.height


def test_compare_rows_with_their_own_rules():
    rng = _rng()
    rows = [{"cnn: LRPEpsilon(eps=0.25)": rng.normal(size=(1, 5, 5)), "cnn: Gradient": rng.normal(size=(1, 5, 5))},
            {"vit: AttnLRP(eps=1e-06)": torch.from_numpy(rng.normal(size=(5, 5)))}]
    images = [torch.from_numpy(rng.random((1, 5, 5))) for _ in rows]
    fig = plot.compare(rows, images, masks=[torch.ones(5, 5, dtype=torch.bool), torch.zeros(5, 5)],
                       titles=["cnn", "vit"])
    panels = _heat_axes(fig)
    assert [ax.get_title().replace("\n", "") for ax in panels] == [k for row in rows for k in row]
    assert len(fig.axes) == (1 + 2) + (1 + 1) + 3  # the shorter row leaves its last cell empty
    assert [ax.get_title() for ax in fig.axes[:5]][::3] == ["cnn", "vit"]


def test_compare_without_images():
    rng = _rng()
    maps = {"a": rng.normal(size=(3, 4, 4)), "b": rng.normal(size=(3, 4, 4))}  # one [C, H, W] map each
    fig = plot.compare(maps, titles=["row"])
    panels = _heat_axes(fig)
    assert len(fig.axes) == 4 and len(panels) == 2
    assert [ax.get_title() for ax in panels] == ["a", "b"] and panels[0].get_ylabel() == "row"
    assert all(len(ax.images) == 1 for ax in panels)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_heatmap_errors():
    z = np.zeros
    with pytest.raises(ValueError, match=r"x holds 1 image\(s\) of \(5, 5\) pixels but R holds 1 map"):
        plot.heatmap(z((4, 4)), z((3, 5, 5)))
    with pytest.raises(ValueError, match="x holds 3 image"):
        plot.heatmap(z((2, 1, 4, 4)), z((3, 1, 4, 4)))
    with pytest.raises(ValueError, match=r"is a batch .* but x is one image"):
        plot.heatmap(z((2, 1, 4, 4)), z((1, 4, 4)))
    with pytest.raises(ValueError, match=r"is one map .* but x is a batch"):
        plot.heatmap(z((4, 4)), z((2, 1, 4, 4)))
    with pytest.raises(ValueError, match=r"R must have shape \[H, W\], \[C, H, W\] or \[B, C, H, W\]"):
        plot.heatmap(z((1, 1, 1, 4, 4)))
    with pytest.raises(ValueError, match="R must have shape"):
        plot.heatmap(z(4))
    with pytest.raises(ValueError, match="no pixels"):
        plot.heatmap(z((1, 0, 4)))
    with pytest.raises(ValueError, match="x has 2 channels"):
        plot.heatmap(z((4, 4)), z((2, 4, 4)))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 3\) does not match 1 map\(s\) of shape \(4, 4\)"):
        plot.heatmap(z((4, 4)), mask=z((3, 3)))
    with pytest.raises(ValueError, match="has 3 channels; a mask has one"):
        plot.heatmap(z((2, 1, 4, 4)), mask=z((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="binary"):
        plot.heatmap(z((4, 4)), mask=np.full((4, 4), 0.5))
    with pytest.raises(ValueError, match="1 NaN/inf"):
        plot.heatmap(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="channel_reduction"):
        plot.heatmap(z((2, 4, 4)), channel_reduction="median")
    with pytest.raises(ValueError, match="title has 1 entries for 2 sample"):
        plot.heatmap(z((2, 1, 4, 4)), title=["a"])
    with pytest.raises(TypeError, match="real"):
        plot.heatmap(torch.zeros(4, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="real numeric"):
        plot.heatmap(np.array([["a", "b"]]))


def test_compare_errors():
    z = np.zeros
    with pytest.raises(ValueError, match="maps is empty"):
        plot.compare({})
    with pytest.raises(ValueError, match="maps is empty"):
        plot.compare([{}])
    with pytest.raises(ValueError, match=r"maps\['b'\] gives maps of shape \(3, 4, 4\)"):
        plot.compare({"a": z((2, 1, 4, 4)), "b": z((3, 1, 4, 4))})
    with pytest.raises(ValueError, match="different shapes"):
        plot.compare([{"a": z((4, 4))}, {"b": z((5, 5))}])
    with pytest.raises(ValueError, match=r"maps\[0\]\['a'\] is a batch"):
        plot.compare([{"a": z((2, 1, 4, 4))}])
    with pytest.raises(ValueError, match="x holds 1 image"):
        plot.compare({"a": z((2, 1, 4, 4))}, z((1, 1, 4, 4)))
    with pytest.raises(ValueError, match="titles has 1 entries for 2 sample"):
        plot.compare({"a": z((2, 1, 4, 4))}, titles=["x"])
    with pytest.raises(ValueError, match="masks of shape"):
        plot.compare({"a": z((2, 1, 4, 4))}, masks=z((4, 4)))
    with pytest.raises(TypeError, match="maps must be a mapping"):
        plot.compare(z((4, 4)))
    with pytest.raises(ValueError, match="items have different shapes"):
        plot.compare([{"a": z((4, 4))}, {"a": z((4, 4))}], [z((1, 4, 4)), z((1, 5, 5))])


# ---------------------------------------------------------------------------------------------
# save, pyplot
# ---------------------------------------------------------------------------------------------


def test_save_writes_png_and_closes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "h.png"
    fig = plot.heatmap(_rng().normal(size=(2, 1, 4, 4)))
    plot.save(fig, path, dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = fig.get_size_inches() * 50
    size = Image.open(path).size
    assert abs(size[0] - w) <= 1 and abs(size[1] - h) <= 1
    pfig, ax = plt.subplots()  # a figure pyplot holds: save releases it
    plot.heatmap(np.ones((3, 3)), ax=ax)
    num = pfig.number
    assert plt.fignum_exists(num)
    plot.save(pfig, tmp_path / "p.pdf")
    assert not plt.fignum_exists(num) and (tmp_path / "p.pdf").read_bytes()[:4] == b"%PDF"
    with pytest.raises(TypeError, match="fig must be a matplotlib Figure"):
        plot.save(ax, tmp_path / "x.png")


def test_headless_without_pyplot(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from backplay import plot\n"
        "fig = plot.compare({'a': np.ones((2, 1, 3, 3))}, np.zeros((2, 1, 3, 3)))\n"
        f"plot.save(plot.heatmap(np.ones((3, 3))), {str(tmp_path / 'h.png')!r})\n"
        f"plot.save(fig, {str(tmp_path / 'c.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "DISPLAY")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert (tmp_path / "h.png").stat().st_size > 0 and (tmp_path / "c.png").stat().st_size > 0
