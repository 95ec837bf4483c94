"""Hypothesis strategies and assertion helpers, public for users' own property tests: random MLPs
(``relu_nets`` ...), random models of any architecture (``random_models``), the exact reference of
``explain`` on any model (``exact_report``, ``torch_error``), the zoo of architectures (``zoo``)."""

from .graph_exact import exact_report, torch_error
from .identities import Case, IdentityCheck, err
from .model_strategies import RandomModel, random_models
from .registry import IDENTITIES, Identity, assert_identity, check_identity
from .routing_identities import ROUTING_RULES, torch_matches_law
from .random_nets import random_case, random_cases
from .rule_checks import assert_matches_law, cnn_cases, rule_cases
from .strategies import (
    dyadics,
    exact_preactivations,
    inputs_for,
    nets_with_inputs,
    relu_nets,
    softplus_nets,
    tie_at,
)

__all__ = [
    "IDENTITIES", "ROUTING_RULES", "Case", "Identity", "IdentityCheck", "assert_identity", "check_identity", "dyadics", "err",
    "exact_preactivations", "inputs_for", "nets_with_inputs", "random_case", "random_cases",
    "relu_nets", "softplus_nets", "tie_at", "torch_matches_law",
    "assert_matches_law", "cnn_cases", "rule_cases", "RandomModel", "random_models", "exact_report",
    "torch_error",
]
