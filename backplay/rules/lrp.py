"""The LRP rule zoo (docs/theory.md section 12): Gamma, ZPlus, ZBox, Flat, WSquare (Epsilon is in
:mod:`.gradient`), the composite rule :class:`Composite` (a rule per operation kind, per module
name, and for the first layer) and zennit's presets EpsilonPlus, EpsilonPlusFlat, EpsilonGammaBox,
EpsilonAlpha2Beta1, EpsilonAlpha2Beta1Flat.

Every rule here is a law on the extended graph in the terms of docs/theory.md section 8, stated in its
docstring: at unit i of layer l the probability p of the + branch (sign kept), q of the - branch
(sign flipped), stop of a direct move to the cemetery (multiplier 1, sign kept; p + q + stop = 1),
the multiplier m of a branch move, and the routing pi(j | i, b) inside each branch. Mass handed to
an empty branch goes to the cemetery with its sign; mass routed to the bias unit ends in the bias
sink. Every rule starts at R^L = f_k(x) on the target, and reports the mass it stops per layer
(``backward`` returns ``(lower, stopped)``, the public stopped-mass API), so that
sum R^0 + stopped = f_k(x) (I14) for each of them. Selections (max pools) and copy layers pass
relevance to their winner unchanged, whatever the rule (a copy of constants only: the bias sink).
The exact laws are :func:`backplay.theory.routing_law` of these rules.

The "first layer" is every layer that reads the input tensor (through layout steps, and through
selections and copies of it): :func:`first_layers`. Layer kinds are the reader's
(``LayerTrace.kind``), module names its qualified names (``LayerTrace.module``, e.g. "features.0").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from .base import Handover, LayerRule, check_finite, safe_divide
from .gradient import LRP0, Epsilon
from .routing import RG, AlphaBeta, GradientEquilibrium, RGEq

if TYPE_CHECKING:  # pragma: no cover
    from backplay.gpu.trace import LayerTrace, Trace

Tensor = torch.Tensor

__all__ = ["Gamma", "ZPlus", "ZBox", "Flat", "WSquare", "Composite", "EpsilonPlus", "EpsilonPlusFlat",
           "EpsilonGammaBox", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat", "LAYER_KINDS", "first_layers"]

#: the operation kinds a composite maps to rules (the reader's ``LayerTrace.kind`` of the layers
#: that carry contributions; "maxpool", "copy" and "gate" layers pass relevance whatever the rule)
LAYER_KINDS = ("linear", "conv", "pool", "add", "norm", "scale", "map", "attention")


# -- the first layer --------------------------------------------------------------------------------
def _near_input(trace: "Trace", values: tuple | None = None) -> dict:
    """{index: value at the layer's input} of the layers that read the input tensor through layout
    steps and selections / copies of it (no constants, no gate); ``values``: tensors shaped like ``trace.x``
    carried along (a layout step applies its index map, a selection its map), or None (then the
    values are None)."""
    vals: dict = {0: values}
    out: dict = {}
    for step in trace.steps:
        if not all(s in vals for s in step.sources):
            continue
        ins = [vals[s] for s in step.sources]
        m = getattr(step, "map", None)
        if values is None:
            v_in = None
        elif m is None:
            vals[step.out] = tuple(step.fn(*parts) for parts in zip(*ins))
            continue
        elif len(ins) == 1:
            v_in = ins[0]
        else:  # a sum node reads its sources stacked along dim 1
            shape = step.input_shape[:1] + step.input_shape[2:]
            v_in = tuple(torch.stack([u.expand(shape) for u in parts], dim=1) for parts in zip(*ins))
        if m is None:
            vals[step.out] = None
        elif step.kind == "gate":  # a standalone gate changes the values: what follows is not first
            continue
        elif m.pass_through and m.bias is None:
            vals[step.out] = None if v_in is None else tuple(m.apply(v) for v in v_in)
        else:
            out[step.index] = v_in
    return out


def first_layers(trace: "Trace") -> frozenset:
    """The indices (``LayerTrace.index``) of the first layers: the layers with contributions that
    read the input tensor, through layout steps and selections or copies of it only (not through a
    standalone gate, which changes the values: a Linear after an activation of the input is not a
    first layer here, where zennit, which takes the first module of the type, would count it)."""
    return frozenset(_near_input(trace))


def _pass(layer: "LayerTrace", upper: Tensor) -> tuple[Tensor, Tensor]:
    """A selection or copy layer: relevance to the winner unchanged; a unit made of constants only
    (a concatenated cls token, a max pool's winner among the zeros of an ``F.pad``: no unit,
    ``LayerTrace.unit_mask``) sends its mass to the bias sink."""
    M = layer.map
    lower = M.transpose(upper)
    if M.bias is None and layer.units is None:
        return lower, upper.new_zeros(upper.shape[0])
    lower = layer.unit_mask() * lower
    return lower, upper.flatten(1).sum(1) - lower.flatten(1).sum(1)


@dataclass(frozen=True)
class _ZooRule(LayerRule):
    """The start and the pass-through layers shared by the zoo rules; subclasses give ``_unit``."""

    def start(self, trace: "Trace", target: Tensor) -> Tensor:
        return trace.onehot(target) * trace.output

    def backward(self, layer: "LayerTrace", upper: Tensor) -> tuple[Tensor, Tensor]:
        """(relevance at the layer's input, signed stopped mass per sample)."""
        if layer.map.pass_through:
            return _pass(layer, upper)
        return self._unit(layer, upper)

    def _unit(self, layer: "LayerTrace", upper: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


# -- the rules --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gamma(_ZooRule):
    """LRP-gamma in zennit's (generalised) convention, zennit 0.5.1 ``rules.Gamma``: the contributions
    of the sign of z_i are boosted by gamma,

        z_i > 0:  R_j = sum_i (Z_ij + gamma Z+_ij) / (z_i + gamma S+_i) R_i,
        z_i < 0:  R_j = sum_i (Z_ij + gamma Z-_ij) / (z_i + gamma S-_i) R_i,
        z_i = 0:  R_i stops (cemetery),

    with Z_ij = W_ij y_j (inputs of both signs: Z+ = W+ y+ + W- y-), S+_i = sum of the positive
    contributions, S-_i of the negative ones, z_i = S+_i + S-_i, the bias b_i a constant unit in the
    branch of its sign (zennit: b + gamma b+ in the z > 0 denominator, b + gamma b- in the z < 0 one;
    its share R_i (b_i + gamma b_i^{sign z_i}) / (z_i + gamma S_i^{sign z_i}) ends in the bias sink).

    As a law (I22, docs/theory.md section 12): routing in each branch proportional to |Z_ij| (route
    temperature 1, bias unit included), no stop (stop = 0), and with a = 1 + gamma
        z_i > 0:  p = a S+ / (a S+ + |S-|),  q = |S-| / (a S+ + |S-|),  m = (a S+ + |S-|) / (z + gamma S+),
        z_i < 0:  p = S+ / (S+ + a |S-|),    q = a |S-| / (S+ + a |S-|),  m = (S+ + a |S-|) / (z + gamma S-)
    (m < 0 there), i.e. log-odds(p) = sign(z_i) log(1 + gamma) + log(S+/|S-|) and m = 1/(p - q):
    on units with z_i > 0 this is RGEq(kappa = log(1 + gamma), nu = 1, T = 1) exactly, with or without
    a bias (I22); on units with z_i < 0 it is RGEq(kappa = -log(1 + gamma), nu = 1). m (p - q) = 1,
    so it is conservative (I14, stopped = bias sink + the mass at z = 0). gamma = 0 is LRP-0 (I17).
    """

    gamma: float = 0.25

    def __post_init__(self) -> None:
        check_finite("gamma", self.gamma)
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")

    def _unit(self, layer: "LayerTrace", upper: Tensor) -> tuple[Tensor, Tensor]:
        M, y, g = layer.map, layer.input, float(self.gamma)
        yp, yn = y.clamp_min(0), y.clamp_max(0)
        Sp, Sn = M.cross(yp, yn)
        b = M.bias_like(Sp)
        if b is not None:
            Sp, Sn = Sp + b.clamp_min(0), Sn + b.clamp_max(0)
        z = Sp + Sn
        pos, neg = z > 0, z < 0
        cp = torch.where(pos, upper / torch.where(pos, z + g * Sp, 1.0), 0.0)
        cn = torch.where(neg, upper / torch.where(neg, z + g * Sn, 1.0), 0.0)
        t1, t2 = M.cross_t((1 + g) * cp + cn, cp + (1 + g) * cn)  # (W+^T G + W-^T H, W-^T G + W+^T H)
        stopped = torch.where(z == 0, upper, 0.0).flatten(1).sum(1)
        if b is not None:
            share = cp * (b + g * b.clamp_min(0)) + cn * (b + g * b.clamp_max(0))
            stopped = stopped + share.flatten(1).sum(1)
        return yp * t1 + yn * t2, stopped

    def handover(self, Sp: Tensor, Sn: Tensor) -> Handover:
        """I22: p = a S+ / (a S+ + |S-|) where z > 0, S+ / (S+ + a |S-|) where z < 0 (a = 1 + gamma),
        m = 1/(p - q); the whole token stops where z = 0."""
        z, a = Sp + Sn, 1.0 + float(self.gamma)
        wp, wn = torch.where(z > 0, a * Sp, Sp), torch.where(z < 0, -a * Sn, -Sn)
        stop = z == 0
        p = safe_divide(wp, wp + wn)
        q = 1 - p
        m = torch.where(stop, 0.0, 1 / torch.where(stop, 1.0, p - q))
        return Handover(torch.where(stop, 0.0, p), torch.where(stop, 0.0, q), stop.to(Sp.dtype), m)


@dataclass(frozen=True)
class ZPlus(AlphaBeta):
    """The z+ rule: R_j = sum_i Z+_ij / S+_i R_i (0/0 := 0), Z+_ij = the positive part of W_ij y_j
    (inputs of both signs: W+ y+ + W- y-), the bias b_i > 0 a unit of the + branch (its share ends in
    the bias sink), as zennit 0.5.1's ``ZPlus``.

    As a law it is AlphaBeta(1, 0) (I15): p = 1, q = 0, m = 1, stop = 0, routing in the + branch
    proportional to Z+_ij (route temperature 1); a unit with S+ = 0 hands its mass to the empty branch,
    i.e. the cemetery. Conservative (I14)."""

    alpha: float = field(default=1.0, init=False)
    beta: float = field(default=0.0, init=False)
    conservative: bool = field(default=True, init=False)

    @property
    def name(self) -> str:
        return "ZPlus(fast=True)" if self.fast else "ZPlus"


def _broadcast(v: Any, shape: tuple, dtype: torch.dtype, device: Any, what: str) -> Tensor:
    t = torch.as_tensor(v, dtype=dtype, device=device)
    if t.ndim == len(shape) + 1 and t.shape[0] == 1:  # a leading batch dimension of 1 (zennit's form)
        t = t[0]
    try:
        return torch.broadcast_to(t, shape)
    except RuntimeError:
        raise ValueError(f"ZBox: {what} of shape {tuple(t.shape)} does not broadcast to the input's shape "
                         f"{shape} per sample") from None


@dataclass(frozen=True, eq=False)
class ZBox(_ZooRule):
    """The z^B (box) rule of the first layer, inputs bounded by low <= x <= high (numbers or tensors
    that broadcast to the input's shape per sample, e.g. (1, 3, 1, 1) per channel):

        R_j = sum_i c_ij / D_i R_i,  c_ij = x_j W_ij - low_j W+_ij - high_j W-_ij >= 0,  D_i = sum_j c_ij,

    (zennit 0.5.1's ``ZBox``; the bias cancels in zennit's denominator and takes no share). As a law
    (docs/theory.md section 12): one branch, p = 1, q = 0, m = 1, stop = 0, routing pi(j | i) = c_ij / D_i;
    D_i = 0 sends the mass to the cemetery. Its terminal weights are the contributions c_ij, not x_j
    times a gradient. Conservative (I14).

    It applies to the first layers (:func:`first_layers`; the bounds follow the input through layout
    steps and selections); another layer with contributions is an error: use it as the first-layer
    rule of a :class:`Composite`. An input outside [low, high] is an error (c would be negative)."""

    low: Any = 0.0
    high: Any = 1.0

    def __post_init__(self) -> None:
        for name, v in (("low", self.low), ("high", self.high)):
            t = torch.as_tensor(v, dtype=torch.float64)
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"ZBox: {name} must be finite")
        if not bool((torch.as_tensor(self.low, dtype=torch.float64)
                     <= torch.as_tensor(self.high, dtype=torch.float64)).all()):
            raise ValueError("ZBox: need low <= high")

    @property
    def name(self) -> str:
        def show(v: Any) -> str:
            return repr(v) if isinstance(v, (int, float)) else f"tensor{tuple(torch.as_tensor(v).shape)}"
        return f"ZBox(low={show(self.low)}, high={show(self.high)})"

    def bounds(self, shape: tuple, dtype: torch.dtype = torch.float64, device: Any = None
               ) -> tuple[Tensor, Tensor]:
        """(low, high) broadcast to the per-sample input ``shape``."""
        return (_broadcast(self.low, tuple(shape), dtype, device, "low"),
                _broadcast(self.high, tuple(shape), dtype, device, "high"))

    def bounds_at(self, trace: "Trace") -> dict:
        """{layer index: (low, high) at the layer's input} for the first layers of ``trace``
        (:func:`first_layers`): the bounds carried from the input through layout steps and selections."""
        x = trace.x
        lo, hi = self.bounds(tuple(x.shape[1:]), x.dtype, x.device)
        return _near_input(trace, (lo.expand(x.shape), hi.expand(x.shape)))

    def box_at(self, layer: "LayerTrace", bounds: dict) -> tuple[Tensor, Tensor]:
        """(low, high) at ``layer``'s input from :meth:`bounds_at`'s ``bounds``; ValueError when the
        layer does not read the input or its input lies outside the box (c would be negative)."""
        box = bounds.get(layer.index)
        if box is None:
            raise ValueError(f"ZBox is a first-layer rule: layer {layer.index} ({layer.kind}, {layer.where}) "
                             "does not read the input; use it as Composite(first=ZBox(...), ...)")
        lo, hi = box
        x = layer.input
        if bool((x < lo).any()) or bool((x > hi).any()):
            raise ValueError(f"ZBox: the input lies outside [low, high] at layer {layer.index} ({layer.where}); "
                             "pass bounds that hold every input value")
        return lo, hi

    def sweep_context(self, trace: "Trace", target: Tensor) -> dict:
        return {"stopped": None, "bounds": self.bounds_at(trace)}

    def sweep_step(self, layer: "LayerTrace", r: Tensor, ctx: dict) -> Tensor:
        if layer.map.pass_through:
            lower, stopped = _pass(layer, r)
        else:
            lower, stopped = self._box(layer, r, *self.box_at(layer, ctx["bounds"]))
        ctx["stopped"] = stopped if ctx["stopped"] is None else ctx["stopped"] + stopped
        return lower

    def _unit(self, layer: "LayerTrace", upper: Tensor) -> tuple[Tensor, Tensor]:
        box = self.bounds(tuple(layer.input.shape[1:]), layer.input.dtype, layer.input.device)
        return self._box(layer, upper, *self.box_at(layer, {layer.index: box}))

    def _box(self, layer: "LayerTrace", upper: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        M, x = layer.map, layer.input
        D = M.apply(x) - M.apply(lo.expand_as(x), "pos") - M.apply(hi.expand_as(x), "neg")
        c = safe_divide(upper, D)
        stopped = torch.where(D == 0, upper, 0.0).flatten(1).sum(1)
        lower = x * M.transpose(c) - lo * M.transpose(c, "pos") - hi * M.transpose(c, "neg")
        return lower, stopped


@dataclass(frozen=True)
class Flat(_ZooRule):
    """The flat rule: R_j = sum_i 1{W_ij != 0} / N_i R_i, N_i = #{j : W_ij != 0} (the lower units
    connected to i; a convolution's zero padding is not a unit, nor are the zeros an explicit ``F.pad``
    writes: ``LayerTrace.unit_mask``, docs/theory.md section 11). As a law (docs/theory.md section 12):
    one branch, p = 1, q = 0, m = 1, stop = 0, routing pi(j | i) = 1{W_ij != 0} / N_i, whatever the values
    y; no bias unit (zennit zeroes the bias); a row with no edge (N_i = 0) sends its mass to the
    cemetery. Conservative (I14).

    zennit 0.5.1's ``Flat`` sets every weight to 1, an exact zero weight included; the law routes along
    the edges of the graph, 1{W != 0}. They agree where no weight is exactly 0."""

    def _unit(self, layer: "LayerTrace", upper: Tensor) -> tuple[Tensor, Tensor]:
        M, units = layer.map, layer.unit_mask()
        N = M.apply(units, "nz")
        stopped = torch.where(N == 0, upper, 0.0).flatten(1).sum(1)
        return units * M.transpose(safe_divide(upper, N), "nz"), stopped


@dataclass(frozen=True)
class WSquare(_ZooRule):
    """The w^2 rule: R_j = sum_i W_ij^2 / D_i R_i, D_i = sum_j W_ij^2 + b_i^2 over the lower units j (as
    for :class:`Flat`, the zeros a layout step writes are no units). As a law (docs/theory.md
    section 10): one branch, p = 1, q = 0, m = 1, stop = 0, routing pi(j | i) = W_ij^2 / D_i whatever
    the values y, the bias b_i a unit with weight b_i^2 (its share R_i b_i^2 / D_i ends in the bias
    sink; zennit 0.5.1's ``WSquare`` squares the bias too); D_i = 0 sends the mass to the cemetery.
    Conservative (I14)."""

    def _unit(self, layer: "LayerTrace", upper: Tensor) -> tuple[Tensor, Tensor]:
        M, units = layer.map, layer.unit_mask()
        D = M.apply(units, "sq")
        b = M.bias_like(D)
        if b is not None:
            D = D + b * b
        c = safe_divide(upper, D)
        stopped = torch.where(D == 0, upper, 0.0).flatten(1).sum(1)
        if b is not None:
            stopped = stopped + (c * b * b).flatten(1).sum(1)
        return units * M.transpose(c, "sq"), stopped


# -- composites -------------------------------------------------------------------------------------
#: the rules a composite may use per layer: each is a local law at the layer (the whole-graph
#: transforms Anchor and RiskAverse, and non-LRP rules, are not)
_LAYER_RULES = (LRP0, Epsilon, Gamma, ZBox, Flat, WSquare, AlphaBeta, RG, RGEq, GradientEquilibrium)


def _table(entries: Any, what: str, kinds: bool) -> tuple:
    """((keys, rule), ...) from a mapping or a sequence of (key or keys, rule) pairs."""
    items = entries.items() if isinstance(entries, dict) else entries
    out = []
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"{what} must be a dict or a sequence of (key, rule) pairs") from None
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"{what} must be a dict or a sequence of (key, rule) pairs, got {item!r}")
        keys, rule = item
        keys = (keys,) if isinstance(keys, str) else tuple(keys)
        if not keys or not all(isinstance(k, str) for k in keys):
            raise TypeError(f"{what}: a key must be a string or a tuple of strings, got {item[0]!r}")
        if kinds:
            bad = [k for k in keys if k not in LAYER_KINDS]
            if bad:
                raise ValueError(f"{what}: unknown layer kind {bad[0]!r} (known: {', '.join(LAYER_KINDS)})")
        out.append((keys, _check_rule(rule, what)))
    return tuple(out)


def _check_rule(rule: Any, what: str) -> LayerRule:
    if not isinstance(rule, _LAYER_RULES) or isinstance(rule, Composite):
        raise TypeError(f"{what}: a composite takes a per-layer law ({', '.join(c.__name__ for c in _LAYER_RULES)}), "
                        f"got {type(rule).__name__}")
    return rule


@dataclass(frozen=True, eq=False, kw_only=True)
class Composite(LayerRule):
    """A rule per layer (docs/theory.md section 12): a law whose kernel changes with the layer; it is Markov
    because each layer's rule is (I14 holds with every layer's stopped mass).

    Which rule a layer with contributions gets, first match wins:
      1. ``names``: by the module's qualified name (``LayerTrace.module``, e.g. "features.0"), exact;
      2. ``first``: at the first layers (:func:`first_layers`): a rule for any kind, or a table by kind;
      3. ``kinds``: by the operation kind (:data:`LAYER_KINDS`: "linear", "conv", "pool", "add",
         "norm", "scale", "map", "attention");
      4. ``default`` (LRP0 when not given).
    Tables are dicts or sequences of (key or tuple of keys, rule) pairs; the four fields are
    keyword-only (a preset's own parameters come first). Per-layer rules: LRP0 (as a
    law the gradient equilibrium, I17), Epsilon, Gamma, ZPlus, ZBox, Flat, WSquare, AlphaBeta, RG,
    RGEq, GradientEquilibrium. Selections and copy layers pass relevance to the winner whatever the
    rule. The presets below prepend the user's tables to theirs (zennit's ``layer_map``)."""

    kinds: Any = ()
    names: Any = ()
    first: Any = None
    default: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", _table(self.kinds, "kinds", True))
        object.__setattr__(self, "names", _table(self.names, "names", False))
        first = self.first
        if first is not None:
            first = ((None, _check_rule(first, "first")),) if isinstance(first, LayerRule) \
                else _table(first, "first", True)
        object.__setattr__(self, "first", first)
        if self.default is not None:
            _check_rule(self.default, "default")

    @property
    def name(self) -> str:
        parts = [f"{f}={_show(getattr(self, f))}" for f in self._params()]
        for f in ("kinds", "names", "first", "default"):
            v = getattr(self, f)
            if f == "first" and v and len(v) == 1 and v[0][0] is None:  # one rule for any kind
                parts.append(f"first={v[0][1].name}")
            elif v:
                parts.append(f"{f}={_show(v)}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def _params(self) -> tuple:
        """The preset's own parameters (for the name)."""
        return ()

    def _preset(self) -> tuple[tuple, tuple, LayerRule]:
        """(first table, kinds table, default) of the preset (a plain Composite: none, LRP0)."""
        return (), (), LRP0()

    @cached_property
    def table(self) -> tuple[tuple, tuple, tuple, LayerRule]:
        """(names, first, kinds, default) as matched: the user's entries before the preset's."""
        first, kinds, default = self._preset()
        return (self.names, (self.first or ()) + first, self.kinds + kinds,
                self.default if self.default is not None else default)

    def rule_at(self, kind: str, module: str, first: bool) -> LayerRule:
        """The rule of a layer of operation ``kind``, module ``module``, reading the input or not."""
        names, firsts, kinds, default = self.table
        for keys, rule in names:
            if module in keys:
                return rule
        if first:
            for keys, rule in firsts:
                if keys is None or kind in keys:
                    return rule
        for keys, rule in kinds:
            if kind in keys:
                return rule
        return default

    def rules(self) -> tuple:
        """Every rule the composite may use (distinct objects)."""
        names, firsts, kinds, default = self.table
        out: list = []
        for rule in [r for _, r in names + firsts + kinds] + [default]:
            if all(rule is not o for o in out):
                out.append(rule)
        return tuple(out)

    def start(self, trace: "Trace", target: Tensor) -> Tensor:
        return trace.onehot(target) * trace.output

    def sweep_context(self, trace: "Trace", target: Tensor) -> dict:
        firsts = first_layers(trace)
        at = {layer.index: self.rule_at(layer.kind, layer.module, layer.index in firsts)
              for layer in trace.layers if not layer.map.pass_through}
        used = {id(r): r for r in at.values()}
        return {"stopped": torch.zeros_like(trace.output[:, 0]), "at": at,
                "sub": {k: r.sweep_context(trace, target) for k, r in used.items()}}

    def sweep_step(self, layer: "LayerTrace", r: Tensor, ctx: dict) -> Tensor:
        if layer.map.pass_through:
            lower, stopped = _pass(layer, r)
            ctx["stopped"] = ctx["stopped"] + stopped
            return lower
        rule = ctx["at"][layer.index]
        sub = ctx["sub"][id(rule)]
        before = sub["stopped"]
        lower = rule.sweep_step(layer, r, sub)
        after = sub["stopped"]
        if after is not None:
            ctx["stopped"] = ctx["stopped"] + (after if before is None else after - before)
        return lower

    def backward(self, layer: "LayerTrace", upper: Tensor) -> tuple[Tensor, Tensor]:
        """Not defined on a layer alone: which rule applies depends on the whole trace (the first
        layers); the sweep (:meth:`sweep`) and :meth:`layer_map` apply it."""
        raise TypeError("a Composite picks its rule per layer from the whole trace: use sweep() or layer_map()")


def _show(v: Any) -> str:
    if isinstance(v, LayerRule):
        return v.name
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)}"
    if isinstance(v, tuple):
        return "(" + ", ".join(_show(e) for e in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v)


# -- zennit's presets -------------------------------------------------------------------------------
def _base_kinds(epsilon: float) -> tuple:
    """zennit's ``layer_map_base`` and nn.Linear: sum nodes and average pools by LRP-0 (zennit's
    ``Norm``), a standalone BatchNorm / scaling passes relevance (zennit's ``Pass``; the flat rule on a
    diagonal map), dense maps by Epsilon."""
    return ((("pool", "add"), LRP0()), (("scale",), Flat()), (("linear",), Epsilon(epsilon)))


@dataclass(frozen=True, eq=False)
class EpsilonPlus(Composite):
    """zennit's ``EpsilonPlus``: ZPlus on convolutions, Epsilon(epsilon) on dense layers, LRP-0 on sum
    nodes and average pools (zennit's ``Norm``), Flat on a standalone scaling / BatchNorm (zennit's
    ``Pass``; backplay merges a BatchNorm that follows a convolution or a dense layer into it, as
    zennit's ``SequentialMergeBatchNorm`` canonizer does), Epsilon(epsilon) on every other map
    (matmul with a constant, LayerNorm, attention: zennit leaves them to the gradient)."""

    epsilon: float = 1e-6

    def _params(self) -> tuple:
        return ("epsilon",)

    def _preset(self) -> tuple[tuple, tuple, LayerRule]:
        return (), ((("conv",), ZPlus()),) + _base_kinds(self.epsilon), Epsilon(self.epsilon)


@dataclass(frozen=True, eq=False)
class EpsilonPlusFlat(EpsilonPlus):
    """zennit's ``EpsilonPlusFlat``: :class:`EpsilonPlus` with Flat on the first layer if it is a
    dense layer or a convolution (zennit: the first such module in registration order; backplay: the
    layers that read the input, :func:`first_layers`)."""

    def _preset(self) -> tuple[tuple, tuple, LayerRule]:
        _, kinds, default = super()._preset()
        return ((("linear", "conv"), Flat()),), kinds, default


@dataclass(frozen=True, eq=False)
class EpsilonAlpha2Beta1(Composite):
    """zennit's ``EpsilonAlpha2Beta1``: AlphaBeta(2, 1) on convolutions, the rest as :class:`EpsilonPlus`."""

    epsilon: float = 1e-6

    def _params(self) -> tuple:
        return ("epsilon",)

    def _preset(self) -> tuple[tuple, tuple, LayerRule]:
        return (), ((("conv",), AlphaBeta(2, 1)),) + _base_kinds(self.epsilon), Epsilon(self.epsilon)


@dataclass(frozen=True, eq=False)
class EpsilonAlpha2Beta1Flat(EpsilonAlpha2Beta1):
    """zennit's ``EpsilonAlpha2Beta1Flat``: :class:`EpsilonAlpha2Beta1` with Flat on the first layer if
    it is a dense layer or a convolution."""

    def _preset(self) -> tuple[tuple, tuple, LayerRule]:
        _, kinds, default = super()._preset()
        return ((("linear", "conv"), Flat()),), kinds, default


@dataclass(frozen=True, eq=False)
class EpsilonGammaBox(Composite):
    """zennit's ``EpsilonGammaBox``: ZBox(low, high) on a first layer that is a convolution,
    Gamma(gamma) on the other convolutions, Epsilon(epsilon) on dense layers, the rest as
    :class:`EpsilonPlus`. ``low`` / ``high``: the input's bounds (numbers, or tensors that broadcast
    to the input's shape per sample)."""

    low: Any = 0.0
    high: Any = 1.0
    epsilon: float = 1e-6
    gamma: float = 0.25

    def _params(self) -> tuple:
        return ("low", "high", "epsilon", "gamma")

    def _preset(self) -> tuple[tuple, tuple, LayerRule]:
        return ((("conv",), ZBox(self.low, self.high)),), ((("conv",), Gamma(self.gamma)),) \
            + _base_kinds(self.epsilon), Epsilon(self.epsilon)
