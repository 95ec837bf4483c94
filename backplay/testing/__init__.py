"""Hypothesis strategies and assertion helpers, public for users' own property tests."""

from .identities import IDENTITIES, Case, IdentityCheck, assert_identity, check_identity, err
from .random_nets import random_case, random_cases
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
    "IDENTITIES", "Case", "IdentityCheck", "assert_identity", "check_identity", "dyadics", "err",
    "exact_preactivations", "inputs_for", "nets_with_inputs", "random_case", "random_cases",
    "relu_nets", "softplus_nets", "tie_at",
]
