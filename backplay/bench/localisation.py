"""The localisation benchmark: every rule x every localisation metric, with a transfer protocol.

Protocol (the paper's transfer setting). Each rule *family* has a grid of hyperparameters (RG: tau x
route temperature; RGEq: kappa x nu; Anchor: lam; on a ViT also the token anchor: lam; RiskAverse:
theta; SoftplusGame: eps; the others, among them the transformer rules AttnLRP, CPLRP, Rollout and
TransformerAttribution, a single member). On split A every member is scored and the member with the
highest mean :data:`SELECTION_METRIC` (relevance mass accuracy) is chosen (ties: the first in grid
order); the chosen member is then evaluated unchanged on split B, and the table reports split B. On the digit
canvases split A holds the digits 0-4 and split B the digits 5-9; on a real data set (ImageNet-S,
VOC) images with even index form A and odd index B.

The attribution is always for the ground-truth class, computed by :func:`backplay.explain` in
float64 on a copy of the model. Metrics (:mod:`backplay.metrics`, channels summed): pointing game,
relevance mass accuracy, relevance rank accuracy, AUROC and top-k intersection with k = H W / 64.
(The energy pointing game is left out: with the square masks of the digit canvases it equals
relevance mass accuracy.) Summary: mean over images (NaN = excluded images dropped, count shown)
and a 95% Student-t confidence interval, mean +- t_{0.975, n-1} s / sqrt(n) (not clipped to
[0, 1]: a pointing game near 1 can show an upper end above 1).
"""

from __future__ import annotations

import copy
import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

import backplay as bp
from backplay import metrics
from backplay.rules import (RG, AlphaBeta, Anchor, AttributionEquilibrium, AttributionEquilibriumLaw,
                            Gradient, GradientEquilibrium, GradientXInput, LRP0, RGEq, RiskAverse, Rule,
                            SoftplusGame)

from .distributed import Comm, merge_shards, shard_chunks
from .rulespec import find_rule, rule_label

__all__ = ["METRICS", "SELECTION_METRIC", "VIT_ONLY_RULES", "RuleFamily", "EvalSet", "BenchConfig", "digits_models",
           "BenchResult", "cnn_families", "graph_families", "vit_families", "vit_engine_error", "score_maps",
           "evaluate_rules", "t_interval", "run_protocol", "run_digits", "run_dataset",
           "format_table", "markdown_table", "write_outputs", "table_rows", "example_maps"]

#: (key, column title) of the metrics in table order
METRICS = (("pointing_game", "pointing game"), ("rma", "rel. mass acc."), ("rra", "rel. rank acc."),
           ("auroc", "AUROC"), ("topk", "top-k inters."))
SELECTION_METRIC = "rma"
#: transformer rules looked up by name (in backplay.rules) when they exist
VIT_ONLY_RULES = ("AttnLRP", "CPLRP", "Rollout", "TransformerAttribution")


@dataclass(frozen=True)
class RuleFamily:
    """A rule family: its name and its hyperparameter grid (one member: nothing to choose)."""

    name: str
    grid: tuple[Rule, ...]


def _rg_grid(quick: bool) -> tuple[Rule, ...]:
    taus = (0.5, 1 / math.log(2)) if quick else (0.5, 1 / math.log(2), 2.0)
    temps = (1.0, 2.0) if quick else (0.5, 1.0, 2.0)
    return tuple(RG(t, T) for t in taus for T in temps)


def cnn_families(quick: bool = False) -> list[RuleFamily]:
    """The rule families evaluated on the CNN (grids halved in ``quick`` mode): the graph rules of
    :func:`graph_families` and Nam and Lee's Attribution Equilibrium with its closest law on the graph
    (docs/theory.md section 13; r in 1, 1.5, 2, quick 1, 2)."""
    rs = (1.0, 2.0) if quick else (1.0, 1.5, 2.0)
    return graph_families(quick) + [
        RuleFamily("AttributionEquilibrium", tuple(AttributionEquilibrium(r) for r in rs)),
        RuleFamily("AttributionEquilibriumLaw", tuple(AttributionEquilibriumLaw(r) for r in rs)),
    ]


def graph_families(quick: bool = False) -> list[RuleFamily]:
    """The rule families defined on any graph (CNNs and the frozen ViT graph; grids halved in
    ``quick`` mode)."""
    q = quick
    return [
        RuleFamily("Gradient", (Gradient(),)),
        RuleFamily("GradientXInput", (GradientXInput(),)),
        RuleFamily("LRP0", (LRP0(),)),
        RuleFamily("AlphaBeta(2,1)", (AlphaBeta(2.0, 1.0),)),
        RuleFamily("AlphaBeta(1,0)", (AlphaBeta(1.0, 0.0),)),
        RuleFamily("RG", _rg_grid(q)),
        RuleFamily("RGEq", tuple(RGEq(k, nu) for k in ((0.0, math.log(2)) if q else (0.0, math.log(2), math.log(4)))
                                 for nu in (0.5, 1.0))),
        RuleFamily("GradientEquilibrium", (GradientEquilibrium(),)),
        RuleFamily("Anchor", tuple(Anchor(RG(), lam) for lam in ((0.1, 0.3) if q else (0.03, 0.1, 0.3)))),
        RuleFamily("RiskAverse", tuple(RiskAverse(RG(), th) for th in ((0.1, 1.0) if q else (0.1, 1.0, 10.0)))),
        RuleFamily("SoftplusGame", tuple(SoftplusGame(e) for e in ((0.1, 1.0) if q else (0.1, 0.5, 2.0)))),
    ]


def _token_anchor_lams(quick: bool) -> tuple[float, ...]:
    return (0.1, 0.5) if quick else (0.1, 0.3, 0.6)


def vit_families(quick: bool = False, log: Any = sys.stderr) -> list[RuleFamily]:
    """The rule families evaluated on a ViT: every family of :func:`graph_families` (the graph rules,
    grids as there), the attention anchor ``Anchor(RG(), lam, anchor="token")`` (one lam for every
    block; grid 0.1, 0.3, 0.6, quick 0.1, 0.5), and each of :data:`VIT_ONLY_RULES` that exists in
    this installation (default arguments); an absent one is skipped with a note on ``log``."""
    fams = graph_families(quick)
    fams.append(RuleFamily("Anchor(token)", tuple(Anchor(RG(), lam, anchor="token")
                                                  for lam in _token_anchor_lams(quick))))
    for name in VIT_ONLY_RULES:
        cls = getattr(bp.rules, name, None) or find_rule(name)
        if cls is None:
            print(f"[bench] note: rule {name} is not in this backplay; its ViT row is skipped", file=log)
            continue
        fams.append(RuleFamily(name, (cls(),)))
    return fams


def vit_engine_error(model: nn.Module, x: torch.Tensor) -> str | None:
    """None when ``backplay.explain`` runs on the ViT ``model``, else the engine's error message
    (the one place the benchmark checks that the ViT graph engine is present)."""
    try:
        bp.explain(model, x[:1], 0, Gradient())
    except (TypeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return None


@dataclass
class EvalSet:
    """Images [N, C, H, W], ground-truth classes [N] (the explained targets), masks [N, H, W] bool."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.labels.shape != (n,) or self.masks.shape != (n,) + tuple(self.images.shape[2:]):
            raise ValueError(f"inconsistent EvalSet shapes: images {tuple(self.images.shape)}, labels "
                             f"{tuple(self.labels.shape)}, masks {tuple(self.masks.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])


def score_maps(R: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Per-image scores [B, len(METRICS)] of relevance maps [B, C, H, W] against masks [B, H, W]."""
    m = masks.cpu().numpy()
    r = R.detach().cpu().double().numpy()
    k = max(1, m.shape[1] * m.shape[2] // 64)
    cols = [metrics.pointing_game(r, m), metrics.relevance_mass_accuracy(r, m),
            metrics.relevance_rank_accuracy(r, m), metrics.auroc(r, m), metrics.top_k_intersection(r, m, k)]
    return np.stack(cols, axis=1)


def _explain_model(model: nn.Module, device: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


def evaluate_rules(model: nn.Module, data: EvalSet, rules: Sequence[Rule], chunks: Sequence[np.ndarray],
                   device: str = "cpu", log: Any = sys.stderr, progress: bool = False,
                   dtype: torch.dtype = torch.float64,
                   ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """Scores of every rule on the images of ``chunks`` (one ``explain`` call per chunk and rule, in
    ``dtype``; ``progress``: a bar over the calls on stderr).

    Returns ``({label: (indices, scores [k, M])}, {label: reason})``: a rule the engine rejects for
    this model (TypeError / NotImplementedError) is left out and its reason returned.
    ``model`` is not modified (a copy in ``dtype`` is explained).
    """
    net = _explain_model(model, device, dtype)
    out: dict[str, tuple[list, list]] = {}
    failed: dict[str, str] = {}
    idx_all = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    from tqdm import tqdm

    bar = tqdm(total=len(rules) * len(chunks), desc="rules x image chunks", unit="call", file=sys.stderr,
               disable=not progress, leave=False)
    for rule in rules:
        label = rule_label(rule)
        parts = []
        try:
            for idx in chunks:
                ti = torch.as_tensor(idx, dtype=torch.long)
                x = data.images[ti].to(device=device, dtype=dtype)
                R = bp.explain(net, x, data.labels[ti].to(device), rule)
                parts.append(score_maps(R, data.masks[ti]))
                bar.update(1)
        except (TypeError, NotImplementedError) as e:
            failed[label] = f"{type(e).__name__}: {e}"
            print(f"[bench] note: {label} does not run on this model ({failed[label]}); row skipped",
                  file=log)
            continue
        scores = np.concatenate(parts) if parts else np.zeros((0, len(METRICS)))
        out[label] = (idx_all, scores)
    bar.close()
    return out, failed


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the finite values: Student-t interval mean +- t s / sqrt(n)
    (low = high = mean when n == 1; all NaN when n == 0)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(v.mean())
    if n == 1:
        return mean, mean, mean, 1
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def _sel_col() -> int:
    return [k for k, _ in METRICS].index(SELECTION_METRIC)


@dataclass
class ProtocolResult:
    """On rank 0: the selection scores on A per family, the chosen member, the scores on B."""

    selection: list[dict]  # one row per grid member: family, rule, mean of every metric on A, chosen
    chosen: dict[str, str]  # family -> rule label
    scores_b: dict[str, np.ndarray]  # rule label -> [n_B, M]
    skipped: dict[str, str]


def run_protocol(model: nn.Module, families: Sequence[RuleFamily], split_a: EvalSet, split_b: EvalSet,
                 comm: Comm, chunk: int = 50, device: str = "cpu",
                 log: Any = sys.stderr, progress: bool = False,
                 dtype: torch.dtype = torch.float64) -> ProtocolResult | None:
    """Choose every family's member on A, evaluate the choices on B (sharded over ``comm``; a progress
    bar on rank 0 with ``progress``). Returns the result on rank 0 and None on the other ranks."""
    grid = [r for f in families for r in f.grid]
    bar = progress and comm.rank == 0
    part_a, failed = evaluate_rules(model, split_a, grid, shard_chunks(len(split_a), chunk, comm.rank,
                                                                         comm.world), device, log, bar, dtype)
    gathered = comm.gather(part_a)
    chosen: dict[str, Rule] | None = None
    selection: list[dict] = []
    if comm.rank == 0:
        full_a = merge_shards(gathered, len(split_a))
        chosen = {}
        for fam in families:
            best, best_val = None, -math.inf
            for rule in fam.grid:
                label = rule_label(rule)
                if label not in full_a:
                    continue
                means = [t_interval(full_a[label][:, j])[0] for j in range(len(METRICS))]
                val = means[_sel_col()]
                row = dict(family=fam.name, rule=label, chosen=False,
                           **{k: m for (k, _), m in zip(METRICS, means)})
                selection.append(row)
                if val > best_val or best is None:
                    best, best_val = rule, val
            if best is not None:
                chosen[fam.name] = best
                for row in selection:
                    if row["family"] == fam.name and row["rule"] == rule_label(best):
                        row["chosen"] = True
    chosen = comm.broadcast(chosen)
    part_b, _ = evaluate_rules(model, split_b, list(chosen.values()),
                               shard_chunks(len(split_b), chunk, comm.rank, comm.world), device, log, bar, dtype)
    gathered_b = comm.gather(part_b)
    if comm.rank != 0:
        return None
    return ProtocolResult(selection, {f: rule_label(r) for f, r in chosen.items()},
                          merge_shards(gathered_b, len(split_b)), failed)


@dataclass
class BenchConfig:
    """Options of :func:`run_digits` (``quick``: tiny training and few images, for tests)."""

    quick: bool = False
    seed: int = 0
    n_eval: int | None = None  # images per split (default 300, quick 16)
    models: tuple[str, ...] = ("cnn", "vit")
    cache: str | None = None
    chunk: int = 50
    device: str = "cpu"
    #: a model below this held-out accuracy (chance: 1/10) is not evaluated: the localisation metrics
    #: of a net that has not learned the digits would be reported as if they meant something
    min_accuracy: float = 0.5
    progress: bool = False

    def images_per_split(self) -> int:
        return self.n_eval if self.n_eval is not None else (16 if self.quick else 300)


@dataclass
class BenchResult:
    """Rank 0's result: table rows (split B), selection rows (split A), notes, model information,
    and example heatmaps for the plots (``maps``: chosen rule label -> relevance [C, H, W])."""

    rows: list[dict]
    selection: list[dict]
    notes: list[str]
    models: dict[str, dict]
    examples: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    #: models not evaluated because their held-out accuracy is below ``BenchConfig.min_accuracy``
    undertrained: dict[str, float] = field(default_factory=dict)


def table_rows(model_name: str, res: ProtocolResult) -> list[dict]:
    """The table's rows: per family, its chosen rule's mean and 95% interval of every metric on B."""
    rows = []
    for fam, label in res.chosen.items():
        sc = res.scores_b[label]
        for j, (key, _) in enumerate(METRICS):
            mean, lo, hi, n = t_interval(sc[:, j])
            rows.append(dict(model=model_name, family=fam, rule=label, metric=key, mean=mean,
                             ci_low=lo, ci_high=hi, n=n))
    return rows


def example_maps(model: nn.Module, split_b: EvalSet, chosen: dict[str, str], rules: dict[str, Rule],
                 model_name: str, device: str, count: int = 3, dtype: torch.dtype = torch.float64) -> list[dict]:
    """The chosen rules' heatmaps of the first ``count`` images of split B, for the heatmaps figure."""
    net = _explain_model(model, device, dtype)
    out = []
    for i in range(min(count, len(split_b))):
        x = split_b.images[i:i + 1].to(device=device, dtype=dtype)
        maps = {label: bp.explain(net, x, split_b.labels[i:i + 1].to(device), rules[label])[0].cpu()
                for label in chosen.values()}
        out.append(dict(model=model_name, image=split_b.images[i], mask=split_b.masks[i],
                        label=int(split_b.labels[i]), maps=maps))
    return out


def digits_models(cfg: BenchConfig) -> tuple:
    """(canvas configuration, {"cnn": TrainConfig, "vit": TrainConfig}) of the digits benchmark
    (``cfg.quick``: the small, fast ones)."""
    from .digits import CanvasConfig
    from .models import TrainConfig

    canvas = CanvasConfig(size=24, n_distractors=2)
    if cfg.quick:
        return canvas, {"cnn": TrainConfig("cnn", dict(size=24, width=8), canvas.to_dict(), n_train=600,
                                           epochs=3, seed=cfg.seed),
                        "vit": TrainConfig("vit", dict(size=24, dim=16, depth=1, heads=2), canvas.to_dict(),
                                           n_train=600, epochs=3, lr=3e-3, seed=cfg.seed, optimizer="adamw",
                                           weight_decay=0.05, warmup=0.1)}
    return canvas, {"cnn": TrainConfig("cnn", dict(size=24), canvas.to_dict(), n_train=4000, epochs=15,
                                       lr=3e-3, seed=cfg.seed),
                    "vit": TrainConfig("vit", dict(size=24, dim=64, depth=2, heads=4), canvas.to_dict(),
                                       n_train=4000, epochs=48, batch_size=64, lr=1e-3, seed=cfg.seed,
                                       optimizer="adamw", weight_decay=0.05, warmup=0.1,
                                       label_smoothing=0.1)}


def run_digits(cfg: BenchConfig, comm: Comm | None = None, log: Any = sys.stderr) -> BenchResult | None:
    """The digits benchmark (module docstring): train or load the models, run the protocol per
    model. Returns the result on rank 0 (None on other ranks)."""
    from .digits import CLASSES_A, CLASSES_B, digit_pools, make_canvases
    from .models import build_model, train_or_load

    comm = comm or Comm()
    t0 = time.perf_counter()
    canvas, train_cfgs = digits_models(cfg)
    pools = digit_pools(canvas, cfg.seed)
    n = cfg.images_per_split()
    sets = {}
    for name, classes, s in (("A", CLASSES_A, 101), ("B", CLASSES_B, 202)):
        c = make_canvases(canvas, *pools["eval"], n=n, seed=cfg.seed + s, classes=classes)
        sets[name] = EvalSet(c.images, c.labels, c.masks)
    rows, selection, notes, models, examples, undertrained = [], [], [], {}, [], {}
    for kind in cfg.models:
        if kind not in train_cfgs:
            raise ValueError(f"unknown model {kind!r} (known: cnn, vit)")
        tc = train_cfgs[kind]
        if kind == "vit":
            err = vit_engine_error(build_model("vit", tc.arch).eval().double(), sets["A"].images.double())
            if err is not None:
                note = ("ViT rows unavailable: backplay.explain does not run on the backplay ViT in "
                        f"this installation ({err.splitlines()[0][:160]})")
                notes.append(note)
                print(f"[bench] {note}", file=log)
                continue
            families = vit_families(cfg.quick, log)
        else:
            families = cnn_families(cfg.quick)
        if comm.rank == 0:
            model, meta, path = train_or_load(tc, cfg.cache, log)
        comm.barrier()
        if comm.rank != 0:
            model, meta, path = train_or_load(tc, cfg.cache, log)
        acc = float(meta["heldout_accuracy"])
        if acc < cfg.min_accuracy:
            undertrained[kind] = acc
            note = (f"{kind}: held-out accuracy {acc:.3f} (chance 0.100) is below {cfg.min_accuracy:g}: not "
                    "evaluated (the metrics of a net that has not learned the digits mean nothing); train "
                    "longer" + (" (drop --quick)" if cfg.quick else ""))
            notes.append(note)
            print(f"[bench] {note}", file=log)
            continue
        with torch.no_grad():
            acc_b = float((model(sets["B"].images).argmax(1) == sets["B"].labels).double().mean())
        res = run_protocol(model, families, sets["A"], sets["B"], comm, cfg.chunk, cfg.device, log, cfg.progress)
        if comm.rank != 0:
            continue
        notes += [f"{kind}: {lab} skipped ({why})" for lab, why in res.skipped.items()]
        models[kind] = dict(checkpoint=str(path), heldout_accuracy=meta.get("heldout_accuracy"),
                            accuracy_split_b=acc_b, train_seconds=meta.get("train_seconds"))
        rows += table_rows(kind, res)
        selection += [dict(model=kind, **r) for r in res.selection]
        rules = {rule_label(r): r for f in families for r in f.grid}
        examples += example_maps(model, sets["B"], res.chosen, rules, kind, cfg.device)
    if comm.rank != 0:
        return None
    return BenchResult(rows, selection, notes, models, examples, time.perf_counter() - t0, undertrained)


def run_dataset(dataset, loaded, limit: int | None = None, quick: bool = False, comm: Comm | None = None,
                chunk: int = 8, device: str = "cpu", log: Any = sys.stderr, progress: bool = False
                ) -> BenchResult | None:
    """The protocol on a real data set (an iterable of ``(image [C, H, W], target, mask [H, W])`` of
    the model's input size, e.g. :class:`~backplay.bench.datasets.ImageNetS`) with a model from
    :func:`~backplay.bench.models.load_model`; split A = even, B = odd image index."""
    comm = comm or Comm()
    t0 = time.perf_counter()
    items = []
    for item in dataset:
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if len(items) < 2:
        raise ValueError(f"the data set gave {len(items)} usable image(s); need at least 2")
    mean = torch.tensor(loaded.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(loaded.std, dtype=torch.float32)[:, None, None]
    images = torch.stack([(im - mean) / std for im, _, _ in items])
    labels = torch.tensor([int(t) for _, t, _ in items])
    masks = torch.stack([torch.as_tensor(m, dtype=torch.bool) for _, _, m in items])
    sets = {s: EvalSet(images[s::2], labels[s::2], masks[s::2]) for s in (0, 1)}
    notes: list[str] = []
    if loaded.kind == "vit":
        err = vit_engine_error(copy.deepcopy(loaded.model).double(), images[:1].double())
        if err is not None:
            note = f"ViT rows unavailable: backplay.explain does not run on this ViT ({err.splitlines()[0][:160]})"
            print(f"[bench] {note}", file=log)
            return BenchResult([], [], [note], {}, [], time.perf_counter() - t0) if comm.rank == 0 else None
        families = vit_families(quick, log)
    else:
        families = cnn_families(quick)
    res = run_protocol(loaded.model, families, sets[0], sets[1], comm, chunk, device, log, progress)
    if comm.rank != 0:
        return None
    notes += [f"{lab} skipped ({why})" for lab, why in res.skipped.items()]
    rules = {rule_label(r): r for f in families for r in f.grid}
    return BenchResult(table_rows(loaded.kind, res), [dict(model=loaded.kind, **r) for r in res.selection],
                       notes, {loaded.kind: {}},
                       example_maps(loaded.model, sets[1], res.chosen, rules, loaded.kind, device),
                       time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# output


def _cell(r: dict) -> str:
    if r["n"] == 0:
        return "n/a"
    return f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def _grid(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "rule (chosen on A)"] + [t for _, t in METRICS] + ["n"]
    body, seen = [], {}
    for r in rows:
        seen.setdefault((r["model"], r["rule"]), {})[r["metric"]] = r
    for (model, rule), cells in seen.items():
        body.append([model, rule] + [_cell(cells[k]) for k, _ in METRICS]
                    + [str(max(c["n"] for c in cells.values()))])
    return head, body


def format_table(rows: list[dict]) -> str:
    """The table (rule x metric, mean [95% CI]) as aligned text."""
    head, body = _grid(rows)
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*b) for b in body])


def markdown_table(rows: list[dict]) -> str:
    """The table as GitHub Markdown."""
    head, body = _grid(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in b) + " |" for b in body]
    return "\n".join(lines)


def _bar_plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["model"], r["family"]) for r in rows))
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 0.28 * len(keys) + 1.5),
                             sharey=True, squeeze=False)
    for ax, (metric, title) in zip(axes[0], METRICS):
        sel = {(r["model"], r["family"]): r for r in rows if r["metric"] == metric}
        y = np.arange(len(keys))
        mean = np.array([sel[k]["mean"] for k in keys])
        err = np.array([[sel[k]["mean"] - sel[k]["ci_low"] for k in keys],
                        [sel[k]["ci_high"] - sel[k]["mean"] for k in keys]])
        colors = ["C0" if k[0] == "cnn" else "C1" for k in keys]
        ax.barh(y, mean, xerr=err, color=colors, capsize=2)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
    axes[0][0].set_yticks(np.arange(len(keys)))
    axes[0][0].set_yticklabels([f"{m}: {f}" for m, f in keys], fontsize=7)
    fig.suptitle("split B, mean and 95% t-interval", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: BenchResult, out: str | os.PathLike, plots: bool = True) -> dict[str, Path]:
    """Write table.csv, table.md, selection.csv and (with ``plots``) metrics.png and heatmaps.png
    into ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "table.csv", "md": out / "table.md", "selection": out / "selection.csv"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, ["model", "family", "rule", "metric", "mean", "ci_low", "ci_high", "n"])
        w.writeheader()
        w.writerows(result.rows)
    with open(paths["selection"], "w", newline="") as f:
        cols = ["model", "family", "rule", "chosen"] + [k for k, _ in METRICS]
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(result.selection)
    md = [markdown_table(result.rows), "",
          f"Split B; each family's hyperparameters chosen on split A by mean {SELECTION_METRIC}; "
          "mean [95% Student-t CI] over images."]
    md += [f"- note: {n}" for n in result.notes]
    paths["md"].write_text("\n".join(md) + "\n")
    if plots and result.rows:
        paths["metrics_plot"] = out / "metrics.png"
        _bar_plot(paths["metrics_plot"], result.rows)
    if plots and result.examples:
        from ..plot import compare, save

        paths["heatmaps"] = out / "heatmaps.png"
        ex = result.examples
        fig = compare([e["maps"] for e in ex], [e["image"] for e in ex], masks=[e["mask"] for e in ex],
                      titles=[f"{e['model']}, class {e['label']}" for e in ex])
        save(fig, paths["heatmaps"], dpi=80)
    return paths
