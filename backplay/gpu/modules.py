"""Modules that models use so that the engine can read skip connections (THEORY.md section 7).

``Add()(a, b) = a + b``; ``Residual(body)`` computes ``Add()(x, body(x))``. The engine reads a
:class:`Residual` as its body followed by an add node: a neuron with two contributions (the skip
input and the body output), i.e. a layer whose "weights" are 1 and 1 and has no bias. An activation
that follows the Residual module in the enclosing ``nn.Sequential`` is the add node's activation.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["Add", "Residual"]


class Add(nn.Module):
    """``Add()(a, b) = a + b`` (a residual addition node)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Residual(nn.Module):
    """``x + body(x)`` with ``body`` an ``nn.Sequential`` of supported modules (same output shape)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(x, self.body(x))
