"""Layer maps: a torch model read as a chain of affine maps and gates (THEORY.md sections 0-3).

Every rule and every occupation computation in :mod:`backplay.gpu` works on the same two objects:

* an :class:`AffineMap` ``z = A y + b`` (today :class:`Dense`, the ``nn.Linear`` layer; convolutions
  will be further subclasses). A map can apply itself forward with any weight of its shape
  (``W``, ``|W|``, ``W+``, ``W-``) and its adjoint (``g -> g A``, the transpose), and knows its row
  masses ``gamma_i = sum_j |W_ij|`` (the discount of the GV game);
* a :class:`Gate`: the probability ``p(z)`` that the player at a neuron continues. ReLU continues iff
  ``z > 0`` (ties stop, torch's convention ``relu'(0) = 0``), softplus_eps continues with probability
  ``sigmoid(z/eps)`` (the Gibbs policy of the entropic game, I10), a linear layer always continues.

:func:`read_model` turns an ``nn.Sequential`` into a :class:`Network` without touching the model: the
weights are ``detach()``-ed views (cast only where the compute dtype differs), no hook is
registered, no forward of the model is run (so its training flag, its ``requires_grad`` flags and
its hooks are irrelevant and untouched). :meth:`Network.trace` runs the one batched forward pass and
records every layer's input, pre-activation, gate and output.

Softplus is computed here as ``eps * logaddexp(0, z/eps)``, never with ``nn.Softplus``: torch's module
switches to the identity above ``threshold`` (default 20 on ``beta*z``), which is off by up to
``eps*exp(-20)`` and would break float64 exactness tests (THEORY.md section 3). The threshold of the
module is therefore ignored; its ``beta`` gives ``eps = 1/beta``.

Dropout modules are read as the identity: the explained function is the deterministic (eval-mode)
network, whatever the model's training flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "AffineMap",
    "Dense",
    "Gate",
    "LinearGate",
    "ReLUGate",
    "SoftplusGate",
    "Layer",
    "LayerTrace",
    "Network",
    "Trace",
    "read_model",
    "read_structure",
    "network_from_structure",
    "SUPPORTED_MODULES",
]

SUPPORTED_MODULES = "Linear, ReLU, Softplus, Identity, Dropout, nested Sequential"


# --------------------------------------------------------------------------------------------
# affine maps
# --------------------------------------------------------------------------------------------
class AffineMap:
    """``z = A y + b`` with ``A`` linear. Subclasses implement :meth:`forward` and :meth:`adjoint`.

    ``weight`` arguments select another weight tensor of the same shape as :attr:`weight`
    (e.g. :attr:`abs_weight`); ``None`` means the map's own weight.
    """

    weight: Tensor
    bias: Tensor | None

    def forward(self, y: Tensor, weight: Tensor | None = None, bias: bool = True) -> Tensor:
        raise NotImplementedError

    def adjoint(self, g: Tensor, weight: Tensor | None = None) -> Tensor:
        """The transpose map applied to ``g`` (shape of ``z``), giving the shape of ``y``."""
        raise NotImplementedError

    @cached_property
    def abs_weight(self) -> Tensor:
        return self.weight.abs()

    @cached_property
    def positive_weight(self) -> Tensor:
        return self.weight.clamp_min(0)

    @cached_property
    def negative_weight(self) -> Tensor:
        return self.weight.clamp_max(0)

    def row_mass(self) -> Tensor:
        """gamma_i = sum_j |W_ij|, broadcastable against ``z`` (batch first)."""
        raise NotImplementedError

    def bias_like(self, z: Tensor) -> Tensor | None:
        """The bias broadcast to the shape of ``z``, or ``None`` for a bias-free map."""
        raise NotImplementedError


class Dense(AffineMap):
    """``nn.Linear``: ``z = y W^T + b`` on batches ``y`` of shape [B, n_in]."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        if weight.ndim != 2:
            raise ValueError(f"a dense weight must be 2-d, got shape {tuple(weight.shape)}")
        self.weight = weight
        self.bias = bias

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, y: Tensor, weight: Tensor | None = None, bias: bool = True) -> Tensor:
        w = self.weight if weight is None else weight
        return F.linear(y, w, self.bias if bias else None)

    def adjoint(self, g: Tensor, weight: Tensor | None = None) -> Tensor:
        w = self.weight if weight is None else weight
        return g @ w

    def row_mass(self) -> Tensor:
        return self.abs_weight.sum(dim=1)

    def bias_like(self, z: Tensor) -> Tensor | None:
        return None if self.bias is None else self.bias.expand_as(z)

    def __repr__(self) -> str:
        return f"Dense({self.in_features} -> {self.out_features}, bias={self.bias is not None})"


# --------------------------------------------------------------------------------------------
# gates
# --------------------------------------------------------------------------------------------
class Gate:
    """Activation read as a continuation probability (THEORY.md sections 2-3).

    ``gate(z)`` returns ``(y, p)``: the activation and the probability of continuing, with
    ``y = p*z + entropy(z, p)`` (I9; the entropy term is 0 for ReLU and linear gates).
    """

    #: True when the gate may stop (hidden ReLU / softplus); False for a linear layer.
    activated: bool = True

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def entropy(self, z: Tensor, p: Tensor) -> Tensor | None:
        """``eps * H(p)`` per neuron (entropic game reward), or ``None`` when it is identically 0."""
        return None


class LinearGate(Gate):
    """No activation (a linear output layer): the player must continue, p = 1."""

    activated = False

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z, torch.ones_like(z)

    def __repr__(self) -> str:
        return "LinearGate()"


class ReLUGate(Gate):
    """ReLU: continue iff z > 0; a tie z = 0 stops (relu'(0) = 0, as torch)."""

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        active = z > 0
        return torch.where(active, z, torch.zeros_like(z)), active.to(z.dtype)

    def __repr__(self) -> str:
        return "ReLUGate()"


class SoftplusGate(Gate):
    """softplus_eps(z) = eps*log(1 + exp(z/eps)); continue with p = sigmoid(z/eps) (I9, I10).

    Computed as ``eps * logaddexp(0, z/eps)`` in the compute dtype (exact to round-off in float64,
    no identity switch as in ``nn.Softplus``).
    """

    def __init__(self, eps: float) -> None:
        eps = float(eps)
        if not eps > 0 or eps == float("inf"):
            raise ValueError(f"softplus eps must be finite and > 0, got {eps}")
        self.eps = eps

    def __call__(self, z: Tensor) -> tuple[Tensor, Tensor]:
        u = z / self.eps
        y = self.eps * torch.logaddexp(torch.zeros_like(u), u)
        return y, torch.sigmoid(u)

    def entropy(self, z: Tensor, p: Tensor) -> Tensor:
        # H(p) = -p log p - (1-p) log(1-p) with log p = -softplus(-u), log(1-p) = -softplus(u):
        # stable for every u and 0 log 0 = 0 comes out by itself (p = 0 multiplies a finite number).
        u = z / self.eps
        zero = torch.zeros_like(u)
        h = p * torch.logaddexp(zero, -u) + (1 - p) * torch.logaddexp(zero, u)
        return self.eps * h

    def __repr__(self) -> str:
        return f"SoftplusGate(eps={self.eps})"


# --------------------------------------------------------------------------------------------
# network and forward trace
# --------------------------------------------------------------------------------------------
@dataclass
class Layer:
    """One torch layer l: affine map z^l = A^l y^{l-1} + b^l followed by its gate."""

    map: AffineMap
    gate: Gate


@dataclass
class LayerTrace:
    """Layer l of the explained forward pass: its map and gate, input y^{l-1}, z^l, p^l, y^l."""

    map: AffineMap
    gate: Gate
    input: Tensor
    z: Tensor
    p: Tensor
    y: Tensor
    _entropy: Any = field(default=None, repr=False)

    def entropy(self) -> Tensor | None:
        """eps*H(p^l) per neuron (softplus layers), ``None`` for ReLU and linear layers."""
        if self._entropy is None:
            self._entropy = self.gate.entropy(self.z, self.p)
            if self._entropy is None:
                self._entropy = False
        return self._entropy if self._entropy is not False else None


@dataclass
class Trace:
    """The explained forward pass of a batch: ``x`` (= y^0) and one :class:`LayerTrace` per layer."""

    x: Tensor
    layers: list[LayerTrace]

    @property
    def output(self) -> Tensor:
        """y^L, shape [B, n_L] (flattened when the last layer has more dimensions)."""
        return self.layers[-1].y.flatten(1)

    def logit(self, target: Tensor) -> Tensor:
        """f_target(x) per sample, shape [B]."""
        return self.output.gather(1, target.view(-1, 1)).squeeze(1)

    def onehot(self, target: Tensor) -> Tensor:
        """The start measure at layer L: one-hot at the target, shape [B, n_L]."""
        out = torch.zeros_like(self.output)
        out.scatter_(1, target.view(-1, 1), 1)
        return out


@dataclass
class Network:
    """A chain of :class:`Layer` in torch order (layer 1 acts on the input)."""

    layers: list[Layer]

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def in_features(self) -> int:
        return self.layers[0].map.in_features  # type: ignore[attr-defined]

    @property
    def out_features(self) -> int:
        return self.layers[-1].map.out_features  # type: ignore[attr-defined]

    def trace(self, x: Tensor) -> Trace:
        """One batched forward pass, recording every layer (no autograd graph is built)."""
        records = []
        y = x
        with torch.no_grad():
            for layer in self.layers:
                z = layer.map.forward(y)
                y_next, p = layer.gate(z)
                records.append(LayerTrace(layer.map, layer.gate, y, z, p, y_next))
                y = y_next
        return Trace(x, records)


# --------------------------------------------------------------------------------------------
# reading a torch model
# --------------------------------------------------------------------------------------------
def _is_plain(module: nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` whose forward is ``cls.forward`` (a subclass with its own forward
    computes something else and is refused)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _flatten(module: nn.Module) -> list[nn.Module]:
    if _is_plain(module, nn.Sequential):
        return [leaf for child in module for leaf in _flatten(child)]
    return [module]


def _unsupported(m: nn.Module) -> TypeError:
    name = type(m).__name__
    return TypeError(
        f"unsupported module type {name} (supported: {SUPPORTED_MODULES}; subclasses that "
        "override forward are not supported)"
    )


def read_structure(model: nn.Module) -> list[tuple[nn.Linear, Gate]]:
    """The model as a list of (Linear module, gate); raises TypeError / ValueError with the cause."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch nn.Module or a backplay.MLPSpec, got {type(model).__name__}")
    out: list[list[Any]] = []  # [linear, gate or None]
    for m in _flatten(model):
        if _is_plain(m, nn.Linear):
            out.append([m, None])
        elif _is_plain(m, nn.ReLU) or _is_plain(m, nn.Softplus):
            kind = type(m).__name__
            if not out:
                raise ValueError(f"{kind} must follow a Linear layer (it comes first in the model)")
            if out[-1][1] is not None:
                raise ValueError(
                    f"{kind} follows another activation; each Linear layer takes at most one"
                )
            if isinstance(m, nn.ReLU):
                out[-1][1] = ReLUGate()
            else:
                beta = float(m.beta)
                if not beta > 0 or beta == float("inf"):
                    raise ValueError(f"Softplus needs a finite beta > 0, got {beta}")
                out[-1][1] = SoftplusGate(1.0 / beta)
        elif _is_plain(m, nn.Identity) or _is_plain(m, nn.Dropout):
            continue
        else:
            raise _unsupported(m)
    if not out:
        raise ValueError("the model contains no Linear layer")
    for l in range(1, len(out)):
        n_prev = out[l - 1][0].out_features
        if out[l][0].in_features != n_prev:
            raise ValueError(
                f"shape mismatch: Linear layer {l + 1} takes {out[l][0].in_features} inputs but "
                f"layer {l} has {n_prev} outputs"
            )
    return [(lin, gate if gate is not None else LinearGate()) for lin, gate in out]


def model_dtype(structure: list[tuple[nn.Linear, Gate]]) -> torch.dtype:
    dtype = structure[0][0].weight.dtype
    for lin, _ in structure:
        for p in (lin.weight, lin.bias):
            if p is not None:
                dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def check_device(structure: list[tuple[nn.Linear, Gate]], device: torch.device) -> None:
    for l, (lin, _) in enumerate(structure, start=1):
        for name, p in (("weight", lin.weight), ("bias", lin.bias)):
            if p is not None and p.device != device:
                raise ValueError(
                    f"the model's parameters are on {p.device} (layer {l} {name}) but the input is "
                    f"on {device}; move the model or the input so that they share one device"
                )


def read_model(model: nn.Module, dtype: torch.dtype | None = None,
               device: torch.device | None = None) -> Network:
    """Read ``model`` as a :class:`Network` in ``dtype`` (default: the model's own), never modifying it.

    With ``device`` given, every parameter must already be there (ValueError otherwise).
    """
    structure = read_structure(model)
    if device is not None:
        check_device(structure, device)
    return network_from_structure(structure, model_dtype(structure) if dtype is None else dtype)


def network_from_structure(structure: list[tuple[nn.Linear, Gate]], dtype: torch.dtype) -> Network:
    """Detached (and, where ``dtype`` differs, cast) copies of the weights; the modules stay as they are."""
    layers = []
    for lin, gate in structure:
        w = lin.weight.detach().to(dtype)
        b = None if lin.bias is None else lin.bias.detach().to(dtype)
        layers.append(Layer(Dense(w, b), gate))
    return Network(layers)
