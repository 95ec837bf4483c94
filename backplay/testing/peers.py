"""Importing the peer libraries that the cross-library checks use as oracles (I23, docs/theory.md section
10), optional extras: zennit 0.5.1 (``pip install --no-deps zennit==0.5.1``) and captum.

zennit 0.5.1 runs ``from torchvision.models.resnet import Bottleneck, BasicBlock`` at import time
(``zennit/torchvision.py``, for its ResNet canonizers), and torchvision cannot be installed beside
every torch build. The checks only use zennit's rules and composites on plain models, so two empty
classes are enough: :func:`torchvision_stub` installs ``torchvision``, ``torchvision.models`` and
``torchvision.models.resnet`` in ``sys.modules`` only if the real torchvision is not importable, and
restores every ``torchvision*`` entry of ``sys.modules`` on exit (zennit keeps its references to the
two stub classes; nothing else sees them).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator

__all__ = ["INSTALL", "torchvision_stub", "import_zennit", "missing_peer"]

_STUB_FLAG = "__backplay_test_stub__"
#: how each peer is installed (the message of a row that needs it and does not find it)
INSTALL = {"zennit": "pip install --no-deps zennit==0.5.1", "captum": "pip install captum"}


def _torchvision_keys() -> set[str]:
    return {k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")}


def _real_torchvision_importable() -> bool:
    before = _torchvision_keys()
    try:
        importlib.import_module("torchvision.models.resnet")
        return True
    except Exception:  # noqa: BLE001 - absent (ImportError) or broken beside this torch (anything)
        for k in _torchvision_keys() - before:  # drop what a failed or partial import left behind
            del sys.modules[k]
        return False


def _make_stub() -> dict[str, types.ModuleType]:
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    resnet = types.ModuleType("torchvision.models.resnet")

    class BasicBlock:
        """Stand-in for torchvision.models.resnet.BasicBlock (zennit's ResNet canonizer only)."""

    class Bottleneck:
        """Stand-in for torchvision.models.resnet.Bottleneck (zennit's ResNet canonizer only)."""

    for cls in (BasicBlock, Bottleneck):
        cls.__module__ = "torchvision.models.resnet"
    resnet.BasicBlock = BasicBlock
    resnet.Bottleneck = Bottleneck
    tv.models = models
    models.resnet = resnet
    tv.__path__ = []  # packages, so that the submodule imports resolve through sys.modules
    models.__path__ = []
    for m in (tv, models, resnet):
        setattr(m, _STUB_FLAG, True)
    return {"torchvision": tv, "torchvision.models": models, "torchvision.models.resnet": resnet}


@contextlib.contextmanager
def torchvision_stub() -> Iterator[bool]:
    """Within the block ``torchvision.models.resnet`` is importable; yields True if it is the stub.

    ``sys.modules``' torchvision entries are exactly as before once the block is left.
    """
    saved = {k: sys.modules[k] for k in _torchvision_keys()}
    stubbed = False
    try:
        if not _real_torchvision_importable():
            sys.modules.update(_make_stub())
            stubbed = True
        yield stubbed
    finally:
        for k in _torchvision_keys() - saved.keys():
            del sys.modules[k]
        sys.modules.update(saved)


def import_zennit() -> types.ModuleType:
    """``import zennit`` (with its submodules), under :func:`torchvision_stub`. Raises ImportError
    if zennit is not installed."""
    if "zennit" in sys.modules:
        return sys.modules["zennit"]
    with torchvision_stub():
        zennit = importlib.import_module("zennit")
        for sub in ("attribution", "composites", "core", "rules", "types"):
            importlib.import_module(f"zennit.{sub}")
    return zennit


def missing_peer(name: str) -> str | None:
    """None if the peer library ``name`` ("zennit" or "captum") is installed, else the one line a
    check that needs it reports, e.g. "zennit not installed: pip install --no-deps zennit==0.5.1".
    Looks the package up without importing it."""
    if name not in INSTALL:
        raise ValueError(f"unknown peer library {name!r}; known: {', '.join(INSTALL)}")
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return None
    return f"{name} not installed: {INSTALL[name]}"
