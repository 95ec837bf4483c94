"""The plain-torch ViT (backplay.gpu.vit) and its checkpoint loaders (backplay.gpu.vit.checkpoints).

Every checkpoint is made here, in a tmp dir: nothing is downloaded. The reference is a randomly
initialised Hugging Face ``ViTForImageClassification``; timm- and torchvision-format state dicts
are written by hand from the same weights (the key maps below), so all formats must give the HF
logits.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from backplay.gpu import vit as V
from backplay.gpu.vit import checkpoints as C

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: everything is made locally

DEPTH, DIM, HEADS, MLP, CLASSES, IMG, PATCH = 2, 32, 4, 64, 5, 32, 8


# ----------------------------------------------------------------------------------------------
# the model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_equals_unfused_float64(seed):
    m = V.vit_tiny_test(seed=seed, dtype=torch.float64)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        fused, unfused = m(x), m(x, fused=False)
        tr = m.forward_explain(x)
        frozen = m.forward_explain(x, freeze=True)
    assert fused.shape == (4, 3)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-12)
    torch.testing.assert_close(fused, tr.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(fused, frozen.logits, rtol=0, atol=1e-12)
    m.fused = False  # the default path follows the attribute
    torch.testing.assert_close(m(x), unfused, rtol=0, atol=0)


def test_tiny_forward_and_trace():
    m = V.vit_tiny_test()
    assert not m.training
    cfg = m.config
    assert (cfg.image_size, cfg.patch_size, cfg.n_tokens, cfg.dim, cfg.heads, cfg.depth,
            cfg.mlp_dim, cfg.num_classes) == (8, 4, 5, 8, 2, 2, 16, 3)
    x = torch.randn(2, 3, 8, 8)
    y = m(x)
    assert y.shape == (2, 3) and torch.isfinite(y).all()
    tr = m.forward_explain(x)
    assert len(tr.blocks) == 2 and tr.tokens.shape == (2, 5, 8) and tr.patches.shape == (2, 4, 8)
    for b in tr.blocks:
        assert b.attn.shape == (2, 2, 5, 5)
        torch.testing.assert_close(b.attn.sum(-1), torch.ones(2, 2, 5))
        assert b.q.shape == b.k.shape == b.v.shape == (2, 2, 5, 4)
        assert b.attn_in.shape == b.proj_in.shape == b.fc1_in.shape == (2, 5, 8)
        assert b.gelu_in.shape == b.gelu_gate.shape == b.fc2_in.shape == (2, 5, 16)
        torch.testing.assert_close(b.fc2_in, torch.nn.functional.gelu(b.gelu_in))
        torch.testing.assert_close(b.fc2_in, b.gelu_in * b.gelu_gate)
        assert b.norm1_std.shape == b.norm2_std.shape == (2, 5, 1)
        torch.testing.assert_close(b.out, b.resid1 + b.mlp_out)
    torch.testing.assert_close(tr.logits, y)
    assert tr.head_in.shape == (2, 8)
    # same values, reproducible from the seed
    torch.testing.assert_close(V.vit_tiny_test()(x), y)


def test_freeze_detaches_only_the_chosen_quantities():
    m = V.vit_tiny_test(dtype=torch.float64)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    grads = {}
    for freeze in (False, "attention", "gelu", "norm", True):
        tr = m.forward_explain(x, freeze=freeze)
        (g,) = torch.autograd.grad(tr.logits[0, 1], x)
        grads[str(freeze)] = g
    for k in ("attention", "gelu", "norm", "True"):
        assert not torch.allclose(grads[k], grads["False"]), k
    with pytest.raises(ValueError, match="cannot freeze"):
        m.forward_explain(x, freeze="softmax")
    # the frozen pass keeps a gradient through the linear parts only
    tr = m.forward_explain(x, freeze=True)
    (g,) = torch.autograd.grad(tr.logits[0, 1], x, retain_graph=True)
    assert torch.isfinite(g).all()
    b = tr.blocks[0]
    frozen = [b.attn, b.norm1_std, b.norm2_std, b.gelu_gate, tr.norm_std]
    assert all(gr is None for gr in torch.autograd.grad(tr.logits[0, 1], frozen,
                                                        allow_unused=True))


def test_vit_b_16_builds_and_runs_on_cpu():
    t0 = time.perf_counter()
    m = V.vit_b_16()
    assert not m.training
    cfg = m.config
    assert (cfg.image_size, cfg.patch_size, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_dim,
            cfg.num_classes, cfg.ln_eps) == (224, 16, 768, 12, 12, 3072, 1000, 1e-6)
    assert sum(p.numel() for p in m.parameters()) == 86_567_656  # the ViT-B/16 count
    with torch.no_grad():
        y = m(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 1000) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert time.perf_counter() - t0 < 60


def test_config_validation_and_input_shape():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        V.ViTConfig(image_size=10, patch_size=4)
    with pytest.raises(ValueError, match="multiple of heads"):
        V.ViTConfig(dim=10, heads=3)
    with pytest.raises(ValueError, match="expected images"):
        V.vit_tiny_test()(torch.randn(1, 3, 16, 16))


# ----------------------------------------------------------------------------------------------
# checkpoints


def _hf_model(dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=IMG, patch_size=PATCH, hidden_size=DIM,
                                 num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                 intermediate_size=MLP, num_labels=CLASSES, hidden_act="gelu")
    model = transformers.ViTForImageClassification(cfg).eval()
    # the HF init leaves biases at zero and LayerNorms at identity: randomise every parameter
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "layernorm" in name else 0.05))
            if p.dim() >= 2 and "embeddings" not in name:
                p.mul_(4.0)
    return model.to(dtype)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = _hf_model()
    d = tmp_path_factory.mktemp("hf_vit")
    model.save_pretrained(str(d), safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def hf_legacy_sd(hf_dir):
    """What save_pretrained wrote (legacy spelling in transformers 4 and 5)."""
    from safetensors.torch import load_file

    return load_file(str(hf_dir / "model.safetensors"))


def _images(dtype=torch.float32, n=3):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(7)).to(dtype)


def _hf_logits(hf_dir, dtype):
    transformers = pytest.importorskip("transformers")
    ref = transformers.ViTForImageClassification.from_pretrained(str(hf_dir)).to(dtype).eval()
    with torch.no_grad():
        return ref(pixel_values=_images(dtype)).logits


# legacy HF name -> timm name ({i} a block); q, k, v are packed into attn.qkv (rows q;k;v)
HF_TO_TIMM = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "pos_embed",
    "vit.embeddings.patch_embeddings.projection.{p}": "patch_embed.proj.{p}",
    "vit.encoder.layer.{i}.layernorm_before.{p}": "blocks.{i}.norm1.{p}",
    "vit.encoder.layer.{i}.attention.output.dense.{p}": "blocks.{i}.attn.proj.{p}",
    "vit.encoder.layer.{i}.layernorm_after.{p}": "blocks.{i}.norm2.{p}",
    "vit.encoder.layer.{i}.intermediate.dense.{p}": "blocks.{i}.mlp.fc1.{p}",
    "vit.encoder.layer.{i}.output.dense.{p}": "blocks.{i}.mlp.fc2.{p}",
    "vit.layernorm.{p}": "norm.{p}",
    "classifier.{p}": "head.{p}",
}
TIMM_QKV = "blocks.{i}.attn.qkv.{p}"

HF_TO_TORCHVISION = {
    "vit.embeddings.cls_token": "class_token",
    "vit.embeddings.position_embeddings": "encoder.pos_embedding",
    "vit.embeddings.patch_embeddings.projection.{p}": "conv_proj.{p}",
    "vit.encoder.layer.{i}.layernorm_before.{p}": "encoder.layers.encoder_layer_{i}.ln_1.{p}",
    "vit.encoder.layer.{i}.attention.output.dense.{p}":
        "encoder.layers.encoder_layer_{i}.self_attention.out_proj.{p}",
    "vit.encoder.layer.{i}.layernorm_after.{p}": "encoder.layers.encoder_layer_{i}.ln_2.{p}",
    "vit.encoder.layer.{i}.intermediate.dense.{p}": "encoder.layers.encoder_layer_{i}.mlp.0.{p}",
    "vit.encoder.layer.{i}.output.dense.{p}": "encoder.layers.encoder_layer_{i}.mlp.3.{p}",
    "vit.layernorm.{p}": "encoder.ln.{p}",
    "classifier.{p}": "heads.head.{p}",
}
TORCHVISION_QKV = "encoder.layers.encoder_layer_{i}.self_attention.in_proj_{p}"


def _convert(hf_sd, table, qkv, old_mlp_names=False):
    out = {}
    for i in range(DEPTH):
        for p in ("weight", "bias"):
            for src, dst in table.items():
                s, d = src.format(i=i, p=p), dst.format(i=i, p=p)
                if s in hf_sd:
                    out[d] = hf_sd[s].clone()
            att = f"vit.encoder.layer.{i}.attention.attention"
            out[qkv.format(i=i, p=p)] = torch.cat(
                [hf_sd[f"{att}.{n}.{p}"] for n in ("query", "key", "value")], dim=0)
    if old_mlp_names:
        out = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
               for k, v in out.items()}
    assert len(out) == len(hf_sd) - 4 * DEPTH  # 3 q/k/v pairs become one qkv pair per block
    return out


def test_transformers_key_spellings(hf_legacy_sd):
    """save_pretrained writes the legacy names; the in-memory v5 module names differ."""
    keys = set(hf_legacy_sd)
    assert "vit.encoder.layer.0.attention.attention.query.weight" in keys
    assert C.detect_format(hf_legacy_sd) == "hf"
    import transformers

    mem = _hf_model().state_dict()
    major = int(transformers.__version__.split(".")[0])
    assert C.detect_format(mem) == ("hf-v5" if major >= 5 else "hf")


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_hf_save_pretrained_matches(hf_dir, dtype, atol):
    ref = _hf_logits(hf_dir, dtype)
    m = C.load(hf_dir / "model.safetensors", dtype=dtype)  # heads, eps from config.json
    assert m.config.heads == HEADS and m.config.ln_eps == 1e-12 and not m.training
    assert m.config.num_classes == CLASSES and m.config.image_size == IMG
    with torch.no_grad():
        y = m(_images(dtype))
        y_unfused = m(_images(dtype), fused=False)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ref, rtol=0, atol=atol)
    torch.testing.assert_close(y_unfused, ref, rtol=0, atol=atol)
    # the directory form and the bp.gpu.vit.load alias
    with torch.no_grad():
        torch.testing.assert_close(V.load(hf_dir, dtype=dtype)(_images(dtype)), ref,
                                   rtol=0, atol=atol)


def test_hf_in_memory_state_dict(hf_dir):
    """model.state_dict() of the installed transformers (v5 names under transformers 5)."""
    ref = _hf_logits(hf_dir, torch.float64)
    transformers = pytest.importorskip("transformers")
    hf = transformers.ViTForImageClassification.from_pretrained(str(hf_dir))
    m = C.load_state_dict_any(hf.state_dict(), config={"heads": HEADS}, dtype=torch.float64)
    assert m.config.ln_eps == 1e-12
    with torch.no_grad():
        torch.testing.assert_close(m(_images(torch.float64)), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("fmt", ["timm", "torchvision", "torchvision-old"])
def test_timm_and_torchvision_pth(hf_dir, hf_legacy_sd, tmp_path, fmt):
    if fmt == "timm":
        sd = _convert(hf_legacy_sd, HF_TO_TIMM, TIMM_QKV)
    else:
        sd = _convert(hf_legacy_sd, HF_TO_TORCHVISION, TORCHVISION_QKV,
                      old_mlp_names=fmt == "torchvision-old")
    assert C.detect_format(sd) == fmt.split("-")[0]
    path = tmp_path / f"{fmt}.pth"
    torch.save(sd, path)
    # heads (dim 32 is not in the default table) and the HF eps are not in these files
    cfg = {"heads": HEADS, "ln_eps": 1e-12}
    for dtype, atol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        ref = _hf_logits(hf_dir, dtype)
        m = C.load(path, config=cfg, dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(m(_images(dtype)), ref, rtol=0, atol=atol)
    # default eps of the format
    assert C.load(path, config={"heads": HEADS}).config.ln_eps == 1e-6
    # wrapped and DataParallel-prefixed forms
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    m = C.load(tmp_path / "wrapped.pt", config=cfg, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(_images(torch.float64)), _hf_logits(hf_dir, torch.float64),
                                   rtol=0, atol=1e-10)


def test_backplay_round_trip_safetensors(tmp_path):
    save_file = pytest.importorskip("safetensors.torch").save_file

    m = V.vit_tiny_test(dtype=torch.float64)
    save_file(m.state_dict(), str(tmp_path / "tiny.safetensors"))
    m2 = C.load(tmp_path / "tiny.safetensors", config={"heads": 2, "ln_eps": 1e-6},
                dtype=torch.float64)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)


def test_default_heads_table():
    # a ViT-S-shaped (dim 384) state dict, built from a backplay model
    m = V.ViT(V.ViTConfig(image_size=32, patch_size=16, dim=384, depth=1, heads=6, mlp_dim=8,
                          num_classes=2))
    loaded = C.load_state_dict_any(m.state_dict())
    assert loaded.config.heads == 6 and loaded.config.depth == 1 and loaded.config.mlp_dim == 8


def test_errors_missing_unexpected_unknown(hf_legacy_sd, tmp_path):
    sd = dict(hf_legacy_sd)
    del sd["vit.encoder.layer.1.attention.attention.key.weight"]
    sd["vit.encoder.layer.0.attention.extra.weight"] = torch.zeros(1)
    with pytest.raises(C.KeyMismatchError) as e:
        C.load_state_dict_any(sd, config={"heads": HEADS})
    assert e.value.missing == ["vit.encoder.layer.1.attention.attention.key.weight"]
    assert e.value.unexpected == ["vit.encoder.layer.0.attention.extra.weight"]
    msg = str(e.value)
    assert "missing keys (1)" in msg and "unexpected keys (1)" in msg

    timm = _convert(hf_legacy_sd, HF_TO_TIMM, TIMM_QKV)
    del timm["blocks.1.attn.qkv.bias"], timm["head.weight"], timm["head.bias"]
    timm["fc_norm.weight"] = torch.zeros(DIM)
    with pytest.raises(C.KeyMismatchError) as e:
        C.load_state_dict_any(timm, config={"heads": HEADS})
    assert set(e.value.missing) == {"blocks.1.attn.qkv.bias", "head.weight", "head.bias"}
    assert e.value.unexpected == ["fc_norm.weight"]
    assert "num_classes=0" in str(e.value)
    # headless load is allowed on request
    del timm["fc_norm.weight"]
    timm["blocks.1.attn.qkv.bias"] = torch.zeros(3 * DIM)
    m = C.load_state_dict_any(timm, config={"heads": HEADS}, num_classes=0)
    assert isinstance(m.head, torch.nn.Identity) and m(_images()).shape == (3, DIM)

    with pytest.raises(C.CheckpointError, match="num_classes=7"):
        C.load_state_dict_any(hf_legacy_sd, config={"heads": HEADS}, num_classes=7)
    with pytest.raises(C.CheckpointError, match="attention heads"):
        C.load_state_dict_any(hf_legacy_sd)  # dim 32, no config.json in memory
    with pytest.raises(C.KeyMismatchError, match="shape mismatches"):
        C.load_state_dict_any(hf_legacy_sd, config={"heads": HEADS, "mlp_dim": 48})
    with pytest.raises(C.UnknownFormatError, match="unknown ViT checkpoint format"):
        C.load_state_dict_any({"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(C.CheckpointError, match="extension"):
        (tmp_path / "x.npz").write_bytes(b"")
        C.load(tmp_path / "x.npz")
    with pytest.raises(FileNotFoundError):
        C.load(tmp_path / "nope.pth")
