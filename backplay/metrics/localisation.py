"""Localisation metrics: how well an attribution map points at a ground-truth region.

Every metric takes a batch of attributions ``R`` and a batch of binary masks ``masks`` and returns
one score per sample:

* ``R``: shape ``[B, H, W]``, or ``[B, C, H, W]`` reduced over the channel axis (axis 1) to one
  ``[B, H, W]`` map by ``channel_reduction`` before scoring: ``"sum"`` (default: signed sum over
  channels, the usual choice for LRP / gradient x input maps and what Quantus's examples do
  before calling a metric, ``a_batch.sum(axis=1)``), ``"mean"`` (signed mean), ``"abs_sum"``
  (sum of absolute values), ``"l2"`` (Euclidean norm over channels) or ``"max_abs"`` (largest
  absolute value). ``C = 1`` is allowed (every reduction but the absolute ones is then the
  identity). Real, finite values (bool/int/float; cast to float64).
* ``masks``: shape ``[B, H, W]``, or ``[B, 1, H, W]`` (Quantus's ``s_batch`` convention; the
  channel axis is dropped), dtype bool or numeric with values in {0, 1}. A mask with ``C > 1``
  channels is an error: combine the channels first (e.g. ``masks.any(axis=1)``).
* Inputs may be numpy arrays (or array-likes) or torch tensors. The result has the kind of ``R``:
  a numpy ``float64`` array of shape ``[B]``, or a ``torch.float64`` tensor of shape ``[B]`` on
  ``R``'s device. Computation is done in numpy (float64), vectorised over the batch; torch inputs
  are detached and copied to the CPU, and the result is moved back.
* ``NaN`` marks an excluded sample. Every metric excludes a sample whose mask is empty (no
  ground-truth pixel: nothing to localise); some metrics also define other 0/0 cases as NaN (see
  each docstring). Use ``np.nanmean`` / ``torch.nanmean`` to average, and report the exclusions
  (``pointing_game_summary`` does this for the pointing game).

Errors (``ValueError``): wrong number of dimensions, batch/spatial shape mismatch between ``R`` and
``masks``, a mask with more than one channel, a non-binary mask (values other than 0/1, including
NaN), non-finite attributions (NaN/inf), complex or non-numeric attributions, images with zero
pixels, an unknown channel reduction, and an out-of-range ``k`` in ``top_k_intersection``.

Ties. Metrics that rank pixels (relevance rank accuracy, top-k intersection) are *tie-invariant*:
pixels tied at the k-th largest value share the remaining slots fractionally (the expected score
over a uniformly random order among the tied pixels; see ``_topk_fraction_inside``). Ties are exact
floating-point equality; no tolerance is applied. The pointing game counts a hit when *any* of the
tied maxima lies in the mask; AUROC counts a tied (inside, outside) pair as 1/2.

Quantus. Each docstring compares the metric with its Quantus counterpart (Hedström et al. 2023;
the class API of ``quantus/metrics/localisation/``, whose ``normalise_func`` default is
``quantus.functions.normalise_func.normalise_by_max``). The defaults shared by the five
counterparts (``PointingGame``, ``RelevanceMassAccuracy``, ``RelevanceRankAccuracy``,
``TopKIntersection``, ``AUC``) are ``abs=False`` (the signed attribution is scored, as here) and
``normalise=True`` with ``normalise_by_max`` (division by the sample's largest ``|a|``, a
positive rescaling that changes none of these scores). Quantus expects ``s_batch`` of shape
``[B, 1, H, W]`` and one-channel attributions (it does not reduce channels; its examples sum
them, ``.sum(axis=1)``, before calling a metric). Unlike Quantus, backplay breaks ties
fractionally (above) instead of by the order ``np.argsort`` happens to return, so the two agree
whenever no tie straddles the cut.

References
----------
* Zhang, Bargal, Lin, Brandt, Shen, Sclaroff (2018), "Top-down neural attention by excitation
  backprop", IJCV 126 (pointing game).
* Arras, Osman, Samek (2022), "CLEVR-XAI: A benchmark dataset for the ground truth evaluation of
  neural network explanations", Information Fusion 81 (relevance mass / rank accuracy).
* Theiner, Müller-Budack, Ewerth (2022), "Interpretable semantic photo geolocation", WACV; as
  implemented in Quantus (Hedström et al. 2023, JMLR 24) ``TopKIntersection``.
* Wang, Wang, Du, Yang, Zhang, Ding, Mardziel, Hu (2020), "Score-CAM: Score-weighted visual
  explanations for convolutional neural networks", CVPR workshops (energy-based pointing game).
* Mann & Whitney (1947); Hanley & McNeil (1982) for AUROC as the Mann-Whitney U statistic.
* Hedström, Weber, Krakowczyk, Bareeva, Motzkus, Samek, Lapuschkin, Höhne (2023), "Quantus: An
  explainable AI toolkit for responsible evaluation of neural network explanations and beyond",
  JMLR 24(34).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = [
    "CHANNEL_REDUCTIONS",
    "auroc",
    "energy_pointing_game",
    "pointing_game",
    "pointing_game_summary",
    "reduce_channels",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "top_k_intersection",
]

CHANNEL_REDUCTIONS = ("sum", "mean", "abs_sum", "l2", "max_abs")


# ---------------------------------------------------------------------------------------------
# input handling
# ---------------------------------------------------------------------------------------------


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if _is_torch(x):
        import torch

        t = x.detach()
        if t.is_complex():
            raise ValueError(f"{name} must be real-valued, got complex dtype {t.dtype}")
        if t.dtype != torch.bool:
            t = t.to(torch.float64)
        return t.cpu().numpy()
    return np.asarray(x)


def reduce_channels(r: np.ndarray, how: str = "sum") -> np.ndarray:
    """Reduce axis 1 (channels) of a ``[B, C, H, W]`` array to ``[B, H, W]`` by ``how``, one of
    ``CHANNEL_REDUCTIONS`` (see the module docstring); the metrics' ``channel_reduction``.

    Raises ValueError for an unknown ``how`` or an array without a channel axis.
    """
    if how not in CHANNEL_REDUCTIONS:
        raise ValueError(f"unknown channel_reduction {how!r}; expected one of {CHANNEL_REDUCTIONS}")
    if r.ndim != 4:
        raise ValueError(f"reduce_channels needs a [B, C, H, W] array, got shape {tuple(r.shape)}")
    if how == "sum":
        return r.sum(axis=1)
    if how == "mean":
        return r.mean(axis=1)
    if how == "abs_sum":
        return np.abs(r).sum(axis=1)
    if how == "l2":
        return np.sqrt((r * r).sum(axis=1))
    return np.abs(r).max(axis=1)  # "max_abs"


def _prepare(R: Any, masks: Any, channel_reduction: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Validate and flatten: returns (r [B, N] float64, m [B, N] bool, (H, W))."""
    if channel_reduction not in CHANNEL_REDUCTIONS:
        raise ValueError(
            f"unknown channel_reduction {channel_reduction!r}; expected one of {CHANNEL_REDUCTIONS}"
        )
    r = _to_numpy(R, "R")
    m = _to_numpy(masks, "masks")

    if r.dtype == object or not (np.issubdtype(r.dtype, np.number) or r.dtype == np.bool_):
        raise ValueError(f"R must be a real numeric array, got dtype {r.dtype}")
    if np.issubdtype(r.dtype, np.complexfloating):
        raise ValueError(f"R must be real-valued, got complex dtype {r.dtype}")
    if r.ndim not in (3, 4):
        raise ValueError(
            f"R must have shape [B, H, W] or [B, C, H, W], got {r.ndim} dims with shape "
            f"{tuple(r.shape)} (add a leading batch axis for a single map)"
        )
    if m.ndim == 4:
        if m.shape[1] != 1:
            raise ValueError(
                f"masks of shape {tuple(m.shape)} have {m.shape[1]} channels; a mask must have "
                f"one, [B, H, W] or [B, 1, H, W] (combine the channels first, e.g. "
                f"masks.any(axis=1))"
            )
        m = m[:, 0]
    elif m.ndim != 3:
        raise ValueError(
            f"masks must have shape [B, H, W] or [B, 1, H, W], got {m.ndim} dims with shape "
            f"{tuple(m.shape)}"
        )
    r = r.astype(np.float64, copy=False)
    if not np.all(np.isfinite(r)):
        bad = int(np.count_nonzero(~np.isfinite(r)))
        raise ValueError(f"R must be finite; found {bad} NaN/inf value(s)")
    if r.ndim == 4:
        r = reduce_channels(r, channel_reduction)
    if r.shape != m.shape:
        raise ValueError(
            f"shape mismatch: R gives maps of shape {tuple(r.shape)} [B, H, W] but masks give "
            f"{tuple(m.shape)}"
        )
    B, H, W = r.shape
    if H * W == 0:
        raise ValueError(f"maps must have at least one pixel, got H, W = {H}, {W}")

    if m.dtype != np.bool_:
        if m.dtype == object or not np.issubdtype(m.dtype, np.number):
            raise ValueError(f"masks must be bool or numeric 0/1, got dtype {m.dtype}")
        if not np.all((m == 0) | (m == 1)):
            vals = np.unique(m[~((m == 0) | (m == 1))])[:5]
            raise ValueError(
                f"masks must be binary (bool or values in {{0, 1}}); found other values, e.g. "
                f"{vals.tolist()}"
            )
        m = m == 1
    return r.reshape(B, H * W), m.reshape(B, H * W), (H, W)


def _wrap(out: np.ndarray, R: Any):
    """Return ``out`` in the kind of ``R``: numpy float64, or torch float64 on R's device."""
    out = np.asarray(out, dtype=np.float64)
    if _is_torch(R):
        import torch

        return torch.from_numpy(out).to(device=R.device)
    return out


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with NaN where den == 0 (no warnings)."""
    out = np.full(np.shape(num), np.nan)
    ok = den != 0
    np.divide(num, den, out=out, where=ok)
    return out


# ---------------------------------------------------------------------------------------------
# shared kernels (flattened [B, N] arrays)
# ---------------------------------------------------------------------------------------------


def _topk_fraction_inside(r: np.ndarray, m: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Tie-invariant fraction of the top-``k`` pixels (per row) that lie in the mask.

    With ``t`` the k-th largest value of the row, ``G`` pixels strictly above ``t`` and ``E``
    pixels equal to ``t`` (``G < k <= G + E``), the ``k - G`` remaining slots are shared evenly
    among the ``E`` tied pixels::

        inside = #{i in mask : r_i > t} + (k - G) * #{i in mask : r_i == t} / E
        score  = inside / k

    This is the expectation of the strict top-k fraction over a uniformly random order among
    tied pixels, so it depends only on the multiset of (value, in-mask) pairs: invariant under
    any pixel permutation that is applied to ``r`` and ``m`` together. ``k`` must be in [1, N].
    """
    B = r.shape[0]
    s = -np.sort(-r, axis=1)  # descending
    t = s[np.arange(B), k - 1][:, None]
    above = r > t
    tied = r == t
    G = above.sum(axis=1)
    E = tied.sum(axis=1)
    inside = (above & m).sum(axis=1) + (k - G) * (tied & m).sum(axis=1) / E
    return inside / k


def _average_ranks(r: np.ndarray) -> np.ndarray:
    """Row-wise 1-based ranks with ties given their average rank (vectorised over rows)."""
    B, N = r.shape
    order = np.argsort(r, axis=1, kind="stable")
    s = np.take_along_axis(r, order, axis=1)
    pos = np.broadcast_to(np.arange(N), (B, N))
    new_group = np.ones((B, N), dtype=bool)
    new_group[:, 1:] = s[:, 1:] != s[:, :-1]
    start = np.maximum.accumulate(np.where(new_group, pos, 0), axis=1)
    end_group = np.ones((B, N), dtype=bool)
    end_group[:, :-1] = new_group[:, 1:]
    # last index of each group: reverse running minimum of group ends
    end = np.where(end_group, pos, N)
    end = np.minimum.accumulate(end[:, ::-1], axis=1)[:, ::-1]
    sorted_ranks = (start + end) / 2.0 + 1.0
    ranks = np.empty((B, N))
    np.put_along_axis(ranks, order, sorted_ranks, axis=1)
    return ranks


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def _pointing_hits(r: np.ndarray, m: np.ndarray) -> np.ndarray:
    mx = r.max(axis=1, keepdims=True)
    return np.any((r == mx) & m, axis=1)


def pointing_game(R: Any, masks: Any, *, channel_reduction: str = "sum"):
    """Pointing game (Zhang et al. 2018): 1.0 if a maximum of ``R`` lies in the mask, else 0.0.

    Ties: when several pixels attain the maximum, the sample is a hit if ANY of them lies in the
    mask (exact equality). This is the strict version without the 15-pixel tolerance of the
    original; dilate the masks beforehand to reproduce a tolerance. Samples with an empty mask are
    excluded (NaN); they are never hits. See ``pointing_game_summary`` for counts.

    Quantus ``PointingGame`` (defaults ``weighted=False, abs=False, normalise=True``) scores the
    same: a hit when any maximum of the signed map lies in the mask, NaN for an empty mask. Its
    ``weighted=True`` (a hit scores ``1 - |mask| / (H * W)``) has no counterpart here.

    Returns one score per sample (0.0, 1.0 or NaN), in the kind of ``R``.
    """
    r, m, _ = _prepare(R, masks, channel_reduction)
    out = _pointing_hits(r, m).astype(np.float64)
    out[~m.any(axis=1)] = np.nan
    return _wrap(out, R)


def pointing_game_summary(R: Any, masks: Any, *, channel_reduction: str = "sum") -> dict:
    """Aggregate pointing game with the exclusions reported.

    Returns ``dict(hits, evaluated, excluded_empty, accuracy)``: ``hits`` (int) counts samples
    whose mask contains a maximum of ``R`` (ties: any maximum counts); a sample with an empty
    mask is never a hit, is not evaluated, and is counted in ``excluded_empty`` (int);
    ``evaluated`` (int) = batch size - ``excluded_empty``; ``accuracy`` (float) = hits /
    evaluated, NaN when nothing was evaluated.
    """
    r, m, _ = _prepare(R, masks, channel_reduction)
    nonempty = m.any(axis=1)
    hits = int(np.count_nonzero(_pointing_hits(r, m) & nonempty))
    evaluated = int(np.count_nonzero(nonempty))
    excluded = int(r.shape[0] - evaluated)
    accuracy = hits / evaluated if evaluated else float("nan")
    return {"hits": hits, "evaluated": evaluated, "excluded_empty": excluded, "accuracy": accuracy}


def relevance_mass_accuracy(R: Any, masks: Any, *, channel_reduction: str = "sum"):
    """Relevance mass accuracy (Arras et al. 2022, CLEVR-XAI).

    ``RMA = sum_{i in mask} max(R_i, 0) / sum_i max(R_i, 0)``: the share of positive relevance
    that falls inside the mask, in [0, 1]. Negative relevance is ignored (clipped at 0).

    NaN (excluded) when the mask is empty, or when there is no positive relevance at all
    (0/0: all ``R_i <= 0``).

    Quantus ``RelevanceMassAccuracy`` (defaults ``abs=False, normalise=True``) computes
    ``sum_{i in mask} R_i / sum_i R_i`` of the *signed* map (its docstring speaks of positive
    attributions, but its code clips nothing): the two agree when ``R >= 0``; for signed maps pass
    ``np.maximum(R, 0)`` to Quantus to get this score.
    """
    r, m, _ = _prepare(R, masks, channel_reduction)
    pos = np.maximum(r, 0.0)
    out = _safe_div(np.where(m, pos, 0.0).sum(axis=1), pos.sum(axis=1))
    out[~m.any(axis=1)] = np.nan
    return _wrap(out, R)


def relevance_rank_accuracy(R: Any, masks: Any, *, channel_reduction: str = "sum"):
    """Relevance rank accuracy (Arras et al. 2022, CLEVR-XAI).

    With ``K = |mask|``, the fraction of the ``K`` highest-relevance pixels (ranked by the signed
    value of ``R``) that lie in the mask, in [0, 1]. Ties at the K-th value are counted
    fractionally (tie-invariant; see module docstring): e.g. a constant map scores ``K / N``.
    A full mask scores 1.

    NaN (excluded) when the mask is empty (K = 0).

    Quantus ``RelevanceRankAccuracy`` (defaults ``abs=False, normalise=True``) is the same
    fraction over the signed values, its top K taken from ``np.argsort``, which breaks ties at the
    K-th value by sort order; the two agree when there is no such tie.
    """
    r, m, _ = _prepare(R, masks, channel_reduction)
    K = m.sum(axis=1)
    empty = K == 0
    out = _topk_fraction_inside(r, m, np.where(empty, 1, K))
    out[empty] = np.nan
    return _wrap(out, R)


def top_k_intersection(R: Any, masks: Any, k: int, *, channel_reduction: str = "sum"):
    """Top-k intersection (Theiner et al. 2022; Quantus ``TopKIntersection``).

    The fraction of the ``k`` highest-relevance pixels (ranked by the signed value of ``R``) that
    lie in the mask, in [0, 1]; ``1 <= k <= H * W``. Ties at the k-th value are counted
    fractionally (tie-invariant; see module docstring).

    Quantus ``TopKIntersection`` defaults to ``k=1000, concept_influence=False, abs=False,
    normalise=True``: like here it ranks the *signed* values, so the scores agree for the same
    ``k`` when no tie straddles the k-th value (Quantus breaks ties by ``np.argsort`` order).
    ``k`` has no default here (1000 exceeds small images). To reproduce Quantus's ``abs=True``,
    pass the absolute value of the reduced map, e.g. ``np.abs(R.sum(axis=1))`` for ``[B, C, H,
    W]`` ``R`` (``channel_reduction="abs_sum"`` sums ``|R_c|`` per channel instead, which differs
    for ``C > 1``). Quantus's ``concept_influence=True`` (the score times ``H * W / |mask|``) has
    no counterpart here.

    NaN (excluded) when the mask is empty.
    """
    r, m, _ = _prepare(R, masks, channel_reduction)
    N = r.shape[1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= N:
        raise ValueError(f"k must satisfy 1 <= k <= H*W = {N}, got k = {k}")
    out = _topk_fraction_inside(r, m, np.full(r.shape[0], int(k)))
    out[~m.any(axis=1)] = np.nan
    return _wrap(out, R)


def auroc(R: Any, masks: Any, *, channel_reduction: str = "sum"):
    """Area under the ROC curve of ``R`` as a score for mask membership.

    Computed as the normalised Mann-Whitney U statistic::

        AUROC = ( #{(i, j) : i in mask, j not in mask, R_i > R_j}
                  + 1/2 #{(i, j) : i in mask, j not in mask, R_i == R_j} ) / (|mask| * |~mask|)

    (via average ranks), i.e. the probability that a random inside pixel outranks a random
    outside pixel, ties counting 1/2. 1 = perfect separation, 0.5 = chance (or a constant map),
    0 = inverted.

    NaN (excluded) when the mask is empty or full (one class missing).

    Quantus ``AUC`` (defaults ``abs=False, normalise=True``) computes the same area from
    scikit-learn's ``roc_curve`` / ``auc`` over the signed values (tied scores share one ROC
    point, which also counts a tied pair 1/2); it returns NaN for an empty mask, and for a full
    mask scikit-learn warns that the ROC curve is undefined.
    """
    r, m, _ = _prepare(R, masks, channel_reduction)
    N = r.shape[1]
    P = m.sum(axis=1).astype(np.float64)
    Q = N - P
    ranks = _average_ranks(r)
    U = np.where(m, ranks, 0.0).sum(axis=1) - P * (P + 1) / 2.0
    out = _safe_div(U, P * Q)
    return _wrap(out, R)


def _bbox_masks(m: np.ndarray, H: int, W: int) -> np.ndarray:
    """Tight axis-aligned bounding box of each mask (flattened [B, N]); empty stays empty."""
    B = m.shape[0]
    m3 = m.reshape(B, H, W)
    rows = m3.any(axis=2)  # [B, H]
    cols = m3.any(axis=1)  # [B, W]
    r0 = rows.argmax(axis=1)
    r1 = H - 1 - rows[:, ::-1].argmax(axis=1)
    c0 = cols.argmax(axis=1)
    c1 = W - 1 - cols[:, ::-1].argmax(axis=1)
    hi = np.arange(H)[None, :]
    wi = np.arange(W)[None, :]
    in_r = (hi >= r0[:, None]) & (hi <= r1[:, None])
    in_c = (wi >= c0[:, None]) & (wi <= c1[:, None])
    box = in_r[:, :, None] & in_c[:, None, :]
    box &= rows.any(axis=1)[:, None, None]
    return box.reshape(B, H * W)


def energy_pointing_game(
    R: Any, masks: Any, *, use_bbox: bool = True, channel_reduction: str = "sum"
):
    """Energy-based pointing game (Wang et al. 2020, Score-CAM, Sec. 5.2).

    ``EPG = sum_{i in region} max(R_i, 0) / sum_i max(R_i, 0)`` where the region is

    * ``use_bbox=True`` (default, as in the original, which evaluates on ImageNet/VOC boxes): the
      tight axis-aligned bounding box of the mask's pixels;
    * ``use_bbox=False``: the mask itself (then EPG equals ``relevance_mass_accuracy``).

    Score-CAM maps are non-negative; for signed attributions only the positive part is counted
    as energy. NaN (excluded) when the mask is empty, or when there is no positive energy (0/0).
    Quantus has no energy-based pointing game.
    """
    r, m, (H, W) = _prepare(R, masks, channel_reduction)
    region = _bbox_masks(m, H, W) if use_bbox else m
    pos = np.maximum(r, 0.0)
    out = _safe_div(np.where(region, pos, 0.0).sum(axis=1), pos.sum(axis=1))
    out[~m.any(axis=1)] = np.nan
    return _wrap(out, R)
