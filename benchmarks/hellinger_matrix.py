"""The Hellinger distance matrix (docs/theory.md I21) between the routing laws and the LRP zoo's laws,
on a trained digits CNN and a trained digits ViT (``backplay.bench``: the canvases of
``backplay.bench.digits``, the digits benchmark's own models and training configurations, cached like
``backplay bench``'s), averaged over a few held-out test canvases.

Writes ``docs/hellinger/digits_cnn.png``, ``docs/hellinger/digits_vit.png`` and
``docs/hellinger/table.md`` (the numbers and the command). Training the two models takes about 10
minutes on 2 cores (cached afterwards); the matrices are dominated by the laws compared edge by edge
(the uniform Anchor, Flat, WSquare: on each layer's edge list).

    python benchmarks/hellinger_matrix.py [--images 4] [--out docs/hellinger] [--cache DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

import backplay as bp
from backplay.bench.digits import digit_pools, make_canvases
from backplay.bench.localisation import BenchConfig, digits_models
from backplay.bench.models import train_or_load
from backplay.rules import RG, AlphaBeta, Anchor, Epsilon, GradientEquilibrium, RGEq, RiskAverse
from backplay.rules.lrp import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat, Flat, Gamma, WSquare, ZPlus

# the digits benchmark's own models (``backplay bench localisation``: CNN held-out accuracy 0.98, ViT
# 0.92 in the committed run), trained once and cached like the benchmark's
CANVAS, MODELS = digits_models(BenchConfig())


def rules(kind: str) -> list[tuple[str, object]]:
    """(label, rule): the routing laws, the LRP zoo's laws and three of zennit's presets
    (EpsilonGammaBox with the canvases' bounds [0, 1]); the ViT's also the token anchor."""
    out = [("AB(2,1)", AlphaBeta(2, 1)), ("z+ = AB(1,0)", ZPlus()), ("GradEq = LRP-0", GradientEquilibrium()),
           ("RG(tau=0.5)", RG(0.5)), ("RG(1/ln2, T=2)", RG(1 / math.log(2), route_temp=2.0)),
           ("RGEq(0.5, 0.5)", RGEq(0.5, 0.5)), ("Anchor(RG, 0.1)", Anchor(RG(), 0.1)),
           ("RiskAverse(RG, 1, 0.1)", RiskAverse(RG(), theta=1.0, sigma=0.1)), ("Epsilon(0.1)", Epsilon(0.1)),
           ("Gamma(0.25)", Gamma(0.25)), ("Flat", Flat()), ("WSquare", WSquare()),
           ("EpsilonPlusFlat", EpsilonPlusFlat()), ("EpsilonAlpha2Beta1", EpsilonAlpha2Beta1()),
           ("EpsilonGammaBox[0,1]", EpsilonGammaBox(0.0, 1.0))]
    if kind == "vit":
        out.append(("Anchor(RG, 0.3, token)", Anchor(RG(), 0.3, anchor="token")))
    return out


def draw(values: torch.Tensor, names: list, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * n, 0.6 + 0.55 * n))
    im = ax.imshow(values.numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    for i in range(n):
        for j in range(n):
            v = float(values[i, j])
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Hellinger distance H (I21)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="held-out canvases averaged over (default 4)")
    parser.add_argument("--out", default="docs/hellinger")
    parser.add_argument("--cache", default=None, help="model cache (default $BACKPLAY_CACHE or ~/.cache/backplay)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pools = digit_pools(CANVAS, 0)
    test = make_canvases(CANVAS, *pools["eval"], n=args.images, seed=7)
    x = test.images.double()
    lines = ["# Hellinger distance between trajectory laws on the digits models", "",
             f"Command: `python benchmarks/hellinger_matrix.py --images {args.images}` "
             f"(torch {torch.__version__}, float64). H (docs/theory.md I21) averaged over {args.images} held-out "
             "canvases (seed 7), explained at the true label; `bp.hellinger_matrix` (one sweep per image).", ""]
    for kind, cfg in MODELS.items():
        t0 = time.perf_counter()
        model, meta, _ = train_or_load(cfg, args.cache)
        model = model.double().eval()
        names, rs = zip(*rules(kind))
        # one image at a time: the anchored and single-branch laws are compared edge by edge
        mats = [bp.hellinger_matrix(model, x[k:k + 1], test.labels[k:k + 1], rs).values[0]
                for k in range(x.shape[0])]
        mean = torch.stack(mats).mean(0)
        acc = meta["heldout_accuracy"]
        draw(mean, names, f"digits {kind.upper()} (held-out acc {acc:.2f}), mean over {args.images} images",
             out / f"digits_{kind}.png")
        secs = time.perf_counter() - t0
        print(f"{kind}: {secs:.0f} s", file=sys.stderr)
        lines += [f"## digits {kind} (held-out accuracy {acc:.3f}; {cfg.kind} {cfg.arch}, "
                  f"{cfg.n_train} canvases x {cfg.epochs} epochs, seed {cfg.seed}; model loaded or trained "
                  f"and matrix computed in {secs:.0f} s)", "",
                  "| | " + " | ".join(f"{k}" for k in range(len(names))) + " |",
                  "|---|" + "---|" * len(names)]
        for i, n in enumerate(names):
            lines.append(f"| {i}: {n} (`{rs[i].name}`) | " + " | ".join(f"{float(v):.3f}" for v in mean[i]) + " |")
        lines.append("")
    (out / "table.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
