"""One network description shared by theory, numerics and gpu (docs/theory.md section 1).

``MLPSpec`` holds a fully connected net in torch layer order: ``weights[l-1]`` is W^l with shape
(n_l, n_{l-1}) and acts on y^{l-1}; ``biases[l-1]`` is b^l or ``None``. Hidden layers use the
activation (ReLU, or softplus_eps(z) = eps*log(1 + exp(z/eps))); the output layer is linear by default
or carries the activation too (``output="relu"`` / ``"softplus"``).

A spec is either numeric (float64 numpy arrays) or exact (numpy object arrays of sympy Rationals,
see :meth:`MLPSpec.exact`). The exact copy of a float spec is the exact binary value of every float,
so exact results and float64 results describe the same net.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import sympy

ACTIVATIONS = ("relu", "softplus")


def _is_sympy(value: Any, kind: str = "Basic") -> bool:
    """Whether ``value`` is a sympy object (``kind``: the sympy base class). sympy is imported only for
    exact work (``import backplay`` stays light): no value can be a sympy object before it is loaded."""
    sp = sys.modules.get("sympy")
    return sp is not None and isinstance(value, getattr(sp, kind))


def _as_array(value: Any, name: str) -> np.ndarray:
    """Convert torch tensors, numpy arrays, sympy matrices and nested lists to a numpy array."""
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().double().numpy()
    if _is_sympy(value, "MatrixBase"):
        value = np.array(value.tolist(), dtype=object)
    arr = np.asarray(value)
    if arr.dtype == object:
        return arr
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def to_rational(value: Any) -> "sympy.Expr":
    """Exact sympy value: floats become the Rational of their exact binary value."""
    import sympy as sp

    if isinstance(value, sp.Basic):
        return value
    if isinstance(value, (int, np.integer)):
        return sp.Integer(int(value))
    return sp.Rational(float(value))


def _check_finite(arr: np.ndarray, name: str) -> None:
    if arr.dtype == object:
        import sympy as sp

        for v in arr.flat:
            if isinstance(v, sp.Basic) and v.free_symbols:
                continue
            if not sp.sympify(v).is_finite:
                raise ValueError(f"{name} contains a non-finite value: {v}")
    elif not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


@dataclass(frozen=True, eq=False)
class MLPSpec:
    """A ReLU or softplus MLP in torch layer order (docs/theory.md section 1).

    Args:
        weights: W^1..W^L, W^l of shape (n_l, n_{l-1}).
        biases: b^1..b^L (entries may be ``None``), or ``None`` for a bias-free net.
        activation: ``"relu"`` or ``"softplus"``.
        eps: softplus temperature (> 0; a float, a sympy Rational or a positive sympy Symbol).
        output: ``"linear"`` (logits, default) or the activation's name (output carries it too).
    """

    weights: tuple
    biases: tuple
    activation: str
    eps: Any
    output: str

    def __init__(
        self,
        weights: Sequence[Any],
        biases: Sequence[Any] | None = None,
        activation: str = "relu",
        eps: Any = None,
        output: str = "linear",
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if output not in ("linear", activation):
            raise ValueError(
                f"output must be 'linear' or the activation {activation!r}, got {output!r}"
            )
        if len(weights) == 0:
            raise ValueError("an MLPSpec needs at least one weight matrix")
        ws = []
        for l, w in enumerate(weights, start=1):
            arr = _as_array(w, f"W^{l}")
            if arr.ndim != 2:
                raise ValueError(f"W^{l} must be a 2-d matrix, got shape {arr.shape}")
            if arr.shape[0] == 0 or arr.shape[1] == 0:
                raise ValueError(f"W^{l} has an empty dimension: shape {arr.shape}")
            _check_finite(arr, f"W^{l}")
            if ws and arr.shape[1] != ws[-1].shape[0]:
                raise ValueError(
                    f"shape mismatch: W^{l} has {arr.shape[1]} columns but layer {l - 1} "
                    f"has {ws[-1].shape[0]} neurons"
                )
            ws.append(arr)
        if biases is None:
            biases = [None] * len(ws)
        if len(biases) != len(ws):
            raise ValueError(f"got {len(ws)} weight matrices but {len(biases)} biases")
        bs = []
        for l, (b, w) in enumerate(zip(biases, ws), start=1):
            if b is None:
                bs.append(None)
                continue
            arr = _as_array(b, f"b^{l}").reshape(-1)
            if arr.shape[0] != w.shape[0]:
                raise ValueError(
                    f"shape mismatch: b^{l} has {arr.shape[0]} entries, W^{l} has {w.shape[0]} rows"
                )
            _check_finite(arr, f"b^{l}")
            bs.append(arr)
        if activation == "softplus":
            if eps is None:
                raise ValueError("a softplus net needs eps > 0")
            if _is_sympy(eps):
                if eps.free_symbols:
                    if eps.is_positive is not True:
                        raise ValueError(f"symbolic eps must be declared positive, got {eps}")
                elif not (eps.is_finite and eps > 0):
                    raise ValueError(f"eps must be finite and > 0, got {eps}")
            else:
                eps = float(eps)
                if not (math.isfinite(eps) and eps > 0):
                    raise ValueError(f"eps must be finite and > 0, got {eps}")
        elif eps is not None:
            raise ValueError("eps is only used with activation='softplus'")
        if any(a.dtype == object for a in ws + [b for b in bs if b is not None]):
            conv = np.vectorize(to_rational, otypes=[object])  # any exact entry: all exact
            ws = [conv(w) for w in ws]
            bs = [None if b is None else conv(b) for b in bs]
        object.__setattr__(self, "weights", tuple(ws))
        object.__setattr__(self, "biases", tuple(bs))
        object.__setattr__(self, "activation", activation)
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "output", output)

    # -- shape ---------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Number of layers L."""
        return len(self.weights)

    @property
    def widths(self) -> tuple[int, ...]:
        """(n_0, n_1, ..., n_L)."""
        return (self.weights[0].shape[1],) + tuple(w.shape[0] for w in self.weights)

    @property
    def is_exact(self) -> bool:
        return self.weights[0].dtype == object

    def weight(self, l: int) -> np.ndarray:
        """W^l, 1 <= l <= L."""
        return self.weights[l - 1]

    def bias(self, l: int) -> np.ndarray:
        """b^l, zeros when the layer has no bias."""
        b = self.biases[l - 1]
        if b is not None:
            return b
        n = self.weights[l - 1].shape[0]
        return np.array([to_rational(0)] * n, dtype=object) if self.is_exact else np.zeros(n)

    @property
    def has_bias(self) -> bool:
        return any(b is not None for b in self.biases)

    def activated(self, l: int) -> bool:
        """Whether layer l applies the activation (hidden layers, and the output unless linear)."""
        return l < self.depth or self.output != "linear"

    # -- conversions ---------------------------------------------------------------------------
    def exact(self) -> "MLPSpec":
        """Copy with sympy Rational entries (exact binary value of each float); eps likewise."""
        if self.is_exact:
            return self
        conv = np.vectorize(to_rational, otypes=[object])
        eps = self.eps
        if eps is not None and not _is_sympy(eps):
            eps = to_rational(eps)
        return MLPSpec(
            [conv(w) for w in self.weights],
            [None if b is None else conv(b) for b in self.biases],
            self.activation,
            eps,
            self.output,
        )

    def numeric(self) -> "MLPSpec":
        """float64 copy (inverse of :meth:`exact` up to rounding)."""
        if not self.is_exact:
            return self
        eps = self.eps
        if _is_sympy(eps):
            if eps.free_symbols:
                raise ValueError("cannot make a numeric copy of a spec with symbolic eps")
            eps = float(eps)
        return MLPSpec(
            [w.astype(np.float64) for w in self.weights],
            [None if b is None else b.astype(np.float64) for b in self.biases],
            self.activation,
            eps,
            self.output,
        )

    def with_eps(self, eps: Any, activation: str = "softplus") -> "MLPSpec":
        """Same weights with another activation / eps (e.g. the softplus surrogate of a ReLU net)."""
        output = "linear" if self.output == "linear" else activation
        return MLPSpec(self.weights, self.biases, activation, eps if activation == "softplus" else None, output)

    def to_torch(self, dtype: Any = None, device: Any = None) -> Any:
        """An ``nn.Sequential`` computing this net (float64 by default).

        Softplus layers get beta = 1/eps and a threshold high enough that torch's identity switch
        stays below round-off (700 in float64, 20 otherwise).
        """
        import torch
        import torch.nn as nn

        dtype = torch.float64 if dtype is None else dtype
        spec = self.numeric()
        mods: list = []
        for l, (w, b) in enumerate(zip(spec.weights, spec.biases), start=1):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=dtype, device=device)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(w).to(dtype))
                if b is not None:
                    lin.bias.copy_(torch.from_numpy(b).to(dtype))
            mods.append(lin)
            if spec.activated(l):
                if spec.activation == "relu":
                    mods.append(nn.ReLU())
                else:
                    threshold = 700.0 if dtype == torch.float64 else 20.0
                    mods.append(nn.Softplus(beta=1.0 / spec.eps, threshold=threshold))
        return nn.Sequential(*mods).to(dtype=dtype, device=device).eval()

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        """float64 forward pass of one input: [(z^1, y^1), ..., (z^L, y^L)]."""
        spec = self.numeric()
        y = _as_array(x, "x").reshape(-1).astype(np.float64)
        if y.shape[0] != spec.widths[0]:
            raise ValueError(f"x has {y.shape[0]} entries, the net expects {spec.widths[0]}")
        out = []
        for l in range(1, spec.depth + 1):
            z = spec.weight(l) @ y + spec.bias(l)
            if not spec.activated(l):
                y = z
            elif spec.activation == "relu":
                y = np.maximum(z, 0.0)
            else:
                y = spec.eps * np.logaddexp(0.0, z / spec.eps)
            out.append((z, y))
        return out

    def __call__(self, x: Any) -> np.ndarray:
        return self.forward(x)[-1][1]

    def __repr__(self) -> str:
        eps = f", eps={self.eps}" if self.eps is not None else ""
        kind = "exact" if self.is_exact else "float64"
        return (
            f"MLPSpec(widths={_short(self.widths)}, activation={self.activation!r}{eps}, "
            f"output={self.output!r}, bias={self.has_bias}, {kind})"
        )


def _short(values: Sequence[Any], keep: int = 6) -> str:
    """A tuple for a repr: whole when short, else its first and last ``keep // 2`` entries and the count."""
    values = tuple(values)
    if len(values) <= keep:
        return repr(values)
    h = keep // 2
    return "(" + ", ".join(map(repr, values[:h])) + f", ... {len(values) - keep} more ..., " + \
        ", ".join(map(repr, values[-h:])) + ")"


def check_input(spec: MLPSpec, x: Any) -> np.ndarray:
    """One input vector for ``spec`` as a numpy array (object dtype kept), with clear errors."""
    arr = _as_array(x, "x").reshape(-1) if not isinstance(x, np.ndarray) or x.ndim <= 1 else None
    if arr is None:
        raise ValueError(f"x must be one input vector, got shape {np.shape(x)}")
    if arr.shape[0] != spec.widths[0]:
        raise ValueError(f"x has {arr.shape[0]} entries, the net expects {spec.widths[0]}")
    _check_finite(arr, "x")
    return arr


def check_target(spec: MLPSpec, target: int) -> int:
    """The explained output index, checked against the output width."""
    if not isinstance(target, (int, np.integer)) or isinstance(target, bool):
        raise TypeError(f"target must be an int, got {type(target).__name__}")
    n = spec.widths[-1]
    if not 0 <= int(target) < n:
        raise ValueError(f"target {target} out of range for {n} outputs")
    return int(target)



@dataclass(frozen=True, eq=False)
class FrozenNet:
    """One explained forward pass written as affine layers (docs/theory.md sections 8 and 10).

    ``weights[l-1]`` (n_l, n_{l-1}) and ``biases[l-1]`` (or None) give z^l = W^l y^{l-1} + b^l;
    ``ys`` holds the recorded y^0 (the input), ..., y^L (the output). The activation between z^l and
    y^l is frozen into these values (ReLU, softplus, a max-pool selection, a frozen gate ...), so a CNN
    unrolled at one input is a FrozenNet too. Routing laws need nothing else. Entries are floats or
    exact (sympy) values.

    ``kinds[l-1]`` is ``"affine"`` (the rule applies) or ``"maxpool"`` (a frozen 0/1 selection of
    the argmax: relevance passes to the winner unchanged, whatever the rule), or a tuple with one
    kind per row of layer l: ``"affine"`` or ``"copy"`` (a row with a single weight 1 that passes
    relevance unchanged to its unit whatever the rule, as a max-pool row does: it carries a residual
    skip through the layers of a block, so a network with skip edges is a layered FrozenNet).

    ``anchors[l-1]`` (optional, default None everywhere): for the token-mixing (attention) layers of
    a ViT, one lower unit per row (the query's own token, -1 for none): the anchor of
    ``Anchor(..., anchor="token")``, which acts only at the layers that have anchors.

    What a composite rule (docs/theory.md section 12) reads per layer, as the reader recorded it
    (:func:`backplay.gpu.unroll`): ``ops[l-1]`` the operation kind (``LayerTrace.kind``: "linear",
    "conv", "pool", "add", ...; default "linear"), ``modules[l-1]`` the qualified module name
    (default ""), ``first[l-1]`` whether layer l reads the input (default: layer 1 only), and
    ``in_shape`` the input's shape per sample (default (n_0,); y^0 is the input flattened).
    """

    weights: tuple
    biases: tuple
    ys: tuple
    kinds: tuple
    anchors: tuple
    ops: tuple
    modules: tuple
    first: tuple
    in_shape: tuple

    def __init__(self, weights: Sequence[Any], biases: Sequence[Any] | None, ys: Sequence[Any],
                 kinds: Sequence[Any] | None = None, anchors: Sequence[Any] | None = None,
                 ops: Sequence[str] | None = None, modules: Sequence[str] | None = None,
                 first: Sequence[bool] | None = None, in_shape: Sequence[int] | None = None) -> None:
        ws = [_as_array(w, f"W^{l}") for l, w in enumerate(weights, start=1)]
        bs = [None if b is None else _as_array(b, f"b^{l}").reshape(-1)
              for l, b in enumerate(biases if biases is not None else [None] * len(ws), start=1)]
        yv = [_as_array(y, f"y^{l}").reshape(-1) for l, y in enumerate(ys)]
        if len(yv) != len(ws) + 1 or len(bs) != len(ws):
            raise ValueError(f"need L weights, L biases and L+1 values; got {len(ws)}, {len(bs)}, {len(yv)}")
        for l, (w, b) in enumerate(zip(ws, bs), start=1):
            if w.ndim != 2 or w.shape != (yv[l].shape[0], yv[l - 1].shape[0]):
                raise ValueError(f"shape mismatch at layer {l}: W {w.shape}, y^{l - 1} {yv[l - 1].shape}, "
                                 f"y^{l} {yv[l].shape}")
            if b is not None and b.shape[0] != w.shape[0]:
                raise ValueError(f"shape mismatch: b^{l} has {b.shape[0]} entries, W^{l} has {w.shape[0]} rows")
            for arr, name in ((w, f"W^{l}"), (b, f"b^{l}")):
                if arr is not None:
                    _check_finite(arr, name)
        for l, y in enumerate(yv):
            _check_finite(y, f"y^{l}")
        kinds = tuple(kinds) if kinds is not None else ("affine",) * len(ws)
        if len(kinds) != len(ws):
            raise ValueError(f"kinds must give 'affine', 'maxpool' or one kind per row for each of the "
                             f"{len(ws)} layers")
        kinds = tuple(k if isinstance(k, str) else tuple(k) for k in kinds)
        for l, (k, w) in enumerate(zip(kinds, ws), start=1):
            if isinstance(k, str):
                if k not in ("affine", "maxpool"):
                    raise ValueError(f"kinds[{l - 1}] must be 'affine', 'maxpool' or one kind per row, got {k!r}")
                continue
            if len(k) != w.shape[0] or not set(k) <= {"affine", "copy"}:
                raise ValueError(f"kinds[{l - 1}] per row must give 'affine' or 'copy' for each of the "
                                 f"{w.shape[0]} rows of layer {l}")
            for i in (i for i, ki in enumerate(k) if ki == "copy"):
                nz = [v for v in w[i] if v != 0]
                if nz != [1] or (bs[l - 1] is not None and bs[l - 1][i] != 0):
                    raise ValueError(f"copy row {i} of layer {l} must have a single weight 1 and no bias")
        anchors = tuple(anchors) if anchors is not None else (None,) * len(ws)
        if len(anchors) != len(ws):
            raise ValueError(f"anchors must give None or one unit per row for each of the {len(ws)} layers")
        anchors = tuple(None if a is None else tuple(int(v) for v in a) for a in anchors)
        for l, (a, w) in enumerate(zip(anchors, ws), start=1):
            if a is not None and (len(a) != w.shape[0] or any(not -1 <= v < w.shape[1] for v in a)):
                raise ValueError(f"anchors[{l - 1}] must give a lower unit (or -1) for each of the "
                                 f"{w.shape[0]} rows of layer {l}")
        L = len(ws)
        ops = tuple(str(o) for o in ops) if ops is not None else ("linear",) * L
        modules = tuple(str(m) for m in modules) if modules is not None else ("",) * L
        first = tuple(bool(f) for f in first) if first is not None else tuple(l == 1 for l in range(1, L + 1))
        for name, v in (("ops", ops), ("modules", modules), ("first", first)):
            if len(v) != L:
                raise ValueError(f"{name} must give one entry for each of the {L} layers, got {len(v)}")
        in_shape = tuple(int(n) for n in in_shape) if in_shape is not None else (yv[0].shape[0],)
        if math.prod(in_shape) != yv[0].shape[0]:
            raise ValueError(f"in_shape {in_shape} does not hold the {yv[0].shape[0]} inputs")
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "anchors", anchors)
        object.__setattr__(self, "ops", ops)
        object.__setattr__(self, "modules", modules)
        object.__setattr__(self, "first", first)
        object.__setattr__(self, "in_shape", in_shape)
        object.__setattr__(self, "weights", tuple(ws))
        object.__setattr__(self, "biases", tuple(bs))
        object.__setattr__(self, "ys", tuple(yv))

    @property
    def depth(self) -> int:
        return len(self.weights)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(y.shape[0] for y in self.ys)

    def selects(self, l: int, i: int) -> bool:
        """Whether row i of layer l passes relevance unchanged to one unit (a max-pool or copy row)."""
        k = self.kinds[l - 1]
        return k == "maxpool" if isinstance(k, str) else k[i] == "copy"

    @property
    def has_selections(self) -> bool:
        """Whether some row is a max-pool or copy row."""
        return any(k == "maxpool" if isinstance(k, str) else "copy" in k for k in self.kinds)

    def __repr__(self) -> str:
        exact = any(a is not None and a.dtype == object for a in self.weights + self.biases + self.ys)
        ops = {o: self.ops.count(o) for o in self.ops}
        extras = ", selections" * self.has_selections + ", anchors" * any(a is not None for a in self.anchors)
        return (f"FrozenNet(widths={_short(self.widths)}, in_shape={self.in_shape}, ops: "
                f"{', '.join(f'{o} x{n}' for o, n in ops.items())}, "
                f"bias={any(b is not None for b in self.biases)}{extras}, {'exact' if exact else 'float64'})")
