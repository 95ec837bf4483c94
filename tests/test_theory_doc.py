"""docs/theory.md, the project's statement of its mathematics, stays true to the repository.

Pure file parsing (no torch, no backplay import):
(a) every identity I1..I23 has exactly one heading ``### I<k>: ...`` (so docs/theory.md#i<k>-... links
    work), and every identity section names the code that implements it and a test that checks it;
(b) every code reference ``backplay/<path>.py::<Name>`` names a file that exists and a name defined at
    its top level (def, class, assignment) or ``Class.member`` (a method or class attribute); code
    references use that one format only;
(c) every test reference ``tests/<path>.py::test_name`` names a file that defines ``def test_name``;
(d) every row of the ``backplay verify`` table (the ``Identity(...)`` rows of the list that
    backplay/cli.py imports as ``IDENTITIES``) is defined by a heading of docs/theory.md.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "theory.md"
IDS = [f"I{k}" for k in range(1, 24)]

CODE_REF = re.compile(r"`(backplay/[\w/]+\.py)::([A-Za-z_][\w.]*)`")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")
ANY_PATH = re.compile(r"`((?:backplay|tests)/[\w/]+\.py)(?:::[^`]*)?`")
# the other format (``backplay/x.py: Name``) must not creep in
OTHER_FORMAT = re.compile(r"(?:backplay|tests)/[\w/]+\.py:(?!:)\s*\w")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
DEF_HEADING = re.compile(r"^(I\d+|[\w-]+(?: [\w-]+)*):\s")


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _headings(text: str) -> list[tuple[int, int, str]]:
    """(line index, level, title) of every Markdown heading outside code fences."""
    out, fence = [], False
    for n, line in enumerate(text.splitlines()):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        m = HEADING.match(line)
        if m and not fence:
            out.append((n, len(m.group(1)), m.group(2)))
    return out


def _defined_ids(text: str) -> dict[str, list[int]]:
    """{identity id: [line indices]} of the headings ``<id>: title`` (any level >= 2)."""
    out: dict[str, list[int]] = {}
    for n, level, title in _headings(text):
        m = DEF_HEADING.match(title)
        if level >= 2 and m:
            out.setdefault(m.group(1), []).append(n)
    return out


def _section(text: str, start: int) -> str:
    """The text under the heading at line ``start`` up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    heads = _headings(text)
    level = next(lv for n, lv, _ in heads if n == start)
    end = next((n for n, lv, _ in heads if n > start and lv <= level), len(lines))
    return "\n".join(lines[start:end])


@lru_cache(maxsize=None)
def _module(path: str) -> ast.Module:
    return ast.parse((ROOT / path).read_text(encoding="utf-8"), filename=path)


def _targets(node: ast.stmt) -> list[str]:
    """Names bound by an assignment statement."""
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _members(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    out: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        for name in _targets(node):
            out[name] = node
    return out


def _defines(path: str, dotted: str) -> bool:
    """Whether module ``path`` defines ``dotted`` (``Name`` or ``Class.member``, any depth of classes)."""
    scope = _members(_module(path).body)
    parts = dotted.split(".")
    for k, part in enumerate(parts):
        node = scope.get(part)
        if node is None:
            return False
        if k < len(parts) - 1:
            if not isinstance(node, ast.ClassDef):
                return False
            scope = _members(node.body)
    return True


def _test_names(path: str) -> set[str]:
    return {n.name for n in ast.walk(_module(path)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _resolve(importer: Path, node: ast.ImportFrom) -> Path:
    """The file of the module imported by ``from <module> import ...`` in ``importer``."""
    base = importer.parent
    for _ in range(node.level - 1):
        base = base.parent
    if node.level == 0:
        base = ROOT
    mod = base.joinpath(*(node.module or "").split(".")) if node.module else base
    return mod.with_suffix(".py") if mod.with_suffix(".py").exists() else mod / "__init__.py"


def verify_table_rows() -> list[str]:
    """The identity ids of the ``backplay verify`` table: follow ``IDENTITIES`` from backplay/cli.py to the
    module that assigns it, and read the first argument of its ``Identity(...)`` rows."""
    path = ROOT / "backplay" / "cli.py"
    for _ in range(10):  # follow re-exports
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if "IDENTITIES" in _targets(node):
                value = node.value
                assert isinstance(value, ast.List), f"IDENTITIES in {path} is not a list literal"
                rows = []
                for el in value.elts:
                    assert isinstance(el, ast.Call) and getattr(el.func, "id", None) == "Identity", \
                        f"a row of IDENTITIES in {path} is not an Identity(...) call"
                    first = el.args[0] if el.args else next(k.value for k in el.keywords if k.arg == "name")
                    assert isinstance(first, ast.Constant) and isinstance(first.value, str)
                    rows.append(first.value)
                return rows
        imports = [n for n in tree.body if isinstance(n, ast.ImportFrom)
                   and any(a.name == "IDENTITIES" for a in n.names)]
        assert imports, f"{path} neither assigns nor imports IDENTITIES"
        path = _resolve(path, imports[0])
    raise AssertionError("IDENTITIES: too many re-exports")


# -- (a) -------------------------------------------------------------------------------------------
def test_every_identity_has_one_heading():
    defined = _defined_ids(_doc())
    missing = [i for i in IDS if i not in defined]
    assert not missing, f"docs/theory.md has no heading '### <id>: ...' for {missing}"
    twice = [i for i in IDS if len(defined[i]) > 1]
    assert not twice, f"identities defined more than once: {twice}"
    stray = sorted(k for k in defined if re.fullmatch(r"I\d+", k) and k not in IDS)
    assert not stray, f"headings for identities that do not exist: {stray}"


def test_every_identity_names_its_code_and_its_test():
    text = _doc()
    defined = _defined_ids(text)
    for ident in IDS + [r for r in verify_table_rows() if r not in IDS]:
        if ident not in defined:
            continue  # reported by the heading tests
        body = _section(text, defined[ident][0])
        assert CODE_REF.search(body), f"{ident}: no code reference `backplay/...py::Name` in its section"
        assert TEST_REF.search(body), f"{ident}: no test reference `tests/...py::test_name` in its section"


# -- (b) -------------------------------------------------------------------------------------------
def test_code_references_exist():
    refs = sorted(set(CODE_REF.findall(_doc())))
    assert len(refs) > 50, "docs/theory.md should name the code of every identity and rule"
    bad = []
    for path, name in refs:
        if not (ROOT / path).is_file():
            bad.append(f"{path} (no such file)")
        elif not _defines(path, name):
            bad.append(f"{path}::{name} (not defined there)")
    assert not bad, "dangling code references in docs/theory.md:\n  " + "\n  ".join(bad)


def test_every_path_exists_and_one_reference_format():
    text = _doc()
    missing = sorted({p for p in ANY_PATH.findall(text) if not (ROOT / p).is_file()})
    assert not missing, f"paths named in docs/theory.md that do not exist: {missing}"
    other = sorted(set(OTHER_FORMAT.findall(text)))
    assert not other, f"use `path.py::Name` for references, not `path.py: Name`: {other}"
    for m in re.finditer(r"`((?:backplay|tests)/[\w/]+\.py)::([^`]*)`", text):
        assert CODE_REF.fullmatch(m.group(0)) or TEST_REF.fullmatch(m.group(0)), \
            f"malformed reference {m.group(0)}"


# -- (c) -------------------------------------------------------------------------------------------
def test_test_references_exist():
    refs = sorted(set(TEST_REF.findall(_doc())))
    assert refs, "docs/theory.md names no test"
    bad = []
    for path, name in refs:
        if not (ROOT / path).is_file():
            bad.append(f"{path} (no such file)")
        elif name not in _test_names(path):
            bad.append(f"{path}::{name} (no def {name})")
    assert not bad, "dangling test references in docs/theory.md:\n  " + "\n  ".join(bad)


# -- (d) -------------------------------------------------------------------------------------------
def test_every_verify_row_is_defined():
    rows = verify_table_rows()
    assert set(IDS) <= set(rows), "the verify table lost an identity row"
    defined = _defined_ids(_doc())
    missing = [r for r in rows if r not in defined]
    assert not missing, f"rows of `backplay verify` with no heading '### <id>: ...' in docs/theory.md: {missing}"


# -- the checker checks ----------------------------------------------------------------------------
@pytest.mark.parametrize("path, name, ok", [
    ("backplay/rules/routing.py", "AlphaBeta", True),
    ("backplay/rules/routing.py", "Anchor.lam_at", True),
    ("backplay/testing/identities.py", "TOL_TORCH", True),
    ("backplay/rules/routing.py", "NoSuchRule", False),
    ("backplay/rules/routing.py", "Anchor.no_such_method", False),
    ("backplay/rules/routing.py", "routing_parts.x", False),
])
def test_the_reference_checker(path, name, ok):
    assert _defines(path, name) is ok


def test_the_heading_parser():
    text = "## 1. Intro\n### I1: a title\ntext `backplay/nets.py::MLPSpec`\n### I10: other\n```\n### I11: in a fence\n```\n"
    defined = _defined_ids(text)
    assert set(defined) == {"I1", "I10"}
    assert "MLPSpec" in _section(text, defined["I1"][0]) and "I10" not in _section(text, defined["I1"][0])
