"""LRP-0 with biases, exactly (docs/theory.md I8)."""

from __future__ import annotations

from typing import Any

import numpy as np
import sympy as sp

from ..nets import MLPSpec, check_target
from .game import exact_forward


def lrp0(spec: MLPSpec, x: Any, target: int) -> list[np.ndarray]:
    """Layer-wise LRP-0 relevance [R^0, ..., R^L] started at R^L = f_k e_k.

    R^{l-1}_j = sum_i y^{l-1}_j W^l_ij / z^l_i R^l_i, with z^l_i including the bias and 0/0 := 0.
    I8: on a ReLU net R^0 = x * grad f_k exactly.
    """
    spec = spec.exact()
    if spec.activation != "relu":
        raise ValueError("lrp0 (I8) is stated for ReLU nets")
    k = check_target(spec, target)
    ys = exact_forward(spec, x)
    top = np.array([sp.Integer(0)] * spec.widths[-1], dtype=object)
    top[k] = ys[-1][k]
    rel = [top]
    for l in range(spec.depth, 0, -1):
        w, y = spec.weight(l), ys[l - 1]
        z = w.dot(y) + spec.bias(l)
        ratio = np.array([r / zi if zi != 0 else sp.Integer(0) for r, zi in zip(rel[0], z)],
                         dtype=object)
        rel.insert(0, y * w.T.dot(ratio))
    return rel
