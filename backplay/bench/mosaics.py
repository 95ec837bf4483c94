"""``backplay bench photos``: localisation on real photos with known masks, on a real pretrained
ImageNet model (EfficientNet-Lite0, :mod:`backplay.bench.efficientnet`).

Data. The bundled photos (:mod:`backplay.bench.photos`) that the model classifies correctly and
confidently are the objects; each is preprocessed to 224 x 224 as the model expects and shrunk to a
112 x 112 tile (2 x 2 area average). A mosaic is four different photos in a 2 x 2 grid; the explained
target is the ImageNet class of one tile (the class the model gives that photo alone), and the
ground-truth mask is that tile: the relevance of a class should lie on the photo that shows it.
Mosaics whose target class is not among the model's top 5 on the whole mosaic are drawn again (the
model must see the object in the mosaic for its explanation to point anywhere). Split A and split B
are disjoint sets of mosaics (different arrangements and targets of the same photos; there are too
few confident photos to split the photos themselves, which the table's note says).

Objects pasted on real textures with exact masks were left out: no bundled photo ships an object
mask (imgaug's quokka polygon would have been one; imgaug does not import beside NumPy 2), and a
mask drawn by hand would not be exact.

Protocol: the digits benchmark's (:func:`backplay.bench.localisation.run_protocol`): every rule
family's hyperparameters chosen on split A by mean relevance mass accuracy and reported on split B,
mean and 95% Student-t interval of every metric. Rules: every graph rule
(:func:`~backplay.bench.localisation.graph_families`), the LRP zoo's rules and zennit's composites,
Attribution Equilibrium's law (Attribution Equilibrium itself takes VGG-like nets only); explained in float32 (the model's own precision; the exactness
of the rules on this model is checked in float64 by the tests). The Hellinger distance matrix
(:func:`backplay.hellinger_matrix`) between the laws on this model, on a few of split B's mosaics.
"""

from __future__ import annotations

import io
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..rules import (RG, AlphaBeta, Anchor, AttributionEquilibrium, AttributionEquilibriumLaw, Epsilon, EpsilonAlpha2Beta1,
                     EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat, Flat, Gamma, Gradient,
                     GradientEquilibrium, GradientXInput, RGEq, RiskAverse, WSquare, ZPlus)
from .distributed import Comm
from .rulespec import rule_label
from .localisation import (BenchResult, EvalSet, RuleFamily, example_maps, graph_families, run_protocol,
                           table_rows, write_outputs)

__all__ = ["PhotoBenchConfig", "PhotoBenchResult", "INPUT_LOW", "INPUT_HIGH", "make_mosaics", "photo_families",
           "hellinger_laws", "run_photos", "write_photo_outputs"]

TILE = 112
TOP_K = 5
#: the preprocessed pixel range ((0 - 127) / 128, (255 - 127) / 128): the bounds of the z^B rule
INPUT_LOW, INPUT_HIGH = -127.0 / 128.0, 128.0 / 128.0


@dataclass
class PhotoBenchConfig:
    """Options of :func:`run_photos` (``quick``: few mosaics, halved grids: a smoke test that still
    reports, since the model is the pretrained one)."""

    quick: bool = False
    seed: int = 0
    n_mosaics: int | None = None  # per split (default 12, quick 2)
    chunk: int | None = None  # mosaics per explain call (default: the split shared evenly by the ranks, 8 at most)
    hellinger_images: int | None = None  # split B mosaics averaged in the Hellinger matrix (1)
    progress: bool = False

    def per_split(self) -> int:
        return self.n_mosaics if self.n_mosaics is not None else (2 if self.quick else 12)

    def chunk_for(self, world: int) -> int:
        """Mosaics per explain call: ``chunk``, else each split in equal parts over ``world`` ranks
        (8 at most), so that no rank waits for another."""
        return self.chunk if self.chunk is not None else min(8, math.ceil(self.per_split() / world))

    def matrix_images(self) -> int:
        return self.hellinger_images if self.hellinger_images is not None else 1


@dataclass
class PhotoBenchResult:
    """The protocol's result (:class:`~backplay.bench.localisation.BenchResult`), the photos used and
    the top-1 check, the Hellinger matrix (laws' labels, values [n, n]) and how long each part took."""

    bench: BenchResult
    photos: list[dict]
    top1_line: str
    hellinger_labels: list[str]
    hellinger: np.ndarray
    seconds: dict[str, float]
    processes: int = 1
    threads: int = 1


def make_mosaics(tiles: torch.Tensor, classes: torch.Tensor, model: torch.nn.Module, n: int, seed: int
                 ) -> tuple[EvalSet, int]:
    """``n`` mosaics of four different tiles [N, 3, 112, 112] (N >= 4) with one tile's class as the
    target and that tile as the mask; a draw whose target is not in the model's top 5 on the mosaic is
    drawn again. Returns the set and the number of draws rejected."""
    N = tiles.shape[0]
    if N < 4:
        raise ValueError(f"a mosaic needs 4 different photos, {N} are confident enough")
    g = torch.Generator().manual_seed(seed)
    images, labels, masks, rejected = [], [], [], 0
    dtype = next(model.parameters()).dtype
    while len(images) < n:
        if rejected > 20 * n:
            raise RuntimeError(f"only {len(images)} of {n} mosaics keep their target in the model's top {TOP_K}")
        pick = torch.randperm(N, generator=g)[:4]
        t = int(torch.randint(4, (1,), generator=g))
        img = torch.zeros(3, 2 * TILE, 2 * TILE)
        mask = torch.zeros(2 * TILE, 2 * TILE, dtype=torch.bool)
        for k, i in enumerate(pick.tolist()):
            r, c = divmod(k, 2)
            img[:, r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = tiles[i]
            if k == t:
                mask[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = True
        target = int(classes[int(pick[t])])
        with torch.no_grad():
            top = model(img[None].to(dtype))[0].topk(TOP_K).indices.tolist()
        if target not in top:
            rejected += 1
            continue
        images.append(img)
        labels.append(target)
        masks.append(mask)
    return EvalSet(torch.stack(images), torch.tensor(labels), torch.stack(masks)), rejected


def photo_families(quick: bool = False) -> list[RuleFamily]:
    """The graph rules (:func:`~backplay.bench.localisation.graph_families` with its halved grids), the
    LRP zoo (Epsilon, Gamma, ZPlus, Flat, WSquare), zennit's composites (EpsilonGammaBox with the
    preprocessed pixel range as its box), Attribution Equilibrium (which refuses a model with sums: the
table's notes say so) and its law. ``quick``: one member of
    eight families (a pipeline check that fits in two minutes). The grids are small because one
    explanation of a 224 x 224 mosaic costs about a second on 2 CPU cores (the README's measurement)."""
    if quick:
        return [RuleFamily("Gradient", (Gradient(),)), RuleFamily("GradientXInput", (GradientXInput(),)),
                RuleFamily("AlphaBeta(2,1)", (AlphaBeta(2.0, 1.0),)), RuleFamily("RG", (RG(0.5),)),
                RuleFamily("GradientEquilibrium", (GradientEquilibrium(),)), RuleFamily("Epsilon", (Epsilon(0.1),)),
                RuleFamily("Gamma", (Gamma(0.25),)), RuleFamily("EpsilonPlus", (EpsilonPlus(),))]
    return graph_families(True) + [
        RuleFamily("Epsilon", (Epsilon(0.01), Epsilon(1.0))),
        RuleFamily("Gamma", (Gamma(0.1), Gamma(1.0))),
        RuleFamily("ZPlus", (ZPlus(),)),
        RuleFamily("Flat", (Flat(),)),
        RuleFamily("WSquare", (WSquare(),)),
        RuleFamily("EpsilonPlus", (EpsilonPlus(),)),
        RuleFamily("EpsilonPlusFlat", (EpsilonPlusFlat(),)),
        RuleFamily("EpsilonGammaBox", (EpsilonGammaBox(INPUT_LOW, INPUT_HIGH),)),
        RuleFamily("EpsilonAlpha2Beta1", (EpsilonAlpha2Beta1(),)),
        RuleFamily("EpsilonAlpha2Beta1Flat", (EpsilonAlpha2Beta1Flat(),)),
        RuleFamily("AttributionEquilibrium", (AttributionEquilibrium(1.0),)),  # refused here: noted in the table
        RuleFamily("AttributionEquilibriumLaw", (AttributionEquilibriumLaw(1.0), AttributionEquilibriumLaw(2.0))),
    ]


def hellinger_laws(quick: bool = False) -> list[tuple[str, Any]]:
    """(label, law) of the Hellinger matrix: the routing laws, the zoo's laws and two composites."""
    laws = [("AB(2,1)", AlphaBeta(2, 1)), ("z+", ZPlus()), ("GradEq = LRP-0", GradientEquilibrium()),
            ("RG(0.5)", RG(0.5)), ("RG(T=2)", RG(1 / math.log(2), route_temp=2.0)), ("RGEq(0.5,0.5)", RGEq(0.5, 0.5)),
            ("RiskAverse(RG,1)", RiskAverse(RG(), theta=1.0)), ("Epsilon(0.1)", Epsilon(0.1)),
            ("Gamma(0.25)", Gamma(0.25)), ("Anchor(RG,0.1)", Anchor(RG(), 0.1)), ("Flat", Flat()),
            ("EpsilonGammaBox", EpsilonGammaBox(INPUT_LOW, INPUT_HIGH)), ("EpsilonAlpha2Beta1", EpsilonAlpha2Beta1())]
    return [laws[0], laws[2], laws[8]] if quick else laws


def run_photos(cfg: PhotoBenchConfig, comm: Comm | None = None, log: Any = sys.stderr) -> PhotoBenchResult | None:
    """The photos benchmark (module docstring): the top-1 check, the mosaics, the protocol, example
    heatmaps and the Hellinger matrix. With ``comm`` over several processes every rank draws the same
    mosaics, the protocol's images and the Hellinger matrix's pairs are sharded over the ranks, the
    last rank draws the heatmaps; the result is returned on rank 0 (None elsewhere) and only rank 0
    logs."""
    import backplay as bp

    from .efficientnet import class_name, efficientnet_lite0
    from .photos import CONFIDENT, load_all, top1

    comm = comm or Comm()
    if comm.rank != 0:
        log = io.StringIO()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model = efficientnet_lite0()
    preds = top1(model, verbose=False)
    scored = [p for p in preds if p.correct is not None]
    top1_line = f"top-1 on the bundled photos: {sum(p.correct for p in scored)}/{len(scored)}"
    print(f"[bench] {top1_line}", file=log)
    used = [p for p in preds if p.correct and p.probability >= CONFIDENT]
    names, x = load_all([p.name for p in used])
    tiles = torch.nn.functional.avg_pool2d(x, 2)
    classes = torch.tensor([p.predicted for p in used])
    photos = [dict(name=p.name, cls=p.predicted, label=class_name(p.predicted), probability=p.probability)
              for p in used]
    n = cfg.per_split()
    split_a, rej_a = make_mosaics(tiles, classes, model, n, cfg.seed)
    split_b, rej_b = make_mosaics(tiles, classes, model, n, cfg.seed + 1)
    seconds["data"] = time.perf_counter() - t0
    print(f"[bench] {len(used)} confident photos ({', '.join(names)}); {n} mosaics per split "
          f"({rej_a + rej_b} draws rejected: target not in the top {TOP_K})", file=log)

    t1 = time.perf_counter()
    families = photo_families(cfg.quick)
    res = run_protocol(model, families, split_a, split_b, comm, cfg.chunk_for(comm.world), "cpu", log,
                       cfg.progress, dtype=torch.float32)
    seconds["protocol"] = time.perf_counter() - t1
    chosen = comm.broadcast(res.chosen if res is not None else None)

    t2 = time.perf_counter()
    examples = None
    if comm.rank == comm.world - 1:
        rules = {rule_label(r): r for f in families for r in f.grid}
        examples = example_maps(model, split_b, chosen, rules, "EfficientNet-Lite0", "cpu", count=2,
                                dtype=torch.float32)
    labels, laws = zip(*hellinger_laws(cfg.quick))
    pairs = [(a, b) for a in range(len(laws)) for b in range(a + 1, len(laws))][comm.rank::comm.world]
    k = min(cfg.matrix_images(), len(split_b))
    mats = [bp.hellinger_matrix(model, split_b.images[i:i + 1], split_b.labels[i:i + 1], laws, pairs).values[0]
            for i in range(k)]
    gathered = comm.gather((examples, torch.stack(mats).mean(0).double().numpy()))
    seconds["heatmaps and Hellinger matrix"] = time.perf_counter() - t2
    if comm.rank != 0:
        return None
    examples = gathered[-1][0]
    H = np.zeros((len(laws), len(laws)))
    for _, part in gathered:  # each rank's pairs (NaN elsewhere)
        H = np.where(np.isnan(part), H, part)
    notes = [f"{lab} skipped ({why})" for lab, why in res.skipped.items()]
    notes.append(f"mosaics of the {len(used)} photos the model classifies correctly with p >= {CONFIDENT} "
                 f"({', '.join(names)}); split A and B are different mosaics of the same photos")
    bench = BenchResult(table_rows("efficientnet-lite0", res),
                        [dict(model="efficientnet-lite0", **r) for r in res.selection], notes,
                        {"efficientnet-lite0": dict(photos=photos)}, examples, seconds["protocol"])
    return PhotoBenchResult(bench, photos, top1_line, list(labels), H, seconds, comm.world,
                            torch.get_num_threads())


def write_photo_outputs(result: PhotoBenchResult, out: str | Path, command: str) -> dict[str, Path]:
    """table.csv, table.md, selection.csv, metrics.png, heatmaps.png (the protocol's,
    :func:`~backplay.bench.localisation.write_outputs`), hellinger.png and README.md (how the run was
    made: the command, the photos, the top-1 check, the times) into ``out``."""
    from ..plot import save

    out = Path(out)
    paths = write_outputs(result.bench, out)
    paths["hellinger"] = out / "hellinger.png"
    save(_matrix_figure(result.hellinger, result.hellinger_labels), paths["hellinger"], dpi=100)
    lines = ["# The photos benchmark: EfficientNet-Lite0 (ImageNet weights) on real photos", "",
             f"Command: `{command}` (torch {torch.__version__}).", "", result.top1_line, "",
             "Photos used (correct and confident):", ""]
    lines += [f"- {p['name']}: class {p['cls']} ({p['label']}), p = {p['probability']:.3f}" for p in result.photos]
    lines += ["", f"Times ({result.processes} process(es), {result.threads} torch thread(s) each): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()), "",
              "Files: `table.md` / `table.csv` (split B, chosen on split A), `selection.csv` (every grid "
              "member on split A), `metrics.png`, `heatmaps.png`, `hellinger.png` (the Hellinger distance "
              "between the laws, mean over split B's first mosaics).", ""]
    lines += ["## Hellinger matrix", "", "| | " + " | ".join(str(k) for k in range(len(result.hellinger_labels)))
              + " |", "|---|" + "---|" * len(result.hellinger_labels)]
    lines += [f"| {i}: {n} | " + " | ".join(f"{v:.3f}" for v in result.hellinger[i]) + " |"
              for i, n in enumerate(result.hellinger_labels)]
    paths["readme"] = out / "README.md"
    paths["readme"].write_text("\n".join(lines) + "\n")
    return paths


def _matrix_figure(H: np.ndarray, labels: list[str]) -> Any:
    from matplotlib.figure import Figure

    n = len(labels)
    fig = Figure(figsize=(1.0 + 0.6 * n, 0.6 + 0.55 * n))
    ax = fig.add_subplot()
    im = ax.imshow(H, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{H[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="w" if H[i, j] < 0.6 else "k")
    ax.set_title("Hellinger distance between the laws (I21), EfficientNet-Lite0 on photo mosaics", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig
