"""The arithmetic of the exact objects: sympy (rationals or symbolic expressions), or mpmath at a
fixed number of digits in its own context (for the transcendental values of Gibbs forms)."""

from __future__ import annotations

from typing import Any

import mpmath
import sympy as sp

from ..nets import to_rational


class Arith:
    """Exact sympy arithmetic (``dps=None``) or mpmath at ``dps`` digits."""

    def __init__(self, dps: int | None = None) -> None:
        self.dps = dps
        self.ctx = None
        if dps is not None:
            self.ctx = mpmath.MPContext()
            self.ctx.dps = dps

    @property
    def exact(self) -> bool:
        return self.ctx is None

    def num(self, v: Any) -> Any:
        """Convert a value (float: its exact binary value) into this arithmetic."""
        if self.ctx is None:
            return v if isinstance(v, sp.Basic) else to_rational(v)
        if isinstance(v, sp.Rational):
            return self.ctx.mpf(int(v.p)) / int(v.q)
        if isinstance(v, sp.Basic):
            return self.ctx.mpf(str(sp.N(v, self.ctx.dps + 10)))
        return self.ctx.mpf(v)

    def log(self, v: Any) -> Any:
        return sp.log(v) if self.ctx is None else self.ctx.log(v)

    def exp(self, v: Any) -> Any:
        return sp.exp(v) if self.ctx is None else self.ctx.exp(v)

    def power(self, a: Any, e: Any) -> Any:
        if e == 1:
            return a
        return a ** e if self.ctx is None else self.ctx.power(a, e)

    def sqrt(self, v: Any) -> Any:
        return sp.sqrt(v) if self.ctx is None else self.ctx.sqrt(v)

    def sigmoid(self, t: Any) -> Any:
        return 1 / (1 + self.exp(-t))

    def entropy(self, p: Any) -> Any:
        """Binary entropy H(p), 0 log 0 = 0."""
        return sum((-q * self.log(q) for q in (p, 1 - p) if q != 0), self.num(0))
