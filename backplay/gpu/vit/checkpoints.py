"""Checkpoint loaders for :class:`backplay.gpu.vit.ViT`: timm, Hugging Face, torchvision, backplay.

Nothing is downloaded: :func:`load` reads a local file (``.pth`` / ``.pt`` / ``.bin`` through
``torch.load(weights_only=True)``, ``.safetensors`` through the ``safetensors`` package) or a local
directory (``model.safetensors`` or ``pytorch_model.bin``, plus ``config.json``), and
:func:`load_state_dict_any` takes an in-memory state dict. The format is detected from the key
names; the config (image size, patch size, channels, dim, depth, MLP width, classes, qkv bias) is
inferred from the shapes. Heads cannot be inferred from shapes: they come from ``config``, from a
Hugging Face ``config.json`` beside the weights, or from :data:`DEFAULT_HEADS` by dim.

Key spellings (``{i}`` a block index, ``{p}`` weight or bias)::

  backplay:    cls_token, pos_embed, patch_embed.{p}, blocks.{i}.norm1, blocks.{i}.attn.q / k / v,
               blocks.{i}.attn.proj, blocks.{i}.norm2, blocks.{i}.mlp.fc1 / fc2, norm, head
  timm:        cls_token, pos_embed, patch_embed.proj.{p}, blocks.{i}.norm1,
               blocks.{i}.attn.qkv.{p} (packed q;k;v rows), blocks.{i}.attn.proj, blocks.{i}.norm2,
               blocks.{i}.mlp.fc1 / fc2, norm, head                            LayerNorm eps 1e-6
  hf:          [vit.]embeddings.cls_token, [vit.]embeddings.position_embeddings,
               [vit.]embeddings.patch_embeddings.projection.{p},
               [vit.]encoder.layer.{i}.layernorm_before,
               [vit.]encoder.layer.{i}.attention.attention.query / key / value,
               [vit.]encoder.layer.{i}.attention.output.dense,
               [vit.]encoder.layer.{i}.layernorm_after,
               [vit.]encoder.layer.{i}.intermediate.dense, [vit.]encoder.layer.{i}.output.dense,
               [vit.]layernorm, classifier                                      LayerNorm eps 1e-12
               (what save_pretrained writes, transformers 4.x and 5.x alike)
  hf-v5:       the in-memory module names of transformers 5 (``model.state_dict()``):
               [vit.]layers.{i}.layernorm_before, [vit.]layers.{i}.attention.q_proj / k_proj /
               v_proj / o_proj, [vit.]layers.{i}.layernorm_after, [vit.]layers.{i}.mlp.fc1 / fc2;
               embeddings, layernorm and classifier as hf                       LayerNorm eps 1e-12
  torchvision: class_token, conv_proj.{p}, encoder.pos_embedding,
               encoder.layers.encoder_layer_{i}.ln_1,
               encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight / in_proj_bias,
               ....self_attention.out_proj, ....ln_2, ....mlp.0 / mlp.3 (older: mlp.linear_1 /
               mlp.linear_2), encoder.ln, heads.head                            LayerNorm eps 1e-6

Ignored without complaint: HF ``pooler.dense.*`` and ``embeddings.mask_token`` (not used by the
classifier). A ``module.`` prefix (DataParallel) and a wrapping ``{"state_dict": ...}`` /
``{"model": ...}`` / ``{"model_state_dict": ...}`` dict are removed.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .model import ViT, ViTConfig

__all__ = [
    "load",
    "load_state_dict_any",
    "detect_format",
    "convert_state_dict",
    "infer_config",
    "read_state_dict",
    "unwrap_state_dict",
    "CheckpointError",
    "UnknownFormatError",
    "HeadsUnknownError",
    "KeyMismatchError",
    "DEFAULT_HEADS",
    "DEFAULT_LN_EPS",
    "FORMATS",
]

#: heads by embedding dim when neither ``config`` nor a config.json says
#: (ViT-Ti 192, ViT-S 384, ViT-B 768, ViT-L 1024, ViT-H 1280)
DEFAULT_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

#: LayerNorm eps of each format's reference implementation
DEFAULT_LN_EPS = {"backplay": 1e-6, "timm": 1e-6, "hf": 1e-12, "hf-v5": 1e-12,
                  "torchvision": 1e-6}


class CheckpointError(ValueError):
    """A checkpoint that cannot be turned into a ViT."""


class UnknownFormatError(CheckpointError):
    """The key names match none of the supported formats."""


class HeadsUnknownError(CheckpointError):
    """Neither a config nor :data:`DEFAULT_HEADS` gives the number of attention heads of a checkpoint
    whose embedding width is ``dim`` (no weight shape shows it)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        super().__init__(
            f"cannot infer the number of attention heads for dim {dim} (not in the default table "
            f"{DEFAULT_HEADS}); pass config=ViTConfig(...) or config={{'heads': H}}")


class KeyMismatchError(CheckpointError):
    """Keys missing from or unexpected in a checkpoint. ``missing`` lists the expected keys in the
    checkpoint's own spelling, ``unexpected`` the checkpoint's keys that map to nothing."""

    def __init__(self, fmt: str, missing: list[str], unexpected: list[str],
                 shape_errors: list[str] | None = None, hint: str | None = None) -> None:
        self.format, self.missing, self.unexpected = fmt, missing, unexpected
        self.shape_errors = shape_errors or []
        lines = [f"{fmt} ViT checkpoint does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}):")
            lines += [f"    {k}" for k in missing]
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}):")
            lines += [f"    {k}" for k in unexpected]
        if self.shape_errors:
            lines.append(f"  shape mismatches ({len(self.shape_errors)}):")
            lines += [f"    {s}" for s in self.shape_errors]
        if hint:
            lines.append(f"  hint: {hint}")
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# key tables: (canonical name, source name); {i} block index, {p} weight|bias, {x} q|k|v.
# The canonical name "blocks.{i}.attn.qkv.{p}" is virtual: packed q;k;v, split on conversion.

_HF_IGNORE = (r"(vit\.)?pooler\.dense\.(weight|bias)", r"(vit\.)?embeddings\.mask_token")
_TV = "encoder.layers.encoder_layer_{i}"
_HF_COMMON = [
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.{p}", "embeddings.patch_embeddings.projection.{p}"),
    ("norm.{p}", "layernorm.{p}"),
]


@dataclass(frozen=True)
class _Format:
    name: str
    signature: str               # a key (after prefix stripping) that identifies the format
    table: list[tuple[str, str]]
    head: list[tuple[str, str]]  # head keys (not under the optional prefix for hf)
    prefix: str = ""             # optional prefix of every non-head key ("vit." for HF)
    ignore: tuple[str, ...] = ()  # regexes of keys dropped silently


FORMATS: dict[str, _Format] = {
    "backplay": _Format(
        "backplay", "patch_embed.weight",
        [("cls_token", "cls_token"), ("pos_embed", "pos_embed"),
         ("patch_embed.{p}", "patch_embed.{p}"),
         ("blocks.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"),
         ("blocks.{i}.attn.{x}.{p}", "blocks.{i}.attn.{x}.{p}"),
         ("blocks.{i}.attn.proj.{p}", "blocks.{i}.attn.proj.{p}"),
         ("blocks.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"),
         ("blocks.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.fc1.{p}"),
         ("blocks.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.fc2.{p}"),
         ("norm.{p}", "norm.{p}")],
        [("head.{p}", "head.{p}")]),
    "timm": _Format(
        "timm", "patch_embed.proj.weight",
        [("cls_token", "cls_token"), ("pos_embed", "pos_embed"),
         ("patch_embed.{p}", "patch_embed.proj.{p}"),
         ("blocks.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"),
         ("blocks.{i}.attn.qkv.{p}", "blocks.{i}.attn.qkv.{p}"),
         ("blocks.{i}.attn.proj.{p}", "blocks.{i}.attn.proj.{p}"),
         ("blocks.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"),
         ("blocks.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.fc1.{p}"),
         ("blocks.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.fc2.{p}"),
         ("norm.{p}", "norm.{p}")],
        [("head.{p}", "head.{p}")]),
    "hf": _Format(
        "hf", "embeddings.patch_embeddings.projection.weight",
        _HF_COMMON + [
            ("blocks.{i}.norm1.{p}", "encoder.layer.{i}.layernorm_before.{p}"),
            ("blocks.{i}.attn.q.{p}", "encoder.layer.{i}.attention.attention.query.{p}"),
            ("blocks.{i}.attn.k.{p}", "encoder.layer.{i}.attention.attention.key.{p}"),
            ("blocks.{i}.attn.v.{p}", "encoder.layer.{i}.attention.attention.value.{p}"),
            ("blocks.{i}.attn.proj.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
            ("blocks.{i}.norm2.{p}", "encoder.layer.{i}.layernorm_after.{p}"),
            ("blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),
            ("blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.output.dense.{p}")],
        [("head.{p}", "classifier.{p}")],
        prefix="vit.", ignore=_HF_IGNORE),
    "hf-v5": _Format(
        "hf-v5", "embeddings.patch_embeddings.projection.weight",
        _HF_COMMON + [
            ("blocks.{i}.norm1.{p}", "layers.{i}.layernorm_before.{p}"),
            ("blocks.{i}.attn.q.{p}", "layers.{i}.attention.q_proj.{p}"),
            ("blocks.{i}.attn.k.{p}", "layers.{i}.attention.k_proj.{p}"),
            ("blocks.{i}.attn.v.{p}", "layers.{i}.attention.v_proj.{p}"),
            ("blocks.{i}.attn.proj.{p}", "layers.{i}.attention.o_proj.{p}"),
            ("blocks.{i}.norm2.{p}", "layers.{i}.layernorm_after.{p}"),
            ("blocks.{i}.mlp.fc1.{p}", "layers.{i}.mlp.fc1.{p}"),
            ("blocks.{i}.mlp.fc2.{p}", "layers.{i}.mlp.fc2.{p}")],
        [("head.{p}", "classifier.{p}")],
        prefix="vit.", ignore=_HF_IGNORE),
    "torchvision": _Format(
        "torchvision", "conv_proj.weight",
        [("cls_token", "class_token"), ("pos_embed", "encoder.pos_embedding"),
         ("patch_embed.{p}", "conv_proj.{p}"),
         ("blocks.{i}.norm1.{p}", _TV + ".ln_1.{p}"),
         ("blocks.{i}.attn.qkv.weight", _TV + ".self_attention.in_proj_weight"),
         ("blocks.{i}.attn.qkv.bias", _TV + ".self_attention.in_proj_bias"),
         ("blocks.{i}.attn.proj.{p}", _TV + ".self_attention.out_proj.{p}"),
         ("blocks.{i}.norm2.{p}", _TV + ".ln_2.{p}"),
         ("blocks.{i}.mlp.fc1.{p}", _TV + ".mlp.0.{p}"),
         ("blocks.{i}.mlp.fc1.{p}", _TV + ".mlp.linear_1.{p}"),
         ("blocks.{i}.mlp.fc2.{p}", _TV + ".mlp.3.{p}"),
         ("blocks.{i}.mlp.fc2.{p}", _TV + ".mlp.linear_2.{p}"),
         ("norm.{p}", "encoder.ln.{p}")],
        [("head.{p}", "heads.head.{p}")]),
}

_GROUPS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "x": r"(?P<x>[qkv])"}


def _compile(src: str) -> re.Pattern[str]:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w)\}", src):
        out.append(re.escape(src[pos:m.start()]))
        out.append(_GROUPS[m.group(1)])
        pos = m.end()
    out.append(re.escape(src[pos:]))
    return re.compile("".join(out) + r"\Z")


def _fill(template: str, groups: Mapping[str, str | None]) -> str:
    return re.sub(r"\{(\w)\}", lambda m: str(groups[m.group(1)]), template)


def _strip_prefix(key: str, fmt: _Format) -> str:
    return key[len(fmt.prefix):] if fmt.prefix and key.startswith(fmt.prefix) else key


# ----------------------------------------------------------------------------------------------
# reading


def unwrap_state_dict(obj: Any) -> dict[str, Tensor]:
    """The tensors of a loaded checkpoint: a wrapping ``{"state_dict": ...}`` / ``{"model_state_dict":
    ...}`` / ``{"model": ...}`` / ``{"module": ...}`` dict and a ``module.`` prefix on every key
    (DataParallel) removed, non-tensor entries dropped. Raises :class:`CheckpointError` for an object
    that is not a mapping or holds no tensors."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a state dict (a mapping of names to tensors), got "
                              f"{type(obj).__name__}")
    for wrapper in ("state_dict", "model_state_dict", "model", "module"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
            return unwrap_state_dict(inner)
    sd = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise CheckpointError("the checkpoint holds no tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: str | os.PathLike[str],
                    ) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Read a checkpoint file or directory without building a model. Returns the state dict and
    the parsed ``config.json`` beside it (None when absent). Never touches the network."""
    p = Path(path)
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            if any(p.glob("*.safetensors.index.json")) or any(p.glob("*.bin.index.json")):
                raise CheckpointError(f"{path}: sharded checkpoints are not supported")
            raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin inside")
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("reading .safetensors needs the 'safetensors' package "
                              "(pip install safetensors)") from e
        sd: dict[str, Tensor] = load_file(str(p), device="cpu")
    elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
        sd = unwrap_state_dict(torch.load(str(p), map_location="cpu", weights_only=True))
    else:
        raise CheckpointError(f"{p}: unknown checkpoint extension {suffix!r} "
                              "(.safetensors, .pth, .pt, .bin, .ckpt)")
    cfg_json = None
    cfg_path = p.parent / "config.json"
    if cfg_path.is_file():
        try:
            cfg_json = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            cfg_json = None
        if not isinstance(cfg_json, dict):
            cfg_json = None
    return sd, cfg_json


# ----------------------------------------------------------------------------------------------
# detection and conversion


def detect_format(state_dict: Mapping[str, Any]) -> str:
    """The name of the format in :data:`FORMATS` the keys are written in."""
    keys = set(state_dict)
    hits = []
    for name, fmt in FORMATS.items():
        stripped = {_strip_prefix(k, fmt) for k in keys}
        if fmt.signature not in stripped:
            continue
        pats = [_compile(src) for _, src in fmt.table + fmt.head]
        n = sum(any(pt.match(k) for pt in pats) for k in stripped)
        hits.append((n, name))
    if not hits:
        sample = ", ".join(sorted(keys)[:8])
        raise UnknownFormatError(
            "unknown ViT checkpoint format: expected timm (patch_embed.proj.weight), Hugging Face "
            "([vit.]embeddings.patch_embeddings.projection.weight), torchvision (conv_proj.weight) "
            f"or backplay (patch_embed.weight) keys; got {len(keys)} keys, e.g. {sample}")
    hits.sort(reverse=True)
    return hits[0][1]


def convert_state_dict(state_dict: Mapping[str, Tensor], fmt: str | None = None,
                       ) -> tuple[dict[str, Tensor], list[str], str]:
    """Rename (and split packed q;k;v) into backplay's canonical names.

    Returns ``(canonical_state_dict, unexpected_source_keys, format_name)``."""
    fmt_name = fmt or detect_format(state_dict)
    if fmt_name not in FORMATS:
        raise UnknownFormatError(f"unknown format {fmt_name!r}; choose from {sorted(FORMATS)}")
    f = FORMATS[fmt_name]
    body = [(_compile(src), dst) for dst, src in f.table]
    head = [(_compile(src), dst) for dst, src in f.head]
    ignore = [re.compile(r + r"\Z") for r in f.ignore]
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, val in state_dict.items():
        if any(r.match(key) for r in ignore):
            continue
        dst = None
        for pat, tmpl in head:  # head keys are matched without the prefix
            m = pat.match(key)
            if m:
                dst = _fill(tmpl, m.groupdict())
                break
        if dst is None:
            k = _strip_prefix(key, f)
            for pat, tmpl in body:
                m = pat.match(k)
                if m:
                    dst = _fill(tmpl, m.groupdict())
                    break
        if dst is None:
            unexpected.append(key)
            continue
        mq = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", dst)
        if mq:
            if val.shape[0] % 3:
                raise CheckpointError(f"{key}: packed q;k;v has {val.shape[0]} rows, not a "
                                      "multiple of 3")
            for name, part in zip("qkv", val.chunk(3, dim=0)):
                out[f"blocks.{mq.group(1)}.attn.{name}.{mq.group(2)}"] = part
        else:
            out[dst] = val
    return out, unexpected, fmt_name


def _source_name(canonical: str, fmt: _Format, used_prefix: bool) -> str:
    """The name a canonical key has in ``fmt`` (for error messages)."""
    mq = re.fullmatch(r"blocks\.(\d+)\.attn\.([qkv])\.(weight|bias)", canonical)
    for dst, src in fmt.table + fmt.head:
        for cand in ([canonical] if not mq else
                     [canonical, f"blocks.{mq.group(1)}.attn.qkv.{mq.group(3)}"]):
            m = _compile(dst).match(cand)
            if m:
                name = _fill(src, m.groupdict())
                if used_prefix and (dst, src) not in fmt.head:
                    name = fmt.prefix + name
                return name
    return canonical


# ----------------------------------------------------------------------------------------------
# config inference


_CONFIG_FIELDS = {f.name for f in fields(ViTConfig)}


def _config_from_hf_json(cfg_json: Mapping[str, Any] | None) -> dict[str, Any]:
    if not cfg_json:
        return {}
    out: dict[str, Any] = {}
    for src, dst in (("num_attention_heads", "heads"), ("layer_norm_eps", "ln_eps"),
                     ("image_size", "image_size"), ("patch_size", "patch_size"),
                     ("num_channels", "in_channels"), ("qkv_bias", "qkv_bias")):
        v = cfg_json.get(src)
        if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
            v = v[0]
        if v is not None and not isinstance(v, (list, tuple, dict)):
            out[dst] = v
    return out


def infer_config(canonical: Mapping[str, Tensor], fmt: str = "backplay",
                 config: ViTConfig | Mapping[str, Any] | None = None,
                 hf_config: Mapping[str, Any] | None = None,
                 num_classes: int | None = None) -> ViTConfig:
    """A :class:`ViTConfig` from canonical-name tensors. Precedence: explicit ``config`` fields,
    then ``num_classes``, then a HF ``config.json`` (``hf_config``), then shapes, then defaults
    (:data:`DEFAULT_HEADS`, :data:`DEFAULT_LN_EPS`)."""
    if isinstance(config, ViTConfig):
        explicit = config.to_dict()
    else:
        explicit = dict(config or {})
        bad = set(explicit) - _CONFIG_FIELDS
        if bad:
            raise CheckpointError(f"unknown ViTConfig fields {sorted(bad)}")

    def need(key: str) -> Tensor:
        if key not in canonical:
            raise CheckpointError(f"cannot infer the ViT config: no {key!r} tensor "
                                  f"(canonical name) in the {fmt} checkpoint")
        return canonical[key]

    inferred: dict[str, Any] = {}
    w = need("patch_embed.weight")
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise CheckpointError(f"patch embedding weight has shape {tuple(w.shape)}; expected "
                              "(dim, channels, p, p)")
    inferred["dim"], inferred["in_channels"], inferred["patch_size"] = (
        int(w.shape[0]), int(w.shape[1]), int(w.shape[2]))
    pos = need("pos_embed")
    n_patches = pos.shape[-2] - 1
    grid = math.isqrt(max(n_patches, 0))
    if grid * grid != n_patches or n_patches < 1:
        raise CheckpointError(f"position embedding has {pos.shape[-2]} tokens; expected 1 + a "
                              "square number of patches (cls token first)")
    inferred["image_size"] = grid * inferred["patch_size"]
    depth = 1 + max((int(m.group(1)) for k in canonical
                     if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth < 1:
        raise CheckpointError(f"no transformer blocks found in the {fmt} checkpoint")
    inferred["depth"] = depth
    inferred["mlp_dim"] = int(need("blocks.0.mlp.fc1.weight").shape[0])
    inferred["qkv_bias"] = "blocks.0.attn.q.bias" in canonical
    if "head.weight" in canonical:
        inferred["num_classes"] = int(canonical["head.weight"].shape[0])
    inferred["ln_eps"] = DEFAULT_LN_EPS.get(fmt, 1e-6)

    merged = {**inferred, **(_config_from_hf_json(hf_config) if fmt.startswith("hf") else {})}
    if num_classes is not None:
        merged["num_classes"] = num_classes
    elif "num_classes" not in merged:
        merged["num_classes"] = 0 if "num_classes" not in explicit else explicit["num_classes"]
    merged.update(explicit)
    if "heads" not in merged:
        dim = merged["dim"]
        if dim not in DEFAULT_HEADS:
            raise HeadsUnknownError(dim)
        merged["heads"] = DEFAULT_HEADS[dim]
    try:
        return ViTConfig(**{k: v for k, v in merged.items() if k in _CONFIG_FIELDS})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"inconsistent ViT config {merged}: {e}") from e


# ----------------------------------------------------------------------------------------------
# public entry points


def load_state_dict_any(state_dict: Mapping[str, Any],
                        config: ViTConfig | Mapping[str, Any] | None = None,
                        num_classes: int | None = None, dtype: torch.dtype | None = None, *,
                        format: str | None = None, hf_config: Mapping[str, Any] | None = None,
                        device: Any = None) -> ViT:
    """Build an eval-mode :class:`ViT` from an in-memory state dict in any supported format.

    ``config``: a full :class:`ViTConfig` or a dict of fields overriding what is inferred (e.g.
    ``{"heads": 4}``). ``num_classes``: the expected head size; ``0`` drops the head (the model
    returns the normalised cls token) and ignores head keys; a value different from the
    checkpoint's head raises. ``dtype``: the model's dtype (default: torch's default dtype, i.e.
    float32; half-precision checkpoints are upcast). ``format``: force a format name of
    :data:`FORMATS` instead of detecting it. ``hf_config``: a parsed HF config.json.

    Raises :class:`UnknownFormatError` for unknown key names and :class:`KeyMismatchError`
    listing every missing / unexpected key (in the checkpoint's spelling) or shape mismatch."""
    sd = unwrap_state_dict(state_dict)
    canonical, unexpected, fmt_name = convert_state_dict(sd, format)
    fmt = FORMATS[fmt_name]
    used_prefix = bool(fmt.prefix) and any(k.startswith(fmt.prefix) for k in sd)
    drop_head = num_classes == 0
    if drop_head:
        canonical = {k: v for k, v in canonical.items() if not k.startswith("head.")}
    if num_classes not in (None, 0) and "head.weight" in canonical \
            and canonical["head.weight"].shape[0] != num_classes:
        raise CheckpointError(
            f"num_classes={num_classes} but the checkpoint's head has "
            f"{canonical['head.weight'].shape[0]} classes (pass num_classes=0 to drop the head)")
    cfg = infer_config(canonical, fmt_name, config, hf_config, num_classes)
    if drop_head and cfg.num_classes != 0:
        cfg = cfg.replace(num_classes=0)
    model = ViT(cfg)
    if dtype is not None:  # before the copy: a float64 checkpoint is not rounded through float32
        model = model.to(dtype=dtype)
    expected = model.state_dict()
    missing = [k for k in expected if k not in canonical]
    hint = None
    if cfg.num_classes == 0 and not drop_head and "head.weight" not in canonical:
        missing += ["head.weight", "head.bias"]
        hint = "the checkpoint has no classifier head; pass num_classes=0 to load it headless"
    extra = [k for k in canonical if k not in expected]
    shape_errors = [f"{_source_name(k, fmt, used_prefix)}: checkpoint "
                    f"{tuple(canonical[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in expected if k in canonical
                    and canonical[k].shape != expected[k].shape]
    if missing or extra or unexpected or shape_errors:
        extra_src = sorted({_source_name(k, fmt, used_prefix) for k in extra})
        raise KeyMismatchError(
            fmt_name, list(dict.fromkeys(_source_name(k, fmt, used_prefix) for k in missing)),
            sorted(unexpected) + extra_src, shape_errors, hint)
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(canonical[k].to(t.dtype))
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def load(path: str | os.PathLike[str] | Mapping[str, Any],
         config: ViTConfig | Mapping[str, Any] | None = None, num_classes: int | None = None,
         dtype: torch.dtype | None = None, *, format: str | None = None,
         device: Any = None) -> ViT:
    """Load a local ViT checkpoint (timm, Hugging Face, torchvision or backplay names; detected).

    ``path``: a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` file, a directory
    written by HF ``save_pretrained`` (``model.safetensors`` or ``pytorch_model.bin``), or an
    in-memory state dict. A ``config.json`` beside the weights supplies ``num_attention_heads``,
    ``layer_norm_eps``, ``image_size``, ``patch_size`` and ``num_channels`` when present.
    Other arguments as :func:`load_state_dict_any`. Nothing is downloaded."""
    if isinstance(path, Mapping):
        return load_state_dict_any(path, config, num_classes, dtype, format=format,
                                   device=device)
    sd, cfg_json = read_state_dict(path)
    return load_state_dict_any(sd, config, num_classes, dtype, format=format,
                               hf_config=cfg_json, device=device)
