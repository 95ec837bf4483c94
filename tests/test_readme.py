"""The README's "your own model" example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_your_own_model_example_runs():
    text = README.read_text()
    section = text.split("### Your own model")[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    rep = scope["rep"]
    assert len(rep.layers) == 7 and float((rep.relevance_sum + rep.stopped - rep.logit).abs().max()) < 1e-4


def test_supported_operations_table_lists_the_reader_table():
    from backplay.gpu.read import SUPPORTED

    text = README.read_text()
    table = text.split("Supported operations (`backplay.gpu.read.SUPPORTED`")[1].split("Anything else")[0]
    missing = [op for op in SUPPORTED if op != "getitem" and f"`{op}`" not in table]
    assert not missing, missing


# -- "Validating a rule of your own": every example of the section, run as written ---------------------
def _validate_section():
    text = README.read_text()
    section = text.split("### Validating a rule of your own")[1].split("\n### ")[0]
    return re.findall(r"```(python|bash)\n(.*?)```", section, re.S)


def test_validate_section_examples_are_all_run_here():
    kinds = [k for k, _ in _validate_section()]
    assert kinds == ["python", "python", "python", "bash", "python"], kinds  # a new example needs its test below
    assert _validate_section()[1][1].startswith("# myrules.py\n")


def test_validate_section_lrp0_example():
    scope: dict = {}
    exec(compile(_validate_section()[0][1], "README.md", "exec"), scope)
    rep = scope["rep"]
    assert rep.is_law and rep.stops_reported and rep.finding("conservation (I14)").holds
    assert rep.nearest["rule"] in ("GradientEquilibrium", "RGEq(kappa=0.0, nu=1.0, route_temp=1.0)")
    assert rep.nearest["hellinger"] < 1e-9


def test_validate_section_user_rule_property_test_validation_and_shell(tmp_path, monkeypatch):
    """myrules.py written as shown; the property test, validate_rule and the two shell commands run
    from its folder, the shell ones through the CLI (which must find myrules in the working
    directory by itself) with exit status 0."""
    import shlex
    import sys

    import backplay.cli as cli

    blocks = _validate_section()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "myrules.py").write_text(blocks[1][1])
    sys.modules.pop("myrules", None)
    sys.path.insert(0, str(tmp_path))  # as `python script.py` next to myrules.py does
    try:
        scope: dict = {}
        exec(compile(blocks[2][1], "README.md", "exec"), scope)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("myrules", None)
    rep = scope["rep"]
    assert rep.is_law and rep.stops_reported and rep.finding("conservation (I14)").holds
    assert rep.nearest["rule"].startswith("AlphaBeta(alpha=1.0, beta=0.0") and rep.nearest["hellinger"] < 1e-9
    assert (tmp_path / "net.pt").exists() and (tmp_path / "x.pt").exists()
    commands = [ln.split("#")[0].strip() for ln in blocks[3][1].splitlines() if ln.strip()]
    assert len(commands) == 2
    for cmd in commands:
        argv = shlex.split(cmd)
        assert argv[0] == "backplay"
        assert str(tmp_path) not in sys.path
        assert cli.main(argv[1:]) == 0, cmd
        sys.modules.pop("myrules", None)


def test_validate_section_peer_objects_example():
    """zennit's composite and captum's LRP object passed to validate_rule as they are (I23)."""
    import pytest

    pytest.importorskip("captum")
    from backplay.testing.peers import missing_peer

    if missing_peer("zennit"):
        pytest.skip(missing_peer("zennit"))
    scope: dict = {}
    exec(compile(_validate_section()[4][1], "README.md", "exec"), scope)
    rep, rep_captum = scope["rep"], scope["rep_captum"]
    assert rep.rule == "LayerMapComposite" or "EpsilonAlpha2Beta1" in rep.rule
    assert rep.law is not None and rep_captum.law is not None
    # an MLP: zennit's preset is Epsilon(1e-6) on every Linear, named as backplay's Epsilon / preset
    assert rep.is_law and rep.nearest["maps"] <= rep.nearest["maps_tol"], str(rep)


def test_plot_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text.split("### Metrics, plots and notebooks")[1].split("\n## ")[0]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    fig = (tmp_path / "heatmaps.png")
    assert fig.exists() and fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
