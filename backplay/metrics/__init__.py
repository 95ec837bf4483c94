"""Evaluation metrics for attribution maps. See ``localisation`` for definitions and references."""

from .localisation import (
    CHANNEL_REDUCTIONS,
    auroc,
    energy_pointing_game,
    pointing_game,
    pointing_game_summary,
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
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "top_k_intersection",
]
