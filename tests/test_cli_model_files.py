"""`backplay explain --model PATH` with every kind of model file a researcher has: a Hugging Face
save_pretrained folder (with and without preprocessor_config.json) or its weights file, a model saved whole
with torch.save, a bench model's state dict with --arch, torchvision- and timm-style ViT state dicts; the
normalisation line, --mean/--std, --size, --device, --version, the help texts, the progress bar."""

import json
import sys

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import backplay as bp
import backplay.cli as cli
from backplay.bench.commands import explain_image, load_explain_model
from backplay.bench.models import small_cnn, small_vit
from backplay.rules import AlphaBeta, Gradient

from _transformers import tv_vit

F64 = torch.float64


def _rgb(path, size=8, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _pixels(path, size):
    """The image as the command reads it: RGB in [0, 1], resized bilinearly, [3, size, size] float64."""
    im = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1).double()


def _run(capsys, *argv):
    """``backplay explain ...`` in-process: (exit status, stdout, stderr)."""
    rc = cli.main(["explain", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("backplay explain: "), err
    assert "Traceback" not in err
    return lines[0]


# -- Hugging Face -------------------------------------------------------------------------------------
@pytest.fixture
def hf_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                 image_size=8, patch_size=4, num_labels=3)
    model = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():  # the HF init leaves biases at 0 and the logits near 0: make every weight matter
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    folder = tmp_path / "hf"
    model.save_pretrained(str(folder))
    return folder


def test_hf_folder_with_preprocessor_config(hf_dir, tmp_path, capsys):
    (hf_dir / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6],
         "size": {"height": 8, "width": 8}, "image_processor_type": "ViTImageProcessor"}))
    img, out = _rgb(tmp_path / "x.png", size=12), tmp_path / "heat.png"
    rc, stdout, _ = _run(capsys, img, "--model", hf_dir, "--rule", "Gradient,AlphaBeta(2, 1)", "--out", out)
    assert rc == 0
    assert "model: Hugging Face ViTForImageClassification" in stdout
    assert "normalisation: mean (0.1, 0.2, 0.3), std (0.4, 0.5, 0.6) from preprocessor_config.json\n" in stdout
    assert f"wrote {out}" in stdout
    pic = mpimg.imread(out)
    assert pic.ndim == 3 and pic.shape[1] > 2 * pic.shape[0]  # image + 2 rules side by side
    # the maps are bp.explain's on the HF object itself, the image normalised by the processor's mean / std
    loaded = load_explain_model(hf_dir)
    assert type(loaded.model).__name__ == "ViTForImageClassification" and loaded.size == 8
    x, target, logit, maps = explain_image(loaded, img, [Gradient(), AlphaBeta(2, 1)])
    mean, std = torch.tensor([0.1, 0.2, 0.3], dtype=F64), torch.tensor([0.4, 0.5, 0.6], dtype=F64)
    assert torch.allclose(x[0], (_pixels(img, 8) - mean[:, None, None]) / std[:, None, None], atol=1e-6)
    with torch.no_grad():
        logits = loaded.model(x).logits[0]
    assert target == int(logits.argmax()) and logit == pytest.approx(float(logits.max()))
    assert torch.equal(maps["AlphaBeta(alpha=2, beta=1)"], bp.explain(loaded.model, x, target, AlphaBeta(2, 1))[0])


def test_hf_folder_without_preprocessor_config_uses_the_hf_default(hf_dir, tmp_path, capsys):
    img = _rgb(tmp_path / "x.png")
    rc, stdout, _ = _run(capsys, img, "--model", hf_dir, "--out", tmp_path / "h.png", "--no-progress")
    assert rc == 0 and (tmp_path / "h.png").is_file()
    assert ("normalisation: mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5) from the Hugging Face processor default "
            f"(no preprocessor_config.json in {hf_dir})") in stdout
    x = explain_image(load_explain_model(hf_dir), img, [Gradient()])[0]
    assert torch.allclose(x[0], (_pixels(img, 8) - 0.5) / 0.5, atol=1e-6)


def test_hf_preprocessor_without_normalisation_and_overrides(hf_dir, tmp_path, capsys):
    (hf_dir / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False, "size": 8}))
    img = _rgb(tmp_path / "x.png")
    rc, stdout, _ = _run(capsys, img, "--model", hf_dir, "--out", tmp_path / "h.png")
    assert rc == 0
    assert "mean (0, 0, 0), std (1, 1, 1) from preprocessor_config.json (do_normalize is false)" in stdout
    rc, stdout, _ = _run(capsys, img, "--model", hf_dir, "--out", tmp_path / "h.png", "--mean", "0.5",
                         "--std", "0.2,0.3,0.4")
    assert rc == 0
    assert ("normalisation: mean (0.5, 0.5, 0.5), std (0.2, 0.3, 0.4) from --mean/--std (instead of "
            "preprocessor_config.json (do_normalize is false))") in stdout
    rc, stdout, _ = _run(capsys, img, "--model", hf_dir, "--out", tmp_path / "h.png", "--std", "0.25")
    assert rc == 0 and "std (0.25, 0.25, 0.25) from --std; mean from preprocessor_config.json" in stdout
    rc, _, err = _run(capsys, img, "--model", hf_dir, "--mean", "0.1,0.2", "--no-progress")
    assert rc == 2 and "--mean has 2 values; the model takes 3 channels" in _one_line_error(err)
    rc, _, err = _run(capsys, img, "--model", hf_dir, "--std", "0", "--no-progress")
    assert rc == 2 and "--std must be > 0" in _one_line_error(err)


def test_hf_weights_file(hf_dir, tmp_path, capsys):
    """The model.safetensors of a save_pretrained folder: read as a Hugging Face ViT state dict (config.json
    beside it gives the heads), with the processor default."""
    img = _rgb(tmp_path / "x.png")
    rc, stdout, _ = _run(capsys, img, "--model", hf_dir / "model.safetensors", "--out", tmp_path / "h.png")
    assert rc == 0 and (tmp_path / "h.png").is_file()
    assert "model: hf ViT state dict" in stdout and "2 heads, 3 classes" in stdout
    assert "mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5) from the Hugging Face processor default" in stdout
    # the converted ViT computes the HF model's logits
    transformers = pytest.importorskip("transformers")
    hf = transformers.ViTForImageClassification.from_pretrained(str(hf_dir)).to(F64).eval()
    loaded = load_explain_model(hf_dir / "model.safetensors")
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), hf(x).logits, rtol=0, atol=1e-10)


# -- a model saved whole ------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """A conv net as people write it: layers in __init__, F.relu and pooling in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def test_saved_module(tmp_path, capsys):
    torch.manual_seed(0)
    net = TinyNet().eval()
    path = tmp_path / "net.pt"
    torch.save(net, path)
    img, out = _rgb(tmp_path / "x.png", size=16), tmp_path / "h.png"
    rc, stdout, _ = _run(capsys, img, "--model", path, "--rule", "LRP0", "--out", out)
    assert rc == 0 and out.is_file()
    assert f"model: TinyNet saved whole in {path}" in stdout
    assert "normalisation: mean (0, 0, 0), std (1, 1, 1) from the default for a saved module: none" in stdout
    loaded = load_explain_model(path)
    assert loaded.size is None and loaded.in_channels == 3  # the image keeps its size
    x, target, _, maps = explain_image(loaded, img, [bp.rules.LRP0()])
    assert torch.equal(x[0], _pixels(img, 16))
    net64 = TinyNet()
    net64.load_state_dict(net.state_dict())
    net64 = net64.to(F64).eval()
    assert target == int(net64(x).argmax())
    torch.testing.assert_close(maps["LRP0"], bp.explain(net64, x, target, bp.rules.LRP0())[0], rtol=0, atol=0)
    # a 20 x 20 image does not fit the linear layer: a one-line error naming --size; with --size it runs
    big = _rgb(tmp_path / "big.png", size=20)
    rc, _, err = _run(capsys, big, "--model", path, "--out", out)
    assert rc == 2 and "the model rejects a 3 x 20 x 20 image" in _one_line_error(err) and "--size" in err
    rc, _, _ = _run(capsys, big, "--model", path, "--out", out, "--size", "16")
    assert rc == 0


def test_saved_module_class_found_in_the_working_directory(tmp_path, monkeypatch, capsys):
    """A model whose class lives in the user's own module: found when run from that module's folder (the
    console script does not put the working directory on sys.path); elsewhere a one-line error."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "mynets_cli_test.py").write_text(
        "import torch.nn as nn\nimport torch.nn.functional as F\n\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(3, 2, 3)\n"
        "        self.fc = nn.Linear(2, 4)\n\n"
        "    def forward(self, x):\n        return self.fc(F.relu(self.conv(x)).mean((2, 3)))\n")
    monkeypatch.syspath_prepend(str(work))
    import mynets_cli_test

    path = tmp_path / "net.pt"
    torch.save(mynets_cli_test.Net(), path)
    monkeypatch.delitem(sys.modules, "mynets_cli_test")
    sys.path.remove(str(work))
    img = _rgb(tmp_path / "x.png")
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run(capsys, img, "--model", path, "--out", tmp_path / "h.png")
    line = _one_line_error(err)
    assert rc == 2 and "cannot unpickle" in line and "run from the folder holding the module" in line
    monkeypatch.chdir(work)
    try:
        rc, stdout, _ = _run(capsys, img, "--model", path, "--out", tmp_path / "h.png")
    finally:
        sys.modules.pop("mynets_cli_test", None)
    assert rc == 0 and "model: Net saved whole" in stdout
    assert str(work) not in sys.path  # the working directory is on sys.path only while loading


# -- state dicts --------------------------------------------------------------------------------------
def _grey(path, size=16, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)).save(path)
    return path


def test_bench_cnn_state_dict_with_arch(tmp_path, capsys):
    torch.manual_seed(0)
    cnn = small_cnn(in_channels=1, num_classes=7, size=16, width=4).eval()
    path = tmp_path / "cnn_sd.pt"
    torch.save(cnn.state_dict(), path)
    img, out = _grey(tmp_path / "x.png"), tmp_path / "h.png"
    rc, stdout, _ = _run(capsys, img, "--model", path, "--arch", "cnn", "--out", out)
    assert rc == 0 and out.is_file()
    assert "model: bench cnn(in_channels=1, num_classes=7, size=16, width=4)" in stdout
    assert "normalisation: mean (0), std (1) from the default for a bench model's state dict: none" in stdout
    loaded = load_explain_model(path, arch="cnn")
    with torch.no_grad():
        x = torch.randn(2, 1, 16, 16)
        torch.testing.assert_close(loaded.model(x.double()), cnn.double()(x.double()), rtol=0, atol=0)


def test_state_dict_without_arch_lists_the_archs(tmp_path, capsys):
    path = tmp_path / "cnn_sd.pt"
    torch.save(small_cnn(in_channels=1, num_classes=3, size=16, width=4).state_dict(), path)
    img = _grey(tmp_path / "x.png")
    rc, _, err = _run(capsys, img, "--model", path)
    line = _one_line_error(err)
    assert rc == 2 and "not a ViT checkpoint" in line and "pass --arch NAME (cnn, vit)" in line
    with pytest.raises(SystemExit) as e:  # argparse: an unknown name, with the choices
        cli.main(["explain", str(img), "--model", str(path), "--arch", "resnet"])
    err = capsys.readouterr().err.replace("'", "")  # Python 3.12 quotes the choices
    assert e.value.code == 2 and "argument --arch: invalid choice: resnet (choose from cnn, vit)" in err
    rc, _, err = _run(capsys, img, "--model", path, "--arch", "vit")
    assert rc == 2 and "not a bench vit: no 'patch_embed.weight' tensor" in _one_line_error(err)


def test_bench_vit_state_dict_with_arch_and_heads(tmp_path, capsys):
    torch.manual_seed(0)
    vit = small_vit(in_channels=1, num_classes=4, size=16, dim=12, depth=1, heads=2).eval()
    path = tmp_path / "vit_sd.safetensors"
    from safetensors.torch import save_file

    save_file(vit.state_dict(), str(path))
    img = _grey(tmp_path / "x.png")
    rc, stdout, _ = _run(capsys, img, "--model", path, "--arch", "vit", "--heads", "2", "--out", tmp_path / "h.png")
    assert rc == 0 and "bench vit(in_channels=1, num_classes=4, size=16, dim=12, depth=1, patch_size=4, " \
                       "mlp_ratio=2, heads=2)" in stdout
    loaded = load_explain_model(path, arch="vit", heads=2)
    x = torch.randn(2, 1, 16, 16, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), vit.to(F64)(x), rtol=0, atol=1e-12)
    rc, stdout, _ = _run(capsys, img, "--model", path, "--arch", "vit", "--out", tmp_path / "h.png")
    assert rc == 0 and "the weights do not show the number of heads: 3 is the default; set it with --heads" in stdout
    rc, _, err = _run(capsys, img, "--model", path, "--arch", "cnn", "--heads", "2")
    assert rc == 2 and "--heads applies to a ViT; --arch cnn has no attention heads" in _one_line_error(err)
    rc, _, err = _run(capsys, img, "--model", path, "--arch", "cnn")
    assert rc == 2 and "the state dict is not a bench cnn" in _one_line_error(err)


def test_torchvision_vit_state_dict(tmp_path, capsys):
    """torchvision's names (a VisionTransformer written in plain torch with torchvision's module names)."""
    tv = tv_vit(dim=16, heads=2, layers=1, mlp=32, classes=3)
    assert "conv_proj.weight" in tv.state_dict() and "heads.head.weight" in tv.state_dict()
    path = tmp_path / "vit_b_16.pth"
    torch.save(tv.state_dict(), path)
    img, out = _rgb(tmp_path / "x.png"), tmp_path / "h.png"
    rc, _, err = _run(capsys, img, "--model", path, "--out", out)  # dim 16: the heads cannot be guessed
    assert rc == 2 and "attention heads" in _one_line_error(err) and "--heads" in err
    rc, stdout, _ = _run(capsys, img, "--model", path, "--heads", "2", "--rule", "Gradient,AttnLRP", "--out", out)
    assert rc == 0 and out.is_file()
    assert "model: torchvision ViT state dict" in stdout and "2 heads, 3 classes" in stdout
    assert ("normalisation: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) from the ImageNet default for "
            "torchvision checkpoints\n") in stdout
    loaded = load_explain_model(path, heads=2)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), tv(x), rtol=0, atol=1e-10)


def test_timm_vit_state_dict(tmp_path, capsys):
    """timm's names, written by hand from a ViT (q, k, v packed into attn.qkv), in a .safetensors file."""
    ref = bp.gpu.vit.vit_tiny_test(num_classes=4, image_size=8, patch_size=4, in_channels=3, dim=192, heads=3,
                                   depth=1, mlp_dim=32, dtype=F64)
    sd = ref.state_dict()
    timm = {"cls_token": sd["cls_token"], "pos_embed": sd["pos_embed"],
            "patch_embed.proj.weight": sd["patch_embed.weight"], "patch_embed.proj.bias": sd["patch_embed.bias"],
            "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"],
            "head.weight": sd["head.weight"], "head.bias": sd["head.bias"]}
    for p in ("weight", "bias"):
        for name in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2"):
            timm[f"blocks.0.{name}.{p}"] = sd[f"blocks.0.{name}.{p}"]
        timm[f"blocks.0.attn.qkv.{p}"] = torch.cat([sd[f"blocks.0.attn.{n}.{p}"] for n in "qkv"])
    from safetensors.torch import save_file

    path = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in timm.items()}, str(path))
    img, out = _rgb(tmp_path / "x.png"), tmp_path / "h.png"
    rc, stdout, _ = _run(capsys, img, "--model", path, "--rule", "AlphaBeta(2, 1)", "--out", out)
    assert rc == 0 and out.is_file()
    assert "model: timm ViT state dict" in stdout and "3 heads, 4 classes" in stdout
    assert ("normalisation: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) from the ImageNet default for "
            "timm checkpoints (some timm models were trained with mean and std 0.5") in stdout
    loaded = load_explain_model(path)
    x, target, _, maps = explain_image(loaded, img, [AlphaBeta(2, 1)])
    assert torch.equal(maps["AlphaBeta(alpha=2, beta=1)"], bp.explain(ref, x, target, AlphaBeta(2, 1))[0])


# -- inputs that are not models -----------------------------------------------------------------------
def test_files_that_are_not_models(tmp_path, capsys):
    img = _rgb(tmp_path / "x.png")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    rc, _, err = _run(capsys, img, "--model", tmp_path / "notes.pt")
    assert rc == 2 and "not a file written by torch.save or a .safetensors file" in _one_line_error(err)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    rc, _, err = _run(capsys, img, "--model", tmp_path / "list.pt")
    assert rc == 2 and "holds a list; expected an nn.Module" in _one_line_error(err)
    (tmp_path / "empty").mkdir()
    rc, _, err = _run(capsys, img, "--model", tmp_path / "empty")
    assert rc == 2 and "is a folder without config.json" in _one_line_error(err)
    torch.save(TinyNet(), tmp_path / "net.pt")
    rc, _, err = _run(capsys, img, "--model", tmp_path / "net.pt", "--arch", "cnn")
    assert rc == 2 and "--arch applies to a state dict; " in _one_line_error(err) and "is a saved TinyNet" in err


# -- device, version, help, progress ------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_unavailable_device_is_a_one_line_usage_error(tmp_path, capsys):
    img = _rgb(tmp_path / "x.png")
    torch.save(TinyNet(), tmp_path / "net.pt")
    rc, _, err = _run(capsys, img, "--model", tmp_path / "net.pt", "--device", "cuda")
    line = _one_line_error(err)
    assert rc == 2 and "--device 'cuda' is not available here" in line and "use --device cpu" in line
    rc, _, err = _run(capsys, img, "--model", tmp_path / "net.pt", "--device", "gpu0")
    assert rc == 2 and "--device 'gpu0' is not available here" in _one_line_error(err)
    assert cli.main(["bench", "localisation", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("backplay bench localisation: --device 'cuda' is not available here")
    assert len(err.strip().splitlines()) == 1


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"backplay {bp.__version__}"


@pytest.mark.parametrize("argv", [[], ["verify"], ["explain"], ["bench"], ["bench", "localisation"]])
def test_help_is_plain_words(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "usage: backplay" in text
    for markup in ("``", ":func:", ":class:", ":mod:", ":data:"):
        assert markup not in text, (argv, markup)
    if argv == ["explain"]:
        assert "save_pretrained" in text and "only for files you trust" in text and "--arch {cnn,vit}" in text


def test_progress_bar_counts_every_map(tmp_path, capsys):
    torch.save(TinyNet(), tmp_path / "net.pt")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(2):
        _rgb(folder / f"im{k}.png", size=16, seed=k)
    argv = [folder, "--model", tmp_path / "net.pt", "--rule", "Gradient,LRP0", "--out", tmp_path / "out"]
    rc, stdout, err = _run(capsys, *argv)
    assert rc == 0 and "wrote 2 heatmaps" in stdout and "explain" in err and "4/4" in err  # 2 images x 2 rules
    rc, _, err = _run(capsys, *argv, "--no-progress")
    assert rc == 0 and "explain" not in err
    rc, _, err = _run(capsys, folder / "im0.png", "--model", tmp_path / "net.pt", "--rule", "Gradient,LRP0",
                      "--out", tmp_path / "one.png")
    assert rc == 0 and "2/2" in err  # one image, two rules
