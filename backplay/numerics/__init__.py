"""Numerics: cvxpy programs for the ReLU net game and its entropic version (docs/theory.md section 7).

An independent oracle: only :class:`backplay.nets.MLPSpec`, numpy, scipy.sparse and cvxpy are used
(no ``backplay.theory``, no ``backplay.gpu``). :func:`backplay.validate_rule`, which composes the
three parts, is a tool above them (:mod:`backplay.validate`).

Policy format (everywhere): a list of length L; entry l-1 is an array (n_l, 2) holding the
probability of continuing at (l, i, +1) (column 0, Max) and at (l, i, -1) (column 1, Min); 1 at a
linear output layer.
"""

from .game_graph import GameGraph, binary_entropy, equilibrium_policy, policy_state_values, policy_value
from .game_programs import (
    DEFAULT_SOLVER_OPTIONS,
    REACHED_TOL,
    BestResponse,
    Certificate,
    Occupation,
    SolverError,
    best_response,
    box_bound,
    certify_equilibrium,
    entropic_choice,
    occupation_measure,
)
from .routing import (
    FlowOccupation,
    LocalMaximiserReport,
    check_local_maximisers,
    gibbs_handover,
    law_occupation,
    route_choice,
    routing_kernels,
)

__all__ = [
    "DEFAULT_SOLVER_OPTIONS",
    "REACHED_TOL",
    "BestResponse",
    "Certificate",
    "GameGraph",
    "Occupation",
    "SolverError",
    "best_response",
    "binary_entropy",
    "box_bound",
    "certify_equilibrium",
    "entropic_choice",
    "equilibrium_policy",
    "occupation_measure",
    "policy_state_values",
    "policy_value",
    # routing laws (docs/theory.md section 8)
    "FlowOccupation",
    "LocalMaximiserReport",
    "check_local_maximisers",
    "gibbs_handover",
    "law_occupation",
    "route_choice",
    "routing_kernels",
]
