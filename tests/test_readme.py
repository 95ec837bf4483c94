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
