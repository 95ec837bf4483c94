"""General models (MLPs, CNNs, residual blocks) read as frozen linear layers and gates.

This extends :mod:`backplay.gpu.layers` (which reads Linear/ReLU/Softplus chains for ``occupation``
and ``interval_bounds``) to the layers of the routing rules (THEORY.md sections 5 and 7):

* Linear, Conv2d (BatchNorm1d / BatchNorm2d in eval mode that directly follow them are merged into
  detached copies of their weights: the model is untouched), AvgPool2d, AdaptiveAvgPool2d (linear
  maps with positive weights, no bias), MaxPool2d (a frozen 0/1 selection of the argmax at the
  explained input: winner takes all), Flatten (a reshape of the next layer's input), ReLU / Softplus
  (the gate of the preceding layer), Identity / Dropout (the identity; the explained function is the
  eval-mode net whatever the training flags), and :class:`backplay.gpu.Residual` blocks.
* Every layer is an :class:`LinearOp` ``z = A y + b`` that applies itself with the parts of its weight
  (``"W"``, ``"pos"`` = W+, ``"neg"`` = W-, ``"abs"`` = |W|, ``"ipos"`` = 1{W > 0}, ``"ineg"`` =
  1{W < 0}) and their transposes (explicit for dense maps, a vector-Jacobian product of the linear
  map for convolutions and pools: everything detached, no hook).

Layer numbering (``Trace.layers``, ``explain``'s report ``layers``, :func:`unroll`): one layer per
Linear / Conv2d / pool module (plus one add node per Residual block), torch order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from backplay.gpu.layers import Gate, LayerTrace, LinearGate, ReLUGate, SoftplusGate, Trace, _is_plain
from backplay.gpu.modules import Residual

Tensor = torch.Tensor

__all__ = [
    "LinearOp", "DenseOp", "ConvOp", "AvgPoolOp", "AdaptiveAvgPoolOp", "Selection", "AddOp",
    "GraphNetwork", "ResidualTrace", "read_graph", "GRAPH_MODULES",
]

GRAPH_MODULES = (
    "Linear, Conv2d, BatchNorm1d/2d (directly after Linear/Conv2d), AvgPool2d, AdaptiveAvgPool2d, "
    "MaxPool2d, Flatten, ReLU, Softplus, Identity, Dropout, backplay.gpu.Residual, nested Sequential"
)
PARTS = ("W", "pos", "neg", "abs", "ipos", "ineg")


def _vjp(fn, in_shape: tuple, g: Tensor) -> Tensor:
    """Transpose of the linear map ``fn`` (batch first) applied to ``g``."""
    with torch.enable_grad():
        y0 = torch.zeros((g.shape[0],) + tuple(in_shape), dtype=g.dtype, device=g.device,
                         requires_grad=True)
        out = fn(y0)
        if not out.requires_grad:  # a zero map
            return torch.zeros_like(y0).detach()
        (gi,) = torch.autograd.grad(out, y0, g, allow_unused=True)
    return torch.zeros_like(y0).detach() if gi is None else gi.detach()


# --------------------------------------------------------------------------------------------
# frozen linear maps
# --------------------------------------------------------------------------------------------
class LinearOp:
    """``z = A y + b``; ``apply(y, part)`` (no bias) and ``transpose(g, part)``; ``in_shape`` per sample."""

    bias: Tensor | None = None
    in_shape: tuple = ()

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        raise NotImplementedError

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        return _vjp(lambda y: self.apply(y, part), self.in_shape, g)

    # the interface of backplay.gpu.layers.AffineMap used by Gradient / GxI / LRP0
    def forward(self, y: Tensor, weight: Any = None, bias: bool = True) -> Tensor:
        z = self.apply(y)
        b = self.bias_like(z) if bias else None
        return z if b is None else z + b

    def adjoint(self, g: Tensor, weight: Any = None) -> Tensor:
        if weight is not None:
            raise TypeError("use transpose(g, part) on general layer maps")
        return self.transpose(g, "W")

    def bias_like(self, z: Tensor) -> Tensor | None:
        return None if self.bias is None else self.bias.expand_as(z)

    def bound(self, in_shape: tuple) -> "LinearOp":
        self.in_shape = tuple(in_shape)
        return self

    def drop_parts(self) -> None:
        """Free the weight parts built for the routing laws (they are rebuilt when next used)."""

    # the two parts of the map at once (the routing laws): ind=False W+ / W-, ind=True 1{W>0} / 1{W<0}
    def pair(self, y: Tensor, ind: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(A+ y, A- y)`` without bias; the second is ``None`` where the part is identically 0."""
        a, b = ("ipos", "ineg") if ind else ("pos", "neg")
        return self.apply(y, a), self.apply(y, b)

    def pair_t(self, g: Tensor, h: Tensor | None, ind: bool = False) -> Tensor:
        """``A+^T g + A-^T h`` (``h`` None: 0)."""
        a, b = ("ipos", "ineg") if ind else ("pos", "neg")
        out = self.transpose(g, a)
        return out if h is None else out + self.transpose(h, b)

    def cross(self, a: Tensor, c: Tensor, ind: bool = False) -> tuple[Tensor, Tensor]:
        """``(A+ a + A- c, A+ c + A- a)`` (the branch sums of y = a + c split by sign)."""
        Pa, Na = self.pair(a, ind)
        Pc, Nc = self.pair(c, ind)
        return (Pa if Nc is None else Pa + Nc), (Pc if Na is None else Pc + Na)

    def cross_t(self, g: Tensor, h: Tensor, ind: bool = False) -> tuple[Tensor, Tensor]:
        """``(A+^T g + A-^T h, A-^T g + A+^T h)``."""
        return self.pair_t(g, h, ind), self.pair_t(h, g, ind)

    # the same on one buffer holding [g, h] along dim 1 (g = buf[:, :n], h = buf[:, n:])
    def pair_t_buf(self, buf: Tensor, n: int) -> Tensor:
        return self.pair_t(buf[:, :n], buf[:, n:])

    def cross_t_buf(self, buf: Tensor, n: int) -> tuple[Tensor, Tensor]:
        return self.cross_t(buf[:, :n], buf[:, n:])


class _Lazy(dict):
    """A dict whose values are made on first access by ``make(key)``."""

    def __init__(self, make) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key):
        v = self[key] = self._make(key)
        return v


_PART_FNS = {
    "pos": lambda w: w.clamp_min(0), "neg": lambda w: w.clamp_max(0), "abs": lambda w: w.abs(),
    "ipos": lambda w: (w > 0).to(w.dtype), "ineg": lambda w: (w < 0).to(w.dtype),
}


class _Parts(_Lazy):
    def __init__(self, w: Tensor) -> None:
        super().__init__(lambda name: _PART_FNS[name](w))
        self["W"] = w


class _WeightOp(LinearOp):
    weight: Tensor

    def drop_parts(self) -> None:
        for name in ("parts", "stacked", "crossed"):
            self.__dict__.pop(name, None)

    @cached_property
    def parts(self) -> "_Parts":
        """The parts of the weight by name, each computed once, when first used."""
        return _Parts(self.weight)

    @cached_property
    def stacked(self) -> "_Lazy":
        """The two parts stacked along the output dimension (one matmul / convolution for both)."""
        parts = self.parts  # not self: no reference cycle, the op is freed as soon as it is dropped

        def make(ind: bool) -> Tensor:
            a, b = ("ipos", "ineg") if ind else ("pos", "neg")
            return torch.cat([parts[a], parts[b]], 0)
        return _Lazy(make)

    @cached_property
    def crossed(self) -> "_Lazy":
        """[[A+, A-], [A-, A+]]: rows = output parts, columns = the two input halves (also the
        conv_transpose2d weight of cross_t)."""
        parts = self.parts  # not self (no reference cycle)

        def make(ind: bool) -> Tensor:
            a, b = ("ipos", "ineg") if ind else ("pos", "neg")
            pa, pb = parts[a], parts[b]
            return torch.cat([torch.cat([pa, pb], 1), torch.cat([pb, pa], 1)], 0)
        return _Lazy(make)


class DenseOp(_WeightOp):
    """Linear: z = y W^T + b."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        return F.linear(y, self.parts[part])

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        return g @ self.parts[part]

    def pair(self, y: Tensor, ind: bool = False) -> tuple[Tensor, Tensor | None]:
        n = self.weight.shape[0]
        out = F.linear(y, self.stacked[ind])
        return out[..., :n], out[..., n:]

    def pair_t(self, g: Tensor, h: Tensor | None, ind: bool = False) -> Tensor:
        a, b = ("ipos", "ineg") if ind else ("pos", "neg")
        out = g @ self.parts[a]
        return out if h is None else out.addmm_(h, self.parts[b])

    def cross(self, a: Tensor, c: Tensor, ind: bool = False) -> tuple[Tensor, Tensor]:
        n = self.weight.shape[0]
        out = F.linear(torch.cat([a, c], -1), self.crossed[ind])
        return out[..., :n], out[..., n:]

    def cross_t(self, g: Tensor, h: Tensor, ind: bool = False) -> tuple[Tensor, Tensor]:
        m = self.weight.shape[1]
        out = torch.cat([g, h], -1) @ self.crossed[ind]
        return out[..., :m], out[..., m:]

    def pair_t_buf(self, buf: Tensor, n: int) -> Tensor:
        return buf @ self.stacked[False]

    def cross_t_buf(self, buf: Tensor, n: int) -> tuple[Tensor, Tensor]:
        m = self.weight.shape[1]
        out = buf @ self.crossed[False]
        return out[..., :m], out[..., m:]

    def __repr__(self) -> str:
        return f"DenseOp({self.weight.shape[1]} -> {self.weight.shape[0]})"


class ConvOp(_WeightOp):
    """Conv2d (zeros padding): the transpose is the vector-Jacobian product of the convolution."""

    def __init__(self, weight: Tensor, bias: Tensor | None, conv: nn.Conv2d) -> None:
        self.weight = weight
        self.bias = None if bias is None else bias.view(-1, 1, 1)
        self.kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        return F.conv2d(y, self.parts[part], None, **self.kw)

    def _tkw(self, g: Tensor) -> dict | None:
        """conv_transpose2d arguments giving back in_shape, or None (string padding: use the vjp)."""
        kw = self.kw
        pad = kw["padding"]
        if isinstance(pad, str) or len(self.in_shape) != 3:
            return None
        k = self.weight.shape[-2:]
        op = []
        for d in range(2):
            base = (g.shape[-2 + d] - 1) * kw["stride"][d] - 2 * pad[d] + kw["dilation"][d] * (k[d] - 1) + 1
            o = self.in_shape[1 + d] - base
            if not 0 <= o < max(kw["stride"][d], kw["dilation"][d]):
                return None
            op.append(o)
        return dict(stride=kw["stride"], padding=pad, output_padding=tuple(op), groups=kw["groups"],
                    dilation=kw["dilation"])

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        tkw = self._tkw(g)
        if tkw is None:
            return super().transpose(g, part)
        return F.conv_transpose2d(g, self.parts[part], None, **tkw)

    def pair(self, y: Tensor, ind: bool = False) -> tuple[Tensor, Tensor | None]:
        if self.kw["groups"] != 1:
            return super().pair(y, ind)
        n = self.weight.shape[0]
        out = F.conv2d(y, self.stacked[ind], None, **self.kw)
        return out[:, :n], out[:, n:]

    def pair_t(self, g: Tensor, h: Tensor | None, ind: bool = False) -> Tensor:
        tkw = self._tkw(g)
        if h is None or tkw is None or self.kw["groups"] != 1:
            return super().pair_t(g, h, ind)
        return F.conv_transpose2d(torch.cat([g, h], 1), self.stacked[ind], None, **tkw)

    def cross(self, a: Tensor, c: Tensor, ind: bool = False) -> tuple[Tensor, Tensor]:
        if self.kw["groups"] != 1:
            return super().cross(a, c, ind)
        n = self.weight.shape[0]
        out = F.conv2d(torch.cat([a, c], 1), self.crossed[ind], None, **self.kw)
        return out[:, :n], out[:, n:]

    def cross_t(self, g: Tensor, h: Tensor, ind: bool = False) -> tuple[Tensor, Tensor]:
        tkw = self._tkw(g)
        if tkw is None or self.kw["groups"] != 1:
            return super().cross_t(g, h, ind)
        m = self.weight.shape[1]
        out = F.conv_transpose2d(torch.cat([g, h], 1), self.crossed[ind], None, **tkw)
        return out[:, :m], out[:, m:]

    def pair_t_buf(self, buf: Tensor, n: int) -> Tensor:
        tkw = self._tkw(buf)
        if tkw is None or self.kw["groups"] != 1:
            return super().pair_t_buf(buf, n)
        return F.conv_transpose2d(buf, self.stacked[False], None, **tkw)

    def cross_t_buf(self, buf: Tensor, n: int) -> tuple[Tensor, Tensor]:
        tkw = self._tkw(buf)
        if tkw is None or self.kw["groups"] != 1:
            return super().cross_t_buf(buf, n)
        m = self.weight.shape[1]
        out = F.conv_transpose2d(buf, self.crossed[False], None, **tkw)
        return out[:, :m], out[:, m:]

    def __repr__(self) -> str:
        return f"ConvOp({tuple(self.weight.shape)}, {self.kw})"


class _PoolOp(LinearOp):
    """A linear pool with positive weights: W = W+ = |W|, W- = 0, no bias."""

    def pool(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def window_sum(self, y: Tensor) -> Tensor:
        """The map with every weight replaced by 1 (the indicator of the support)."""
        raise NotImplementedError

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        if part in ("W", "pos", "abs"):
            return self.pool(y)
        if part == "ipos":
            return self.window_sum(y)
        return torch.zeros_like(self.pool(y))

    def pair(self, y: Tensor, ind: bool = False) -> tuple[Tensor, Tensor | None]:
        return (self.window_sum(y) if ind else self.pool(y)), None

    def pair_t(self, g: Tensor, h: Tensor | None, ind: bool = False) -> Tensor:
        return self.transpose(g, "ipos" if ind else "pos")


class AvgPoolOp(_PoolOp):
    def __init__(self, m: nn.AvgPool2d) -> None:
        self.kw = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                       ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad,
                       divisor_override=m.divisor_override)

    def pool(self, y: Tensor) -> Tensor:
        return F.avg_pool2d(y, **self.kw)

    def window_sum(self, y: Tensor) -> Tensor:
        return F.avg_pool2d(y, **{**self.kw, "divisor_override": 1})


class AdaptiveAvgPoolOp(_PoolOp):
    def __init__(self, m: nn.AdaptiveAvgPool2d) -> None:
        self.output_size = m.output_size

    def pool(self, y: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(y, self.output_size)

    def window_sum(self, y: Tensor) -> Tensor:
        # sum over each bin = mean * bin size; bin [floor(i n/o), ceil((i+1) n/o))
        out = self.pool(y)
        H, W = y.shape[-2:]
        oh, ow = out.shape[-2:]

        def sizes(n: int, o: int) -> Tensor:
            return torch.tensor([-(-((i + 1) * n) // o) - (i * n) // o for i in range(o)],
                                dtype=y.dtype, device=y.device)

        return out * sizes(H, oh).view(-1, 1) * sizes(W, ow).view(1, -1)


class Selection(LinearOp):
    """MaxPool2d frozen at one input: z_i = y_{argmax(i)} (a 0/1 matrix), winner takes all."""

    def __init__(self, indices: Tensor, in_shape: tuple) -> None:
        self.indices = indices  # [B, C, oh, ow] into the flattened H*W of each channel
        self.in_shape = tuple(in_shape)

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        if part in ("neg", "ineg"):
            return torch.zeros(self.indices.shape, dtype=y.dtype, device=y.device)
        idx = self.indices
        return y.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        B, C = g.shape[:2]
        out = torch.zeros((B, C, self.in_shape[1] * self.in_shape[2]), dtype=g.dtype, device=g.device)
        if part not in ("neg", "ineg"):
            out.scatter_add_(2, self.indices.flatten(2), g.flatten(2))
        return out.view((B,) + self.in_shape)


class AddOp(LinearOp):
    """The add node of a residual block on the stacked input [B, 2, ...] (skip, body): weights 1, 1."""

    def __init__(self, in_shape: tuple) -> None:
        self.in_shape = tuple(in_shape)

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        if part in ("neg", "ineg"):
            return torch.zeros_like(y[:, 0])
        return y[:, 0] + y[:, 1]

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        if part in ("neg", "ineg"):
            g = torch.zeros_like(g)
        return torch.stack([g, g], dim=1)

    def pair(self, y: Tensor, ind: bool = False) -> tuple[Tensor, Tensor | None]:
        return y[:, 0] + y[:, 1], None

    def pair_t(self, g: Tensor, h: Tensor | None, ind: bool = False) -> Tensor:
        return torch.stack([g, g], dim=1)


# --------------------------------------------------------------------------------------------
# the model as items
# --------------------------------------------------------------------------------------------
@dataclass
class _Item:
    kind: str  # "linear", "conv", "avgpool", "adaptive", "maxpool", "residual"
    module: Any
    gate: Gate | None = None
    flatten_input: bool = False
    bn: Any = None
    body: list = field(default_factory=list)


@dataclass
class ResidualTrace:
    """A residual block of the explained pass: ``body`` (LayerTraces), then the add node ``add``
    (a LayerTrace whose input is the stacked (skip, body output), map :class:`AddOp`)."""

    input: Tensor
    body: list
    add: LayerTrace

    @property
    def y(self) -> Tensor:
        return self.add.y

    @property
    def z(self) -> Tensor:
        return self.add.z


def _unsupported(m: nn.Module) -> TypeError:
    return TypeError(
        f"unsupported module type {type(m).__name__} (supported: {GRAPH_MODULES}; subclasses that "
        "override forward are not supported)"
    )


def _leaves(module: nn.Module) -> list:
    if _is_plain(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


def read_items(model: nn.Module) -> list[_Item]:
    """Parse ``model`` (never modified) into items; TypeError / ValueError with the cause."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch nn.Module or a backplay.MLPSpec, got {type(model).__name__}")
    items: list[_Item] = []
    flat = False
    kinds = {nn.Linear: "linear", nn.Conv2d: "conv", nn.AvgPool2d: "avgpool",
             nn.AdaptiveAvgPool2d: "adaptive", nn.MaxPool2d: "maxpool"}
    for m in _leaves(model):
        kind = next((k for cls, k in kinds.items() if _is_plain(m, cls)), None)
        if kind is not None:
            if kind == "conv" and m.padding_mode != "zeros":
                raise TypeError(f"Conv2d with padding_mode={m.padding_mode!r} is not supported (zeros only)")
            items.append(_Item(kind, m, flatten_input=flat))
            flat = False
        elif _is_plain(m, Residual):
            if flat:
                raise TypeError("Flatten directly before a Residual block is not supported")
            body = read_items(m.body)
            items.append(_Item("residual", m, body=body))
        elif _is_plain(m, nn.BatchNorm1d) or _is_plain(m, nn.BatchNorm2d):
            name = type(m).__name__
            prev = items[-1] if items else None
            if prev is None or flat or prev.kind not in ("linear", "conv") or prev.gate is not None \
                    or prev.bn is not None:
                raise TypeError(f"{name} is supported only directly after a Linear or Conv2d layer "
                                "(it is merged into that layer)")
            if m.running_mean is None or m.running_var is None:
                raise TypeError(f"{name} without running statistics cannot be merged")
            prev.bn = m
        elif _is_plain(m, nn.ReLU) or _is_plain(m, nn.Softplus):
            name = type(m).__name__
            if not items or flat:
                raise ValueError(f"{name} must follow a Linear, Conv2d, pool or Residual layer")
            if items[-1].gate is not None:
                raise ValueError(f"{name} follows another activation; each layer takes at most one")
            if isinstance(m, nn.ReLU):
                items[-1].gate = ReLUGate()
            else:
                beta = float(m.beta)
                if not beta > 0 or beta == float("inf"):
                    raise ValueError(f"Softplus needs a finite beta > 0, got {beta}")
                items[-1].gate = SoftplusGate(1.0 / beta)
        elif _is_plain(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise TypeError("only Flatten(start_dim=1, end_dim=-1) is supported")
            flat = True
        elif _is_plain(m, nn.Identity) or _is_plain(m, nn.Dropout):
            continue
        else:
            raise _unsupported(m)
    if not items:
        raise ValueError("the model contains no Linear, Conv2d or pool layer")
    return items


def _tensors(items: list[_Item]):
    for it in items:
        if it.kind == "residual":
            yield from _tensors(it.body)
            continue
        for mod in (it.module, it.bn):
            if mod is None:
                continue
            for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if t is not None and t.is_floating_point():
                    yield name, t


def items_dtype(items: list[_Item], default: torch.dtype) -> torch.dtype:
    dtype = None
    for _, t in _tensors(items):
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return default if dtype is None else dtype


def check_items_device(items: list[_Item], device: torch.device) -> None:
    for name, t in _tensors(items):
        if t.device != device:
            raise ValueError(
                f"the model's parameters are on {t.device} ({name}) but the input is on {device}; "
                "move the model or the input so that they share one device"
            )


# --------------------------------------------------------------------------------------------
# the network: built ops and the forward trace
# --------------------------------------------------------------------------------------------
@dataclass
class _Built:
    kind: str
    op: Any  # LinearOp, or MaxPool2d kwargs
    gate: Gate
    flatten_input: bool
    body: list = field(default_factory=list)


def _build(items: list[_Item], dtype: torch.dtype) -> list[_Built]:
    out = []
    for it in items:
        gate = it.gate if it.gate is not None else LinearGate()
        m = it.module
        if it.kind == "residual":
            out.append(_Built("residual", None, gate, False, _build(it.body, dtype)))
            continue
        if it.kind in ("linear", "conv"):
            w = m.weight.detach().to(dtype).clone()
            b = None if m.bias is None else m.bias.detach().to(dtype).clone()
            if it.bn is not None:
                bn = it.bn
                var = bn.running_var.detach().to(dtype)
                mean = bn.running_mean.detach().to(dtype)
                s = 1.0 / torch.sqrt(var + bn.eps)
                if bn.weight is not None:
                    s = s * bn.weight.detach().to(dtype)
                w = w * s.view((-1,) + (1,) * (w.ndim - 1))
                b = ((b if b is not None else torch.zeros_like(mean)) - mean) * s
                if bn.bias is not None:
                    b = b + bn.bias.detach().to(dtype)
            op = DenseOp(w, b) if it.kind == "linear" else ConvOp(w, b, m)
        elif it.kind == "avgpool":
            op = AvgPoolOp(m)
        elif it.kind == "adaptive":
            op = AdaptiveAvgPoolOp(m)
        else:  # maxpool
            op = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                      dilation=m.dilation, ceil_mode=m.ceil_mode)
        out.append(_Built(it.kind, op, gate, it.flatten_input))
    return out


@dataclass
class GraphNetwork:
    """The read model: built items in torch order; :meth:`trace` runs one batched forward pass."""

    items: list
    dtype: torch.dtype

    def first_kind(self) -> str:
        it = self.items[0]
        while it.kind == "residual":
            it = it.body[0]
        return "flat" if it.flatten_input else it.kind

    def first_op(self):
        it = self.items[0]
        while it.kind == "residual":
            it = it.body[0]
        return it.op

    def trace(self, x: Tensor, gate: Any = None, lean: bool = False) -> Trace:
        """Forward pass of the batch ``x``; ``gate`` (optional) maps each activation gate to another
        (e.g. ReLU -> softplus_eps for the SoftplusGame surrogate). No autograd graph is kept.
        ``lean``: record only the layers' inputs and outputs (``z`` and ``p`` are ``None``; the
        routing laws need neither), which halves the memory the trace holds."""
        counter = [0]
        with torch.no_grad():
            records, _ = self._run(self.items, x, gate, counter, lean)
        tr = Trace(x, records)
        tr.network = self
        tr.n_layers = counter[0]
        return tr

    def _run(self, items: list, y: Tensor, gate: Any, counter: list, lean: bool = False
             ) -> tuple[list, Tensor]:
        records = []
        for it in items:
            g = it.gate
            if gate is not None and not isinstance(g, LinearGate):
                g = gate(g)
            if it.kind == "residual":
                body, yb = self._run(it.body, y, gate, counter, lean)
                if yb.shape != y.shape:
                    raise ValueError(f"a Residual body maps shape {tuple(y.shape[1:])} to "
                                     f"{tuple(yb.shape[1:])}; the skip needs the same shape")
                stacked = torch.stack([y, yb], dim=1)
                op = AddOp(tuple(stacked.shape[1:]))
                z = op.apply(stacked)
                y_next, p = g(z)
                counter[0] += 1
                add = LayerTrace(op, g, stacked, z, p, y_next)
                add.index, add.kind = counter[0], "add"
                records.append(ResidualTrace(y, body, add))
                y = y_next
                continue
            if it.flatten_input:
                y = y.flatten(1)
            if it.kind == "maxpool":
                z, idx = F.max_pool2d(y, return_indices=True, **it.op)
                op = Selection(idx, tuple(y.shape[1:]))
            else:
                op = it.op.bound(tuple(y.shape[1:])) if it.kind != "linear" else it.op
                op.in_shape = tuple(y.shape[1:])
                z = op.forward(y)
            if lean and type(g) is ReLUGate and it.kind in ("linear", "conv"):
                y_next, p = torch.relu_(z), None  # z is a fresh buffer, not kept in a lean trace
            else:
                y_next, p = g(z)
            if lean:
                z = p = None
            counter[0] += 1
            rec = LayerTrace(op, g, y, z, p, y_next)
            rec.index, rec.kind = counter[0], it.kind
            records.append(rec)
            y = y_next
        return records, y


def read_graph(model: nn.Module, dtype: torch.dtype | None = None) -> GraphNetwork:
    items = read_items(model)
    dt = items_dtype(items, torch.get_default_dtype()) if dtype is None else dtype
    return GraphNetwork(_build(items, dt), dt)


def softplus_surrogate(eps: float):
    """Gate map of the SoftplusGame surrogate: every activation replaced by softplus_eps."""
    sp = SoftplusGate(eps)
    return lambda g: sp
