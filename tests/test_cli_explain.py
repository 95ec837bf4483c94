"""`backplay explain IMAGE --model CKPT --rule a,b --out heatmap.png`."""

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from PIL import Image

import backplay as bp
import backplay.cli as cli
from backplay.bench.commands import explain_image
from backplay.bench.models import load_model, save_checkpoint, small_cnn
from backplay.rules import LRP0, RG, AlphaBeta, AttnLRP, Gradient, Rollout


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "cnn.pt"
    arch = dict(in_channels=1, num_classes=10, size=16, width=4)
    save_checkpoint(path, small_cnn(**arch).eval(), "cnn", arch, dict(mean=[0.2], std=[0.5]))
    return path


def _png(path, seed=0, shape=(20, 20)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def test_explain_one_image_several_rules(ckpt, tmp_path, capsys):
    img = _png(tmp_path / "x.png")
    out = tmp_path / "sub" / "heat.png"
    assert cli.main(["explain", str(img), "--model", str(ckpt), "--rule",
                     "Gradient, LRP0 ,RG(tau=0.5, route_temp=2)", "--target", "3", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    pic = mpimg.imread(out)
    assert pic.ndim == 3 and pic.shape[1] > 3 * pic.shape[0]  # image + 3 rules side by side


def test_explain_image_maps_are_bp_explain(ckpt, tmp_path):
    img = _png(tmp_path / "x.png", seed=2)
    loaded = load_model(ckpt, dtype=torch.float64)
    x, target, logit, maps = explain_image(loaded, img, [Gradient(), LRP0(), RG(0.5, 2.0)])
    # the preprocessing: grey, resized to 16 x 16 (bilinear), normalised by the checkpoint's mean/std
    ref = np.asarray(Image.open(img).convert("RGB").resize((16, 16), Image.BILINEAR), dtype=np.float32) / 255
    ref = (torch.from_numpy(ref).double().mean(-1) - 0.2) / 0.5
    assert torch.allclose(x[0, 0], ref, atol=1e-12)
    with torch.no_grad():
        logits = loaded.model(x)[0]
    assert target == int(logits.argmax()) and logit == pytest.approx(float(logits.max()), abs=1e-12)
    assert list(maps) == ["Gradient", "LRP0", "RG(tau=0.5, route_temp=2)"]
    assert torch.equal(maps["LRP0"], bp.explain(loaded.model, x, target, LRP0())[0])


def test_explain_folder_with_progress(ckpt, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(3):
        _png(folder / f"im{k}.png", seed=k, shape=(16 + k, 16))
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "heat"
    assert cli.main(["explain", str(folder), "--model", str(ckpt), "--rule", "AlphaBeta(1, 0)",
                     "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "wrote 3 heatmaps" in captured.out and "explain" in captured.err  # tqdm bar on stderr
    assert sorted(p.name for p in out.iterdir()) == [f"im{k}_heatmap.png" for k in range(3)]


@pytest.mark.parametrize("argv, message", [
    (["--rule", "Nope"], "unknown rule 'Nope'"),
    (["--rule", "RG(tau=-1)"], "tau must be > 0"),
    (["--target", "10"], "target 10 is out of range"),
])
def test_explain_errors(ckpt, tmp_path, capsys, argv, message):
    img = _png(tmp_path / "x.png")
    assert cli.main(["explain", str(img), "--model", str(ckpt), "--out", str(tmp_path / "h.png")] + argv) == 2
    assert message in capsys.readouterr().err


def test_explain_missing_files(ckpt, tmp_path, capsys):
    img = _png(tmp_path / "x.png")
    assert cli.main(["explain", str(tmp_path / "none.png"), "--model", str(ckpt)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["explain", str(img), "--model", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(2)}, tmp_path / "junk.pt")
    assert cli.main(["explain", str(img), "--model", str(tmp_path / "junk.pt")]) == 2
    err = capsys.readouterr().err
    assert "holds a state dict that is not a ViT checkpoint" in err and "--arch NAME (cnn, vit)" in err
    assert len(err.strip().splitlines()) == 1


def test_explain_vit_checkpoint(tmp_path, capsys):
    """A ViT checkpoint loads and is explained like any model (bp.explain reads the ViT through the one
    reader): the heatmap is drawn for graph rules and transformer rules, and the maps are bp.explain's."""
    # dim 192: the loader infers 3 heads (the ViT-Ti default) from the weights alone
    vit = bp.gpu.vit.vit_tiny_test(num_classes=4, image_size=8, patch_size=4, in_channels=3, dim=192,
                                   heads=3, depth=1, mlp_dim=32)
    path = tmp_path / "vit.pt"
    torch.save(vit.state_dict(), path)
    loaded = load_model(path)
    assert loaded.kind == "vit" and loaded.size == 8 and loaded.in_channels == 3
    img = tmp_path / "c.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "v.png"
    assert cli.main(["explain", str(img), "--model", str(path), "--rule", "Gradient, AlphaBeta(2, 1), AttnLRP, Rollout",
                     "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    pic = mpimg.imread(out)
    assert pic.ndim == 3 and pic.shape[1] > 4 * pic.shape[0]  # image + 4 rules side by side
    loaded = load_model(path, dtype=torch.float64)
    rules = [Gradient(), AlphaBeta(2, 1), AttnLRP(), Rollout()]
    x, target, logit, maps = explain_image(loaded, img, rules)
    assert x.shape == (1, 3, 8, 8)
    with torch.no_grad():
        logits = loaded.model(x)[0]
    assert target == int(logits.argmax()) and logit == pytest.approx(float(logits.max()), abs=1e-12)
    assert list(maps) == ["Gradient", "AlphaBeta(alpha=2, beta=1)", "AttnLRP(eps=1e-06)", "Rollout"]
    for rule, R in zip(rules, maps.values()):
        assert R.shape == (3, 8, 8)
        assert torch.equal(R, bp.explain(loaded.model, x, target, rule)[0]), rule.name
