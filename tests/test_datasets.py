"""ImageNet-S and VOC loaders on tiny fixture folders; the benchmark on them with a small CNN."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import backplay.cli as cli
from backplay.bench import localisation as loc
from backplay.bench.datasets import ImageNetS, VOCSegmentation, read_image
from backplay.bench.models import load_model, save_checkpoint, small_cnn


def _rgb_ids(ids: np.ndarray) -> np.ndarray:
    """Class ids -> the ImageNet-S RGB encoding (R = id % 256, G = id // 256)."""
    return np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)


@pytest.fixture
def imagenet_s(tmp_path):
    root = tmp_path / "ImageNetS50"
    rng = np.random.default_rng(0)
    ids_one = np.zeros((12, 16), dtype=np.int64)
    ids_one[2:8, 3:11] = 300
    ids_one[0, :] = 1000  # ignore row
    ids_two = ids_one.copy()
    ids_two[9:, :4] = 7  # a second class: not single-class
    ids_bg = np.zeros((12, 16), dtype=np.int64)
    for wnid, name, ids in (("n01", "a", ids_one), ("n01", "b", ids_two), ("n02", "c", ids_bg)):
        (root / "validation" / wnid).mkdir(parents=True, exist_ok=True)
        (root / "validation-segmentation" / wnid).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(
            root / "validation" / wnid / f"{name}.png")
        Image.fromarray(_rgb_ids(ids)).save(root / "validation-segmentation" / wnid / f"{name}.png")
    return root, ids_one


def test_imagenet_s_single_class_images(imagenet_s):
    root, ids = imagenet_s
    items = list(ImageNetS(root, "validation", size=None))
    assert len(items) == 1
    image, target, mask = items[0]
    assert target == 300 and image.shape == (3, 12, 16) and image.dtype == torch.float32
    assert torch.equal(mask, torch.from_numpy(ids == 300))
    ref = np.asarray(Image.open(root / "validation" / "n01" / "a.png"), dtype=np.float32) / 255
    assert torch.equal(image, torch.from_numpy(ref).permute(2, 0, 1))
    assert np.array_equal(ImageNetS.read_mask(root / "validation-segmentation" / "n01" / "a.png"), ids)


def test_imagenet_s_wnids_and_resize(imagenet_s, tmp_path):
    root, ids = imagenet_s
    (tmp_path / "wnids.txt").write_text("n00 tench\nn01 goldfish\n")
    [(image, target, mask)] = list(ImageNetS(root, size=8, wnids=tmp_path / "wnids.txt"))
    assert target == 1 and image.shape == (3, 8, 8) and mask.shape == (8, 8) and mask.any()
    assert list(ImageNetS(root, size=8, wnids=["n05"])) == []
    with pytest.raises(FileNotFoundError):
        ImageNetS(root, "train-semi")


@pytest.fixture
def voc(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("ImageSets/Segmentation", "JPEGImages", "SegmentationClass"):
        (base / d).mkdir(parents=True)
    rng = np.random.default_rng(1)
    palette = list(rng.integers(0, 256, 768, dtype=np.uint8))
    labels = {}
    names = ("dog1", "two", "dog2", "cat1", "cat2", "dog3", "dog4")
    for k, name in enumerate(names):
        lab = np.zeros((16, 16), dtype=np.uint8)
        lab[4:12, 4 + k % 2:12] = 8 if name.startswith("cat") else 12
        lab[3, 4:12] = 255  # ignore border
        if name == "two":
            lab[13:, :3] = 15
        p = Image.fromarray(lab, mode="P")
        p.putpalette(palette)
        p.save(base / "SegmentationClass" / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(base / "JPEGImages" / f"{name}.jpg")
        labels[name] = lab
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")
    return tmp_path, labels


def test_voc_single_class_images(voc):
    root, labels = voc
    items = list(VOCSegmentation(root, "2012", "val", size=None))
    assert [t for _, t, _ in items] == [11, 11, 7, 7, 11, 11]  # dog = 12, cat = 8 (minus background)
    assert torch.equal(items[0][2], torch.from_numpy(labels["dog1"] == 12))
    img = read_image(root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "dog1.jpg")
    assert torch.equal(items[0][0], img)
    mapped = list(VOCSegmentation(root / "VOCdevkit" / "VOC2012", size=8, target_map={12: 207}))
    assert [t for _, t, _ in mapped] == [207] * 4 and mapped[0][2].shape == (8, 8)
    with pytest.raises(FileNotFoundError):
        VOCSegmentation(root / "nothing")
    with pytest.raises(FileNotFoundError):
        VOCSegmentation(root, image_set="train")


def test_benchmark_on_voc_fixture(voc, tmp_path, capsys):
    root, _ = voc
    torch.manual_seed(3)
    ckpt = tmp_path / "cnn3.pt"
    save_checkpoint(ckpt, small_cnn(in_channels=3, num_classes=20, size=16, width=4).eval(), "cnn",
                    dict(in_channels=3, num_classes=20, size=16, width=4),
                    dict(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]))
    loaded = load_model(ckpt)
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.size == 16
    res = loc.run_dataset(VOCSegmentation(root, size=16), loaded, quick=True, chunk=2, log=io.StringIO())
    n = {r["metric"]: r["n"] for r in res.rows}  # split B: the 3 odd-indexed images (NaN dropped)
    assert n["pointing_game"] == n["rra"] == n["auroc"] == 3 and n["rma"] <= 3
    assert [r["family"] for r in res.rows[::len(loc.METRICS)]] == [f.name for f in loc.cnn_families(True)]
    out = tmp_path / "voc_out"
    assert cli.main(["bench", "localisation", "--dataset", "voc", "--data-root", str(root), "--model",
                     str(ckpt), "--quick", "--out", str(out), "--no-plots"]) == 0
    assert "voc at" in capsys.readouterr().out and (out / "table.md").is_file()
