"""Hypothesis profiles: ``ci`` (bounded, derandomized: failures reproduce) is the default;
``thorough`` for long runs: HYPOTHESIS_PROFILE=thorough pytest."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _reproducible_torch():
    """Every test starts from the same torch RNG state, whatever ran before it on the worker."""
    torch.manual_seed(0)
