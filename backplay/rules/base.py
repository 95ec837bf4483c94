"""The base of every rule: :class:`Rule`, :class:`LayerRule` and its sweep, :class:`Sweep`.

A rule is a frozen, parameter-only object. It never holds a model and never modifies one: the engine
(:func:`backplay.gpu.explain`) reads the model into its operation graph (:mod:`backplay.gpu.read`),
runs ONE batched forward pass and hands the rule the recorded :class:`~backplay.gpu.trace.Trace`.
This module depends on torch only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Union

import torch

if TYPE_CHECKING:  # pragma: no cover
    from backplay.gpu.trace import LayerTrace, Trace

Tensor = torch.Tensor

__all__ = ["Rule", "LayerRule", "Sweep", "Handover", "safe_divide", "check_finite", "check_positive",
           "option", "bias_sum", "lrp0_backward"]


def safe_divide(num: Tensor, den: Tensor, zero: Tensor | None = None, consume: bool = False) -> Tensor:
    """num / den with x/0 := 0 (in particular 0/0 := 0; num finite), elementwise; safe under autograd
    (the division never sees a zero denominator). ``zero``: the mask den == 0 as 0/1 in den's dtype,
    when the caller has it; ``consume=True`` hands it over (the caller does not read it after). The
    denominator is formed in the mask's buffer when the mask is made here or handed over: one buffer
    of den's size beside the result, not three. Arithmetic masks, (num (1 - zero)) / (den + zero):
    the same numbers as a masked fill (den + 0 = den, num * 1 = num), at a third of its cost on CPU
    (measured: 17 against 45 ms on 4M float32 entries, one thread)."""
    if zero is None:
        zero, consume = torch.eq(den, 0, out=torch.empty(den.shape, dtype=den.dtype, device=den.device)), True
    if consume and num.shape == den.shape and num.dtype == den.dtype:  # else num broadcasts over den
        return (1 - zero).mul_(num).div_(zero.add_(den))
    return num.mul(1 - zero).div_(den + zero)


def lrp0_backward(layer: "LayerTrace", r: Tensor) -> tuple[Tensor, Tensor]:
    """One layer of the LRP-0 recursion, the gradient equilibrium's closed form (docs/theory.md I8, I17):
    (R^{l-1}_j = y_j sum_i W_ij R_i / z_i, the stopped mass per sample: all of R_i where z_i = 0 and the
    bias share R_i b_i / z_i). Shared by :class:`~backplay.rules.LRP0` and the gradient equilibrium."""
    M = layer.map
    z, zero, r0 = layer.recursion_terms(r)
    stopped = r0.flatten(1).sum(1)
    del r0
    c = safe_divide(r, z, zero, consume=True)  # two buffers of z's size beside r and z, not four
    del zero
    if M.bias is not None:
        stopped = stopped + bias_sum(c, M.bias)
    return M.transpose(c).mul_(layer.input), stopped


def bias_sum(c: Tensor, b: Tensor) -> Tensor:
    """sum over the neurons of c * b per sample (the share of relevance a bias b absorbs: the bias
    sink, I14), b broadcast against c; a conv's [C, 1, ..., 1] bias as one sum per channel."""
    if c.ndim > 2 and b.ndim == c.ndim - 1 and all(n == 1 for n in b.shape[1:]):
        return c.flatten(2).sum(2) @ b.flatten()
    return (c * b).flatten(1).sum(1)


Number = Union[float, Tensor]


class Handover(NamedTuple):
    """A law's hand-over at the units of one layer (docs/theory.md, routing laws, I14-I18, and the LRP
    zoo): a token at unit i continues on the + branch (sign kept) with probability ``plus``, on the
    - branch (sign flipped) with ``minus``, and stops directly (the cemetery) with ``stop``
    (plus + minus + stop = 1); ``mult`` is the multiplier m at the transition, so the relevance a law
    moves is R^{l-1}_j = sum_i m_i R_i (plus_i pi(j | i, +) - minus_i pi(j | i, -)). Each field is a
    tensor of z's shape, or a float where the law's hand-over is the same at every unit (AlphaBeta,
    RG, RGEq with nu = 0). The one declaration of a law's hand-over: the routing sweep, the Hellinger
    sweep and validate_rule's named laws read it."""

    plus: Number
    minus: Number
    stop: Number
    mult: Number


def constant_handover(p: float) -> Handover:
    """The hand-over p, q = 1 - p, m = 1/(p - q) at every unit; where p = q the token stops (m would be
    undefined): RG, RGEq with nu = 0 (I16, I18)."""
    q = 1.0 - p
    if p == q:
        return Handover(0.0, 0.0, 1.0, 0.0)
    return Handover(p, q, 0.0, 1.0 / (p - q))


def equilibrium_handover(Sp: Tensor, Sn: Tensor, stop: Tensor | None = None) -> Handover:
    """The gradient equilibrium (I17) from the branch sums S+ >= 0, S- <= 0 (bias included): p = S+ /
    (S+ + |S-|), m = (S+ + |S-|) / z; the whole token stops where z = S+ + S- = 0. ``stop`` (optional):
    a direct stop taken first where z != 0 (Epsilon's stabiliser), the branches scaled by 1 - stop."""
    tot, z = Sp - Sn, Sp + Sn
    halt = z == 0
    p = safe_divide(Sp, tot)
    keep = 1.0 if stop is None else torch.where(halt, 0.0, 1.0 - stop)
    plus = torch.where(halt, 0.0, keep * p)
    minus = torch.where(halt, 0.0, keep * (1.0 - p))
    stopped = halt.to(Sp.dtype) if stop is None else torch.where(halt, 1.0, stop)
    return Handover(plus, minus, stopped, safe_divide(tot, z))


@dataclass(frozen=True)
class Rule:
    """Base class of every rule: ``relevance(trace, target) -> [B, n_0]``."""

    @property
    def name(self) -> str:
        """The rule and its parameters, e.g. ``"LRP0"`` or ``"AlphaBeta(alpha=2, beta=1)"``."""
        params = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                           if not (f.metadata.get("option") and getattr(self, f.name) == f.default))
        return type(self).__name__ + (f"({params})" if params else "")

    @property
    def pass_fields(self) -> frozenset:
        """What the rule reads of each layer of the pass besides its map, input and output: a subset of
        {"z", "p"} (:class:`backplay.gpu.trace.LayerTrace`); the engine records only that. Default:
        both; the routing laws none, the gradient-type rules p alone (what autograd keeps)."""
        return frozenset({"z", "p"})

    @property
    def pass_temperature(self) -> float | None:
        """The temperature of every game gate in the pass the rule sweeps: None, the model's own pass
        (SoftplusGame: the softplus_eps surrogate's, docs/theory.md I10); the engine records that pass."""
        return None

    def relevance(self, trace: "Trace", target: Tensor) -> Tensor:
        """Input relevance [B, n_0] for the recorded forward pass and targets (LongTensor [B])."""
        raise NotImplementedError


@dataclass(frozen=True)
class Sweep:
    """One backward sweep: the input relevance (shape of the first layer's input), the relevance at
    every layer's input in torch order ([0] input, [L] the start at the output layer), and the
    signed stopped mass per sample accumulated by the law (``None`` when the rule does not track it)."""

    relevance: Tensor
    layers: list
    stopped: Tensor | None = None


@dataclass(frozen=True)
class LayerRule(Rule):
    """A rule computed by one backward sweep, layer L down to the input."""

    def start(self, trace: "Trace", target: Tensor) -> Tensor:
        """The measure put on the output layer L, shape [B, n_L]."""
        raise NotImplementedError

    def backward(self, layer: "LayerTrace", upper: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Map the relevance of layer l (shape of ``layer.y``) to layer l-1 (shape of ``layer.input``).

        The stopped-mass API (docs/theory.md I14): a rule that absorbs relevance at this layer (a bias
        sink, a cemetery, a stabiliser) returns ``(lower, stopped)`` with ``stopped`` the signed mass
        it absorbed per sample (shape [B]), so that sum(upper) = sum(lower) + stopped per sample. The
        sweep adds it up in :attr:`Sweep.stopped`, and :func:`backplay.validate_rule` checks
        conservation with it (a rule that returns ``lower`` alone is taken to stop nothing)."""
        raise NotImplementedError

    def finish(self, trace: "Trace", lower: Tensor) -> Tensor:
        """Turn the measure reached at layer 0 into the input relevance (default: unchanged)."""
        return lower

    def view(self, y: Tensor, r: Tensor) -> Tensor:
        """The relevance reported at a layer whose values are ``y``, from the swept measure ``r``."""
        return r

    def layer_map(self, trace: "Trace", target: Tensor
                  ) -> Callable[["LayerTrace", Tensor], tuple[Tensor, Tensor | None]]:
        """One layer's map as the sweep applies it, for probing (:func:`backplay.validate_rule`).

        Returns ``apply(layer, upper) -> (lower, stopped)``: ``layer`` one of ``trace.layers``,
        ``upper`` its output relevance (any shape with ``layer.y``'s number of elements), ``lower``
        shaped like ``layer.input``, ``stopped`` the signed mass absorbed at this layer per sample
        ([B], the stopped-mass API of :meth:`backward`, docs/theory.md I14) or ``None`` when the rule
        reports none. Each call sets up the sweep's context afresh (e.g. the routing laws' anchor
        and the risk-averse U sweep over the whole trace, I20), so layers may be mapped in any order
        and more than once. NotImplementedError for a rule with no per-layer map on this trace."""
        if type(self).backward is LayerRule.backward and type(self).sweep_step is LayerRule.sweep_step:
            raise NotImplementedError(f"{self.name} has no per-layer map on the explained pass "
                                      "(it defines no backward(layer, upper))")

        def apply(layer: "LayerTrace", upper: Tensor) -> tuple[Tensor, Tensor | None]:
            ctx = self.sweep_context(trace, target)  # fresh: its stopped mass is this layer's alone
            lower = self.sweep_step(layer, upper.reshape(layer.y.shape), ctx)
            return lower, ctx["stopped"]

        return apply

    # -- the sweep ------------------------------------------------------------------------------
    def sweep_context(self, trace: "Trace", target: Tensor) -> dict:
        """The state one sweep shares across layers (a dict with at least ``"stopped"``: the signed
        stopped mass so far per sample, or None). Rules that need the whole trace (the routing laws'
        anchor and risk sweep, composites' choice per layer) extend it."""
        return {"stopped": None}

    def sweep_step(self, layer: "LayerTrace", r: Tensor, ctx: dict) -> Tensor:
        """One layer of the sweep: :meth:`backward`, its stopped mass (if it returns one) added to
        ``ctx["stopped"]``. A composite calls its per-layer rules through this step."""
        out = self.backward(layer, r)
        if not isinstance(out, tuple):
            return out
        lower, stopped = out
        stopped = torch.as_tensor(stopped, dtype=r.dtype, device=r.device).reshape(r.shape[0])
        ctx["stopped"] = stopped if ctx["stopped"] is None else ctx["stopped"] + stopped
        return lower

    def sweep(self, trace: "Trace", target: Tensor, keep_layers: bool = True,
              release: bool = False) -> Sweep:
        """The backward sweep over the trace's operation graph (:meth:`Trace.walk`).
        ``keep_layers=False``: ``Sweep.layers`` is left empty. ``release=True``: each step is dropped
        once swept (frees its buffers early; the trace is spent afterwards)."""
        ctx = self.sweep_context(trace, target)
        r = self.start(trace, target)
        keep = (lambda step, v: self.view(step.y, v.reshape(step.y.shape))) if keep_layers else None
        top = self.view(trace.output, r) if keep_layers else None
        lower, kept = trace.walk({trace.output_id: r},
                                 lambda layer, v: self.sweep_step(layer, v.reshape(layer.y.shape), ctx),
                                 keep, release)
        if lower is None:
            lower = torch.zeros_like(trace.x)
        lower = self.finish(trace, lower)
        rel = [lower] + [kept[i] for i in trace.cuts] + [top] if keep_layers else []
        return Sweep(lower, rel, ctx["stopped"])

    def relevance(self, trace: "Trace", target: Tensor) -> Tensor:
        return self.sweep(trace, target).relevance


def option(default: bool = False) -> Any:
    """A keyword-only field for a way of computing that is not part of the law (``fast``): left out of
    :attr:`Rule.name` at its default."""
    return dataclasses.field(default=default, kw_only=True, metadata={"option": True})


def check_finite(name: str, v: float) -> None:
    """ValueError unless ``v`` is a finite number (parameter validation of the rules)."""
    if not math.isfinite(float(v)):
        raise ValueError(f"{name} must be finite, got {v}")


def check_positive(name: str, v: float) -> None:
    """ValueError unless ``v`` is a finite number > 0."""
    check_finite(name, v)
    if not float(v) > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
