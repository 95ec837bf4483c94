"""Execute the proof notebooks in place and store them with their outputs (the figures included), so a
reader who opens one sees what it shows; volatile metadata (timings, versions) is stripped. The tests
(tests/test_notebooks.py) execute them again from scratch and fail on any assertion or error.

    python proofs_notebooks/execute.py [NAME.ipynb ...]     (default: every notebook here)
"""

from __future__ import annotations

import pathlib
import sys

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).parent
TIMEOUT_S = 900  # per cell


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop what changes from run to run without changing what the notebook shows."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("collapsed", None)
    nb.metadata = nbformat.from_dict({
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    })
    return nb


def execute(path: pathlib.Path) -> None:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(strip(nb), path)


def main(names: list[str]) -> None:
    paths = [HERE / n for n in names] if names else sorted(HERE.glob("*.ipynb"))
    for path in paths:
        execute(path)
        print(f"executed {path.name} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main(sys.argv[1:])
