"""Property tests: every identity of docs/theory.md in the verification table holds three ways (exact ==
cvxpy 1e-6 == torch float64 1e-10) on random nets (widths 1-6, depth 1-4, mixed signs, zero rows,
exact ties, zero weights, biases on/off, linear or activated output, negative and positive inputs).
A row that needs an optional peer library (I23: zennit) is skipped where the library is not installed."""

import pytest
from hypothesis import given

from backplay.testing import IDENTITIES, assert_identity, nets_with_inputs

RELU = [i.name for i in IDENTITIES if i.applies.__name__ in ("_relu", "_any")]
SOFTPLUS = [i.name for i in IDENTITIES if i.applies.__name__ in ("_softplus", "_any")]
BY_NAME = {i.name: i for i in IDENTITIES}


def _skip_without_peer(name):
    missing = BY_NAME[name].unavailable()
    if missing is not None:
        pytest.skip(f"{name}: {missing}")


@pytest.mark.parametrize("name", RELU)
@given(case=nets_with_inputs(ties=True, activation="relu"))
def test_identity_on_relu_nets(name, case):
    _skip_without_peer(name)
    spec, x, target = case
    assert_identity(name, spec, x, target)


@pytest.mark.parametrize("name", SOFTPLUS)
@given(case=nets_with_inputs(activation="softplus"))
def test_identity_on_softplus_nets(name, case):
    _skip_without_peer(name)
    spec, x, target = case
    assert_identity(name, spec, x, target)


def test_every_identity_is_tested():
    assert {f"I{k}" for k in range(1, 24)} | {"per-layer lam"} == set(RELU) | set(SOFTPLUS)
    assert {i.name for i in IDENTITIES if i.requires is not None} == {"I23"}
