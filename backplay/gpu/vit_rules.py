"""Transformer rules that are not laws on the frozen extended graph (THEORY.md section 7).

A :class:`ViTRule` reads a :class:`backplay.gpu.vit.ViT` directly (its ``forward_explain`` trace,
attention matrices and their gradients) instead of a chain of layer maps. ``bp.explain`` hands a ViT
and such a rule to :meth:`ViTRule.vit_relevance`; rules defined on the frozen graph (Gradient,
GradientXInput, AlphaBeta, the routing laws, SoftplusGame) run through the graph engine instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from backplay.rules import Rule

if TYPE_CHECKING:  # pragma: no cover
    from backplay.gpu.vit import ViT

Tensor = torch.Tensor

__all__ = ["ViTRule"]


@dataclass(frozen=True)
class ViTRule(Rule):
    """Base class of the ViT-only rules: ``vit_relevance(model, x, target) -> [B, C, H, W]``."""

    def vit_relevance(self, model: "ViT", x: Tensor, target: Tensor) -> Tensor:
        """Pixel relevance of the batch ``x`` ([B, C, H, W], already checked and in the compute
        dtype) for the targets (LongTensor [B]); the model is never modified."""
        raise NotImplementedError
