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


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (default with HYPOTHESIS_PROFILE=thorough)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` are skipped by the default command; ``--runslow`` or the ``thorough``
    profile runs them."""
    if config.getoption("--runslow") or os.environ.get("HYPOTHESIS_PROFILE") == "thorough":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or HYPOTHESIS_PROFILE=thorough")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
