"""Evaluation metrics for attribution maps. See ``localisation`` for definitions, references and
how each metric compares with its Quantus counterpart.

Shapes: attributions ``[B, H, W]`` or ``[B, C, H, W]`` (channels reduced by ``channel_reduction``,
default the signed sum; :func:`reduce_channels`), masks ``[B, H, W]`` or ``[B, 1, H, W]``
(Quantus's layout); one score per sample.
"""

from .localisation import (
    CHANNEL_REDUCTIONS,
    auroc,
    energy_pointing_game,
    pointing_game,
    pointing_game_summary,
    reduce_channels,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    top_k_intersection,
)

__all__ = [
    "CHANNEL_REDUCTIONS",
    "auroc",
    "energy_pointing_game",
    "pointing_game",
    "pointing_game_summary",
    "reduce_channels",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "top_k_intersection",
]
