"""Exact objects: the extended graph, the GV game and its entropic version (docs/theory.md 1-4)."""

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
from .routing import (
    BIAS,
    BIAS_SINK,
    GVLaw,
    LawOccupation,
    LocalLaw,
    Move,
    RoutePath,
    RoutingLaw,
    TrajectoryLaw,
    alpha_beta_lrp,
    bhattacharyya_paths,
    freeze,
    gibbs_alpha_beta,
    gv_law,
    hellinger,
    risk_reweighted_paths,
    routing_law,
    tau_from,
)

__all__ = [
    "CEMETERY", "SINK", "Field", "GameSolution", "Occupation", "Path", "ReLUNetGame",
    "enumerate_policies", "exact_forward", "extended_graph", "gap_bound", "ibp", "lrp0", "to_float",
    # routing laws (section 5)
    "BIAS", "BIAS_SINK", "GVLaw", "LawOccupation", "LocalLaw", "Move", "RoutePath", "RoutingLaw",
    "TrajectoryLaw", "alpha_beta_lrp", "bhattacharyya_paths", "freeze", "gibbs_alpha_beta", "gv_law",
    "hellinger", "risk_reweighted_paths", "routing_law", "tau_from",
]
