"""Localisation metrics (backplay.metrics): invariances, known values, references, errors."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from backplay.metrics import (
    auroc,
    energy_pointing_game,
    pointing_game,
    pointing_game_summary,
    reduce_channels,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    top_k_intersection,
)

# (name, callable(R, masks)) for every per-sample metric.
METRICS = [
    ("pointing_game", pointing_game),
    ("rma", relevance_mass_accuracy),
    ("rra", relevance_rank_accuracy),
    ("topk1", lambda R, m, **kw: top_k_intersection(R, m, 1, **kw)),
    ("topk3", lambda R, m, **kw: top_k_intersection(R, m, 3, **kw)),
    ("auroc", auroc),
    ("epg_mask", lambda R, m, **kw: energy_pointing_game(R, m, use_bbox=False, **kw)),
    ("epg_bbox", lambda R, m, **kw: energy_pointing_game(R, m, use_bbox=True, **kw)),
]
REGION_METRICS = [(n, f) for n, f in METRICS if n != "epg_bbox"]


@st.composite
def batches(draw, max_b=4, min_hw=2, max_hw=5):
    """Integer-valued R in [-6, 6] (frequent ties) and random masks, as numpy arrays."""
    B = draw(st.integers(1, max_b))
    H = draw(st.integers(min_hw, max_hw))
    W = draw(st.integers(min_hw, max_hw))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    R = rng.integers(-6, 7, size=(B, H, W)).astype(np.float64)
    p = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    masks = rng.random((B, H, W)) < p
    if draw(st.booleans()):  # mix in some empty / full masks
        masks[0] = draw(st.booleans())
    return R, masks, rng


def _same(a, b, exact=False):
    a, b = np.asarray(a), np.asarray(b)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    if exact:
        np.testing.assert_array_equal(a[~np.isnan(a)], b[~np.isnan(b)])
    else:
        np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# invariances
# ---------------------------------------------------------------------------------------------


@given(batches(), st.floats(1e-3, 1e3), st.integers(-20, 20))
def test_positive_scaling_invariance(data, c, j):
    R, masks, _ = data
    for name, f in METRICS:
        base = f(R, masks)
        _same(base, f(c * R, masks), exact=name not in ("rma", "epg_mask", "epg_bbox"))
        _same(base, f(2.0**j * R, masks), exact=True)  # powers of two scale exactly


def _permute_within(R, region, rng):
    """Shuffle R's values among the pixels of ``region`` and among those outside, per sample."""
    out = R.copy()
    for b in range(R.shape[0]):
        flat, reg = out[b].reshape(-1), region[b].reshape(-1)
        for sel in (np.flatnonzero(reg), np.flatnonzero(~reg)):
            flat[sel] = flat[rng.permutation(sel)]
    return out


@given(batches())
def test_permutation_within_regions_invariance(data):
    R, masks, rng = data
    Rp = _permute_within(R, masks, rng)
    for _, f in REGION_METRICS:
        _same(f(R, masks), f(Rp, masks), exact=True)


@given(batches())
def test_bbox_epg_permutation_within_box_invariance(data):
    from backplay.metrics.localisation import _bbox_masks

    R, masks, rng = data
    B, H, W = R.shape
    box = _bbox_masks(masks.reshape(B, -1), H, W).reshape(B, H, W)
    Rp = _permute_within(R, box, rng)
    _same(energy_pointing_game(R, masks), energy_pointing_game(Rp, masks), exact=True)


@given(batches())
def test_joint_pixel_permutation_invariance(data):
    """Every mask-based metric is a function of the multiset of (value, in-mask) pairs."""
    R, masks, rng = data
    B, H, W = R.shape
    perm = rng.permutation(H * W)
    Rp = R.reshape(B, -1)[:, perm].reshape(B, H, W)
    mp = masks.reshape(B, -1)[:, perm].reshape(B, H, W)
    for _, f in REGION_METRICS:
        _same(f(R, masks), f(Rp, mp), exact=True)


# ---------------------------------------------------------------------------------------------
# references (brute force)
# ---------------------------------------------------------------------------------------------


def _ref_auroc(r, m):
    pos, neg = r[m], r[~m]
    if len(pos) == 0 or len(neg) == 0:
        return np.nan
    d = pos[:, None] - neg[None, :]
    return ((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size


def _ref_topk_all_orders(r, m, k):
    """Average strict top-k fraction over every tie-breaking order (all N! orders)."""
    vals = []
    for order in itertools.permutations(range(len(r))):
        idx = sorted(range(len(r)), key=lambda i: (-r[i], order[i]))[:k]
        vals.append(m[idx].mean())
    return float(np.mean(vals))


@given(batches(max_hw=6))
def test_auroc_matches_pairwise(data):
    R, masks, _ = data
    got = auroc(R, masks)
    ref = [_ref_auroc(R[b].ravel(), masks[b].ravel()) for b in range(R.shape[0])]
    _same(got, ref)


@given(batches(max_b=2, max_hw=3).filter(lambda d: d[0].shape[1] * d[0].shape[2] <= 6),
       st.integers(1, 6))
def test_topk_and_rra_equal_mean_over_tie_breaks(data, k):
    R, masks, _ = data
    B, H, W = R.shape
    k = min(k, H * W)
    got_k, got_rra = top_k_intersection(R, masks, k), relevance_rank_accuracy(R, masks)
    for b in range(B):
        r, m = R[b].ravel(), masks[b].ravel()
        if not m.any():
            assert np.isnan(got_k[b]) and np.isnan(got_rra[b])
            continue
        assert got_k[b] == pytest.approx(_ref_topk_all_orders(r, m, k), abs=1e-12)
        assert got_rra[b] == pytest.approx(_ref_topk_all_orders(r, m, int(m.sum())), abs=1e-12)


@given(batches())
def test_pointing_game_and_rma_reference(data):
    R, masks, _ = data
    pg, rma = pointing_game(R, masks), relevance_mass_accuracy(R, masks)
    for b in range(R.shape[0]):
        r, m = R[b], masks[b]
        if not m.any():
            assert np.isnan(pg[b]) and np.isnan(rma[b])
            continue
        assert pg[b] == float(any(m[i, j] for i, j in zip(*np.nonzero(r == r.max()))))
        pos = np.clip(r, 0, None)
        assert np.isnan(rma[b]) if pos.sum() == 0 else rma[b] == pytest.approx(
            pos[m].sum() / pos.sum())


# ---------------------------------------------------------------------------------------------
# known values
# ---------------------------------------------------------------------------------------------


def _mask():
    m = np.zeros((1, 4, 5), dtype=bool)
    m[0, 1:3, 1:4] = True  # 6 pixels, not full, not empty
    return m


def test_r_equals_mask_is_perfect():
    m = _mask()
    R = m.astype(float)
    assert pointing_game(R, m)[0] == 1.0
    assert relevance_mass_accuracy(R, m)[0] == 1.0
    assert relevance_rank_accuracy(R, m)[0] == 1.0
    assert top_k_intersection(R, m, 6)[0] == 1.0
    assert auroc(R, m)[0] == 1.0
    assert energy_pointing_game(R, m)[0] == 1.0
    assert energy_pointing_game(R, m, use_bbox=False)[0] == 1.0


def test_r_equals_not_mask():
    m = _mask()
    R = (~m).astype(float)
    assert auroc(R, m)[0] == 0.0
    assert pointing_game(R, m)[0] == 0.0
    assert relevance_mass_accuracy(R, m)[0] == 0.0
    assert relevance_rank_accuracy(R, m)[0] == 0.0


def test_constant_map():
    m = _mask()
    R = np.full(m.shape, 3.0)
    assert auroc(R, m)[0] == 0.5
    assert pointing_game(R, m)[0] == 1.0  # every pixel is a tied maximum
    assert relevance_rank_accuracy(R, m)[0] == pytest.approx(6 / 20)
    assert top_k_intersection(R, m, 4)[0] == pytest.approx(6 / 20)
    assert relevance_mass_accuracy(R, m)[0] == pytest.approx(6 / 20)


def test_tied_maximum_with_one_inside_is_hit():
    m = np.zeros((1, 3, 3), dtype=bool)
    m[0, 2, 2] = True
    R = np.zeros((1, 3, 3))
    R[0, 0, 0] = R[0, 2, 2] = 5.0  # tie at the maximum, one inside
    assert pointing_game(R, m)[0] == 1.0
    R[0, 2, 2] = 4.999
    assert pointing_game(R, m)[0] == 0.0
    # fractional tie counting at the threshold: top-1 of two tied maxima, one inside
    R[0, 2, 2] = 5.0
    assert top_k_intersection(R, m, 1)[0] == 0.5
    assert relevance_rank_accuracy(R, m)[0] == 0.5


def test_empty_mask_excluded_and_never_a_hit():
    R = np.zeros((3, 2, 2))
    R[:, 0, 0] = 1.0
    m = np.zeros((3, 2, 2), dtype=bool)
    m[0, 0, 0] = True  # hit
    m[1, 1, 1] = True  # miss
    # m[2] empty
    for _, f in METRICS:
        assert np.isnan(f(R, m)[2])
    assert pointing_game(R, m).tolist()[:2] == [1.0, 0.0]
    s = pointing_game_summary(R, m)
    assert s == {"hits": 1, "evaluated": 2, "excluded_empty": 1, "accuracy": 0.5}
    s = pointing_game_summary(R[2:], m[2:])
    assert s["hits"] == 0 and s["evaluated"] == 0 and s["excluded_empty"] == 1
    assert np.isnan(s["accuracy"])


def test_full_mask():
    R = np.arange(6.0).reshape(1, 2, 3)
    m = np.ones((1, 2, 3), dtype=bool)
    assert np.isnan(auroc(R, m)[0])
    assert relevance_rank_accuracy(R, m)[0] == 1.0
    assert pointing_game(R, m)[0] == 1.0


def test_zero_positive_relevance_is_nan():
    R = -np.ones((1, 2, 2))
    m = np.zeros((1, 2, 2), dtype=bool)
    m[0, 0, 0] = True
    assert np.isnan(relevance_mass_accuracy(R, m)[0])
    assert np.isnan(energy_pointing_game(R, m)[0])


def test_negative_relevance_ignored_by_mass_metrics():
    R = np.array([[[2.0, -100.0], [1.0, 1.0]]])
    m = np.array([[[True, True], [False, False]]])
    assert relevance_mass_accuracy(R, m)[0] == pytest.approx(0.5)


def test_bbox_vs_mask():
    m = np.zeros((1, 4, 4), dtype=bool)
    m[0, 0, 0] = m[0, 2, 2] = True  # bbox covers rows/cols 0..2
    R = np.zeros((1, 4, 4))
    R[0, 1, 1] = 1.0  # inside the box, outside the mask
    R[0, 3, 3] = 1.0  # outside both
    assert energy_pointing_game(R, m, use_bbox=True)[0] == 0.5
    assert energy_pointing_game(R, m, use_bbox=False)[0] == 0.0
    _same(energy_pointing_game(R, m, use_bbox=False), relevance_mass_accuracy(R, m))


def test_known_auroc_with_ties():
    R = np.array([[[3.0, 1.0, 1.0, 0.0]]])
    m = np.array([[[True, True, False, False]]])
    # pairs: (3,1)>, (3,0)>, (1,1)=, (1,0)>  -> (3 + 0.5) / 4
    assert auroc(R, m)[0] == 0.875


def test_channel_reduction():
    rng = np.random.default_rng(0)
    R4 = rng.normal(size=(2, 3, 4, 4))
    m = rng.random((2, 4, 4)) < 0.4
    m[:, 0, 0] = True
    _same(auroc(R4, m), auroc(R4.sum(1), m), exact=True)
    _same(auroc(R4, m, channel_reduction="abs_sum"), auroc(np.abs(R4).sum(1), m), exact=True)
    _same(auroc(R4, m, channel_reduction="l2"), auroc(np.sqrt((R4**2).sum(1)), m), exact=True)
    _same(auroc(R4, m, channel_reduction="max_abs"), auroc(np.abs(R4).max(1), m), exact=True)
    _same(auroc(R4, m, channel_reduction="mean"), auroc(R4.mean(1), m))


def test_reduce_channels():
    R4 = np.random.default_rng(1).normal(size=(2, 3, 4, 4))
    np.testing.assert_array_equal(reduce_channels(R4), R4.sum(1))
    np.testing.assert_array_equal(reduce_channels(R4, "max_abs"), np.abs(R4).max(1))
    np.testing.assert_array_equal(reduce_channels(R4, "l2"), np.sqrt((R4 * R4).sum(1)))
    with pytest.raises(ValueError, match="unknown channel_reduction 'median'"):
        reduce_channels(R4, "median")
    with pytest.raises(ValueError, match=r"needs a \[B, C, H, W\] array, got shape \(3, 4, 4\)"):
        reduce_channels(R4[0])


def test_binary_numeric_masks_accepted():
    R = np.arange(4.0).reshape(1, 2, 2)
    mb = np.array([[[False, True], [False, True]]])
    for dt in (np.int64, np.uint8, np.float32):
        for _, f in METRICS:
            _same(f(R, mb), f(R, mb.astype(dt)), exact=True)


# ---------------------------------------------------------------------------------------------
# numpy vs torch
# ---------------------------------------------------------------------------------------------


@given(batches())
def test_torch_matches_numpy(data):
    R, masks, _ = data
    Rt, mt = torch.from_numpy(R), torch.from_numpy(masks)
    for _, f in METRICS:
        a = f(R, masks)
        assert isinstance(a, np.ndarray) and a.dtype == np.float64 and a.shape == (R.shape[0],)
        for Rin, min_ in ((Rt, mt), (Rt.float(), mt.int()), (Rt, masks)):
            t = f(Rin, min_)
            assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
            assert t.device == Rin.device and t.shape == (R.shape[0],)
            _same(a, t.numpy(), exact=True)
    assert pointing_game_summary(Rt, mt) == pytest.approx(pointing_game_summary(R, masks),
                                                          nan_ok=True)


def test_torch_requires_grad_and_device():
    R = torch.rand(2, 3, 3, requires_grad=True)
    m = torch.zeros(2, 3, 3, dtype=torch.bool)
    m[:, 0, 0] = True
    out = auroc(R, m)
    assert out.device == R.device and not out.requires_grad
    if torch.cuda.is_available():
        out = relevance_rank_accuracy(R.cuda(), m.cuda())
        assert out.device.type == "cuda"
        _same(out.cpu().numpy(), relevance_rank_accuracy(R.detach().numpy(), m.numpy()))


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def _ok():
    return np.zeros((2, 3, 3)), np.ones((2, 3, 3), dtype=bool)


@pytest.mark.parametrize("name,f", METRICS + [("summary", pointing_game_summary)])
def test_errors(name, f):
    R, m = _ok()
    with pytest.raises(ValueError, match="shape mismatch"):
        f(R, m[:, :2])
    with pytest.raises(ValueError, match="shape mismatch"):
        f(R[:1], m)
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        f(R[0], m)
    with pytest.raises(ValueError, match=r"masks must have shape"):
        f(R, m[0])
    with pytest.raises(ValueError, match="binary"):
        f(R, np.full((2, 3, 3), 0.5))
    with pytest.raises(ValueError, match="binary"):
        f(R, np.full((2, 3, 3), np.nan))
    with pytest.raises(ValueError, match="binary"):
        f(torch.from_numpy(R), torch.full((2, 3, 3), 2))
    for bad in (np.nan, np.inf, -np.inf):
        Rb = R.copy()
        Rb[1, 2, 2] = bad
        with pytest.raises(ValueError, match="finite"):
            f(Rb, m)
        with pytest.raises(ValueError, match="finite"):
            f(torch.from_numpy(Rb), torch.from_numpy(m))
    with pytest.raises(ValueError, match="real"):
        f(R.astype(complex), m)
    with pytest.raises(ValueError, match="channel_reduction"):
        f(np.zeros((2, 1, 3, 3)), m, channel_reduction="median")
    with pytest.raises(ValueError, match="at least one pixel"):
        f(np.zeros((2, 0, 3)), np.zeros((2, 0, 3), dtype=bool))


def test_topk_k_errors():
    R, m = _ok()
    for k in (0, 10, -1):
        with pytest.raises(ValueError, match="1 <= k <= H\\*W = 9"):
            top_k_intersection(R, m, k)
    for k in (1.5, True, "2"):
        with pytest.raises(ValueError, match="integer"):
            top_k_intersection(R, m, k)
    assert top_k_intersection(R, m, np.int64(9))[0] == 1.0


def test_empty_batch():
    for _, f in METRICS:
        out = f(np.zeros((0, 2, 2)), np.zeros((0, 2, 2), dtype=bool))
        assert out.shape == (0,)
    assert pointing_game_summary(np.zeros((0, 2, 2)), np.zeros((0, 2, 2)))["evaluated"] == 0


# ---------------------------------------------------------------------------------------------
# Quantus conventions: [B, 1, H, W] masks, and the scores Quantus's defaults give
# ---------------------------------------------------------------------------------------------


@given(batches())
def test_masks_with_channel_axis_equal_plain_masks(data):
    R, masks, _ = data
    R4 = np.stack([R, -0.5 * R], axis=1)  # [B, 2, H, W]: the channel reduction is applied too
    for name, f in METRICS:
        _same(f(R, masks[:, None]), f(R, masks), exact=True)
        _same(f(R4, masks[:, None]), f(R4, masks), exact=True)
        _same(f(R, masks[:, None].astype(np.uint8)), f(R, masks), exact=True)
        t = f(torch.from_numpy(R), torch.from_numpy(masks)[:, None])
        _same(t.numpy(), f(R, masks), exact=True)
    for Rin in (R, R4):
        assert pointing_game_summary(Rin, masks[:, None]) == pytest.approx(
            pointing_game_summary(Rin, masks), nan_ok=True)


@pytest.mark.parametrize("name,f", METRICS + [("summary", pointing_game_summary)])
def test_multichannel_masks_rejected(name, f):
    R, m = _ok()
    for bad in (np.ones((2, 3, 3, 3), dtype=bool), torch.ones(2, 2, 3, 3)):
        with pytest.raises(ValueError, match=r"have \d channels; a mask must have one"):
            f(R, bad)
    with pytest.raises(ValueError, match=r"\[B, H, W\] or \[B, 1, H, W\]"):
        f(R, np.ones((2, 1, 1, 3, 3), dtype=bool))
    with pytest.raises(ValueError, match="shape mismatch"):
        f(R, m[:, None, :2])


def _quantus_like(R, s, k):
    """Scores as Quantus's defaults compute them (abs=False; normalise_by_max, a positive rescaling
    that changes nothing) for one sample: strict top-k from an ascending sort, sklearn's ROC AUC,
    the signed inside/total mass, and a hit at any maximum."""
    from sklearn.metrics import auc, roc_curve

    a, s = R.ravel(), s.ravel().astype(bool)
    a = a / np.abs(a).max()
    order = np.argsort(a)
    fpr, tpr, _ = roc_curve(s, a)
    return {
        "pointing_game": float(s[a == a.max()].any()),
        "rma": a[s].sum() / a.sum(),
        "rra": np.isin(order[-s.sum():], np.flatnonzero(s)).mean(),
        "topk": s[order[-k:]].mean(),
        "auroc": auc(fpr, tpr),
    }


def test_agrees_with_quantus_defaults_without_ties():
    rng = np.random.default_rng(3)
    R = rng.random((6, 1, 7, 5)) + 1e-3  # non-negative (RMA), no ties (ranking metrics)
    s = rng.random((6, 1, 7, 5)) < 0.35  # Quantus's s_batch layout
    s[:, 0, 0, 0], s[:, 0, -1, -1] = True, False  # neither empty nor full
    k = 9
    ours = {
        "pointing_game": pointing_game(R, s),
        "rma": relevance_mass_accuracy(R, s),
        "rra": relevance_rank_accuracy(R, s),
        "topk": top_k_intersection(R, s, k),
        "auroc": auroc(R, s),
    }
    for b in range(R.shape[0]):
        ref = _quantus_like(R[b, 0], s[b, 0], k)
        for key, val in ref.items():
            assert ours[key][b] == pytest.approx(val, rel=1e-12, abs=1e-12), key


def test_rma_clips_negative_relevance_unlike_signed_mass():
    R = np.array([[[2.0, -1.0], [1.0, 0.0]]])
    m = np.array([[[True, True], [False, False]]])
    # positive part: 2 / 3 inside; Quantus's signed ratio is (2 - 1) / 2 = 0.5
    assert relevance_mass_accuracy(R, m)[0] == pytest.approx(2 / 3)
    assert _quantus_like(R[0], m[0], 1)["rma"] == pytest.approx(0.5)
    assert _quantus_like(np.maximum(R[0], 0), m[0], 1)["rma"] == pytest.approx(2 / 3)
