"""proofs_notebooks: every notebook executes from scratch and its assertions hold (nbclient), and the
stored notebooks carry their outputs, figures included (written by proofs_notebooks/execute.py), with
no volatile metadata."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "proofs_notebooks").glob("*.ipynb"))
# the figures a reader expects: the extended graph, the routing laws' Hellinger matrix, the frozen
# ViT graph and its heatmaps, the LRP zoo's Hellinger matrix
FIGURES = {"01_relu_net_game.ipynb": 1, "02_softplus_entropic_game.ipynb": 1, "03_alpha_beta_routing.ipynb": 1,
           "05_vit.ipynb": 2, "06_lrp_zoo.ipynb": 1}
MAX_KB = 400


def test_notebooks_exist():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    for c in nb.cells:  # from scratch: the stored outputs play no part
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_executed_with_its_figures(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "stored unexecuted: run proofs_notebooks/execute.py"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "cells run out of order"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    assert images >= FIGURES.get(path.name, 0), f"{images} figures stored"
    assert all("execution" not in c.metadata for c in code), "volatile metadata stored"
    assert dict(nb.metadata.get("language_info", {})) == {"name": "python"}
    assert path.stat().st_size <= MAX_KB * 1024, f"{path.stat().st_size // 1024} KB stored"
