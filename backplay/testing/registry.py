"""The table of identities that the property tests and ``backplay verify`` share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..nets import MLPSpec
from . import routing_identities as routing
from . import zoo_identities as zoo
from .identities import (
    TOL_CVXPY, TOL_TORCH, Case, IdentityCheck, check_i1, check_i2, check_i3, check_i4, check_i5, check_i6,
    check_i7, check_i8, check_i9, check_i10, check_i11, check_i12, check_i13,
)
from .peers import missing_peer


@dataclass(frozen=True)
class Identity:
    """A row of the verification table."""

    name: str
    statement: str
    check: Callable[[Case], IdentityCheck]
    applies: Callable[[MLPSpec], bool]
    requires: str | None = None  # an optional peer library the check needs (backplay.testing.peers)

    def unavailable(self) -> str | None:
        """None when the row can run here; otherwise why not, in one line (its peer library is not
        installed: the row is skipped, never passed)."""
        return None if self.requires is None else missing_peer(self.requires)


def _relu(s: MLPSpec) -> bool:
    return s.activation == "relu"


def _softplus(s: MLPSpec) -> bool:
    return s.activation == "softplus"


def _any(s: MLPSpec) -> bool:
    return True


IDENTITIES: list[Identity] = [
    Identity("I1", "game value = network, every layer", check_i1, _relu),
    Identity("I2", "continue iff z > 0 (ties stop) is a saddle point", check_i2, _relu),
    Identity("I3", "gradient = nu+ - nu-", check_i3, _any),
    Identity("I4", "f = sum x*grad + discounted bias rewards", check_i4, _relu),
    Identity("I5", "bias gradient = signed continue occupation", check_i5, _any),
    Identity("I6", "f = sum over paths; P*D = prod|W|, end sign = prod sign", check_i6, _any),
    Identity("I7", "layer DP (W, |W| on active, |W|/gamma) = occupation", check_i7, _any),
    Identity("I8", "LRP-0 with biases = Gradient x Input", check_i8, _relu),
    Identity("I9", "max_p pc + eps H(p) = softplus_eps(c) at sigmoid(c/eps)", check_i9, _softplus),
    Identity("I10", "entropic game value = softplus net, Gibbs policies", check_i10, _softplus),
    Identity("I11", "f = GxI + bias + entropy shares; grad = nu+ - nu-", check_i11, _softplus),
    Identity("I12", "eps -> 0: |f_eps - f_relu| <= amplified eps log 2", check_i12, _any),
    Identity("I13", "Shapley box bounds = IBP; policy bounds sound", check_i13, _relu),
    Identity("I14", "routing laws: sum R + stopped = f (10 laws, every layer)", routing.check_i14, _relu),
    Identity("I15", "alpha-beta hand-over = alpha-beta-LRP closed form", routing.check_i15, _relu),
    Identity("I16", "RG(tau) = AlphaBeta(alpha(tau), beta(tau)), m = coth", routing.check_i16, _relu),
    Identity("I17", "gradient equilibrium = LRP-0 = Gradient x Input", routing.check_i17, _relu),
    Identity("I18", "RGEq family: (log a/b, 0) = AB, (0, 1) = GradEq", routing.check_i18, _relu),
    Identity("I19", "routing = argmax of r.pi - T KL(pi || pi0)", routing.check_i19, _relu),
    Identity("I20", "risk aversion: Doob transform = path reweighting", routing.check_i20, _relu),
    Identity("I21", "Hellinger recursion = path enumeration; GV vs GradEq", routing.check_i21, _relu),
    Identity("per-layer lam", "per-layer parameters (Anchor lam tuple, all entries distinct): torch = "
             "exact law at every layer", routing.check_per_layer_lam, _relu),
    Identity("I22", "Gamma(g) = RGEq(+-log(1+g), 1) per kernel; torch = law", zoo.check_i22, _relu),
    Identity("I23", "zennit AB(2,1), Epsilon as black boxes: same report", zoo.check_i23, _relu,
             requires="zennit"),
]


def check_identity(name: str, spec: MLPSpec, x: Any, target: int, **case_kwargs: Any) -> IdentityCheck:
    """Run one identity by name on one case."""
    ident = {i.name: i for i in IDENTITIES}[name]
    missing = ident.unavailable()
    if missing is not None:
        raise ImportError(f"{name} needs {missing}")
    if not ident.applies(spec):
        raise ValueError(f"{name} does not apply to a {spec.activation} net")
    return ident.check(Case(spec, np.asarray(x, dtype=np.float64), target, **case_kwargs))


def assert_identity(name: str, spec: MLPSpec, x: Any, target: int, **case_kwargs: Any) -> IdentityCheck:
    """Assert one identity three ways (exact, torch 1e-10, cvxpy 1e-6)."""
    res = check_identity(name, spec, x, target, **case_kwargs)
    assert res.exact, f"{name} fails in exact arithmetic on {spec}, x={list(x)}, target={target}: {res.detail}"
    assert res.torch_err is None or res.torch_err <= TOL_TORCH, \
        f"{name}: torch error {res.torch_err:.3e} on {spec}"
    assert res.cvxpy_err is None or res.cvxpy_err <= TOL_CVXPY, \
        f"{name}: cvxpy error {res.cvxpy_err:.3e} on {spec}"
    return res
