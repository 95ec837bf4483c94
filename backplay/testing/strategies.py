"""Hypothesis strategies for random nets and inputs, public for users' own property tests.

Every number drawn is a dyadic rational k/4 (|k| <= 8), exactly representable in float64, so a
float64 computation and the exact rational one describe the same net; exact ties z = 0 are reachable
(and forced by :func:`nets_with_inputs` with ``ties=True``). Strategies compose and shrink towards
small, zero-weight, bias-free nets.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np
from hypothesis import strategies as st

from ..nets import MLPSpec

DYADIC = [k / 4 for k in range(-8, 9)]
EPS_VALUES = [0.25, 0.5, 0.75, 1.0, 2.0]


def dyadics(max_abs: float = 2.0) -> st.SearchStrategy[float]:
    """k/4 with |k/4| <= max_abs; shrinks towards 0."""
    vals = sorted((v for v in DYADIC if abs(v) <= max_abs), key=abs)
    return st.sampled_from(vals)


@st.composite
def relu_nets(
    draw: Any,
    min_depth: int = 1,
    max_depth: int = 4,
    min_width: int = 1,
    max_width: int = 6,
    activation: str | None = "relu",
    bias: bool | None = None,
    output: str | None = None,
    eps: float | None = None,
    zero_rows: bool = True,
) -> MLPSpec:
    """Random MLPs: widths min_width..max_width, depth min_depth..max_depth, mixed signs, zero
    weights, optional zero rows, biases on or off, linear or activated output.

    ``activation=None`` draws ReLU or softplus; ``bias=None`` draws it; ``output=None`` draws
    linear or activated; softplus eps is drawn from a few dyadic values unless given.
    """
    act = draw(st.sampled_from(["relu", "softplus"])) if activation is None else activation
    depth = draw(st.integers(min_depth, max_depth))
    widths = [draw(st.integers(min_width, max_width)) for _ in range(depth + 1)]
    has_bias = draw(st.booleans()) if bias is None else bias
    out = draw(st.sampled_from(["linear", act])) if output is None else output
    weights, biases = [], []
    for l in range(1, depth + 1):
        n, m = widths[l], widths[l - 1]
        w = np.array(draw(st.lists(dyadics(), min_size=n * m, max_size=n * m))).reshape(n, m)
        if zero_rows and n > 1:
            for i in draw(st.sets(st.integers(0, n - 1), max_size=1)):
                w[i] = 0.0
        weights.append(w)
        biases.append(np.array(draw(st.lists(dyadics(), min_size=n, max_size=n))) if has_bias else None)
    e = None
    if act == "softplus":
        e = draw(st.sampled_from(EPS_VALUES)) if eps is None else eps
    return MLPSpec(weights, biases, act, e, out)


@st.composite
def inputs_for(draw: Any, spec: MLPSpec, max_abs: float = 2.0) -> np.ndarray:
    """An input vector for ``spec``: dyadic, negative and positive entries, zeros allowed."""
    n = spec.widths[0]
    return np.array(draw(st.lists(dyadics(max_abs), min_size=n, max_size=n)))


def exact_preactivations(spec: MLPSpec, x: np.ndarray) -> list[list[Fraction]]:
    """z^1..z^L of a ReLU net in exact rationals (fractions), from the float spec's exact values."""
    y = [Fraction(v) for v in x]
    zs = []
    for l in range(1, spec.depth + 1):
        w, b = spec.weight(l), spec.bias(l)
        z = [Fraction(b[i]) + sum(Fraction(w[i, j]) * y[j] for j in range(len(y)))
             for i in range(w.shape[0])]
        zs.append(z)
        y = z if not spec.activated(l) else [max(v, Fraction(0)) for v in z]
    return zs


def tie_at(spec: MLPSpec, x: np.ndarray, l: int, i: int) -> MLPSpec:
    """``spec`` with b^l_i shifted so that z^l_i = 0 exactly at x (a tie, I2); unchanged if the
    layer has no bias or the shifted bias is not exact in float64."""
    if spec.biases[l - 1] is None:
        return spec
    biases = [None if b is None else b.copy() for b in spec.biases]
    shifted = Fraction(biases[l - 1][i]) - exact_preactivations(spec, x)[l - 1][i]
    biases[l - 1][i] = float(shifted)
    if Fraction(biases[l - 1][i]) != shifted:
        return spec
    return MLPSpec(spec.weights, biases, spec.activation, spec.eps, spec.output)


@st.composite
def nets_with_inputs(draw: Any, ties: bool = True, **net_kwargs: Any) -> tuple[MLPSpec, np.ndarray, int]:
    """(spec, x, target). With ``ties`` (ReLU nets with biases) one drawn activated neuron may get
    its bias shifted so that z = 0 exactly: the tie case of I2 (ties stop)."""
    spec = draw(relu_nets(**net_kwargs))
    x = draw(inputs_for(spec))
    target = draw(st.integers(0, spec.widths[-1] - 1))
    layers = [l for l in range(1, spec.depth + 1) if spec.activated(l) and spec.biases[l - 1] is not None]
    if ties and spec.activation == "relu" and layers and draw(st.booleans()):
        l = draw(st.sampled_from(layers))
        spec = tie_at(spec, x, l, draw(st.integers(0, spec.widths[l] - 1)))
    return spec, x, target


def softplus_nets(**kwargs: Any) -> st.SearchStrategy[MLPSpec]:
    """:func:`relu_nets` with the softplus activation (the entropic game, I9-I12)."""
    return relu_nets(activation="softplus", **kwargs)
