"""Two convenience modules for skip connections in ``nn.Sequential`` models.

``Add()(a, b) = a + b``; ``Residual(body)`` computes ``x + body(x)``. They are ordinary modules: the
reader (:mod:`backplay.gpu.read`) sees the ``+`` as a sum node with two contributions (the skip
input and the body output), exactly as it sees ``out += identity`` in a model's own forward.
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
