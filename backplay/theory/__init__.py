"""Exact objects: the extended graph, the GV game and its entropic version (THEORY.md 1-4)."""

from .game import (
    Field,
    GameSolution,
    Occupation,
    Path,
    ReLUNetGame,
    enumerate_policies,
    exact_forward,
    gap_bound,
    ibp,
    to_float,
)
from .graph import CEMETERY, SINK, extended_graph
from .lrp import lrp0

__all__ = [
    "CEMETERY", "SINK", "Field", "GameSolution", "Occupation", "Path", "ReLUNetGame",
    "enumerate_policies", "exact_forward", "extended_graph", "gap_bound", "ibp", "lrp0", "to_float",
]
