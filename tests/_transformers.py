"""Tiny transformers written the way people write them; an independent AttnLRP / CP-LRP reference.

Models (all float64, eval mode, deterministic from ``seed``; every weight is drawn from a seeded
generator, not the library's default init, and every bias, LayerNorm weight and LayerNorm bias is
perturbed, so every parameter matters):

* :func:`hf_vit`, :func:`hf_bert`, :func:`hf_gpt2`: Hugging Face ``ViTForImageClassification``,
  ``BertForSequenceClassification`` and ``GPT2LMHeadModel`` with their default attention
  implementation;
* :class:`TVStyleViT` / :func:`tv_vit`: torchvision's ``VisionTransformer`` as torchvision writes
  it (``nn.MultiheadAttention``), in plain torch;
* :class:`DeiTStyle` / :func:`deit`: a timm-style distilled DeiT (class and distillation tokens, a
  packed ``qkv`` and the explicit ``q @ k^T * scale`` attention);
* :func:`token_batch`: token ids and an attention mask for the language models.

Reference (:func:`attnlrp_reference`, :func:`reference_forward`): the model's math re-implemented
step by step from its ``state_dict`` on a small explicit LRP engine (:class:`LRPGraph`). Each
primitive records its inputs in the forward pass and has a relevance backward written from its
formula (AttnLRP, Achtibat et al. 2024; CP-LRP, Ali et al. 2022); there is no autograd anywhere.
Conventions:

* linear / conv (a linear map on patches) ``z = W u + b``: epsilon rule
  ``R_u = u * W^T (R_z / (z + eps sign z))`` with ``sign(0) := +1``; the bias absorbs its share;
* residual ``z = a + b``: ``R_a = a R_z / (z + eps sign z)``, the same for ``b``; an added
  constant (bias-like parameter, position / token-type embedding, additive attention mask) is the
  same rule with the constant absorbing its share; a prepended constant token (cls, distillation)
  absorbs all the relevance that reaches it;
* LayerNorm: identity rule through the standard deviation (frozen); the centring and the affine
  map ``y = gamma (u - mean u) / std + beta`` are one linear map of ``u``, by LRP-0 (no epsilon
  whatever ``eps`` is; beta absorbs its share);
* GELU, tanh-GELU, tanh (and any elementwise activation): identity rule ``R_in = R_out``;
  scaling by a constant: identity;
* softmax ``A = softmax(S)``: AttnLRP ``R_S = S (R_A - A sum_row R_A)``; CP-LRP: ``A`` is a
  constant (no relevance reaches ``S``, ``q`` or ``k``);
* the bilinear matmuls ``q k^T`` and ``A v``: AttnLRP's uniform rule, for ``C = a @ b``
  ``R_a[i,k] = sum_j a_ik b_kj R_C[i,j] / (2 C[i,j])`` and ``R_b[k,j] = sum_i (same)``, ``C``
  stabilised by ``eps`` as for linear; CP-LRP: ``A v`` is a linear map of ``v`` (epsilon rule,
  all of ``R_C`` to ``v``);
* every ratio whose (stabilised) denominator is exactly 0 is 0 (``x / 0 := 0``, the LRP
  convention; only reachable with ``eps = 0``, e.g. a zero token).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "hf_vit", "hf_bert", "hf_gpt2", "token_batch", "TVStyleViT", "tv_vit", "DeiTStyle", "deit",
    "Node", "LRPGraph", "reference_forward", "attnlrp_reference",
]

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# weights


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Redraw every parameter from a generator seeded with ``seed``; float64, eval mode.

    Linear / conv weights (and ``nn.MultiheadAttention``'s packed in-projection) ~ N(0, 1 / fan_in);
    biases ~ N(0, 0.1^2); LayerNorm weights ~ 1 + N(0, 0.1^2) and biases ~ N(0, 0.1^2); embedding
    tables, class / distillation tokens and position embeddings ~ N(0, 1). Tied parameters are drawn
    once. The caller's global RNG is left as it was (module constructors draw from it)."""
    g = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    model = model.to(F64)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                noise = torch.randn(p.shape, generator=g, dtype=F64)
                if isinstance(module, nn.LayerNorm) and name == "weight":
                    p.copy_(1.0 + 0.1 * noise)
                elif name.endswith("bias"):
                    p.copy_(0.1 * noise)
                elif isinstance(module, nn.Embedding) or p.dim() < 2 or _is_token(name):
                    p.copy_(noise)
                else:
                    fan_in = p.shape[0] if type(module).__name__ == "Conv1D" else p[0].numel()
                    p.copy_(noise / fan_in ** 0.5)
    return model.eval()


def _is_token(name: str) -> bool:
    """Class / distillation tokens and position embeddings stored as bare parameters."""
    return "token" in name or "pos" in name


def _build(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Construct with ``make`` (without touching the caller's RNG state) and randomise."""
    with torch.random.fork_rng(devices=[]):
        model = make()
    return _randomise(model, seed)


def hf_vit(seed: int = 0, layers: int = 2, dim: int = 16, heads: int = 2, image: int = 8,
           patch: int = 4, channels: int = 3, classes: int = 3) -> nn.Module:
    """A ``transformers.ViTForImageClassification`` (GELU, qkv bias, MLP 4 * dim)."""
    import transformers

    cfg = transformers.ViTConfig(
        hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * dim, image_size=image, patch_size=patch, num_channels=channels,
        num_labels=classes, hidden_act="gelu", qkv_bias=True)
    return _build(lambda: transformers.ViTForImageClassification(cfg), seed)


def hf_bert(seed: int = 0, layers: int = 2, dim: int = 16, heads: int = 2, vocab: int = 50,
            max_pos: int = 16, labels: int = 3) -> nn.Module:
    """A ``transformers.BertForSequenceClassification`` (GELU, MLP 4 * dim, pad token id 0)."""
    import transformers

    cfg = transformers.BertConfig(
        hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * dim, vocab_size=vocab, max_position_embeddings=max_pos,
        num_labels=labels, hidden_act="gelu", pad_token_id=0)
    return _build(lambda: transformers.BertForSequenceClassification(cfg), seed)


def hf_gpt2(seed: int = 0, layers: int = 2, dim: int = 16, heads: int = 2, vocab: int = 50,
            n_positions: int = 16) -> nn.Module:
    """A ``transformers.GPT2LMHeadModel`` (``gelu_new``, MLP 4 * dim, ``lm_head`` tied to
    ``wte``; bos / eos token id ``vocab - 1``)."""
    import transformers

    cfg = transformers.GPT2Config(
        n_embd=dim, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=n_positions,
        bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    return _build(lambda: transformers.GPT2LMHeadModel(cfg), seed)


def token_batch(seed: int, batch: int = 2, length: int = 5,
                vocab: int = 50) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, both LongTensor [batch, length]. Ids are drawn from
    ``1 .. vocab - 1``; the second sample (if any) is right-padded: its last 2 positions have
    mask 0 and id 0 (BERT's pad id)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, -2:] = 0
        ids[1, -2:] = 0
    return ids, mask


class _TVMLPBlock(nn.Sequential):
    """torchvision's ``MLPBlock``: Linear, GELU, Dropout, Linear, Dropout."""

    def __init__(self, dim: int, mlp: int, dropout: float) -> None:
        super().__init__(nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(mlp, dim), nn.Dropout(dropout))


class _TVEncoderBlock(nn.Module):
    """torchvision's ``EncoderBlock`` (pre-norm, ``nn.MultiheadAttention``)."""

    def __init__(self, heads: int, dim: int, mlp: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _TVMLPBlock(dim, mlp, dropout)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (torchvision's name)
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class _TVEncoder(nn.Module):
    """torchvision's ``Encoder``: position embedding, blocks, final LayerNorm."""

    def __init__(self, seq_length: int, layers: int, heads: int, dim: int, mlp: int,
                 dropout: float) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", _TVEncoderBlock(heads, dim, mlp, dropout))
            for i in range(layers)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (torchvision's name)
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class TVStyleViT(nn.Module):
    """torchvision's ``VisionTransformer`` in plain torch (same module names and forward)."""

    def __init__(self, image: int = 8, patch: int = 4, channels: int = 3, dim: int = 16,
                 heads: int = 2, layers: int = 2, mlp: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.image_size, self.patch_size, self.hidden_dim = image, patch, dim
        self.conv_proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        seq_length = (image // patch) ** 2 + 1
        self.encoder = _TVEncoder(seq_length, layers, heads, dim, mlp, dropout=0.1)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, classes)))

    def _process_input(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        p = self.patch_size
        n_h, n_w = h // p, w // p
        x = self.conv_proj(x)  # (n, hidden_dim, n_h, n_w)
        x = x.reshape(n, self.hidden_dim, n_h * n_w)
        return x.permute(0, 2, 1)  # (n, seq, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self._process_input(x)
        n = x.shape[0]
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        x = x[:, 0]
        return self.heads(x)


def tv_vit(seed: int = 0, **kw: Any) -> TVStyleViT:
    """A randomised :class:`TVStyleViT` (keyword arguments go to its constructor)."""
    return _build(lambda: TVStyleViT(**kw), seed)


class _PatchEmbed(nn.Module):
    """timm's ``PatchEmbed``: conv, flatten, transpose."""

    def __init__(self, patch: int, channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _DeiTAttention(nn.Module):
    """timm's ``Attention`` with the explicit (unfused) path."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = q @ k.transpose(-2, -1) * self.scale
        attn = attn.softmax(dim=-1)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class _Mlp(nn.Module):
    """timm's ``Mlp``: fc1, GELU, fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _DeiTBlock(nn.Module):
    """timm's pre-norm ``Block``."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _DeiTAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, mlp)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DeiTStyle(nn.Module):
    """A timm-style distilled DeiT: ``[cls, dist, patches] + pos_embed``, pre-norm blocks, final
    ``norm``; ``head`` on token 0 and ``head_dist`` on token 1. In eval mode the output is their
    average; in training mode the pair."""

    def __init__(self, image: int = 8, patch: int = 4, channels: int = 3, dim: int = 16,
                 heads: int = 2, layers: int = 2, mlp: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(patch, channels, dim)
        num_patches = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 2, dim))
        self.blocks = nn.Sequential(*(_DeiTBlock(dim, heads, mlp) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        self.head_dist = nn.Linear(dim, classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)
        dist_token = self.dist_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_token, dist_token, x), dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = self.forward_features(x)
        x, x_dist = self.head(x[:, 0]), self.head_dist(x[:, 1])
        if self.training:
            return x, x_dist
        return (x + x_dist) / 2


def deit(seed: int = 0, **kw: Any) -> DeiTStyle:
    """A randomised :class:`DeiTStyle` (keyword arguments go to its constructor)."""
    return _build(lambda: DeiTStyle(**kw), seed)


# ----------------------------------------------------------------------------------------------
# the explicit LRP engine


class Node:
    """A tensor in an :class:`LRPGraph`: its forward value (relevance is held by the graph)."""

    __slots__ = ("value",)

    def __init__(self, value: Tensor) -> None:
        self.value = value


_Backward = Callable[[Tensor], tuple[Tensor, ...]]


class LRPGraph:
    """A tape of LRP primitives. Each method computes its forward value from the input nodes'
    values, records the inputs, and registers the relevance backward of its rule;
    :meth:`relevance` runs the tape in reverse (relevance of a node used several times is summed).

    ``eps`` stabilises the denominators of the linear, residual / constant-add and matmul rules;
    ``cp`` selects CP-LRP (attention weights constant) instead of AttnLRP in :meth:`attention`."""

    def __init__(self, eps: float = 0.0, cp: bool = False) -> None:
        self.eps = eps
        self.cp = cp
        self._tape: list[tuple[_Backward, tuple[Node, ...], Node]] = []

    def _record(self, value: Tensor, inputs: tuple[Node, ...], backward: _Backward) -> Node:
        out = Node(value)
        self._tape.append((backward, inputs, out))
        return out

    def _ratio(self, r: Tensor, z: Tensor, eps: float | None = None) -> Tensor:
        """``r / (z + eps sign z)`` with ``sign(0) := +1`` and ``x / 0 := 0``."""
        eps = self.eps if eps is None else eps
        den = z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
        return torch.where(den == 0, torch.zeros_like(r), r / den)

    def relevance(self, out: Node, r_out: Tensor, inp: Node) -> Tensor:
        """Propagate ``r_out`` (the relevance of ``out``, same shape) back to ``inp``."""
        rel: dict[int, Tensor] = {id(out): r_out}
        for backward, inputs, node in reversed(self._tape):
            r = rel.pop(id(node), None)
            if r is None:
                continue
            for i, ri in zip(inputs, backward(r)):
                rel[id(i)] = rel[id(i)] + ri if id(i) in rel else ri
        return rel.get(id(inp), torch.zeros_like(inp.value))

    # -- primitives ------------------------------------------------------------------------------

    def linear(self, x: Node, weight: Tensor, bias: Tensor | None = None) -> Node:
        """``z = x W^T + b`` (``W`` [out, in]); epsilon rule, the bias absorbs its share."""
        u = x.value
        z = u @ weight.T if bias is None else u @ weight.T + bias
        return self._record(z, (x,), lambda r: (u * (self._ratio(r, z) @ weight),))

    def layer_norm(self, x: Node, weight: Tensor, bias: Tensor, ln_eps: float) -> Node:
        """``y = gamma (u - mean u) / std + beta`` over the last dim; std frozen (identity rule),
        the remaining linear map of ``u`` by LRP-0 (beta absorbs its share)."""
        u = x.value
        centred = u - u.mean(-1, keepdim=True)
        std = (centred.pow(2).mean(-1, keepdim=True) + ln_eps).sqrt()
        y = centred / std * weight + bias

        def backward(r: Tensor) -> tuple[Tensor]:
            g = weight * self._ratio(r, y, eps=0.0) / std   # W^T = (I - 11^T/n) diag(gamma / std)
            return (u * (g - g.mean(-1, keepdim=True)),)

        return self._record(y, (x,), backward)

    def elementwise(self, x: Node, fn: Callable[[Tensor], Tensor]) -> Node:
        """An elementwise activation; identity rule ``R_in = R_out``."""
        return self._record(fn(x.value), (x,), lambda r: (r,))

    def scale(self, x: Node, c: float) -> Node:
        """Multiplication by a constant; identity rule."""
        return self._record(x.value * c, (x,), lambda r: (r,))

    def add(self, a: Node, b: Node) -> Node:
        """Residual ``z = a + b``: ``R_a = a R_z / z``, ``R_b = b R_z / z`` (stabilised)."""
        va, vb = a.value, b.value
        z = va + vb

        def backward(r: Tensor) -> tuple[Tensor, Tensor]:
            q = self._ratio(r, z)
            return va * q, vb * q

        return self._record(z, (a, b), backward)

    def add_const(self, x: Node, c: Tensor) -> Node:
        """``z = x + c`` with a constant ``c`` (broadcast): ``R_x = x R_z / z`` (stabilised); the
        constant absorbs the rest."""
        u = x.value
        z = u + c
        return self._record(z, (x,), lambda r: (u * self._ratio(r, z),))

    def prepend(self, const: Tensor, x: Node) -> Node:
        """``cat([const, x], dim=1)`` with constant leading tokens ``const`` [B, n, D]: they
        absorb all the relevance that reaches them."""
        n = const.shape[1]
        return self._record(torch.cat([const, x.value], dim=1), (x,), lambda r: (r[:, n:],))

    def move(self, x: Node, fn: Callable[[Tensor], Tensor]) -> Node:
        """A pure index map ``fn`` (reshape, permute, transpose, slicing, gathering): each output
        element is a copy of one input element; relevance goes back to where it came from."""
        u = x.value
        src = fn(torch.arange(u.numel()).reshape(u.shape)).reshape(-1)

        def backward(r: Tensor) -> tuple[Tensor]:
            back = torch.zeros(u.numel(), dtype=r.dtype).index_add_(0, src, r.reshape(-1))
            return (back.reshape(u.shape),)

        return self._record(fn(u), (x,), backward)

    def matmul(self, a: Node, b: Node) -> Node:
        """``C = a @ b`` of two input-dependent tensors: uniform rule (half to each factor),
        ``R_a = a ((R_C / 2C) @ b^T)``, ``R_b = b (a^T @ (R_C / 2C))`` (C stabilised)."""
        va, vb = a.value, b.value
        c = va @ vb

        def backward(r: Tensor) -> tuple[Tensor, Tensor]:
            q = self._ratio(r, c) / 2
            return va * (q @ vb.transpose(-2, -1)), vb * (va.transpose(-2, -1) @ q)

        return self._record(c, (a, b), backward)

    def matmul_const(self, a: Tensor, b: Node) -> Node:
        """``C = a @ b`` with a constant ``a``: a linear map of ``b``, epsilon rule."""
        vb = b.value
        c = a @ vb
        return self._record(c, (b,), lambda r: (vb * (a.transpose(-2, -1) @ self._ratio(r, c)),))

    def softmax(self, s: Node) -> Node:
        """``A = softmax(S)`` over the last dim; AttnLRP rule ``R_S = S (R_A - A sum_row R_A)``."""
        vs = s.value
        a = torch.softmax(vs, dim=-1)
        return self._record(a, (s,), lambda r: (vs * (r - a * r.sum(-1, keepdim=True)),))

    # -- composite -------------------------------------------------------------------------------

    def attention(self, q: Node, k: Node, v: Node, heads: int, scale: float,
                  mask: Tensor | None = None) -> Node:
        """Multi-head ``softmax(q k^T * scale + mask) v`` of [B, T, D] projections, heads split
        as ``(heads, D / heads)`` along D, output [B, T, D] (heads concatenated). ``mask`` is an
        additive constant broadcast to [B, heads, T, T]. AttnLRP: softmax rule and uniform rule at
        both matmuls; CP-LRP (``self.cp``): ``A`` constant, ``A v`` linear in ``v``."""
        B, T, D = q.value.shape
        dh = D // heads

        def split(t: Tensor) -> Tensor:
            return t.reshape(B, T, heads, dh).transpose(1, 2)

        qh, kh, vh = self.move(q, split), self.move(k, split), self.move(v, split)
        s = self.scale(self.matmul(qh, self.move(kh, lambda t: t.transpose(-2, -1))), scale)
        if mask is not None:
            s = self.add_const(s, mask)
        a = self.softmax(s)
        ctx = self.matmul_const(a.value, vh) if self.cp else self.matmul(a, vh)
        return self.move(ctx, lambda t: t.transpose(1, 2).reshape(B, T, D))


# ----------------------------------------------------------------------------------------------
# the reference forward passes (parameters read from the state_dict)


def _patches(x: Tensor, p: int) -> Tensor:
    """[B, C, H, W] -> [B, N, C p p]: the non-overlapping p x p patches in row-major order, each
    flattened as (c, i, j) like a conv kernel; a stride-p conv is a linear map on these."""
    B, C, H, W = x.shape
    return (x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
            .reshape(B, (H // p) * (W // p), C * p * p))


def _patch_embed(g: LRPGraph, x: Node, weight: Tensor, bias: Tensor) -> Node:
    """Conv2d with kernel = stride = patch size as a linear layer on patches: [B, N, D]."""
    p = weight.shape[-1]
    if x.value.shape[-1] % p or x.value.shape[-2] % p:
        raise ValueError("the reference needs image sides divisible by the patch size")
    return g.linear(g.move(x, lambda t: _patches(t, p)), weight.reshape(weight.shape[0], -1), bias)


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def _ln(g: LRPGraph, x: Node, sd: dict[str, Tensor], name: str, ln_eps: float) -> Node:
    return g.layer_norm(x, sd[name + ".weight"], sd[name + ".bias"], ln_eps)


def _lin(g: LRPGraph, x: Node, sd: dict[str, Tensor], name: str) -> Node:
    return g.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def _ref_hf_vit(g: LRPGraph, model: nn.Module, x: Node) -> Node:
    """HF ViT: patch embedding, [cls] + position embeddings, pre-norm layers, final LayerNorm,
    classifier on token 0. Logits [B, classes]."""
    sd, cfg = _params(model), model.config
    e, B = cfg.layer_norm_eps, x.value.shape[0]
    h = _patch_embed(g, x, sd["vit.embeddings.patch_embeddings.projection.weight"],
                     sd["vit.embeddings.patch_embeddings.projection.bias"])
    h = g.prepend(sd["vit.embeddings.cls_token"].expand(B, -1, -1), h)
    h = g.add_const(h, sd["vit.embeddings.position_embeddings"])
    scale = (cfg.hidden_size // cfg.num_attention_heads) ** -0.5
    for i in range(cfg.num_hidden_layers):
        p = f"vit.layers.{i}."
        a = _ln(g, h, sd, p + "layernorm_before", e)
        q, k, v = (_lin(g, a, sd, p + f"attention.{n}_proj") for n in "qkv")
        ctx = g.attention(q, k, v, cfg.num_attention_heads, scale)
        h = g.add(_lin(g, ctx, sd, p + "attention.o_proj"), h)
        m = _ln(g, h, sd, p + "layernorm_after", e)
        m = _lin(g, g.elementwise(_lin(g, m, sd, p + "mlp.fc1"), F.gelu), sd, p + "mlp.fc2")
        h = g.add(m, h)
    h = _ln(g, h, sd, "vit.layernorm", e)
    return _lin(g, g.move(h, lambda t: t[:, 0]), sd, "classifier")


def _ref_tv_vit(g: LRPGraph, model: TVStyleViT, x: Node) -> Node:
    """torchvision ViT: conv_proj, [class_token] + pos_embedding, pre-norm blocks (packed
    in-projection of ``nn.MultiheadAttention``), final LayerNorm, head on token 0."""
    sd, B = _params(model), x.value.shape[0]
    blocks = list(model.encoder.layers)
    h = _patch_embed(g, x, sd["conv_proj.weight"], sd["conv_proj.bias"])
    h = g.prepend(sd["class_token"].expand(B, -1, -1), h)
    h = g.add_const(h, sd["encoder.pos_embedding"])
    for i, blk in enumerate(blocks):
        p = f"encoder.layers.encoder_layer_{i}."
        mha = blk.self_attention
        D = mha.embed_dim
        a = _ln(g, h, sd, p + "ln_1", blk.ln_1.eps)
        qkv = g.linear(a, sd[p + "self_attention.in_proj_weight"],
                       sd[p + "self_attention.in_proj_bias"])
        q, k, v = (g.move(qkv, lambda t, j=j: t[..., j * D:(j + 1) * D]) for j in range(3))
        ctx = g.attention(q, k, v, mha.num_heads, (D // mha.num_heads) ** -0.5)
        h = g.add(_lin(g, ctx, sd, p + "self_attention.out_proj"), h)
        m = _ln(g, h, sd, p + "ln_2", blk.ln_2.eps)
        m = _lin(g, g.elementwise(_lin(g, m, sd, p + "mlp.0"), F.gelu), sd, p + "mlp.3")
        h = g.add(h, m)
    h = _ln(g, h, sd, "encoder.ln", model.encoder.ln.eps)
    return _lin(g, g.move(h, lambda t: t[:, 0]), sd, "heads.head")


def _ref_deit(g: LRPGraph, model: DeiTStyle, x: Node) -> Node:
    """DeiT (distilled): [cls, dist] + patches + pos_embed, pre-norm blocks with a packed qkv,
    final norm; the eval output ``(head(x0) + head_dist(x1)) / 2`` as one linear map of the
    concatenated tokens 0 and 1 (weights ``[W_head, W_dist] / 2``, bias the mean)."""
    sd, B = _params(model), x.value.shape[0]
    h = _patch_embed(g, x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"])
    tokens = torch.cat([sd["cls_token"], sd["dist_token"]], dim=1).expand(B, -1, -1)
    h = g.add_const(g.prepend(tokens, h), sd["pos_embed"])
    for i, blk in enumerate(model.blocks):
        p, D = f"blocks.{i}.", blk.attn.qkv.in_features
        a = _ln(g, h, sd, p + "norm1", blk.norm1.eps)
        qkv = _lin(g, a, sd, p + "attn.qkv")
        q, k, v = (g.move(qkv, lambda t, j=j: t[..., j * D:(j + 1) * D]) for j in range(3))
        ctx = g.attention(q, k, v, blk.attn.num_heads, blk.attn.scale)
        h = g.add(h, _lin(g, ctx, sd, p + "attn.proj"))
        m = _ln(g, h, sd, p + "norm2", blk.norm2.eps)
        m = _lin(g, g.elementwise(_lin(g, m, sd, p + "mlp.fc1"), F.gelu), sd, p + "mlp.fc2")
        h = g.add(h, m)
    h = _ln(g, h, sd, "norm", model.norm.eps)
    both = g.move(h, lambda t: t[:, :2].reshape(t.shape[0], -1))
    weight = torch.cat([sd["head.weight"], sd["head_dist.weight"]], dim=1) / 2
    return g.linear(both, weight, (sd["head.bias"] + sd["head_dist.bias"]) / 2)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where ``allowed``, the dtype's most negative number elsewhere (HF's extended mask)."""
    return (~allowed).to(dtype) * torch.finfo(dtype).min


def _ref_hf_bert(g: LRPGraph, model: nn.Module, x: Node, attention_mask: Tensor | None) -> Node:
    """HF BERT sequence classifier from the word embeddings ``x`` [B, T, D]: token-type (type 0)
    + position embeddings (positions 0..T-1) as one added constant, embedding LayerNorm,
    post-norm layers with the extended additive padding mask on the keys, pooler (dense on
    token 0, tanh by the identity rule), classifier. Logits [B, labels]."""
    sd, cfg = _params(model), model.config
    e, T = cfg.layer_norm_eps, x.value.shape[1]
    emb = "bert.embeddings."
    const = sd[emb + "token_type_embeddings.weight"][0] + sd[emb + "position_embeddings.weight"][:T]
    h = _ln(g, g.add_const(x, const), sd, emb + "LayerNorm", e)
    mask = None if attention_mask is None else \
        _additive(attention_mask.bool(), x.value.dtype)[:, None, None, :]
    scale = (cfg.hidden_size // cfg.num_attention_heads) ** -0.5
    for i in range(cfg.num_hidden_layers):
        p = f"bert.encoder.layer.{i}."
        q, k, v = (_lin(g, h, sd, p + f"attention.self.{n}") for n in ("query", "key", "value"))
        ctx = g.attention(q, k, v, cfg.num_attention_heads, scale, mask)
        a = _lin(g, ctx, sd, p + "attention.output.dense")
        h = _ln(g, g.add(a, h), sd, p + "attention.output.LayerNorm", e)
        m = _lin(g, g.elementwise(_lin(g, h, sd, p + "intermediate.dense"), F.gelu),
                 sd, p + "output.dense")
        h = _ln(g, g.add(m, h), sd, p + "output.LayerNorm", e)
    pooled = g.elementwise(_lin(g, g.move(h, lambda t: t[:, 0]), sd, "bert.pooler.dense"),
                           torch.tanh)
    return _lin(g, pooled, sd, "classifier")


def _ref_hf_gpt2(g: LRPGraph, model: nn.Module, x: Node, attention_mask: Tensor | None) -> Node:
    """HF GPT-2 LM from the token embeddings ``x`` = ``wte(input_ids)`` [B, T, D]: + ``wpe``
    (positions 0..T-1, a constant), pre-norm blocks (Conv1D ``y = x W + b``) with one additive
    mask = causal AND key not padded, ``ln_f``, ``lm_head`` (no bias). Logits [B, T, vocab]."""
    sd, cfg = _params(model), model.config
    e, (T, D) = cfg.layer_norm_epsilon, x.value.shape[1:]
    h = g.add_const(x, sd["transformer.wpe.weight"][:T])
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    mask = _additive(allowed, x.value.dtype)
    heads = cfg.n_head
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        scale = (D // heads) ** -0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= i + 1
        a = _ln(g, h, sd, p + "ln_1", e)
        qkv = g.linear(a, sd[p + "attn.c_attn.weight"].T, sd[p + "attn.c_attn.bias"])
        q, k, v = (g.move(qkv, lambda t, j=j: t[..., j * D:(j + 1) * D]) for j in range(3))
        ctx = g.attention(q, k, v, heads, scale, mask)
        o = g.linear(ctx, sd[p + "attn.c_proj.weight"].T, sd[p + "attn.c_proj.bias"])
        h = g.add(o, h)
        m = _ln(g, h, sd, p + "ln_2", e)
        m = g.linear(m, sd[p + "mlp.c_fc.weight"].T, sd[p + "mlp.c_fc.bias"])
        m = g.elementwise(m, lambda t: F.gelu(t, approximate="tanh"))
        m = g.linear(m, sd[p + "mlp.c_proj.weight"].T, sd[p + "mlp.c_proj.bias"])
        h = g.add(h, m)
    h = _ln(g, h, sd, "transformer.ln_f", e)
    return g.linear(h, sd["lm_head.weight"])


def _kind(model: nn.Module) -> str:
    """Which reference applies: 'tv_vit', 'deit', 'hf_vit', 'hf_bert' or 'hf_gpt2'."""
    if isinstance(model, TVStyleViT):
        return "tv_vit"
    if isinstance(model, DeiTStyle):
        return "deit"
    import transformers

    for cls, kind in ((transformers.ViTForImageClassification, "hf_vit"),
                      (transformers.BertForSequenceClassification, "hf_bert"),
                      (transformers.GPT2LMHeadModel, "hf_gpt2")):
        if isinstance(model, cls):
            return kind
    raise TypeError(f"no reference for {type(model).__name__}")


def _graph(model: nn.Module, inputs: Tensor, attention_mask: Tensor | None, eps: float,
           cp: bool) -> tuple[LRPGraph, Node, Node, str]:
    """Build the reference pass: (graph, explained input node, logits node, kind).

    For the language models ``inputs`` are token ids (LongTensor [B, T]; the explained input is
    their word / token embeddings) or the embeddings themselves (float [B, T, D])."""
    kind, g = _kind(model), LRPGraph(eps, cp)
    if kind in ("hf_bert", "hf_gpt2"):
        if not inputs.is_floating_point():
            table = _params(model)["bert.embeddings.word_embeddings.weight" if kind == "hf_bert"
                                   else "transformer.wte.weight"]
            inputs = table[inputs]
        x = Node(inputs)
        ref = _ref_hf_bert if kind == "hf_bert" else _ref_hf_gpt2
        return g, x, ref(g, model, x, attention_mask), kind
    if attention_mask is not None:
        raise ValueError("attention_mask is for the language models only")
    x = Node(inputs)
    ref = {"tv_vit": _ref_tv_vit, "deit": _ref_deit, "hf_vit": _ref_hf_vit}[kind]
    return g, x, ref(g, model, x), kind


def reference_forward(model: nn.Module, inputs: Tensor, *,
                      attention_mask: Tensor | None = None) -> Tensor:
    """The reference's own logits (no LRP): [B, classes] for the classifiers, [B, T, vocab] for
    GPT-2. ``inputs`` as for :func:`attnlrp_reference`."""
    return _graph(model, inputs, attention_mask, 0.0, False)[2].value


def _per_sample(t: int | Tensor, B: int) -> Tensor:
    """An int or a LongTensor with 1 or B entries -> LongTensor [B]."""
    t = torch.as_tensor(t, dtype=torch.long).reshape(-1)
    return t.expand(B).clone() if t.numel() == 1 else t


def attnlrp_reference(model: nn.Module, inputs: Tensor, target: int | Tensor, *,
                      eps: float = 1e-12, cp: bool = False, position: int | Tensor | None = None,
                      attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """AttnLRP (``cp=False``) or CP-LRP (``cp=True``) relevance by the explicit layer-by-layer
    recursion (rules in the module docstring), for one of this module's models.

    ``inputs``: pixels [B, C, H, W] for the vision models; token ids [B, T] (or their
    embeddings [B, T, D]) for BERT and GPT-2, explained at the word embeddings
    (``bert.embeddings.word_embeddings(ids)`` / ``transformer.wte(ids)``). ``target``: class /
    token id, an int or one per sample. ``position`` (GPT-2 only): the position whose logit is
    explained, an int or one per sample; default the last position with ``attention_mask == 1``
    (the last position without a mask). ``attention_mask`` (BERT, GPT-2): LongTensor [B, T], 1 =
    token, 0 = padding (masked as a key; BERT explains token 0, GPT-2 adds the causal mask).

    The explained output's relevance is initialised to the logit itself (one-hot at the target).
    Returns ``(R, logit)``: R in the explained input's shape and the reference's logit [B] that
    was explained."""
    g, x, out, kind = _graph(model, inputs, attention_mask, eps, cp)
    B = x.value.shape[0]
    if kind == "hf_gpt2":
        T = x.value.shape[1]
        if position is None:
            mask = torch.ones(B, T, dtype=torch.long) if attention_mask is None else attention_mask
            position = T - 1 - mask.flip(-1).argmax(-1)
        pos = _per_sample(position, B) % T
        out = g.move(out, lambda t: t[torch.arange(B), pos])
    elif position is not None:
        raise ValueError("position is for GPT-2 only")
    tgt = _per_sample(target, B)
    logit = out.value[torch.arange(B), tgt]
    r_out = torch.zeros_like(out.value)
    r_out[torch.arange(B), tgt] = logit
    return g.relevance(out, r_out, x), logit
