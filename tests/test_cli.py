"""`backplay verify`: the table, JSON, exit codes."""

import json

import pytest
import torch

import backplay.cli as cli
from backplay.gpu import ops
from backplay.validate import LAW_ROW
from backplay.rules import GradientXInput
from backplay.testing import arch_checks, identities, registry, zoo


@pytest.fixture(autouse=True)
def _few_architectures(monkeypatch):
    """The identity tests run the architecture table on two zoo models (the main job runs all)."""
    monkeypatch.setattr(arch_checks, "ZOO", {k: zoo.ZOO[k] for k in ("mlp_norm", "vgg11_bn")})


def test_verify_json_passes(capsys):
    assert cli.main(["verify", "--cases", "4", "--seed", "3", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] and out["seed"] == 3
    assert {r["identity"] for r in out["identities"]} == {f"I{k}" for k in range(1, 24)} | {"per-layer lam"}
    assert all(r["cases"] > 0 for r in out["identities"])


def test_verify_table(capsys):
    assert cli.main(["verify", "--cases", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "seed 0" in out and "I13" in out and "PASS" in out and "FAIL" not in out
    assert "vgg11_bn" in out and "AttributionEquilibriumLaw(2)" in out and "all architectures hold" in out


def test_verify_catches_a_broken_rule_and_a_broken_max_pool_route(monkeypatch, capsys):
    """GradientXInput returning the plain gradient, or a max pool routing to the wrong unit, fail the
    architecture table (the exact side never runs the torch rule code) and the exit status is 1."""
    monkeypatch.setattr(GradientXInput, "finish", lambda self, trace, lower: lower)
    monkeypatch.setattr(GradientXInput, "view", lambda self, y, r: r)
    assert cli.main(["verify", "--cases", "1", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "GradientXInput FAILED on mlp_norm" in out and "ARCHITECTURE FAILURES" in out
    monkeypatch.undo()
    monkeypatch.setattr(arch_checks, "ZOO", {"vgg11_bn": zoo.ZOO["vgg11_bn"]})
    real = ops.Selection.transpose

    def wrong_winner(self, g, part="W"):
        return torch.roll(real(self, g, part), 1, dims=-1)

    monkeypatch.setattr(ops.Selection, "transpose", wrong_winner)
    rows = arch_checks.verify_architectures(progress=False)
    failed = {r["rule"] for r in rows if not r["passed"]}
    assert {"AlphaBeta(2, 1)", "GradientEquilibrium", "Gradient"} <= failed


def test_verify_exits_1_on_a_failure(monkeypatch, capsys):
    def broken(case):
        res = identities.check_i3(case)
        res.torch_err = 1.0
        return res

    rows = [registry.Identity(i.name, i.statement, broken if i.name == "I3" else i.check, i.applies)
            for i in registry.IDENTITIES]
    monkeypatch.setattr(cli, "IDENTITIES", rows)
    assert cli.main(["verify", "--cases", "2", "--no-progress"]) == 1
    assert "I3 FAILED" in capsys.readouterr().out


# -- verify --rule (validate_rule from the shell) ---------------------------------------------------
def test_verify_rule_json_alpha_beta(capsys):
    assert cli.main(["verify", "--rule", "backplay.rules:AlphaBeta", "--cases", "4", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cases"] == 4 and out["rule"].startswith("AlphaBeta(alpha=2.0, beta=1.0")
    assert out["properties"][LAW_ROW]["holds"] == 4
    assert all(r["is_law"] for r in out["rows"])
    assert out["passed"] and out["validated"] == 4 and out["errors"] == [] and out["failed_properties"] == []


def test_verify_rule_table_attribution_equilibrium(capsys):
    """Properties fail: exit status 1, and the summary names them with their cases."""
    assert cli.main(["verify", "--rule", "backplay.rules:AttributionEquilibrium", "--cases", "6",
                     "--no-progress"]) == 1
    out = capsys.readouterr().out
    # on the nets where AE propagates its first layer only (2 layers: the head is not propagated) that
    # layer is the z^B rule, a single-branch law (docs/theory.md section 12): 3 of the 6 cases
    assert "conservation (I14)" in out and "Markov routing law on 3 of 6 cases" in out
    assert "skipped: ValueError: AttributionEquilibrium needs a hidden layer" in out
    assert "FAILS: conservation (I14) on" in out and "FAILS: additivity on" in out
    assert "result: FAIL (" in out and "properties fail" in out
    assert cli.main(["verify", "--rule", "backplay.rules:AttributionEquilibrium", "--cases", "6", "--json",
                     "--no-progress"]) == 1
    res = json.loads(capsys.readouterr().out)
    assert res["passed"] is False and "conservation (I14)" in res["failed_properties"] and res["validated"] > 0
    assert res["validated"] + res["skipped"] == 6 and res["errors"] == []


RULES_PY = """
from dataclasses import dataclass
from backplay.rules import LRP0, AlphaBeta, LayerRule


@dataclass(frozen=True)
class Flaky(LayerRule):  # LRP-0 on nets of 1 or 2 layers, a crash on deeper ones
    def start(self, trace, target):
        return trace.onehot(target) * trace.output

    def backward(self, layer, upper):
        if layer.index > 2:
            raise RuntimeError("boom at layer " + str(layer.index) + "\\nsecond line")
        return LRP0().backward(layer, upper)


Good = AlphaBeta(2, 1)
"""


def test_verify_rule_finds_a_module_in_the_working_directory_and_exits_1_on_errors(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.chdir(tmp_path)
    (tmp_path / "myrules_cli.py").write_text(RULES_PY)
    sys.modules.pop("myrules_cli", None)
    assert str(tmp_path) not in sys.path
    assert cli.main(["verify", "--rule", "myrules_cli:Good", "--cases", "3", "--no-progress"]) == 0
    assert "result: PASS" in capsys.readouterr().out
    assert str(tmp_path) not in sys.path  # restored after the run
    assert cli.main(["verify", "--rule", "myrules_cli:Flaky", "--cases", "8", "--no-progress"]) == 1
    out = capsys.readouterr().out
    errors = [ln for ln in out.splitlines() if ln.strip().startswith("ERROR case")]
    assert errors and all("RuntimeError: boom at layer " in ln and ln[-1].isdigit() for ln in errors), errors
    assert f"{len(errors)} errors" in out and f"{len(errors)} cases error" in out and "result: FAIL" in out
    sys.modules.pop("myrules_cli", None)
    assert cli.main(["verify", "--rule", "no_such_module_here:Rule", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no module named 'no_such_module_here' in the working directory" in err


def test_verify_rule_one_dimensional_input_is_one_sample(tmp_path, capsys):
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    torch.save(model, tmp_path / "m.pt")
    torch.save(torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64), tmp_path / "x.pt")
    assert cli.main(["verify", "--rule", "backplay.rules:GradientEquilibrium", "--model", str(tmp_path / "m.pt"),
                     "--input", str(tmp_path / "x.pt"), "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cases"] == 1 and out["validated"] == 1 and out["passed"]
    assert cli.main(["verify", "--rule", "backplay.rules:GradientEquilibrium", "--model", str(tmp_path / "m.pt"),
                     "--input", str(tmp_path / "x.pt"), "--target", "5", "--no-progress"]) == 2
    assert "--target 5 out of range: the model has 2 outputs" in capsys.readouterr().err


def test_verify_rule_on_a_saved_model(tmp_path, capsys):
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    torch.save(model, tmp_path / "m.pt")
    torch.save(torch.tensor([[1.0, -0.5, 2.0], [0.25, 0.5, -1.0]], dtype=torch.float64), tmp_path / "x.pt")
    assert cli.main(["verify", "--rule", "backplay.rules:GradientEquilibrium", "--model", str(tmp_path / "m.pt"),
                     "--input", str(tmp_path / "x.pt"), "--target", "1", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cases"] == 2 and all(r["is_law"] and r["target"] == 1 for r in out["rows"])
    # random inputs for an MLP, target = argmax
    assert cli.main(["verify", "--rule", "backplay.rules:LRP0", "--model", str(tmp_path / "m.pt"),
                     "--cases", "2", "--no-progress"]) == 0
    assert "Markov routing law on 2 of 2 cases" in capsys.readouterr().out


def test_verify_rule_bad_arguments(tmp_path, capsys):
    assert cli.main(["verify", "--rule", "backplay.rules", "--no-progress"]) == 2
    assert "module:attr" in capsys.readouterr().err
    assert cli.main(["verify", "--rule", "backplay.rules:Nope", "--no-progress"]) == 2
    assert "no attribute 'Nope'" in capsys.readouterr().err
    import torch

    torch.save({"not": "a model"}, tmp_path / "bad.pt")
    assert cli.main(["verify", "--rule", "backplay.rules:RG", "--model", str(tmp_path / "bad.pt"), "--no-progress"]) == 2
    assert "expected an nn.Module or an MLPSpec" in capsys.readouterr().err
    import pytest

    with pytest.raises(SystemExit):
        cli.main(["verify", "--model", "m.pt"])


def test_verify_row_without_its_peer_is_skipped_not_passed(capsys, monkeypatch):
    """A row whose optional peer (zennit for I23) is not installed runs no case and is reported as
    not run with the install line, never as passing (the JSON lists it under not_run)."""
    import backplay.testing.registry as registry

    monkeypatch.setattr(registry, "missing_peer", lambda name: f"{name} not installed: pip install it")
    assert cli.main(["verify", "--cases", "2", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    row = next(r for r in out["identities"] if r["identity"] == "I23")
    assert row["passed"] is False and row["cases"] == 0 and "zennit not installed" in row["skipped"]
    assert "I23" in str(out["not_run"])
    assert cli.main(["verify", "--cases", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "NOT RUN: I23" in text and "skipped (zennit not installed" in text
