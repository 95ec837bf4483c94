"""The explained forward pass over the operation graph: what every rule reads.

A :class:`Trace` holds the batch ``x`` and the steps of the pass in topological order. Tensors are
numbered (0 is the input); each step reads ``sources`` and writes ``out``:

* a :class:`LayerTrace` (a layer: one linear map of docs/theory.md section 11 and the gate that follows it;
  ``map``, ``gate``, ``input`` = y^{l-1} (the stacked inputs of a sum node), ``z``, ``p``, ``y``);
* a :class:`LayoutStep` (view, permute, cat, slice, pad, expand, nearest upsampling ...): an index
  map, transparent to every rule (relevance moves by its transpose).

The report layers (``ExplainReport.layers``, :func:`backplay.gpu.unroll`'s boundaries) are the
input, the layer outputs that every path from the input to the output passes through (the add
node of a residual block, not the layers of its body), and the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from backplay.gpu.ops import Gate, LinearOp

Tensor = torch.Tensor

__all__ = ["LayerTrace", "LayoutStep", "Trace", "ALL_FIELDS"]

#: the per-layer fields a full pass keeps besides each layer's map, input and output (a rule declares
#: the ones it reads: :attr:`backplay.rules.Rule.pass_fields`)
ALL_FIELDS = frozenset({"z", "p"})


@dataclass(eq=False)
class LayerTrace:
    """Layer l of the explained pass: map and gate, input y^{l-1} (:attr:`input`), z^l and p^l (``None`` where the
    pass did not keep them: a pass that keeps :data:`ALL_FIELDS` keeps both at every layer; a pass
    that keeps fewer, for a rule that reads fewer, keeps neither a p that y^l gives or a linear layer's
    p = 1 (:meth:`through_gate`) nor a z that y^l stands for (:meth:`recursion_terms`)), y^l; ``index`` (1-based, topological order), ``kind`` ("linear", "conv", "pool",
    "maxpool", "add", "norm", "scale", "gate", "map", "attention", "copy"), ``sources`` / ``out``
    (tensor ids), ``where`` (the model's source line), ``module`` (the qualified name of the
    innermost module whose forward produced the layer's operation, e.g. ``"features.0"``; ``""`` for
    the root module's own forward: what a composite rule matches names against) and ``units`` (which
    entries of the input are units of the graph, ``None``: all; :meth:`unit_mask`)."""

    map: LinearOp
    gate: Gate
    kept_input: Any  # y^{l-1} as the pass keeps it: a tensor, or a sum node's sources (:attr:`input`)
    z: Tensor | None
    p: Tensor | None
    y: Tensor
    index: int = 0
    kind: str = ""
    sources: tuple = ()
    out: int = -1
    where: str = ""
    in_shapes: tuple = ()  # per-sample shapes of the sources of a sum node (broadcast ones are summed back)
    block: int | None = None  # attention layers (token mixing): their number, 0 first (the token anchor)
    module: str = ""
    units: Tensor | None = None  # bool [1, *input's per-sample shape]: which entries of ``input`` are units
    _offset: Any = field(default=None, repr=False)

    @property
    def input(self) -> Tensor:
        """y^{l-1}, [B, *map.in_shape]; a sum node's sources stacked along dim 1, made afresh at each read
        (the pass keeps the sources themselves, which their producers hold anyway: the stack lives only
        while the rule reading it holds it; a rule that never reads a sum node's input adds no copy)."""
        v = self.kept_input
        return torch.stack(v, dim=1) if isinstance(v, tuple) else v

    @property
    def input_shape(self) -> tuple:
        """The shape of :attr:`input`, [B, *map.in_shape] (no stack made)."""
        return (self.y.shape[0],) + tuple(self.map.in_shape)

    def unit_mask(self) -> Tensor:
        """A tensor like ``input``: 1 at its units, 0 at the constant entries a layout step wrote (the
        zeros of ``F.pad``, a ``cat`` with zeros: constants, not units of the graph, docs/theory.md
        section 11). What a law whose routing ignores the values counts (Flat, WSquare)."""
        x = self.input
        return torch.ones_like(x) if self.units is None else self.units.to(x.dtype).expand(x.shape).contiguous()

    def through_gate(self, r: Tensor) -> Tensor:
        """r * p^l, the chain rule at the gate (docs/theory.md I7): p as the pass kept it, else read back
        from y^l (ReLU, clamp: :meth:`~backplay.gpu.ops.Gate.backprop`), or 1 for a linear layer."""
        if self.p is not None:
            return r * self.p
        if not self.gate.activated:
            return r
        out = self.gate.backprop(r, self.y)
        if out is None:
            raise ValueError(f"this pass kept no p for the gate {self.gate!r}: record it with 'p' in its fields")
        return out

    def recursion_terms(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(z, the mask z == 0 as 0/1 in z's dtype, r where z == 0 and 0 elsewhere): z^l as the LRP-type
        recursions read it at the relevance ``r`` (LRP-0, epsilon, the gradient equilibrium's closed form:
        docs/theory.md I8, I17) with the units where they stop the token. z as the pass kept it, else y where the gate has
        y = z wherever y != 0 (linear, ReLU) and ``r`` vanishes wherever y does (a unit's relevance is
        its y times a sum, unless a standalone gate, a selection or another rule above passed some to a
        dead unit: then it needs its z), else the map's forward again. With y standing for z the mask
        is y == 0, wider than z == 0 only where r = 0, so every recursion gives the same numbers; the
        check costs one pass beyond the mask and the stopped relevance the recursions need anyway.
        Probing a layer with an arbitrary relevance (validate_rule) needs a pass that kept z."""
        if self.z is not None:
            z = self.z
        elif self.gate.z_where_nonzero:
            zero = (self.y == 0).to(self.y.dtype)
            r0 = r * zero
            lo, hi = torch.aminmax(r0) if r0.numel() else (0, 0)
            if lo == 0 and hi == 0:  # no relevance at a dead unit (NaN: recompute)
                return self.y, zero, r0
            z = self.map.forward(self.input)
        else:
            z = self.map.forward(self.input)
        zero = (z == 0).to(z.dtype)
        return z, zero, r * zero

    def offset(self) -> Tensor | None:
        """The gate's reward c per unit (y = p z + c): eps H(p) on softplus layers (I9), the constant
        of a saturated ReLU6; ``None`` where it is identically 0."""
        if self._offset is None:
            self._offset = self.gate.offset(self.z, self.p)
            if self._offset is None:
                self._offset = False
        return self._offset if self._offset is not False else None

    def split(self, lower: Tensor) -> list:
        """The relevance of the stacked input of a sum node per source (one tensor otherwise)."""
        if len(self.sources) == 1:
            return [lower]
        parts = list(lower.unbind(1))
        for i, shp in enumerate(self.in_shapes):
            if tuple(parts[i].shape[1:]) != tuple(shp):
                parts[i] = parts[i].sum_to_size((parts[i].shape[0],) + tuple(shp))
        return parts


@dataclass(eq=False)
class LayoutStep:
    """An index map ``fn(*inputs)`` of explained tensors (``in_shapes`` per sample)."""

    fn: Callable
    in_shapes: tuple
    sources: tuple
    out: int
    y: Tensor
    where: str = ""
    reshape: bool = False  # a pure reshape: the transpose is a reshape back

    def adjoint(self, r: Tensor) -> list:
        """The transpose of the index map at ``r``: one tensor per source."""
        B = r.shape[0]
        if self.reshape:
            return [r.reshape((B,) + tuple(self.in_shapes[0]))]
        with torch.enable_grad():
            zs = [torch.zeros((B,) + tuple(s), dtype=r.dtype, device=r.device, requires_grad=True)
                  for s in self.in_shapes]
            out = self.fn(*zs)
            if not out.requires_grad:
                return [torch.zeros_like(z).detach() for z in zs]
            gs = torch.autograd.grad(out, zs, r.reshape(out.shape), allow_unused=True)
        return [torch.zeros_like(z).detach() if g is None else g.detach() for z, g in zip(zs, gs)]


class Trace:
    """The explained forward pass of a batch (see the module docstring)."""

    def __init__(self, x: Tensor, steps: list, output_id: int, output: Tensor,
                 surrogate: Callable[[float], "Trace"] | None = None, temperature: float | None = None) -> None:
        self.x = x
        self.temperature = temperature  # every game gate at this temperature (a surrogate's pass); None: the model's
        self.steps = steps
        self.output_id = output_id
        self._output = output
        self._surrogate = surrogate
        self.layers = [s for s in steps if isinstance(s, LayerTrace)]
        self.n_layers = len(self.layers)
        self.n_blocks = sum(1 for s in self.layers if s.block is not None)  # attention layers
        self.cuts = _cuts(steps, output_id)
        self._source_ids = [s.sources for s in steps]

    @property
    def output(self) -> Tensor:
        """The model's output, [B, n_out]."""
        return self._output.flatten(1)

    def logit(self, target: Tensor) -> Tensor:
        """f_target(x) per sample, shape [B]."""
        return self.output.gather(1, target.view(-1, 1)).squeeze(1)

    def onehot(self, target: Tensor) -> Tensor:
        """The start measure at the output: one-hot at the target, shape [B, n_out]."""
        out = torch.zeros_like(self.output)
        out.scatter_(1, target.view(-1, 1), 1)
        return out

    def walk(self, start: dict, layer_fn: Callable, keep: Callable | None = None, release: bool = False
             ) -> tuple[Any, dict]:
        """The backward sweep over the steps (reverse topological order), shared by every rule.

        ``start``: {tensor id: value} (a tensor, or a tuple of tensors swept together); at a layer
        ``layer_fn(layer, value)`` gives the value at the map's input (the stacked inputs of a sum
        node); layout steps move values by their transpose; the values a tensor receives from its
        consumers are summed. ``keep(step, value)`` is called at every cut tensor (the report
        layers; :attr:`cuts`) and its results are returned by id. ``release``: each step is dropped
        from :attr:`steps` once swept (its buffers freed early; the trace is spent afterwards).
        Returns (the value at the input or ``None``, {cut id: kept})."""
        vals = dict(start)
        cut = set(self.cuts) if keep is not None else set()
        kept: dict = {}
        steps = self.steps
        for k in range(len(steps) - 1, -1, -1):
            step = steps[k]
            if release:
                steps[k] = None
                if isinstance(step, LayerTrace):
                    self.layers[step.index - 1] = None
            v = vals.pop(step.out, None)
            if v is None:
                continue
            tup = isinstance(v, tuple)
            if step.out in cut:
                kept[step.out] = keep(step, v)
            if isinstance(step, LayerTrace):
                lower = layer_fn(step, v)
                parts = list(zip(*[step.split(c) for c in lower])) if tup else step.split(lower)
            else:
                parts = list(zip(*[step.adjoint(c) for c in v])) if tup else step.adjoint(v)
            del step, v
            for sid, part in zip(self._sources(k), parts):
                old = vals.get(sid)
                if old is None:
                    vals[sid] = part
                elif tup:
                    vals[sid] = tuple(a + b for a, b in zip(old, part))
                else:
                    vals[sid] = old + part
        return vals.pop(0, None), kept

    def _sources(self, k: int) -> tuple:
        return self._source_ids[k]

    def surrogate(self, eps: float) -> "Trace":
        """The pass of the SoftplusGame surrogate: every gate at temperature eps
        (:meth:`backplay.gpu.ops.Gate.at_temperature`); this trace itself when it is that pass."""
        if self.temperature == eps:
            return self
        if self._surrogate is None:
            raise TypeError("this trace cannot be re-run with other gates")
        return self._surrogate(eps)


def _cuts(steps: list, output_id: int) -> list:
    """Ids of the layer outputs that every input-to-output path passes through, in order (the output
    excluded): in a topological order, t is such a cut iff no edge jumps over its position."""
    pos = {0: -1}
    for k, s in enumerate(steps):
        pos[s.out] = k
    jump = [0] * (len(steps) + 1)  # jump[k] > 0: some edge spans position k
    for k, s in enumerate(steps):
        for src in s.sources:
            a = pos[src]
            for j in range(a + 1, k):
                jump[j] += 1
    return [s.out for k, s in enumerate(steps)
            if isinstance(s, LayerTrace) and not jump[k] and s.out != output_id]
