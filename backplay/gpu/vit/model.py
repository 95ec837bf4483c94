"""A plain-torch Vision Transformer (ViT) for explanation (docs/theory.md section 10).

No timm, no torchvision: the model is written with ``nn.Conv2d``, ``nn.Linear``, ``nn.LayerNorm``
and ``nn.GELU`` modules only, so a rule engine can hook every layer, and every nonlinear step can be
*frozen* (LayerNorm standard deviation, GELU gate, attention weights) to turn the explained forward
pass into a linear map of its input on an extended graph.

Layout (the canonical state-dict key names; :mod:`backplay.gpu.vit.checkpoints` maps timm, Hugging
Face and torchvision checkpoints onto them)::

    patch_embed.{weight,bias}              Conv2d(in_channels, dim, k = stride = patch_size)
    cls_token                              (1, 1, dim)
    pos_embed                              (1, 1 + n_patches, dim), added after the cls token
    blocks.{i}.norm1.{weight,bias}         LayerNorm(dim, eps=ln_eps)
    blocks.{i}.attn.{q,k,v}.{weight,bias}  three separate Linear(dim, dim) (not packed); heads are
                                           contiguous slices of dim (head h = rows h*hd:(h+1)*hd),
                                           the convention of timm, HF and torch MultiheadAttention
    blocks.{i}.attn.proj.{weight,bias}     Linear(dim, dim), the output projection
    blocks.{i}.norm2.{weight,bias}         LayerNorm(dim)
    blocks.{i}.mlp.fc1 / mlp.act / mlp.fc2 Linear(dim, mlp_dim), exact (erf) GELU,
                                           Linear(mlp_dim, dim)
    norm.{weight,bias}                     final LayerNorm
    head.{weight,bias}                     Linear(dim, num_classes) on the cls token (Identity if 0)

Block (pre-norm)::

    h = x + attn(norm1(x));   out = h + fc2(gelu(fc1(norm2(h))))

Three ways to run it:

* ``model(x)`` / ``model(x, fused=True)``: ``F.scaled_dot_product_attention`` (the default);
* ``model(x, fused=False)``: explicit ``softmax(Q K^T / sqrt(d)) V``; same logits;
* ``model.forward_explain(x, freeze=...)``: the unfused pass written op by op that returns a
  :class:`ViTTrace` with the logits, every block's attention matrix and the input of every
  Linear / LayerNorm / GELU / attention (see :class:`BlockTrace`). With ``freeze`` the LayerNorm
  standard deviations, GELU gates ``Phi(z)`` (``gelu(z) = z * Phi(z)``) and attention weights are
  detached, so the pass is (piecewise) linear in the image with the frozen quantities as weights;
  the values are unchanged, only the autograd graph differs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ViTConfig",
    "ViT",
    "ViTTrace",
    "BlockTrace",
    "FREEZABLE",
    "vit_b_16",
    "vit_tiny_test",
    "patch_relevance",
]

#: The quantities :meth:`ViT.forward_explain` can freeze (detach).
FREEZABLE = frozenset({"norm", "gelu", "attention"})


@dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of :class:`ViT`. ``image_size`` must be a multiple of ``patch_size``."""

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    ln_eps: float = 1e-6
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not a multiple of heads {self.heads}")
        if min(self.image_size, self.patch_size, self.in_channels, self.dim, self.depth,
               self.heads, self.mlp_dim) < 1 or self.num_classes < 0:
            raise ValueError(f"invalid ViTConfig {self}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid ** 2

    @property
    def n_tokens(self) -> int:
        return 1 + self.n_patches

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def replace(self, **changes: Any) -> ViTConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# traces


@dataclass
class BlockTrace:
    """What one block computed in :meth:`ViT.forward_explain`. Token tensors are (B, T, ·),
    per-head tensors (B, H, T, ·); all are part of the autograd graph of the pass.

    ``x`` is the block input (residual stream) = ``norm1_in``; ``norm1_std`` the LayerNorm standard
    deviation ``sqrt(var + eps)`` (B, T, 1); ``attn_in`` = norm1 output, the input of q, k and v;
    ``q``, ``k``, ``v`` per head; ``attn`` the attention weights A (B, H, T_q, T_k), rows sum to 1;
    ``proj_in`` = sum_t A_qt v_t with heads concatenated (B, T, dim), the input of ``attn.proj``;
    ``attn_out`` its output; ``resid1`` = x + attn_out (= ``norm2_in``); ``fc1_in`` = norm2 output;
    ``gelu_in`` = fc1 output z; ``gelu_gate`` = Phi(z) (so gelu(z) = z * gate); ``fc2_in`` = gelu
    output; ``mlp_out`` = fc2 output; ``out`` = resid1 + mlp_out.
    """

    x: Tensor
    norm1_std: Tensor
    attn_in: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    attn: Tensor
    proj_in: Tensor
    attn_out: Tensor
    resid1: Tensor
    norm2_std: Tensor
    fc1_in: Tensor
    gelu_in: Tensor
    gelu_gate: Tensor
    fc2_in: Tensor
    mlp_out: Tensor
    out: Tensor

    @property
    def norm1_in(self) -> Tensor:
        return self.x

    @property
    def norm2_in(self) -> Tensor:
        return self.resid1


@dataclass
class ViTTrace:
    """The result of :meth:`ViT.forward_explain`.

    ``image`` the input (the input of ``patch_embed``); ``patches`` the patch-embedding output as
    tokens (B, n_patches, dim); ``tokens`` the residual stream entering block 0 (cls token first,
    position embedding added); ``blocks`` one :class:`BlockTrace` per block; ``norm_in`` the stream
    after the last block, ``norm_std`` the final LayerNorm std; ``head_in`` the normalised cls
    token (B, dim), the input of ``head``; ``logits`` (B, num_classes).
    """

    image: Tensor
    patches: Tensor
    tokens: Tensor
    blocks: list[BlockTrace] = field(default_factory=list)
    norm_in: Tensor | None = None
    norm_std: Tensor | None = None
    head_in: Tensor | None = None
    logits: Tensor | None = None
    frozen: frozenset[str] = frozenset()

    @property
    def attentions(self) -> list[Tensor]:
        """Per-block attention matrices, each (B, H, T, T)."""
        return [b.attn for b in self.blocks]


def _freeze_set(freeze: bool | str | Iterable[str] | None) -> frozenset[str]:
    if freeze is None or freeze is False:
        return frozenset()
    if freeze is True:
        return FREEZABLE
    if isinstance(freeze, str):
        freeze = [freeze]
    out = frozenset(freeze)
    bad = out - FREEZABLE
    if bad:
        raise ValueError(f"cannot freeze {sorted(bad)}; choose from {sorted(FREEZABLE)}")
    return out


def layer_norm_explained(x: Tensor, norm: nn.LayerNorm, freeze: bool) -> tuple[Tensor, Tensor]:
    """LayerNorm written out: ``(x - mean) / std * weight + bias`` with ``std = sqrt(var + eps)``
    (biased variance, as ``nn.LayerNorm``). Returns ``(y, std)``; with ``freeze`` std is detached,
    so y is affine in x (the centring stays linear)."""
    mean = x.mean(dim=-1, keepdim=True)
    xc = x - mean
    std = torch.sqrt((xc * xc).mean(dim=-1, keepdim=True) + norm.eps)
    y = xc / (std.detach() if freeze else std)
    if norm.weight is not None:
        y = y * norm.weight
    if norm.bias is not None:
        y = y + norm.bias
    return y, std


def gelu_gate(z: Tensor) -> Tensor:
    """The exact GELU gate Phi(z) = (1 + erf(z / sqrt 2)) / 2, so gelu(z) = z * Phi(z)."""
    return 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))


# ----------------------------------------------------------------------------------------------
# modules


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v Linear layers and an output projection."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def _merge(self, t: Tensor) -> Tensor:
        b, _, n, _ = t.shape
        return t.transpose(1, 2).reshape(b, n, self.dim)

    def attention_weights(self, q: Tensor, k: Tensor) -> Tensor:
        """softmax(Q K^T / sqrt(head_dim)) over keys; q, k (B, H, T, hd) -> (B, H, T, T)."""
        return torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)

    def forward(self, x: Tensor, fused: bool = True) -> Tensor:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        if fused:
            ctx = F.scaled_dot_product_attention(q, k, v)
        else:
            ctx = self.attention_weights(q, k) @ v
        return self.proj(self._merge(ctx))


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU(approximate="none")
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(.))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg.dim, cfg.heads, qkv_bias=cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = MLP(cfg.dim, cfg.mlp_dim)

    def forward(self, x: Tensor, fused: bool = True) -> Tensor:
        x = x + self.attn(self.norm1(x), fused=fused)
        return x + self.mlp(self.norm2(x))

    def explain(self, x: Tensor, frozen: frozenset[str] = frozenset()) -> tuple[Tensor, BlockTrace]:
        """The unfused block op by op, recording every intermediate (see :class:`BlockTrace`)."""
        a = self.attn
        attn_in, std1 = layer_norm_explained(x, self.norm1, "norm" in frozen)
        q, k, v = a._heads(a.q(attn_in)), a._heads(a.k(attn_in)), a._heads(a.v(attn_in))
        A = a.attention_weights(q, k)
        proj_in = a._merge((A.detach() if "attention" in frozen else A) @ v)
        attn_out = a.proj(proj_in)
        resid1 = x + attn_out
        fc1_in, std2 = layer_norm_explained(resid1, self.norm2, "norm" in frozen)
        z = self.mlp.fc1(fc1_in)
        gate = gelu_gate(z)
        fc2_in = z * (gate.detach() if "gelu" in frozen else gate)
        mlp_out = self.mlp.fc2(fc2_in)
        out = resid1 + mlp_out
        return out, BlockTrace(
            x=x, norm1_std=std1, attn_in=attn_in, q=q, k=k, v=v, attn=A, proj_in=proj_in,
            attn_out=attn_out, resid1=resid1, norm2_std=std2, fc1_in=fc1_in, gelu_in=z,
            gelu_gate=gate, fc2_in=fc2_in, mlp_out=mlp_out, out=out)


class ViT(nn.Module):
    """Vision Transformer (pre-norm, cls-token classifier). See the module docstring."""

    def __init__(self, config: ViTConfig, fused: bool = True) -> None:
        super().__init__()
        cfg = self.config = config
        #: default attention path of :meth:`forward` when ``fused`` is None
        self.fused = fused
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size,
                                     stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.n_tokens, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.head: nn.Module = (nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes > 0
                                else nn.Identity())
        self.reset_parameters()

    # -- init ----------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None,
                         randomize_norms: bool = False) -> ViT:
        """Random init: truncated-normal (std 0.02) cls/pos embeddings, linear and conv weights,
        zero biases, unit LayerNorm (ViT / timm style). ``randomize_norms`` also draws LayerNorm
        weights near 1 and small nonzero biases everywhere (for tests). Returns self."""
        g = generator

        def tn(p: Tensor, std: float = 0.02) -> None:
            p.normal_(0.0, std, generator=g).clamp_(-2 * std, 2 * std)

        def small(p: Tensor, std: float) -> None:
            p.normal_(0.0, std, generator=g)

        tn(self.cls_token)
        tn(self.pos_embed)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                tn(m.weight)
                if m.bias is not None:
                    (small(m.bias, 0.02) if randomize_norms else m.bias.zero_())
            elif isinstance(m, nn.LayerNorm):
                if randomize_norms:
                    small(m.weight, 0.1)
                    m.weight.add_(1.0)
                    small(m.bias, 0.1)
                else:
                    m.weight.fill_(1.0)
                    m.bias.zero_()
        return self

    # -- forward -------------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels or x.shape[2] != c.image_size \
                or x.shape[3] != c.image_size:
            raise ValueError(f"expected images (B, {c.in_channels}, {c.image_size}, "
                             f"{c.image_size}), got {tuple(x.shape)}")

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image -> (patch tokens (B, N, dim), residual stream (B, 1 + N, dim))."""
        self._check_input(x)
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return patches, torch.cat([cls, patches], dim=1) + self.pos_embed

    def forward_features(self, x: Tensor, fused: bool | None = None) -> Tensor:
        """The normalised cls token (B, dim), the input of ``head``."""
        fused = self.fused if fused is None else fused
        _, h = self.embed(x)
        for blk in self.blocks:
            h = blk(h, fused=fused)
        return self.norm(h)[:, 0]

    def forward(self, x: Tensor, fused: bool | None = None) -> Tensor:
        """Logits (B, num_classes). ``fused`` None -> ``self.fused`` (True: SDPA; False: explicit
        softmax attention)."""
        return self.head(self.forward_features(x, fused=fused))

    def forward_explain(self, x: Tensor,
                        freeze: bool | str | Iterable[str] | None = False) -> ViTTrace:
        """Unfused pass op by op returning a :class:`ViTTrace` (logits, per-block attention
        matrices, every layer input). ``freeze``: False (plain), True (all of :data:`FREEZABLE`),
        or a subset of {"norm", "gelu", "attention"}: those quantities are detached."""
        frozen = _freeze_set(freeze)
        patches, h = self.embed(x)
        trace = ViTTrace(image=x, patches=patches, tokens=h, frozen=frozen)
        for blk in self.blocks:
            h, bt = blk.explain(h, frozen)
            trace.blocks.append(bt)
        y, std = layer_norm_explained(h, self.norm, "norm" in frozen)
        trace.norm_in, trace.norm_std = h, std
        trace.head_in = y[:, 0]
        trace.logits = self.head(trace.head_in)
        return trace

    def attention_maps(self, x: Tensor) -> list[Tensor]:
        """Per-block attention matrices (B, H, T, T) of the unfused pass."""
        with torch.no_grad():
            return self.forward_explain(x).attentions

    def extra_repr(self) -> str:
        return f"config={self.config}, fused={self.fused}"


# ----------------------------------------------------------------------------------------------
# factories


def _finish(model: ViT, dtype: torch.dtype | None, device: Any) -> ViT:
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def vit_b_16(num_classes: int = 1000, *, ln_eps: float = 1e-6, seed: int | None = None,
             dtype: torch.dtype | None = None, device: Any = None) -> ViT:
    """ViT-B/16 (224 px, patch 16, dim 768, 12 blocks, 12 heads, MLP 3072), random init, eval mode.
    ``seed`` makes the init reproducible (a private generator; the global RNG is untouched)."""
    cfg = ViTConfig(image_size=224, patch_size=16, in_channels=3, dim=768, depth=12, heads=12,
                    mlp_dim=3072, num_classes=num_classes, ln_eps=ln_eps)
    model = ViT(cfg)
    if seed is not None:
        model.reset_parameters(torch.Generator().manual_seed(seed))
    return _finish(model, dtype, device)


def vit_tiny_test(num_classes: int = 3, *, image_size: int = 8, patch_size: int = 4,
                  in_channels: int = 3, dim: int = 8, depth: int = 2, heads: int = 2,
                  mlp_dim: int = 16, ln_eps: float = 1e-6, seed: int = 0,
                  dtype: torch.dtype | None = None, device: Any = None) -> ViT:
    """A tiny ViT (default: 8 px image, patch 4 -> 4 patches + cls = 5 tokens, dim 8, 2 heads,
    2 blocks, MLP 16, 3 classes) small enough for the exact solvers. All parameters, LayerNorm
    affines included, are drawn from a generator seeded with ``seed``; eval mode."""
    cfg = ViTConfig(image_size=image_size, patch_size=patch_size, in_channels=in_channels,
                    dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim, num_classes=num_classes,
                    ln_eps=ln_eps)
    model = ViT(cfg)
    g = torch.Generator().manual_seed(seed)
    model.reset_parameters(g, randomize_norms=True)
    # bigger weights than the 0.02 init so attention and GELU are far from trivial
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64)
                         / math.sqrt(max(p[0].numel(), 1))).to(p.dtype))
    return _finish(model, dtype, device)


def patch_relevance(R_pixels: Tensor, patch_size: int) -> Tensor:
    """Sum pooling of a pixel relevance [B, C, H, W] (or one image [C, H, W]) over the channels and
    the non-overlapping ``patch_size x patch_size`` patches -> [B, H / p, W / p] (or [H / p, W / p])."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if not isinstance(R_pixels, Tensor) or R_pixels.dim() not in (3, 4):
        raise ValueError(f"R_pixels must be a tensor [B, C, H, W] or [C, H, W], got "
                         f"{tuple(getattr(R_pixels, 'shape', ()))}")
    h, w = R_pixels.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"image {h}x{w} is not a multiple of patch_size {patch_size}")
    s = R_pixels.sum(-3)
    return s.reshape(s.shape[:-2] + (h // patch_size, patch_size, w // patch_size, patch_size)).sum((-3, -1))
