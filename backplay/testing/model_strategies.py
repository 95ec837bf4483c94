"""Hypothesis strategy of small random DAG models written as plain torch modules with their own forward.

:func:`random_models` draws a :class:`RandomModel`: an ``nn.Module`` (eval mode) whose forward is a chain
of nodes, each node a small module of its own (conv-BN-gate units, gates, pools, residual sums
``h + f(h)`` or ``out += h``, ``torch.cat`` of two branches, constant scaling, Group/LayerNorm), then a
head (global mean, ``adaptive_avg_pool2d`` + ``torch.flatten`` or ``torch.flatten``) and a Linear; plus
one input sample, a target class and a readable description of the drawn ops.

Two families: images ``[C, H, W]`` (C 1-2, H = W 4-6; conv2d, BatchNorm2d, pools, GroupNorm) and
vectors ``[n]`` (n 1-5; Linear, LayerNorm). Every weight, bias, BatchNorm statistic and input entry is a
dyadic k/4 (|k| <= 8; tensors of more than 72 entries are drawn from a seeded generator on the same
grid with extra zeros), so zero weights and exact ties z = 0 are reachable, and one tie can be forced
at a unit whose input is exact. BatchNorm uses eps = 1/16 and running variances with var + eps in {1/4, 1, 4}, so an
eval BatchNorm is an exact dyadic affine map. Every intermediate tensor has at most ~100 entries, small
enough for an exact rational solver on the unrolled graph. Each operation kind is its own
sub-strategy, so failures shrink towards short chains of simple ops with zero weights.

The model takes a batch: call ``model(x[None])``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

from .strategies import dyadics

__all__ = ["RandomModel", "random_models"]

MAX_UNITS = 100          # entries of any intermediate tensor (one sample)
MAX_VEC = 8              # width of any vector in the vector family
SMALL_TENSOR = 72        # tensors up to this size (any input) are drawn entry by entry (best shrinking)
BN_EPS = 1.0 / 16
BN_VARS = (15 / 16, 3 / 16, 63 / 16)      # var + eps = 1, 1/4, 4: exact inverse square roots
SCALES = (0.5, 2.0, -1.0, 0.25, -0.5)
GATES = ("relu", "relu_", "leaky_relu", "relu6", "hardtanh", "gelu", "silu", "softplus", "tanh", "sigmoid")
SQUASHES = ("tanh", "sigmoid")            # only directly after a linear op


@dataclass(frozen=True, eq=False)
class RandomModel:
    """A drawn model (eval mode) with one input sample ``x`` (no batch dimension), a ``target`` class
    and a ``description`` of the drawn ops."""

    model: nn.Module
    x: Tensor
    target: int
    description: str

    def __repr__(self) -> str:
        return f"RandomModel({self.description}; x={self.x.tolist()}, target={self.target})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis' failure report
        p.text(repr(self))


# ----------------------------------------------------------------------------------------- modules


class Gate(nn.Module):
    """An elementwise nonlinearity written functionally, as in a forward."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "relu":
            return F.relu(x)
        if self.kind == "leaky_relu":
            return F.leaky_relu(x, 0.1)
        if self.kind == "relu6":
            return F.relu6(x)
        if self.kind == "hardtanh":
            return F.hardtanh(x)
        if self.kind == "gelu":
            return F.gelu(x)
        if self.kind == "silu":
            return F.silu(x)
        if self.kind == "softplus":
            return F.softplus(x)
        if self.kind == "tanh":
            return torch.tanh(x)
        if self.kind == "sigmoid":
            return torch.sigmoid(x)
        raise ValueError(self.kind)

    def extra_repr(self) -> str:
        return self.kind


def make_gate(kind: str) -> nn.Module:
    return nn.ReLU(inplace=True) if kind == "relu_" else Gate(kind)


class ConvUnit(nn.Module):
    """conv [-> BatchNorm2d] [-> gate]"""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, act: nn.Module | None) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        if self.bn is not None:
            out = self.bn(out)
        if self.act is not None:
            out = self.act(out)
        return out


class LinearUnit(nn.Module):
    """fc [-> gate]"""

    def __init__(self, fc: nn.Linear, act: nn.Module | None) -> None:
        super().__init__()
        self.fc = fc
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc(x)
        if self.act is not None:
            out = self.act(out)
        return out


class Pool(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "max":
            return F.max_pool2d(x, 2)
        return F.avg_pool2d(x, 2)

    def extra_repr(self) -> str:
        return self.kind


class Scale(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: Tensor) -> Tensor:
        return self.c * x

    def extra_repr(self) -> str:
        return repr(self.c)


class Residual(nn.Module):
    """``h + f(h)`` (style "add") or ``out = f(h); out += h`` (style "iadd")."""

    def __init__(self, f: nn.Module, style: str) -> None:
        super().__init__()
        self.f = f
        self.style = style

    def forward(self, x: Tensor) -> Tensor:
        if self.style == "add":
            return x + self.f(x)
        out = self.f(x)
        out += x
        return out


class Concat(nn.Module):
    """``torch.cat([a(h), b(h)], 1)``; ``a`` may be the identity (DenseNet style)."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a = a
        self.b = b

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


class RandomNet(nn.Module):
    """The drawn chain of nodes, a head and a final Linear."""

    def __init__(self, nodes: list[nn.Module], head: str, fc: nn.Linear) -> None:
        super().__init__()
        self.nodes = nn.ModuleList(nodes)
        self.head = head
        self.fc = fc

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for node in self.nodes:
            h = node(h)
        if self.head == "mean":
            h = h.mean((2, 3))
        elif self.head == "adaptive":
            h = F.adaptive_avg_pool2d(h, 1)
            h = torch.flatten(h, 1)
        elif self.head == "flatten":
            h = torch.flatten(h, 1)
        return self.fc(h)

    def extra_repr(self) -> str:
        return f"head={self.head}"


# ------------------------------------------------------------------------------------ value strategies


@st.composite
def dyadic_arrays(draw: Any, shape: tuple[int, ...], max_abs: float = 2.0) -> np.ndarray:
    """A float64 array of dyadics k/4: entry by entry up to SMALL_TENSOR entries, else from a drawn seed
    (15% extra zeros)."""
    n = int(np.prod(shape)) if shape else 1
    if n <= SMALL_TENSOR:
        return np.array(draw(st.lists(dyadics(max_abs), min_size=n, max_size=n)), dtype=np.float64).reshape(shape)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    kmax = int(4 * max_abs)
    vals = rng.integers(-kmax, kmax + 1, size=n) / 4
    return np.where(rng.random(n) < 0.15, 0.0, vals).reshape(shape)


@torch.no_grad()
def _fill(draw: Any, module: nn.Module) -> None:
    """Dyadic parameters for ``module``'s own parameters (and BatchNorm statistics)."""
    for name, p in module.named_parameters(recurse=False):
        p.copy_(torch.from_numpy(draw(dyadic_arrays(tuple(p.shape)))))
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        c = module.num_features
        module.running_mean.copy_(torch.from_numpy(draw(dyadic_arrays((c,), max_abs=1.0))))
        var = draw(st.lists(st.sampled_from(BN_VARS), min_size=c, max_size=c))
        module.running_var.copy_(torch.tensor(var, dtype=torch.float64))


def _new(module: nn.Module) -> nn.Module:
    return module.double().eval()


# --------------------------------------------------------------------------------- op sub-strategies
# Each returns (module, new_shape, description, ends_linear). ``fresh``: the node's input is a tensor
# nobody else holds, so an in-place gate on it is allowed.


def gate_kinds(after_linear: bool, fresh: bool) -> list[str]:
    return [g for g in GATES if (after_linear or g not in SQUASHES) and (fresh or g != "relu_")]


@st.composite
def gates(draw: Any, shape: tuple[int, ...], after_linear: bool = True, fresh: bool = True):
    kind = draw(st.sampled_from(gate_kinds(after_linear, fresh)))
    return make_gate(kind), shape, kind, False


def _conv_geometries(c: int, h: int, same_size: bool) -> list[tuple[int, int, int, int]]:
    """(kernel, padding, stride, out side), simplest first."""
    out = []
    for k in (1, 2, 3):
        for p in (0, 1):
            for s in (1, 2):
                ho = (h + 2 * p - k) // s + 1
                if ho < 1 or ho * ho > MAX_UNITS:
                    continue
                if same_size and ho != h:
                    continue
                out.append((k, p, s, ho))
    return out


@st.composite
def conv_units(draw: Any, shape: tuple[int, ...], same_size: bool = False, c_out: int | None = None,
               max_c_out: int = 3):
    """conv2d (kernel 1-3, padding 0-1, stride 1-2, groups 1 or depthwise, bias drawn) [-> BatchNorm2d]
    [-> gate]. ``same_size``: spatial size kept; ``c_out``: output channels fixed."""
    c, h, _ = shape
    k, p, s, ho = draw(st.sampled_from(_conv_geometries(c, h, same_size)))
    cap = min(max_c_out, MAX_UNITS // (ho * ho))
    depthwise = c > 1 and c <= cap and (c_out is None or c_out == c) and draw(st.booleans())
    if depthwise:
        co, groups = c, c
    else:
        co, groups = (c_out if c_out is not None else draw(st.integers(1, max(1, cap)))), 1
    bias = draw(st.booleans())
    conv = _new(nn.Conv2d(c, co, k, stride=s, padding=p, groups=groups, bias=bias))
    _fill(draw, conv)
    desc = f"conv({c}->{co} k{k} p{p} s{s}{' dw' if depthwise else ''}{' +b' if bias else ''})"
    bn = None
    if draw(st.booleans()):
        bn = _new(nn.BatchNorm2d(co, eps=BN_EPS))
        _fill(draw, bn)
        desc += " bn"
    act = None
    if draw(st.booleans()):
        kind = draw(st.sampled_from(gate_kinds(True, True)))
        act = make_gate(kind)
        desc += f" {kind}"
    return ConvUnit(conv, bn, act), (co, ho, ho), desc, act is None


@st.composite
def linear_units(draw: Any, shape: tuple[int, ...], n_out: int | None = None, max_out: int = 5):
    """nn.Linear (bias drawn) [-> gate]."""
    (n,) = shape
    m = n_out if n_out is not None else draw(st.integers(1, max_out))
    bias = draw(st.booleans())
    fc = _new(nn.Linear(n, m, bias=bias))
    _fill(draw, fc)
    desc = f"linear({n}->{m}{' +b' if bias else ''})"
    act = None
    if draw(st.booleans()):
        kind = draw(st.sampled_from(gate_kinds(True, True)))
        act = make_gate(kind)
        desc += f" {kind}"
    return LinearUnit(fc, act), (m,), desc, act is None


def units_for(shape: tuple[int, ...], **kw: Any) -> st.SearchStrategy:
    return conv_units(shape, **kw) if len(shape) == 3 else linear_units(shape, **kw)


@st.composite
def pools(draw: Any, shape: tuple[int, ...]):
    c, h, w = shape
    kind = draw(st.sampled_from(["max", "avg"]))
    return Pool(kind), (c, h // 2, w // 2), f"{kind}pool2", False


@st.composite
def scales(draw: Any, shape: tuple[int, ...]):
    c = draw(st.sampled_from(SCALES))
    return Scale(c), shape, f"{c}*h", True


@st.composite
def group_norms(draw: Any, shape: tuple[int, ...]):
    c, h, w = shape
    groups = draw(st.sampled_from(sorted({1, c} if h * w > 1 else {1})))
    gn = _new(nn.GroupNorm(groups, c))
    _fill(draw, gn)
    return gn, shape, f"groupnorm({groups}g)", True


@st.composite
def layer_norms(draw: Any, shape: tuple[int, ...]):
    ln = _new(nn.LayerNorm(shape[0], elementwise_affine=True))
    _fill(draw, ln)
    return ln, shape, "layernorm", True


@st.composite
def residuals(draw: Any, shape: tuple[int, ...]):
    """h + f(h), f: one or two units keeping the shape (the first may change the channels/width)."""
    image = len(shape) == 3
    n_units = draw(st.integers(1, 2))
    if image:
        mods, descs, s = [], [], shape
        for i in range(n_units):
            last = i == n_units - 1
            m, s, d, _ = draw(conv_units(s, same_size=True, c_out=shape[0] if last else None))
            mods.append(m)
            descs.append(d)
    else:
        mods, descs, s = [], [], shape
        for i in range(n_units):
            last = i == n_units - 1
            m, s, d, _ = draw(linear_units(s, n_out=shape[0] if last else None))
            mods.append(m)
            descs.append(d)
    f = mods[0] if len(mods) == 1 else nn.Sequential(*mods)
    style = draw(st.sampled_from(["add", "iadd"]))
    return Residual(f, style), shape, f"res[{style}]({'; '.join(descs)})", True


def _cat_room(shape: tuple[int, ...]) -> int:
    """How many channels / features the two branches of a cat may have together."""
    if len(shape) == 3:
        return MAX_UNITS // (shape[1] * shape[2])
    return MAX_VEC


@st.composite
def concats(draw: Any, shape: tuple[int, ...]):
    """torch.cat([a(h), b(h)], 1) with a the identity or a unit, b a unit (spatial size kept)."""
    image = len(shape) == 3
    room = _cat_room(shape)
    identity = shape[0] < room and draw(st.booleans())
    if identity:
        a, ca, da = nn.Identity(), shape[0], "h"
    else:
        ua = draw(st.integers(1, min(3 if image else 5, room - 1)))
        a, sa, da, _ = draw(conv_units(shape, same_size=True, c_out=ua) if image else linear_units(shape, n_out=ua))
        ca = sa[0]
    cb = draw(st.integers(1, max(1, min(3 if image else 5, room - ca))))
    b, sb, db, _ = draw(conv_units(shape, same_size=True, c_out=cb) if image else linear_units(shape, n_out=cb))
    out = (ca + cb, *shape[1:])
    return Concat(a, b), out, f"cat[{da} | {db}]", False


def node_strategies(shape: tuple[int, ...], after_linear: bool, fresh: bool) -> list[st.SearchStrategy]:
    """The op kinds possible at ``shape``, simplest first (shrinking goes to the first)."""
    image = len(shape) == 3
    out = [units_for(shape), gates(shape, after_linear, fresh), scales(shape)]
    if image:
        if shape[1] >= 2:
            out.append(pools(shape))
        c, h, w = shape
        if h * w > 1 or c > 1:  # group_norm needs more than one value per group
            out.append(group_norms(shape))
    else:
        out.append(layer_norms(shape))
    out.append(residuals(shape))
    if _cat_room(shape) >= 2:
        out.append(concats(shape))
    return out


@st.composite
def nodes(draw: Any, shape: tuple[int, ...], after_linear: bool, fresh: bool):
    return draw(st.one_of(node_strategies(shape, after_linear, fresh)))


# -------------------------------------------------------------------------------------- the strategy


EXACT_GATES = ("relu", "relu_", "relu6", "hardtanh")  # dyadic in, dyadic out


def _exact(m: nn.Module) -> bool:
    """Whether ``m`` maps dyadic inputs to dyadic outputs exactly in float64 (for small values)."""
    if isinstance(m, (ConvUnit, LinearUnit)):
        return m.act is None or _exact(m.act)
    if isinstance(m, Gate):
        return m.kind in EXACT_GATES
    if isinstance(m, (nn.ReLU, Pool, Scale, nn.Identity)):
        return True
    if isinstance(m, Residual):
        return _exact(m.f)
    if isinstance(m, Concat):
        return _exact(m.a) and _exact(m.b)
    if isinstance(m, nn.Sequential):
        return all(_exact(c) for c in m)
    return False


def _tie_bias(m: nn.Module) -> Tensor | None:
    """The bias a tie is forced with: the BatchNorm's when there is one, else the conv's / fc's."""
    if isinstance(m, ConvUnit):
        return m.bn.bias if m.bn is not None else m.conv.bias
    if isinstance(m, LinearUnit):
        return m.fc.bias
    return None


@torch.no_grad()
def _pre_activation(m: nn.Module, h: Tensor) -> Tensor:
    if isinstance(m, ConvUnit):
        z = m.conv(h)
        return m.bn(z) if m.bn is not None else z
    return m.fc(h)


@st.composite
def forced_ties(draw: Any, mods: list[nn.Module], x: Tensor) -> str:
    """Maybe shift one bias of a top-level unit whose input is exact (every node before it maps dyadics
    to dyadics) so that the unit's pre-activation is exactly 0 at ``x`` somewhere: a tie z = 0. Every
    value is dyadic and an eval BatchNorm is an exact dyadic affine map here, so the shift is exact."""
    candidates = []
    for i, m in enumerate(mods):
        if _tie_bias(m) is not None:
            candidates.append(i)
        if not _exact(m):
            break
    if not candidates or not draw(st.booleans()):
        return ""
    i = draw(st.sampled_from(candidates))
    for m in mods:
        m.eval()
    with torch.no_grad():
        h = x[None]
        for m in mods[:i]:
            h = m(h)
        z = _pre_activation(mods[i], h)[0]
        z = z.reshape(z.shape[0], -1)
        ch = draw(st.integers(0, z.shape[0] - 1))
        pos = draw(st.integers(0, z.shape[1] - 1))
        _tie_bias(mods[i])[ch] -= z[ch, pos]
    return f"tie at node {i} channel {ch} position {pos}"


@st.composite
def image_models(draw: Any, max_nodes: int = 6, dtype: torch.dtype = torch.float64) -> RandomModel:
    c, side = draw(st.integers(1, 2)), draw(st.integers(4, 6))
    return draw(_chain_models((c, side, side), max_nodes, dtype))


@st.composite
def vector_models(draw: Any, max_nodes: int = 6, dtype: torch.dtype = torch.float64) -> RandomModel:
    return draw(_chain_models((draw(st.integers(1, 5)),), max_nodes, dtype))


@st.composite
def _chain_models(draw: Any, in_shape: tuple[int, ...], max_nodes: int, dtype: torch.dtype) -> RandomModel:
    image = len(in_shape) == 3
    x = torch.from_numpy(draw(dyadic_arrays(in_shape)))
    n_nodes = draw(st.integers(1, max(1, max_nodes)))
    mods, descs = [], []
    shape, after_linear, fresh = in_shape, False, False  # the model input: no in-place op on it
    for _ in range(n_nodes):
        m, shape, d, after_linear = draw(nodes(shape, after_linear, fresh))
        mods.append(m)
        descs.append(d)
        fresh = True
    tie = draw(forced_ties(mods, x))
    if image:
        head = draw(st.sampled_from(["mean", "adaptive", "flatten"]))
        features = shape[0] if head != "flatten" else int(np.prod(shape))
    else:
        head, features = "none", shape[0]
    classes = draw(st.integers(1, 3))
    fc = _new(nn.Linear(features, classes, bias=draw(st.booleans())))
    _fill(draw, fc)
    model = RandomNet(mods, head, fc).to(dtype).eval()
    target = draw(st.integers(0, classes - 1))
    fam = "image" if image else "vector"
    desc = (f"{fam} x{list(in_shape)} -> " + " -> ".join(descs)
            + f" -> head {head} -> linear({features}->{classes}{' +b' if fc.bias is not None else ''})"
            + (f"; {tie}" if tie else ""))
    return RandomModel(model, x.to(dtype), target, desc)


def random_models(max_nodes: int = 6, dtype: torch.dtype = torch.float64,
                  family: str | None = None) -> st.SearchStrategy[RandomModel]:
    """Small random DAG models (1..``max_nodes`` nodes before the head) with an input and a target.
    ``family``: "image", "vector" or None (both)."""
    if family == "image":
        return image_models(max_nodes, dtype)
    if family == "vector":
        return vector_models(max_nodes, dtype)
    if family is not None:
        raise ValueError(f"family must be 'image', 'vector' or None, got {family!r}")
    return st.one_of(vector_models(max_nodes, dtype), image_models(max_nodes, dtype))
