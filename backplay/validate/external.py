"""Rules implemented in other libraries as black boxes of :func:`validate_rule` (docs/theory.md sections
8 and 10, I23: a rule implemented elsewhere is classified exactly as backplay's rule of the same
definition).

zennit and captum compute LRP as a *modified gradient*: hooks on the model's modules replace the
gradient that autograd moves between modules by the relevance. :func:`black_box` reads such an
implementation layer by layer, in validate_rule's five-parameter form ``fn(model, x, target, layer,
upper) -> (lower, stopped)``:

* ``setup(model, x)`` returns a context manager inside which ``model`` (a float64 deep copy of the
  validated model, never the model itself) carries the implementation's hooks; it yields the forward
  callable to run (``None``: the model itself). :func:`zennit_rule` and :func:`captum_rule` are such
  setups for a zennit ``Composite`` and a captum ``LRP``; :func:`as_layer_map` recognises both.
* Layer l of backplay's chain (``backplay.gpu.unroll``: one linear map + its gate) is found among the
  model's leaf modules by value, on a forward pass of a clean copy: its *input module* is the first
  leaf module call (after layer l-1's) whose raw input equals y^{l-1} (shape and values, 1e-9
  relative), its *output module* the first call from there whose output equals z^l, the map's output
  before the gate (the Linear / Conv / pool itself; a ReLU module or ``F.relu`` after it belongs to
  no layer map). A layer no module computes (a functional convolution) is a ValueError.
* The layer map: the batch of N upper relevances is one forward pass of x repeated N times, with the
  implementation's hooks and backplay's own, put around them: layer l's input module gets a copy of
  its raw input (the hooks of the module that reads it go on the copy, those of the module that wrote
  it stay on the original), and layer l's output module passes its output on through an identity
  node whose backward hands down ``upper`` (below the hooks the module put on its own output, above
  those of the modules that read it). A backward pass from the model's output (start f_target
  e_target) runs every hook of the implementation as in its own sweep; the gradient that reaches the
  copied input, after the implementation's hooks on it, is the lower relevance. This is the
  modified-gradient convention of both libraries (relevance = the gradient a module's input receives
  once the module's hooks have run; the relevance handed to a module's output is what its hooks turn
  into a gradient): zennit's hooks return the relevance as the input's gradient (the reducer
  multiplies by the input), captum's input hook multiplies the gradient by the input and its output
  hook divides the relevance by z'.

Gates. The relevance is injected below the gate: the map is "relevance at z^l -> relevance at
y^{l-1}", so the gate's backward is in no layer map. backplay's own layer maps treat the gate the
same way (a unit's mass moves along its edges whatever its activity); zennit (``Pass`` on
activations) and captum (its rule for ``nn.ReLU``) pass relevance through a ReLU unchanged, so the
composition of the maps is their sweep. A functional ``F.relu`` is a plain gradient in both
libraries (a mask 1[z > 0]; captum takes the mask of its modified pass, z computed with the modified
weights): on a ReLU net under zennit the mask only hits units of value 0, whose relevance is 0
anyway; under captum put activations in ``nn.ReLU`` modules (captum's LRP supports ReLU, Dropout and
Tanh modules).

Stopped mass. A library does not say where the mass it does not pass down goes (a bias share, a
stabiliser). With ``stopped=True`` (the default) the black box reports per probe the defect
sum(upper) - sum(lower) as the stopped mass: validate_rule then identifies the hand-over of neurons
that stop mass exactly as for backplay's own rules (whose reported stopped mass is their defect,
I14), so the two reports agree (I23). The conservation row then holds by construction (it checks
nothing); ``stopped=False`` reports the raw per-layer defect instead, and the hand-over of neurons
that stop mass is then not identified (validate_rule's named-rule distances are upper bounds).

Integration: ``validate_rule`` takes the objects themselves through :func:`as_layer_map` (a zennit
``Composite``, a captum ``LRP``; ``None`` for anything else). The peers stay optional: this module
never imports them; it recognises their objects through ``sys.modules`` (an object of a library is
only there once the library is imported).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

__all__ = ["LayerMap", "black_box", "zennit_rule", "captum_rule", "as_layer_map"]

D = torch.float64
Setup = Callable[[torch.nn.Module, torch.Tensor], ContextManager[Any]]
_MATCH_RTOL = 1e-9  # identification of a module's tensor with a trace value (not a validated figure)


@dataclass
class _Call:
    """One call of a leaf module: ``key`` (module name, occurrence), its raw first input and output."""

    key: tuple
    input: Any
    output: Any = None


class _Inject(torch.autograd.Function):
    """Identity forward; backward hands down ``upper`` whatever arrives (the injected relevance)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        ctx.upper = upper
        return t.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.upper.reshape(grad.shape).to(grad.dtype), None


@contextlib.contextmanager
def _recorder(model: torch.nn.Module, read: tuple | None = None, inject: tuple | None = None
              ) -> Iterator[dict]:
    """Record every leaf module call of ``model`` (key -> :class:`_Call`): the raw input by a forward
    pre-hook put before all others, the output by a forward hook put after all others. ``read``: the
    call whose input is replaced by a copy (recorded; the hooks of the module that reads it go on the
    copy, those of the module that wrote it stay on the original); ``inject`` = (key, upper): the
    call whose output is passed on through :class:`_Inject` (below the hooks the module put on its
    output, above those of the modules that read it)."""
    calls: dict = {}
    counts: dict = {}
    pending: dict = {}
    handles = []

    def pre(name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> tuple | None:
            k = counts.get(name, 0)
            counts[name] = k + 1
            call = _Call((name, k), args[0] if args else None)
            calls[call.key] = call
            pending.setdefault(name, []).append(call)
            if call.key == read:
                call.input = args[0].clone()
                return (call.input,) + tuple(args[1:])
            return None
        return hook

    def post(name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            call = pending[name].pop()
            call.output = output
            if inject is not None and call.key == inject[0]:
                call.output = _Inject.apply(output, inject[1])
                return call.output
            return None
        return hook

    try:
        for name, module in model.named_modules():
            if next(module.children(), None) is not None:
                continue
            handles.append(module.register_forward_pre_hook(pre(name), prepend=True))
            handles.append(module.register_forward_hook(post(name)))
        yield calls
    finally:
        for h in handles:
            h.remove()


def _same(t: Any, ref: torch.Tensor) -> bool:
    """``t`` (one module tensor, batch 1) holds the trace value ``ref`` [1, ...]: shape and values."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(ref.shape):
        return False
    a, b = t.detach().to(D), ref.detach().to(D)
    return bool((a - b).abs().max() <= _MATCH_RTOL * max(1.0, float(b.abs().max())))


def _plan(model: torch.nn.Module, x: torch.Tensor) -> list:
    """Per backplay layer l (index l-1): (input module call key, output module call key); see the
    module docstring. ``x``: one input with a batch dimension of 1."""
    from backplay.gpu.engine import prepare

    with torch.no_grad():
        layers = prepare(model, x).trace().layers
        clean = copy.deepcopy(model).to(D)
        with _recorder(clean) as calls:
            clean(x.detach().to(D))
    order = list(calls.values())
    plan, start = [], 0
    for layer in layers:
        # the module the reader names for the layer, if one call of it maps y^(l-1) to z^l: values alone
        # do not decide where a dead layer (y^(l-1) = z^l = 0) lies, an activation maps 0 to 0 too
        named = next((i for i in range(start, len(order)) if order[i].key[0] == layer.module
                      and _same(order[i].input, layer.input) and _same(order[i].output, layer.z)), None)
        if named is not None:
            i_in = i_out = named
        else:
            i_in = next((i for i in range(start, len(order)) if _same(order[i].input, layer.input)), None)
            i_out = None if i_in is None else next(
                (i for i in range(i_in, len(order)) if _same(order[i].output, layer.z)), None)
        if i_out is None:
            raise ValueError(f"backplay's layer {layer.index} ({layer.kind}, {layer.where}) is not computed by "
                             "the model's modules (no leaf module call maps y^(l-1) to z^l): the black box "
                             "reads layers at module boundaries; write that map as a module (nn.Linear, "
                             "nn.Conv2d, a pool)")
        plan.append((order[i_in].key, order[i_out].key))
        start = i_out + 1
    return plan


class LayerMap:
    """A modified-gradient implementation as validate_rule's black box ``fn(model, x, target, layer,
    upper) -> (lower, stopped)`` (module docstring; I23). Build it with :func:`black_box`.

    Attributes: ``setup`` (the implementation's hooks, see :func:`black_box`), ``stopped`` (report
    the defect as the stopped mass), ``__name__`` (the name validate_rule prints)."""

    def __init__(self, setup: Setup, name: str, stopped: bool = True) -> None:
        if not callable(setup):
            raise TypeError(f"setup must be a callable (model, x) -> context manager, got {type(setup).__name__}")
        self.setup = setup
        self.stopped = bool(stopped)
        self.__name__ = name
        self._cache: tuple | None = None  # (model, x, plan) of the last call

    def __repr__(self) -> str:
        return f"LayerMap({self.__name__})"

    def plan(self, model: torch.nn.Module, x: torch.Tensor) -> list:
        """(input module key, output module key) per backplay layer (cached for one model and input)."""
        c = self._cache
        if c is None or c[0] is not model or c[1].shape != x.shape or not torch.equal(c[1], x):
            self._cache = (model, x.detach().clone(), _plan(model, x))
        return self._cache[2]

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, target: int, layer: int,
                 upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """The lower relevances [N, n_{l-1}] of a batch of upper relevances [N, n_l] at layer l (1..L)
        of the explained pass of ``x`` (batch dimension 1), and the stopped mass per probe [N]."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        x = torch.as_tensor(x).detach().to(D)
        if x.ndim == 0 or x.shape[0] != 1:
            raise ValueError(f"x must be ONE input with a batch dimension of 1, got shape {tuple(x.shape)}")
        plan = self.plan(model, x)
        if not 1 <= layer <= len(plan):
            raise ValueError(f"layer must be 1..{len(plan)} (backplay's layers of this model), got {layer}")
        key_in, key_out = plan[layer - 1]
        U = torch.as_tensor(upper, dtype=D)
        N = U.shape[0]
        xb = x.expand((N,) + tuple(x.shape[1:])).clone().requires_grad_(True)
        work = copy.deepcopy(model).to(D)  # the implementation's hooks go on this copy only
        with self.setup(work, xb) as forward:
            with _recorder(work, read=key_in, inject=(key_out, U)) as calls:
                out = (work if forward is None else forward)(xb)
            start = torch.zeros_like(out)
            start.view(N, -1)[:, int(target)] = out.detach().view(N, -1)[:, int(target)]
            (lower,) = torch.autograd.grad(out, calls[key_in].input, grad_outputs=start)
        lower = lower.detach().reshape(N, -1)
        if not self.stopped:
            return lower
        return lower, U.reshape(N, -1).sum(1) - lower.sum(1)


def black_box(setup: Setup, name: str | None = None, stopped: bool = True) -> LayerMap:
    """A modified-gradient implementation (hooks that make autograd move relevance) as validate_rule's
    five-parameter black box (module docstring; docs/theory.md section 13, I23).

    Args:
        setup: ``setup(model, x)`` -> a context manager that puts the implementation's hooks on
            ``model`` (a float64 deep copy of the validated model) for the batch ``x`` and removes them
            on exit; it yields the forward callable (``None``: ``model`` itself). Relevance must be
            the gradient at module inputs once the implementation's hooks have run, and the gradient
            handed to a module's output before its own hooks (zennit's and captum's convention).
        name: the name in the report (default: the setup's name).
        stopped: report the per-probe defect sum(upper) - sum(lower) as the stopped mass (module
            docstring: the hand-over of neurons that stop mass is identified, conservation then
            holds by construction).

    Example (a zennit composite by hand; :func:`zennit_rule` does this)::

        box = black_box(lambda model, x: composite.context(model), name="zennit EpsilonAlpha2Beta1")
        validate_rule(box, model, x, target)
    """
    return LayerMap(setup, name or getattr(setup, "__name__", type(setup).__name__), stopped)


def _zennit_composite_type() -> type | None:
    core = sys.modules.get("zennit.core")
    return None if core is None else core.Composite


def _captum_lrp_type() -> type | None:
    lrp = sys.modules.get("captum.attr._core.lrp")
    return None if lrp is None else lrp.LRP


def zennit_rule(composite: Any, name: str | None = None, stopped: bool = True) -> LayerMap:
    """A zennit ``Composite`` (e.g. ``zennit.composites.EpsilonAlpha2Beta1()`` or a
    ``LayerMapComposite``) as a black box: registered on a float64 deep copy of the model for each
    probe batch (``composite.context``), removed on exit, also on error.

    Conventions (state them when comparing with backplay's rules): zennit's rules divide by
    ``z + eps sign(z)`` (sign(0) := 1), eps = 1e-6 by default; a callable stabiliser ``lambda d:
    torch.where(d == 0, torch.ones_like(d), d)`` makes them exact (0/0 := 0, backplay's
    ``safe_divide``). zennit's AlphaBeta counts a bias in the branch of its sign and hands down only
    the x-shares (the bias share is stopped), as backplay's AlphaBeta; its Epsilon divides by the
    full z (bias share stopped) and stops eps/(|z| + eps) more."""
    ctype = _zennit_composite_type()
    if ctype is None or not isinstance(composite, ctype):
        raise TypeError(f"composite must be a zennit Composite, got {type(composite).__name__}")

    def setup(model: torch.nn.Module, x: torch.Tensor) -> ContextManager[Any]:
        return composite.context(model)

    return LayerMap(setup, name or f"zennit {type(composite).__name__}", stopped)


def captum_rule(lrp: Any, name: str | None = None, stopped: bool = True) -> LayerMap:
    """A captum ``LRP`` instance (its model's per-layer rules: ``module.rule = EpsilonRule()``,
    ``Alpha1_Beta0_Rule()``, ``GammaRule()``, or captum's defaults) as a black box.

    For each probe batch the setup does on a deep copy of the validated model (its modules' ``rule``
    attributes come with it; validate the model ``lrp`` wraps, see :func:`as_layer_map`) what
    ``LRP.attribute`` does (captum 0.9, ``captum/attr/_core/lrp.py``): attach the rules, run the first
    pass (keeps each layer's input activations and modifies the weights: w -> w+ for
    Alpha1_Beta0_Rule, w + gamma w+ for GammaRule; the bias is kept unless ``set_bias_to_zero``),
    register the rule hooks (output hook: relevance / (z' + eps sign z'), z' the modified layer's
    output on the kept activations; input hook: gradient x input; ReLU / Dropout / Tanh modules pass
    relevance unchanged), yield captum's forward wrapper, and restore the copy on exit. So the layer
    map at a Linear is R_j = sum_i x_j w'_ij R_i / (sum_k x_k w'_ik + b_i + eps sign(...)); the
    start (f_target on the target) is backplay's (captum uses 1 and multiplies by f_target after)."""
    ltype = _captum_lrp_type()
    if ltype is None or not isinstance(lrp, ltype):
        raise TypeError(f"lrp must be a captum.attr.LRP instance, got {type(lrp).__name__}")

    @contextlib.contextmanager
    def setup(model: torch.nn.Module, x: torch.Tensor) -> Iterator[Callable]:
        peer = type(lrp)(model)
        peer._original_state_dict = model.state_dict()
        peer.layers = []
        peer.backward_handles, peer.forward_handles = [], []
        try:
            peer._get_layers(model)
            peer._check_and_attach_rules()
            peer._compute_output_and_change_weights((x,), None, None)
            peer._register_forward_hooks()
            yield peer._forward_fn_wrapper
        finally:
            peer._restore_model()

    return LayerMap(setup, name or "captum LRP", stopped)


def as_layer_map(rule: Any, model: Any) -> LayerMap | None:
    """The black box of a peer library's rule object: a zennit ``Composite`` (:func:`zennit_rule`) or
    a captum ``LRP`` (:func:`captum_rule`, which must wrap ``model`` itself); ``None`` for anything
    else (validate_rule then takes ``rule`` as it is)."""
    ctype, ltype = _zennit_composite_type(), _captum_lrp_type()
    if ctype is not None and isinstance(rule, ctype):
        return zennit_rule(rule)
    if ltype is not None and isinstance(rule, ltype):
        if rule.model is not model:
            raise ValueError("the captum LRP instance wraps another model than the one validated: pass "
                             "LRP(model) built on the model you validate (its modules carry the rules)")
        return captum_rule(rule)
    return None
