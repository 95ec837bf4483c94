"""``import backplay`` loads the torch path only; the heavy parts load on first use (issue: import
time <= 1.5x ``import torch``; the time itself is measured in benchmarks/import_time.py)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("sympy", "cvxpy", "networkx", "hypothesis", "matplotlib", "mpmath", "scipy", "sklearn",
         "backplay.theory", "backplay.numerics", "backplay.testing", "backplay.validate", "backplay.plot",
         "backplay.bench")


def _loaded_after(code: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys, json\n{code}\n"
                          f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_backplay_loads_no_heavy_part():
    assert _loaded_after("import backplay") == []


def test_explain_on_a_model_loads_no_heavy_part():
    code = ("import torch, backplay as bp\n"
            "m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))\n"
            "R = bp.explain(m, torch.randn(2, 4), target=0, rule=bp.rules.AlphaBeta(2, 1))\n"
            "assert R.shape == (2, 4)")
    # torch.export itself loads sympy, networkx and mpmath while it captures the forward (symbolic
    # shapes); what backplay adds on the explain path must not be among the rest
    ours = tuple(m for m in HEAVY if m not in ("sympy", "networkx", "mpmath"))
    assert _loaded_after(code, ours) == []


def test_the_lazy_parts_load_on_first_use():
    import backplay as bp

    assert bp.theory.ReLUNetGame.__module__ == "backplay.theory.game"
    assert bp.validate_rule.__module__ == "backplay.validate.rule"
    assert callable(bp.numerics.certify_equilibrium) and callable(bp.testing.assert_matches_law)
    assert {"theory", "numerics", "testing", "validate", "validate_rule", "plot"} <= set(dir(bp))
    from backplay import numerics, theory  # from-imports resolve the lazy parts too

    assert numerics is bp.numerics and theory is bp.theory


def test_an_unknown_attribute_is_an_attribute_error():
    import backplay as bp

    try:
        bp.no_such_part
    except AttributeError as e:
        assert "no_such_part" in str(e)
    else:
        raise AssertionError("bp.no_such_part did not raise")
