"""`backplay verify`: the table, JSON, exit codes."""

import json

import backplay.cli as cli
from backplay.testing import identities, registry


def test_verify_json_passes(capsys):
    assert cli.main(["verify", "--cases", "4", "--seed", "3", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] and out["seed"] == 3
    assert {r["identity"] for r in out["identities"]} == {f"I{k}" for k in range(1, 22)}
    assert all(r["cases"] > 0 for r in out["identities"])


def test_verify_table(capsys):
    assert cli.main(["verify", "--cases", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "seed 0" in out and "I13" in out and "PASS" in out and "FAIL" not in out


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
