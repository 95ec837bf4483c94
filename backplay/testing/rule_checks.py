"""Property-test a rule of your own in a few lines: strategies of cases and :func:`assert_matches_law`.

Example (a hand-written z+ rule checked against the exact alpha-beta law with alpha=1, beta=0)::

    from dataclasses import dataclass
    import torch
    from hypothesis import given
    from backplay.rules import AlphaBeta, LayerRule, safe_divide
    from backplay.testing import assert_matches_law, rule_cases

    @dataclass(frozen=True)
    class ZPlus(LayerRule):                      # R_j = sum_i max(W_ij y_j, 0) / S+_i R_i
        def start(self, trace, target):
            return trace.onehot(target) * trace.output
        def backward(self, layer, upper):
            M, y = layer.map, layer.input
            yp, yn = y.clamp(min=0), y.clamp(max=0)
            b = M.bias_like(layer.z)             # None for a layer without bias
            b_pos = 0.0 if b is None else b.clamp(min=0)
            s = M.apply(yp, "pos") + M.apply(yn, "neg") + b_pos
            c = safe_divide(upper, s)
            stopped = c * b_pos + torch.where(s == 0, upper, 0.0)   # bias sink + empty branch
            return yp * M.transpose(c, "pos") + yn * M.transpose(c, "neg"), stopped.flatten(1).sum(1)

    @given(rule_cases())
    def test_zplus(case):
        assert_matches_law(ZPlus(), *case, law_rule=AlphaBeta(1, 0))
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

from ..nets import MLPSpec
from ..rules import Rule
from .strategies import nets_with_inputs

__all__ = ["assert_matches_law", "rule_cases", "cnn_cases"]


def rule_cases(ties: bool = True, **net_kwargs: Any) -> st.SearchStrategy[tuple[MLPSpec, np.ndarray, int]]:
    """(spec, x, target) cases for a rule: ReLU MLPs (depth 1-4, widths 1-6, dyadic weights, zero
    weights and rows, biases drawn unless ``bias`` is given, exact ties z = 0 when ``ties``) with an
    input and a target. Keywords go to :func:`backplay.testing.relu_nets`."""
    net_kwargs.setdefault("activation", "relu")
    return nets_with_inputs(ties=ties, **net_kwargs)


@st.composite
def cnn_cases(draw: Any, pool: str | None = None) -> tuple[torch.nn.Module, torch.Tensor, int]:
    """(model, x, target) with a small float64 CNN: Conv2d (kernel 2-3, padding 0-1, bias drawn) - ReLU
    - [MaxPool2d(2) | AvgPool2d(2) | none] - Flatten - Linear, dyadic weights, x of shape [C, H, W]
    (one sample). ``pool`` fixes the pool ("max", "avg", "none")."""
    from .strategies import dyadics

    c_in, size = draw(st.integers(1, 2)), draw(st.integers(4, 5))
    c1, k, pad = draw(st.integers(1, 3)), draw(st.integers(2, 3)), draw(st.integers(0, 1))
    layers: list = [torch.nn.Conv2d(c_in, c1, k, padding=pad, bias=draw(st.booleans())), torch.nn.ReLU()]
    side = size + 2 * pad - k + 1
    kind = draw(st.sampled_from(["max", "avg", "none"])) if pool is None else pool
    if kind == "max" and side >= 2:
        layers.append(torch.nn.MaxPool2d(2))
        side //= 2
    elif kind == "avg" and side >= 2:
        layers.append(torch.nn.AvgPool2d(2))
        side //= 2
    out = draw(st.integers(1, 3))
    layers += [torch.nn.Flatten(), torch.nn.Linear(c1 * side * side, out)]
    model = torch.nn.Sequential(*layers).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            vals = draw(st.lists(dyadics(), min_size=p.numel(), max_size=p.numel()))
            p.copy_(torch.tensor(vals, dtype=torch.float64).reshape(p.shape))
    x = torch.tensor(draw(st.lists(dyadics(), min_size=c_in * size * size, max_size=c_in * size * size)),
                     dtype=torch.float64).reshape(c_in, size, size)
    return model, x, draw(st.integers(0, out - 1))


def assert_matches_law(rule: Rule, spec: Any, x: Any, target: int, law_rule: Rule | None = None,
                       tol: float = 1e-9) -> Any:
    """Assert that ``rule`` is a routing law on the explained pass of (spec, x, target).

    With ``law_rule`` (a routing law of :mod:`backplay.rules`): ``rule`` run by
    :func:`backplay.explain` in float64 must equal the exact law (:func:`backplay.theory.routing_law`
    on the unrolled pass) at every layer, relative error <= ``tol`` (times max(1, |exact|)); its
    stopped mass too when it reports one. Returns the exact law.

    Without ``law_rule``: :func:`backplay.validate_rule` must find a Markov routing law (linear,
    local, sign-consistent, branch signs kept); returns its report (``report.nearest`` names the
    closest named rule).

    ``spec``: an MLPSpec or an nn.Sequential (any model :func:`backplay.gpu.unroll` reads); ``x`` one
    sample. AssertionError with the layer, the neuron and both values otherwise.
    """
    from ..gpu.engine import explain
    from ..gpu.unroll import unroll
    from ..validate import validate_rule
    from ..theory import routing_law
    from .identities import err

    model = spec.to_torch(dtype=torch.float64) if isinstance(spec, MLPSpec) else spec
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64) if not isinstance(x, torch.Tensor) else x).to(torch.float64)
    if law_rule is None:
        rep = validate_rule(rule, model, xt, int(target))
        if not rep.is_law:
            raise AssertionError(f"{getattr(rule, 'name', rule)} is not a Markov routing law on this case "
                                 f"({spec}, x={xt.tolist()}, target={target}):\n{rep}")
        return rep
    law = routing_law(unroll(model, xt), target=int(target), rule=law_rule)
    _, report = explain(model, xt[None], int(target), rule=rule, return_report=True)
    exact = law.relevance()
    for l, ex in enumerate(exact):
        got = report.layers[l][0].reshape(-1).numpy()
        e = err(got, ex)
        if not e <= tol:
            ex_f = np.array([float(v) for v in ex])
            k = int(np.argmax(np.abs(got - ex_f) / np.maximum(1, np.abs(ex_f))))
            raise AssertionError(
                f"{rule.name} differs from the law {law_rule.name} at layer {l} (0 = input), neuron {k}: "
                f"{got[k]!r} vs exact {ex_f[k]!r} (relative error {e:.3g} > {tol:g}); case {spec}, "
                f"x={xt.tolist()}, target={target}")
    from ..rules import RoutingRule

    if isinstance(rule, RoutingRule):
        e = err(report.stopped.reshape(1).numpy(), [law.stopped()["total"]])
        if not e <= tol:
            raise AssertionError(f"{rule.name}: stopped mass {float(report.stopped[0])!r} vs exact "
                                 f"{float(law.stopped()['total'])!r} of {law_rule.name}")
    return law
