"""The operations of the frozen extended graph (docs/theory.md section 11), as torch objects.

Every explained operation of a model read by :mod:`backplay.gpu.read` becomes one of:

* a **linear map** :class:`LinearOp` ``z = A y + b`` with constant coefficients (dense / matmul,
  convolution 1d-3d, average pools, mean and sum, an elementwise affine map, a frozen normaliser,
  a sum node, a max selection). A map applies itself with the parts of its coefficients
  (``"W"``; ``"pos"`` = W+, ``"neg"`` = W-, ``"abs"`` = |W|, ``"ipos"`` = 1{W > 0},
  ``"ineg"`` = 1{W < 0}, ``"sq"`` = W^2, ``"nz"`` = 1{W != 0}) and their transposes; the routing
  laws (docs/theory.md section 8) read the branch sums of a unit through these parts, the LRP zoo's
  WSquare and Flat rules (section 10) the last two;
* a **gate** :class:`Gate`: ``y = p z + c`` per unit with p frozen at the explained pass (section 3
  and 9): ReLU, LeakyReLU, ReLU6 / hardtanh, softplus (the game's own policies), GELU, SiLU, tanh
  and sigmoid (frozen gates, g = act(z) / z).

Everything here is detached arithmetic: no module, no hook, no autograd graph is kept (the
transposes that have no closed form are vector-Jacobian products of the linear map on zeros).
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any, Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "LinearOp", "DenseOp", "ConvOp", "WeightOp", "PoolOp", "ScaleOp", "NormOp", "AddOp", "Selection",
    "IdentityOp", "Gate", "LinearGate", "ReLUGate", "LeakyReLUGate", "ClampGate", "SoftplusGate",
    "GELUGate", "FrozenGate", "FunctionGate", "AttentionOp", "PARTS", "dense_matrix", "edges_of_matrix",
]

PARTS = ("W", "pos", "neg", "abs", "ipos", "ineg", "sq", "nz")

_PART_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "W": lambda w: w, "pos": lambda w: w.clamp_min(0), "neg": lambda w: w.clamp_max(0),
    "abs": lambda w: w.abs(), "ipos": lambda w: (w > 0).to(w.dtype), "ineg": lambda w: (w < 0).to(w.dtype),
    "sq": lambda w: w * w, "nz": lambda w: (w != 0).to(w.dtype),
}
#: the parts that are indicators (0/1 whatever the coefficient's size)
_INDICATORS = ("ipos", "ineg", "nz")


def vjp(fn: Callable[[Tensor], Tensor], in_shape: tuple, g: Tensor) -> Tensor:
    """Transpose of the linear map ``fn`` (batch first, per-sample input shape ``in_shape``) at ``g``."""
    with torch.enable_grad():
        y0 = torch.zeros((g.shape[0],) + tuple(in_shape), dtype=g.dtype, device=g.device,
                         requires_grad=True)
        out = fn(y0)
        if not out.requires_grad:  # a zero map
            return torch.zeros_like(y0).detach()
        (gi,) = torch.autograd.grad(out, y0, g.reshape(out.shape), allow_unused=True)
    # a fresh, dense tensor (autograd may hand back an expanded view, e.g. for a mean)
    return torch.zeros_like(y0).detach() if gi is None else gi.detach().contiguous()


_BASIS_CHUNK = 256


def dense_matrix(op: "LinearOp", y: Tensor) -> Tensor:
    """The matrix of ``op`` per sample at ``y``'s batch, [B, n_out, n_in] (columns: the map applied
    to the basis vectors)."""
    B, shape = y.shape[0], tuple(y.shape[1:])
    n = math.prod(shape)
    cols = []
    for start in range(0, n, _BASIS_CHUNK):  # the basis a chunk at a time: never the n x n identity
        k = min(_BASIS_CHUNK, n - start)
        basis = torch.zeros((k, n), dtype=y.dtype, device=y.device)
        basis[torch.arange(k), torch.arange(start, start + k)] = 1
        cols.append(torch.func.vmap(op.apply)(basis.reshape((k, 1) + shape).expand((k, B) + shape)).reshape(k, B, -1))
    return torch.cat(cols).permute(1, 2, 0)


def edges_of_matrix(W: Tensor) -> tuple[Tensor, Tensor]:
    """``(coef, idx)`` of a matrix [B, n_out, n_in]: each row's nonzero entries (the union over the
    batch), padded with coefficient 0 to the largest row."""
    nz = (W != 0).any(0)  # [n_out, n_in]
    K = max(int(nz.sum(1).max()) if nz.numel() else 0, 1)
    idx = torch.sort(nz.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :K]
    return W.gather(2, idx.unsqueeze(0).expand(W.shape[0], -1, -1)), idx


# --------------------------------------------------------------------------------------------
# linear maps
# --------------------------------------------------------------------------------------------
class LinearOp:
    """``z = A y + b``: ``apply(y, part)`` (no bias) and ``transpose(g, part)``; ``in_shape`` per sample.

    ``pass_through``: relevance passes by the transpose whatever the rule (a max selection, the
    identity map of a standalone gate): the rows are selections, not units with contributions."""

    bias: Tensor | None = None
    in_shape: tuple = ()
    pass_through: bool = False

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        raise NotImplementedError

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        return vjp(lambda y: self.apply(y, part), self.in_shape, g)

    def forward(self, y: Tensor, bias: bool = True) -> Tensor:
        z = self.apply(y)
        b = self.bias_like(z) if bias else None
        return z if b is None else z + b

    def bias_like(self, z: Tensor) -> Tensor | None:
        return None if self.bias is None else self.bias.expand_as(z)

    def bound(self, in_shape: tuple) -> "LinearOp":
        self.in_shape = tuple(in_shape)
        return self

    def drop_parts(self) -> None:
        """Free the coefficient parts built for the routing laws (they are rebuilt when next used)."""

    def edges(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """The map's coefficients edge by edge at the input ``y`` [B, *in_shape]: ``(coef, idx)`` with
        ``idx`` [n_out, K] the flat input units of each output unit's K incoming edges and ``coef``
        [B or 1, n_out, K] their coefficients (padding: coefficient 0). This default builds the map's
        matrix per sample (its columns: the map applied to the basis) and keeps each row's nonzeros;
        the maps with a known structure (dense, convolution, attention, scale, norm, sum) list their
        edges directly."""
        return edges_of_matrix(dense_matrix(self, y))

    # the two parts of the map at once (the routing laws): ind=False W+ / W-, ind=True 1{W>0} / 1{W<0}
    def pair(self, y: Tensor, ind: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(A+ y, A- y)`` without bias; the second is ``None`` where the part is identically 0. Fresh
        tensors, as :meth:`cross`'s and the stacked forms' (the routing sweep writes over them): the
        halves of :meth:`stacked_pair` where the map stacks its parts."""
        buf = self.stacked_pair(y, ind)
        if buf is not None:
            return self.halves(buf)
        a, b = ("ipos", "ineg") if ind else ("pos", "neg")
        return self.apply(y, a), self.apply(y, b)

    def pair_t(self, g: Tensor, h: Tensor | None, ind: bool = False) -> Tensor:
        """``A+^T g + A-^T h`` (``h`` None: 0)."""
        a, b = ("ipos", "ineg") if ind else ("pos", "neg")
        out = self.transpose(g, a)
        return out if h is None else out + self.transpose(h, b)

    def cross(self, a: Tensor, c: Tensor, ind: bool = False) -> tuple[Tensor, Tensor]:
        """``(A+ a + A- c, A+ c + A- a)`` (the branch sums of y = a + c split by sign)."""
        ac = self.stack(a, c)
        if ac is not None:
            return self.halves(self.stacked_cross(ac, ind))
        Pa, Na = self.pair(a, ind)
        Pc, Nc = self.pair(c, ind)
        return (Pa if Nc is None else Pa + Nc), (Pc if Na is None else Pc + Na)

    def cross_t(self, g: Tensor, h: Tensor, ind: bool = False) -> tuple[Tensor, Tensor]:
        """``(A+^T g + A-^T h, A-^T g + A+^T h)``."""
        return self.pair_t(g, h, ind), self.pair_t(h, g, ind)

    # the stacked form: both halves as one tensor (one product each way); None where the map gives them apart
    def stacked_pair(self, y: Tensor, ind: bool = False) -> Tensor | None:
        """``[A+ y, A- y]`` as one tensor (:meth:`halves`), or None (then :meth:`pair` applies the parts
        apart)."""
        return None

    #: the dimension along which the map reads a stacked input [a, c] in one product (:meth:`stacked_cross`);
    #: None: the map gives its parts apart
    stack_dim: int | None = None

    def stack(self, a: Tensor, c: Tensor) -> Tensor | None:
        """``[a, c]`` as one tensor along :attr:`stack_dim` (None where the map has none)."""
        return None if self.stack_dim is None else torch.cat([a, c], self.stack_dim)

    def split(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(y+, y-, [y+, y-])``: the sign split of y; where the map has a :attr:`stack_dim`, y+ and y-
        are written as the halves of one stacked tensor (no concatenation), else the third is None."""
        d = self.stack_dim
        if d is None:
            return y.clamp_min(0), y.clamp_max(0), None
        shape = list(y.shape)
        shape[d] *= 2
        yy = torch.empty(shape, dtype=y.dtype, device=y.device)
        yp, yn = yy.chunk(2, dim=d)
        torch.clamp_min(y, 0, out=yp)
        torch.clamp_max(y, 0, out=yn)
        return yp, yn, yy

    def stacked_cross(self, ac: Tensor, ind: bool = False) -> Tensor:
        """``[A+ a + A- c, A+ c + A- a]`` as one tensor (:meth:`halves`) for the stacked ``ac`` = [a, c]
        (:meth:`stack`, :meth:`split`): one product. Only on a map with a :attr:`stack_dim`."""
        raise TypeError(f"{type(self).__name__} reads no stacked input (stack_dim is None): use cross()")

    def halves(self, buf: Tensor) -> tuple[Tensor, Tensor]:
        """The two halves (views) of a stacked tensor: along dim 1 (the last dim for a dense map)."""
        return buf.chunk(2, dim=1)

    def pair_t_buf(self, buf: Tensor) -> Tensor:
        """``A+^T g + A-^T h`` for the stacked ``buf`` = [g, h] (:meth:`halves`)."""
        return self.pair_t(*self.halves(buf))

    def cross_t_buf(self, buf: Tensor) -> tuple[Tensor, Tensor]:
        """``(A+^T g + A-^T h, A-^T g + A+^T h)`` for the stacked ``buf`` = [g, h]."""
        return self.cross_t(*self.halves(buf))


class _Lazy(dict):
    """A dict whose values are made on first access by ``make(key)``."""

    def __init__(self, make: Callable[[Any], Any]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key: Any) -> Any:
        v = self[key] = self._make(key)
        return v


class _Parts(_Lazy):
    def __init__(self, w: Tensor) -> None:
        super().__init__(lambda name: _PART_FNS[name](w))
        self["W"] = w


class WeightOp(LinearOp):
    """A map bilinear in a constant coefficient tensor and the input: ``fn(y, weight)`` (every
    output is a sum of products weight entry x input entry, so a part of the map is ``fn`` with
    that part of the weight: matmul with a constant operand, an elementwise product)."""

    weight: Tensor

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], weight: Tensor,
                 bias: Tensor | None = None, label: str = "map") -> None:
        self.fn, self.weight, self.bias, self.label = fn, weight, bias, label

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        return self.fn(y, self.parts[part])

    def drop_parts(self) -> None:
        for name in ("parts", "stacked", "crossed"):
            self.__dict__.pop(name, None)

    @cached_property
    def parts(self) -> _Parts:
        """The parts of the weight by name, each computed once, when first used."""
        return _Parts(self.weight)

    @cached_property
    def stacked(self) -> _Lazy:
        """The two parts stacked along the output dimension (one matmul / convolution for both)."""
        parts = self.parts  # not self: no reference cycle, the op is freed as soon as it is dropped

        w = self.weight

        def make(ind: bool) -> Tensor:
            if ind:
                return torch.cat([parts["ipos"], parts["ineg"]], 0)
            out = w.new_empty((2 * w.shape[0],) + tuple(w.shape[1:]))  # [W+; W-] written in place
            torch.clamp_min(w, 0, out=out[:w.shape[0]])
            torch.clamp_max(w, 0, out=out[w.shape[0]:])
            return out
        return _Lazy(make)

    @cached_property
    def crossed(self) -> _Lazy:
        """[[A+, A-], [A-, A+]]: rows = output parts, columns = the two input halves."""
        parts = self.parts  # not self (no reference cycle)

        def make(ind: bool) -> Tensor:
            a, b = ("ipos", "ineg") if ind else ("pos", "neg")
            pa, pb = parts[a], parts[b]
            return torch.cat([torch.cat([pa, pb], 1), torch.cat([pb, pa], 1)], 0)
        return _Lazy(make)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label}, {tuple(self.weight.shape)})"


class DenseOp(WeightOp):
    """Linear on the last dimension: z = y W^T + b (any leading dimensions: tokens, positions)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight, self.bias, self.label = weight, bias, "linear"

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        return F.linear(y, self.parts[part])

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        return g @ self.parts[part]

    def stacked_pair(self, y: Tensor, ind: bool = False) -> Tensor:
        return F.linear(y, self.stacked[ind])

    stack_dim = -1

    def stacked_cross(self, ac: Tensor, ind: bool = False) -> Tensor:
        return F.linear(ac, self.crossed[ind])

    def halves(self, buf: Tensor) -> tuple[Tensor, Tensor]:
        return buf.chunk(2, dim=-1)

    def pair_t(self, g: Tensor, h: Tensor | None, ind: bool = False) -> Tensor:
        a, b = ("ipos", "ineg") if ind else ("pos", "neg")
        out = g @ self.parts[a]
        if h is None:
            return out
        return out.addmm_(h, self.parts[b]) if out.ndim == 2 else out + h @ self.parts[b]

    def cross_t(self, g: Tensor, h: Tensor, ind: bool = False) -> tuple[Tensor, Tensor]:
        m = self.weight.shape[1]
        out = torch.cat([g, h], -1) @ self.crossed[ind]
        return out[..., :m], out[..., m:]

    # the stacked buffer [g, h] lies along the last dimension
    def pair_t_buf(self, buf: Tensor) -> Tensor:
        return buf @ self.stacked[False]

    def cross_t_buf(self, buf: Tensor) -> tuple[Tensor, Tensor]:
        return self.halves(buf @ self.crossed[False])

    def edges(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Output (t, o) reads the inputs (t, k), k < d_in, with W_ok (t: the leading positions)."""
        d_out, d_in = self.weight.shape
        T = math.prod(y.shape[1:-1])
        base = torch.arange(T, device=y.device).repeat_interleave(d_out).unsqueeze(1) * d_in
        idx = base + torch.arange(d_in, device=y.device)
        return self.weight.to(y.dtype).repeat(T, 1).unsqueeze(0), idx

    def __repr__(self) -> str:
        return f"DenseOp({self.weight.shape[1]} -> {self.weight.shape[0]})"


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class ConvOp(WeightOp):
    """Convolution in 1-3 dimensions (zeros padding; other padding modes are a pad layout step
    before it), groups, stride, dilation; the transpose is the transposed convolution."""

    def __init__(self, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any,
                 groups: int) -> None:
        self.weight = weight
        self.dims = d = weight.ndim - 2
        self.bias = None if bias is None else bias.view((-1,) + (1,) * d)
        tup = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (int(v),) * d  # noqa: E731
        if isinstance(padding, (list, tuple)) and len(padding) == 1 and d > 1:
            padding = tuple(padding) * d
        self.kw = dict(stride=tup(stride), padding=padding if isinstance(padding, str) else tup(padding),
                       dilation=tup(dilation), groups=int(groups))
        if len(self.kw["stride"]) == 1 and d > 1:
            self.kw["stride"] = self.kw["stride"] * d
        if len(self.kw["dilation"]) == 1 and d > 1:
            self.kw["dilation"] = self.kw["dilation"] * d
        self.label = f"conv{d}d"

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        return _CONV[self.dims](y, self.parts[part], None, **self.kw)

    def _tkw(self, g: Tensor) -> dict | None:
        """Transposed-convolution arguments giving back in_shape, or None (use the vjp)."""
        kw = self.kw
        pad = kw["padding"]
        d = self.dims
        if isinstance(pad, str) or len(self.in_shape) != d + 1:
            return None
        k = self.weight.shape[-d:]
        op = []
        for i in range(d):
            base = (g.shape[-d + i] - 1) * kw["stride"][i] - 2 * pad[i] + kw["dilation"][i] * (k[i] - 1) + 1
            o = self.in_shape[1 + i] - base
            if not 0 <= o < max(kw["stride"][i], kw["dilation"][i]):
                return None
            op.append(o)
        return dict(stride=kw["stride"], padding=pad, output_padding=tuple(op), groups=kw["groups"],
                    dilation=kw["dilation"])

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        tkw = self._tkw(g)
        if tkw is None:
            return super().transpose(g, part)
        return _CONV_T[self.dims](g, self.parts[part], None, **tkw)

    def stacked_pair(self, y: Tensor, ind: bool = False) -> Tensor | None:
        if self.kw["groups"] != 1:
            return None
        return _CONV[self.dims](y, self.stacked[ind], None, **self.kw)

    @property
    def stack_dim(self) -> int | None:  # type: ignore[override]
        return 1 if self.kw["groups"] == 1 else None

    def stacked_cross(self, ac: Tensor, ind: bool = False) -> Tensor:
        return _CONV[self.dims](ac, self.crossed[ind], None, **self.kw)

    def pair_t(self, g: Tensor, h: Tensor | None, ind: bool = False) -> Tensor:
        tkw = self._tkw(g)
        if h is None or tkw is None or self.kw["groups"] != 1:
            return super().pair_t(g, h, ind)
        return _CONV_T[self.dims](torch.cat([g, h], 1), self.stacked[ind], None, **tkw)

    def cross_t(self, g: Tensor, h: Tensor, ind: bool = False) -> tuple[Tensor, Tensor]:
        tkw = self._tkw(g)
        if tkw is None or self.kw["groups"] != 1:
            return super().cross_t(g, h, ind)
        m = self.weight.shape[1]
        out = _CONV_T[self.dims](torch.cat([g, h], 1), self.crossed[ind], None, **tkw)
        return out[:, :m], out[:, m:]

    def pair_t_buf(self, buf: Tensor) -> Tensor:
        tkw = self._tkw(buf)
        if tkw is None or self.kw["groups"] != 1:
            return super().pair_t_buf(buf)
        return _CONV_T[self.dims](buf, self.stacked[False], None, **tkw)

    def cross_t_buf(self, buf: Tensor) -> tuple[Tensor, Tensor]:
        tkw = self._tkw(buf)
        if tkw is None or self.kw["groups"] != 1:
            return super().cross_t_buf(buf)
        return self.halves(_CONV_T[self.dims](buf, self.crossed[False], None, **tkw))

    def edges(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """The convolution applied to the input's unit numbers (+1; 0: padding) with one output channel
        per kernel tap selecting that tap: output (o, position) reads, at tap k, the input unit
        found there (exact in float64), with the coefficient W[o] at tap k."""
        C_out, C_g = self.weight.shape[:2]
        taps = C_g * math.prod(self.weight.shape[2:])
        groups = self.kw["groups"]
        n_in = math.prod(y.shape[1:])
        units = torch.arange(1, n_in + 1, dtype=torch.float64, device=y.device).reshape((1,) + tuple(y.shape[1:]))
        pick = torch.eye(taps, dtype=torch.float64, device=y.device).reshape((taps,) + tuple(self.weight.shape[1:]))
        found = _CONV[self.dims](units, pick.repeat(groups, *([1] * (pick.ndim - 1))), None, **self.kw)
        found = found.reshape(groups, taps, -1).round().long()  # [g, K, L]
        L = found.shape[-1]
        per_group = C_out // groups
        idx = found.repeat_interleave(per_group, 0).permute(0, 2, 1).reshape(C_out * L, taps)  # rows (o, pos)
        coef = self.weight.to(y.dtype).reshape(C_out, 1, taps).expand(C_out, L, taps).reshape(1, C_out * L, taps)
        coef = torch.where(idx > 0, coef, 0.0)
        return coef, (idx - 1).clamp_min(0)

    def __repr__(self) -> str:
        return f"ConvOp({tuple(self.weight.shape)}, {self.kw})"


class PoolOp(LinearOp):
    """A linear map with positive coefficients and no weight tensor (average pools, mean, sum):
    W = W+ = |W|, W- = 0; ``window_sum`` is the map with every coefficient replaced by 1
    (1{W > 0} = 1{W != 0}). Every row has one coefficient c_i on its window (1/k_i for an average,
    1 for a sum), c_i = pool(1)_i / window_sum(1)_i, so W^2 y = c * pool(y)."""

    def __init__(self, pool: Callable[[Tensor], Tensor], window_sum: Callable[[Tensor], Tensor],
                 label: str) -> None:
        self.pool, self.window_sum, self.label = pool, window_sum, label

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        if part in ("W", "pos", "abs"):
            return self.pool(y)
        if part in ("ipos", "nz"):
            return self.window_sum(y)
        if part == "sq":
            ones = torch.ones_like(y[:1])
            return self.pool(ones) / self.window_sum(ones) * self.pool(y)
        return torch.zeros_like(self.pool(y))

    def pair(self, y: Tensor, ind: bool = False) -> tuple[Tensor, Tensor | None]:
        return (self.window_sum(y) if ind else self.pool(y)), None

    def pair_t(self, g: Tensor, h: Tensor | None, ind: bool = False) -> Tensor:
        return self.transpose(g, "ipos" if ind else "pos")

    def __repr__(self) -> str:
        return f"PoolOp({self.label})"


class ScaleOp(LinearOp):
    """An elementwise affine map z = s * y + b (s, b constants broadcast against y): a diagonal
    matrix (multiplication by a constant, a BatchNorm that follows no linear map)."""

    def __init__(self, scale: Tensor, bias: Tensor | None, label: str = "scale") -> None:
        self.scale, self.bias, self.label = scale, bias, label

    @cached_property
    def parts(self) -> _Parts:
        return _Parts(self.scale)

    def drop_parts(self) -> None:
        self.__dict__.pop("parts", None)

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        return y * self.parts[part]

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        return g * self.parts[part]

    def edges(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Output j reads input j with the scale s_j (one edge per unit)."""
        coef = (self.scale * torch.ones_like(y)).reshape(y.shape[0], -1, 1)
        return coef, torch.arange(coef.shape[1], device=y.device).unsqueeze(1)

    def __repr__(self) -> str:
        return f"ScaleOp({self.label})"


def _others(t: Tensor) -> Tensor:
    """sum_{j != i} t_j along the last dimension, as a prefix sum before i plus a suffix sum after i:
    no subtraction, so no cancellation where one entry dwarfs the others (sum(t) - t_i loses t_j's
    digits when |t_i| >> |t_j|: the routing laws' |y|^(1/T) makes such ratios 1e10)."""
    before = F.pad(t.cumsum(-1)[..., :-1], (1, 0))
    after = F.pad(t.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))
    return before.add_(after)


class NormOp(LinearOp):
    """A frozen normaliser (LayerNorm, GroupNorm, RMSNorm; docs/theory.md section 11): per group of n
    units (the normalised dimensions of one sample and token, or one group of channels), the scale
    1/std is frozen and the map is z = diag(gamma) (I - 11^T / n) y / std + beta (no centring for
    RMSNorm). Row i has the diagonal entry c_i = gamma_i (1 - 1/n) and the off-diagonal entries
    o_i = -gamma_i / n (both / std); since std > 0, a part f is f(c) y + f(o) (sum_{j != i} y_j, summed
    without cancellation: :func:`_others`), divided by std except for the indicator parts (W^2: by std^2): O(n) per group.

    ``group`` reshapes a tensor to [..., n] (the group last) and ``ungroup`` back; ``gamma`` is in
    the grouped shape (broadcast), ``inv`` = 1/std in the grouped shape with a trailing 1."""

    def __init__(self, gamma: Tensor, beta: Tensor | None, inv: Tensor, n: int, centred: bool,
                 group: Callable[[Tensor], Tensor], ungroup: Callable[[Tensor], Tensor], label: str) -> None:
        self.n, self.inv, self.bias, self.label = n, inv, beta, label
        self.c = gamma * (1.0 - 1.0 / n) if centred else gamma
        self.o = gamma * (-1.0 / n) if centred else None
        self.group, self.ungroup = group, ungroup

    def _apply(self, y: Tensor, part: str, transpose: bool) -> Tensor:
        f = _PART_FNS[part]
        scaled = part not in _INDICATORS
        yg = self.group(y)
        inv = self.inv * self.inv if part == "sq" else self.inv
        if transpose and scaled:
            yg = yg * inv
        fc = f(self.c)
        if self.o is None:
            out = fc * yg
        elif not transpose:
            out = fc * yg + f(self.o) * _others(yg)
        else:
            out = (fc * yg).add_(_others(f(self.o) * yg))
        if scaled and not transpose:
            out = out * inv
        return self.ungroup(out)

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        return self._apply(y, part, False)

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        return self._apply(g, part, True)

    def edges(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Output unit a of a group reads every unit b of its group: c_a / std on the diagonal, o_a / std
        off it (RMSNorm: the diagonal only)."""
        n_in = math.prod(y.shape[1:])
        units = self.group(torch.arange(n_in, dtype=torch.float64, device=y.device).reshape((1,) + tuple(y.shape[1:])))
        units = units.round().long()  # [1, ..., n] grouped
        n = self.n
        rows = units.reshape(-1)  # the output unit of each grouped position
        idx_g = units.unsqueeze(-2).expand(units.shape[:-1] + (n, n)).reshape(-1, n)
        eye = torch.eye(n, dtype=torch.bool, device=y.device)
        def per_row(v: Any) -> Tensor:  # a coefficient per grouped position, [1, ..., n, 1]
            return torch.broadcast_to(torch.as_tensor(v, dtype=y.dtype, device=y.device), units.shape).unsqueeze(-1)

        coef_g = per_row(self.c) * eye
        if self.o is not None:
            coef_g = coef_g + per_row(self.o) * ~eye
        coef_g = coef_g * self.inv.unsqueeze(-1)  # [B or 1, ..., n, n]
        coef_g = coef_g.reshape(coef_g.shape[0], -1, n)
        order = torch.argsort(rows)
        return coef_g[:, order], idx_g[order]

    def __repr__(self) -> str:
        return f"NormOp({self.label}, n={self.n})"


class AddOp(LinearOp):
    """A sum node on the stacked input [B, k, ...] (k explained tensors): z = sum_k c_k y_k (+ b);
    the residual add is c = (1, 1), ``x - y`` is (1, -1)."""

    def __init__(self, in_shape: tuple, coefficients: tuple = (1.0, 1.0), bias: Tensor | None = None) -> None:
        self.in_shape = tuple(in_shape)
        self.coefficients = tuple(float(c) for c in coefficients)
        self.bias = bias

    def _coef(self, part: str) -> list:
        f = {"W": lambda c: c, "pos": lambda c: max(c, 0.0), "neg": lambda c: min(c, 0.0),
             "abs": abs, "ipos": lambda c: float(c > 0), "ineg": lambda c: float(c < 0),
             "sq": lambda c: c * c, "nz": lambda c: float(c != 0)}[part]
        return [f(c) for c in self.coefficients]

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        """A fresh tensor (one source with coefficient 1 is copied, not viewed: the routing sweep
        writes over the branch sums)."""
        terms = [(k, c) for k, c in enumerate(self._coef(part)) if c != 0]
        if len(terms) == 1:
            return y[:, terms[0][0]] * terms[0][1]
        out = None
        for k, c in terms:
            t = y[:, k] if c == 1 else y[:, k] * c
            out = t if out is None else out + t
        return torch.zeros_like(y[:, 0]) if out is None else out

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        return torch.stack([g if c == 1 else g * c for c in self._coef(part)], dim=1)

    def combine(self, sources: tuple) -> Tensor:
        """z from the k sources themselves (the same numbers as :meth:`forward` on them stacked, with no
        stacked copy: what the pass records, :attr:`backplay.gpu.trace.LayerTrace.input`)."""
        out = None
        for t, c in zip(sources, self._coef("W")):
            if c == 0:
                continue
            t = t if c == 1 else t * c
            out = t if out is None else out + t
        out = torch.zeros_like(sources[0]) if out is None else out
        b = self.bias_like(out)
        return out if b is None else out + b

    def edges(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Output j reads input j of each of the k stacked tensors, with the coefficients c_k."""
        k, n = y.shape[1], math.prod(y.shape[2:])
        idx = torch.arange(n, device=y.device).unsqueeze(1) + n * torch.arange(k, device=y.device)
        coef = torch.tensor(self.coefficients, dtype=y.dtype, device=y.device).expand(1, n, k)
        return coef, idx

    def pair(self, y: Tensor, ind: bool = False) -> tuple[Tensor, Tensor | None]:
        pos, neg = self.apply(y, "ipos" if ind else "pos"), None
        if any(c < 0 for c in self.coefficients):
            neg = self.apply(y, "ineg" if ind else "neg")
        return pos, neg

    def pair_t(self, g: Tensor, h: Tensor | None, ind: bool = False) -> Tensor:
        out = self.transpose(g, "ipos" if ind else "pos")
        if h is None or not any(c < 0 for c in self.coefficients):
            return out
        return out + self.transpose(h, "ineg" if ind else "neg")

    def __repr__(self) -> str:
        return f"AddOp({self.coefficients})"


class Selection(LinearOp):
    """A max selection frozen at the explained input (max pools, amax): output i copies input unit
    ``indices[b, i]`` (flat index into one sample), winner takes all; ties: torch's first index."""

    pass_through = True

    def __init__(self, indices: Tensor, in_shape: tuple, out_shape: tuple,
                 maximum: Callable[[Tensor], Tensor] | None = None) -> None:
        self.indices = indices  # [B, n_out] into the flattened sample
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.maximum = maximum  # the max operation itself (monotone: interval bounds apply it)

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        B = y.shape[0]
        if part in ("neg", "ineg"):
            return y.new_zeros((B,) + self.out_shape)
        idx = self.indices.expand(B, -1) if self.indices.shape[0] == 1 else self.indices
        return y.reshape(B, -1).gather(1, idx).view((B,) + self.out_shape)

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        B = g.shape[0]
        n_in = math.prod(self.in_shape)
        out = g.new_zeros((B, n_in))
        if part not in ("neg", "ineg"):
            idx = self.indices.expand(B, -1) if self.indices.shape[0] == 1 else self.indices
            out.scatter_add_(1, idx, g.reshape(B, -1))
        return out.view((B,) + self.in_shape)

    def __repr__(self) -> str:
        return f"Selection({self.in_shape} -> {self.out_shape})"


class AttentionOp(WeightOp):
    """Attention out = A v with the frozen attention matrix A (docs/theory.md sections 10 and 11): token-
    mixing edges of weight A_qt >= 0 (a softmax), per head; ``v`` [B, ..., T_k, d] -> [B, ..., T_q, d],
    A [B, ..., T_q, T_k] (per sample). No bias; W = W+ = |W| = A, W- = 0. ``own_*``: the query's own
    token (the token anchor of ``Anchor(..., anchor="token")``), defined when T_q = T_k."""

    def __init__(self, attn: Tensor) -> None:
        self.weight, self.bias, self.label = attn, None, "attention"

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        return torch.matmul(self.parts[part], y)

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        out = torch.matmul(self.parts[part].transpose(-2, -1), g)
        return out.sum_to_size((g.shape[0],) + tuple(self.in_shape)) if out.shape[1:] != self.in_shape else out

    def pair(self, y: Tensor, ind: bool = False) -> tuple[Tensor, Tensor | None]:
        return self.apply(y, "ipos" if ind else "pos"), None  # A >= 0: no negative part

    def pair_t(self, g: Tensor, h: Tensor | None, ind: bool = False) -> Tensor:
        return self.transpose(g, "ipos" if ind else "pos")

    def edges(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Output (..., q, d) reads (..., t, d) for every key t, with A[..., q, t] (per sample)."""
        B, T_k, d = y.shape[0], y.shape[-2], y.shape[-1]
        if tuple(self.weight.shape[1:-2]) != tuple(y.shape[1:-2]):  # heads shared by broadcasting
            return super().edges(y)
        A = self.weight.to(y.dtype).expand(y.shape[:-2] + self.weight.shape[-2:])  # [B, ..., T_q, T_k]
        T_q, H = A.shape[-2], math.prod(y.shape[1:-2])
        head = torch.arange(H, device=y.device).view(H, 1, 1, 1) * (T_k * d)
        idx = head + torch.arange(T_k, device=y.device).view(1, 1, 1, T_k) * d \
            + torch.arange(d, device=y.device).view(1, 1, d, 1)  # [H, 1, d, T_k]
        idx = idx.expand(H, T_q, d, T_k).reshape(-1, T_k)
        coef = A.reshape(B, H, T_q, 1, T_k).expand(B, H, T_q, d, T_k).reshape(B, -1, T_k)
        return coef, idx

    def own_contribution(self, y: Tensor) -> Tensor:
        """A_qq v_qd: the contribution of the query's own token to output (q, d)."""
        return self.weight.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * y

    @staticmethod
    def own_gather(u: Tensor) -> Tensor:
        """The lower layer's values at each output's own unit (the same position)."""
        return u

    @staticmethod
    def own_scatter(c: Tensor) -> Tensor:
        """Transpose of :meth:`own_gather`."""
        return c


class IdentityOp(LinearOp):
    """The identity map: the layer of a gate that follows no linear map (relevance passes)."""

    pass_through = True

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        return torch.zeros_like(y) if part in ("neg", "ineg") else y

    def transpose(self, g: Tensor, part: str = "W") -> Tensor:
        return self.apply(g, part)

    def __repr__(self) -> str:
        return "IdentityOp()"


# --------------------------------------------------------------------------------------------
# gates
# --------------------------------------------------------------------------------------------
class Gate:
    """An activation read as ``y = p z + c`` per unit, p frozen at the explained pass.

    ``gate(z)`` returns ``(y, p)``. ReLU, LeakyReLU, ReLU6 / hardtanh and softplus are the game's own
    policies (p = the probability of continuing, c = the reward collected on stopping: eps H(p) for
    softplus (I9), the clamp constant of a saturated ReLU6); GELU, SiLU, tanh and sigmoid are frozen
    gates p = act(z)/z (docs/theory.md section 11). ``offset(z, p)`` is c (``None`` when identically 0)."""

    #: True when the gate may stop (an activation); False for a linear layer.
    activated: bool = True
    #: True when y = z wherever y != 0 (linear, ReLU): where the relevance is y times a sum (the LRP
    #: recursions), it vanishes wherever y does, so y stands for z on every unit that carries relevance
    z_where_nonzero: bool = False

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def output(self, z: Tensor, in_place: bool = False) -> Tensor:
        """y alone (``in_place``: z may be overwritten with it, a gate that can do so does)."""
        return self(z)[0]

    def backprop(self, r: Tensor, y: Tensor) -> Tensor | None:
        """r * p with p read back from the output y, for a gate whose y determines p exactly (ReLU:
        p = 1{y > 0}, read as torch's backward of relu reads its output), else None (the pass keeps p)."""
        return None

    def offset(self, z: Tensor, p: Tensor) -> Tensor | None:
        return None

    def at_temperature(self, eps: float) -> "Gate":
        """The gate of the SoftplusGame surrogate at temperature eps (the entropic game; docs/theory.md
        section 3): ReLU and softplus -> softplus_eps, GELU z Phi(z) -> z Phi(z/eps), SiLU
        z sigmoid(z) -> z sigmoid(z/eps); other gates are not game policies and stay as they are."""
        return self


class LinearGate(Gate):
    """No activation: the player must continue, p = 1."""

    activated = False
    z_where_nonzero = True

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z, torch.ones_like(z)

    def __repr__(self) -> str:
        return "LinearGate()"


class ReLUGate(Gate):
    """ReLU: continue iff z > 0; a tie z = 0 stops (relu'(0) = 0, as torch)."""

    z_where_nonzero = True

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        active = z > 0
        return torch.where(active, z, torch.zeros_like(z)), active.to(z.dtype)

    def output(self, z: Tensor, in_place: bool = False) -> Tensor:
        return z.relu_() if in_place else z.relu()

    def backprop(self, r: Tensor, y: Tensor) -> Tensor:
        return torch.ops.aten.threshold_backward(r, y, 0)  # y = z where z > 0, else 0: r where y > 0

    def at_temperature(self, eps: float) -> Gate:
        return SoftplusGate(eps)

    def __repr__(self) -> str:
        return "ReLUGate()"


class LeakyReLUGate(Gate):
    """LeakyReLU(a): p = 1 where z > 0, a where z <= 0 (torch's derivative at 0)."""

    def __init__(self, slope: float) -> None:
        self.slope = float(slope)

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        p = torch.where(z > 0, torch.ones_like(z), torch.full_like(z, self.slope))
        return z * p, p

    def __repr__(self) -> str:
        return f"LeakyReLUGate({self.slope})"


class ClampGate(Gate):
    """ReLU6 / hardtanh / clamp(lo, hi): the piecewise-linear policy p = 1 strictly inside (lo, hi),
    0 outside and at the ends (torch's derivative), and the reward c = clamp(z) - p z (the constant
    of a saturated unit; 0 inside). So y = p z + c, and the frozen-graph gradient is the gradient."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = float(lo), float(hi)

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        p = ((z > self.lo) & (z < self.hi)).to(z.dtype)
        return z.clamp(self.lo, self.hi), p

    def output(self, z: Tensor, in_place: bool = False) -> Tensor:
        return z.clamp_(self.lo, self.hi) if in_place else z.clamp(self.lo, self.hi)

    def backprop(self, r: Tensor, y: Tensor) -> Tensor:
        return torch.ops.aten.hardtanh_backward(r, y, self.lo, self.hi)  # y = z strictly inside (lo, hi)

    def offset(self, z: Tensor, p: Tensor) -> Tensor | None:
        return (1 - p) * z.clamp(self.lo, self.hi)

    def __repr__(self) -> str:
        return f"ClampGate({self.lo}, {self.hi})"


class SoftplusGate(Gate):
    """softplus_eps(z) = eps*log(1 + exp(z/eps)); continue with p = sigmoid(z/eps) (I9, I10).

    Computed as ``eps * logaddexp(0, z/eps)`` in the compute dtype (exact to round-off in float64, no
    identity switch above ``threshold`` as in ``nn.Softplus``: docs/theory.md section 5)."""

    def __init__(self, eps: float) -> None:
        eps = float(eps)
        if not eps > 0 or eps == float("inf"):
            raise ValueError(f"softplus eps must be finite and > 0, got {eps}")
        self.eps = eps

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        u = z / self.eps
        y = self.eps * torch.logaddexp(torch.zeros_like(u), u)
        return y, torch.sigmoid(u)

    def offset(self, z: Tensor, p: Tensor) -> Tensor:
        # eps H(p) with log p = -softplus(-u), log(1-p) = -softplus(u): stable, 0 log 0 = 0
        u = z / self.eps
        zero = torch.zeros_like(u)
        h = p * torch.logaddexp(zero, -u) + (1 - p) * torch.logaddexp(zero, u)
        return self.eps * h

    def at_temperature(self, eps: float) -> Gate:
        return SoftplusGate(eps)

    def __repr__(self) -> str:
        return f"SoftplusGate(eps={self.eps})"


class GELUGate(Gate):
    """GELU as a frozen gate: y = z Phi(z / eps), p = Phi(z / eps) (eps = 1: the erf GELU;
    ``approximate="tanh"``: torch's tanh form, p = (1 + tanh(sqrt(2/pi)(u + 0.044715 u^3)))/2)."""

    def __init__(self, eps: float = 1.0, approximate: str = "none") -> None:
        self.eps, self.approximate = float(eps), approximate

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        u = z if self.eps == 1.0 else z / self.eps
        if self.approximate == "tanh":
            p = 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u * u * u)))
        else:
            p = 0.5 * (1.0 + torch.erf(u * (1.0 / 2.0 ** 0.5)))
        return z * p, p

    def at_temperature(self, eps: float) -> Gate:
        return GELUGate(eps, self.approximate)

    def __repr__(self) -> str:
        return f"GELUGate(eps={self.eps}, approximate={self.approximate!r})"


class FrozenGate(Gate):
    """A frozen gate p = act(z)/z (0/0 := act'(0)); where z = 0 and act(0) != 0 (sigmoid) the value
    act(0) is the reward c, so y = p z + c everywhere. SiLU is act = z sigmoid(z / eps)."""

    def __init__(self, name: str, eps: float = 1.0) -> None:
        if name not in ("silu", "tanh", "sigmoid"):
            raise ValueError(f"unknown frozen gate {name!r}")
        self.name, self.eps = name, float(eps)

    def _act(self, z: Tensor) -> Tensor:
        if self.name == "silu":
            return z * torch.sigmoid(z / self.eps)
        return torch.tanh(z) if self.name == "tanh" else torch.sigmoid(z)

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if self.name == "silu":
            p = torch.sigmoid(z / self.eps)
            return z * p, p
        y = self._act(z)
        slope0 = 1.0 if self.name == "tanh" else 0.25
        nz = z != 0
        p = torch.where(nz, y / torch.where(nz, z, torch.ones_like(z)), torch.full_like(z, slope0))
        return y, p

    def offset(self, z: Tensor, p: Tensor) -> Tensor | None:
        if self.name != "sigmoid":
            return None
        return torch.where(z == 0, torch.full_like(z, 0.5), torch.zeros_like(z))

    def at_temperature(self, eps: float) -> Gate:
        return FrozenGate("silu", eps) if self.name == "silu" else self

    def __repr__(self) -> str:
        return f"FrozenGate({self.name!r})" if self.eps == 1.0 else f"FrozenGate({self.name!r}, eps={self.eps})"


class FunctionGate(Gate):
    """An elementwise subgraph y = f(z) of one explained tensor z read as one frozen gate (docs/theory.md
    section 9; e.g. a tanh-approximate GELU the exporter decomposed into pow / mul / tanh / add):
    p = f(z)/z, 0/0 := f'(0); where z = 0 and f(0) != 0 the value f(0) is the reward c, so
    y = p z + c everywhere (the convention of :class:`FrozenGate`). ``f`` is evaluated by the
    model's own operations; ``label`` names them."""

    def __init__(self, f: Callable[[Tensor], Tensor], label: str) -> None:
        self.f, self.label = f, label

    def _at_zero(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(f(0), f'(0)) per unit (elementwise: one vector-Jacobian product of ones at zeros)."""
        with torch.enable_grad():
            z0 = torch.zeros_like(z, requires_grad=True)
            y0 = self.f(z0)
            (d0,) = torch.autograd.grad(y0, z0, torch.ones_like(y0), allow_unused=True)
        return y0.detach(), (torch.zeros_like(z) if d0 is None else d0.detach())

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        y = self.f(z)
        nz = z != 0
        p = y / torch.where(nz, z, torch.ones_like(z))
        if not bool(nz.all()):
            p = torch.where(nz, p, self._at_zero(z)[1])
        return y, p

    def offset(self, z: Tensor, p: Tensor) -> Tensor | None:
        if bool((z != 0).all()):
            return None
        return torch.where(z == 0, self._at_zero(z)[0], torch.zeros_like(z))

    def __repr__(self) -> str:
        return f"FunctionGate({self.label})"
