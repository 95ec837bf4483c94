"""Seeded random nets for ``backplay verify`` (numpy; the hypothesis strategies are for tests).

Same distribution as :mod:`backplay.testing.strategies`: dyadic values k/4, widths 1-6, depth 1-4,
mixed signs, zero weights, zero rows, biases on or off, linear or activated output, exact ties.
"""

from __future__ import annotations

import numpy as np

from ..nets import MLPSpec
from .strategies import EPS_VALUES, tie_at


def _dyadic(rng: np.random.Generator, size: int | tuple) -> np.ndarray:
    vals = rng.integers(-8, 9, size=size) / 4
    return np.where(rng.random(size) < 0.15, 0.0, vals)  # extra zero weights


def random_case(rng: np.random.Generator, activation: str) -> tuple[MLPSpec, np.ndarray, int]:
    """One (spec, x, target) with the given activation."""
    depth = int(rng.integers(1, 5))
    widths = [int(w) for w in rng.integers(1, 7, size=depth + 1)]
    has_bias = bool(rng.random() < 0.7)
    output = "linear" if rng.random() < 0.7 else activation
    weights, biases = [], []
    for l in range(1, depth + 1):
        w = _dyadic(rng, (widths[l], widths[l - 1]))
        if widths[l] > 1 and rng.random() < 0.3:
            w[rng.integers(widths[l])] = 0.0
        weights.append(w)
        biases.append(_dyadic(rng, widths[l]) if has_bias else None)
    eps = float(rng.choice(EPS_VALUES)) if activation == "softplus" else None
    spec = MLPSpec(weights, biases, activation, eps, output)
    x = _dyadic(rng, widths[0])
    target = int(rng.integers(widths[-1]))
    layers = [l for l in range(1, depth + 1) if spec.activated(l)]
    if activation == "relu" and has_bias and layers and rng.random() < 0.5:  # force a tie z = 0
        l = int(rng.choice(layers))
        spec = tie_at(spec, x, l, int(rng.integers(widths[l])))
    return spec, x, target


def random_cases(seed: int, n: int) -> list[tuple[MLPSpec, np.ndarray, int]]:
    """n cases, alternating ReLU and softplus nets, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return [random_case(rng, "relu" if k % 2 == 0 else "softplus") for k in range(n)]
