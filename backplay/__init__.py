"""backplay: verify backward attribution rules against their game-theoretic definitions.

Three parts hold each other equal: ``theory`` (exact objects), ``numerics`` (cvxpy programs) and
``gpu`` (batched torch); :func:`validate_rule` composes them for any rule. docs/theory.md states every
definition and identity (I1, I2, ...) the code names.

``import backplay`` loads the torch path (``explain``, ``rules``, ``gpu``, ``metrics``, ``MLPSpec``);
``theory``, ``numerics``, ``testing``, ``validate``, ``plot`` and ``bench`` (with sympy, cvxpy,
networkx, hypothesis, matplotlib) load when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import gpu, metrics, rules
from .gpu import explain, hellinger, hellinger_matrix
from .nets import MLPSpec

__version__ = "0.1.0"

_LAZY_MODULES = ("bench", "numerics", "plot", "testing", "theory", "validate")
_LAZY_NAMES = {"validate_rule": "validate"}

__all__ = ["MLPSpec", "explain", "hellinger", "hellinger_matrix", "validate_rule", "gpu", "metrics", "rules",
           *_LAZY_MODULES]


def __getattr__(name: str) -> Any:
    """The heavy parts, imported on first use (PEP 562)."""
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'backplay' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
