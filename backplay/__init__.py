"""backplay: verify backward attribution rules against their game-theoretic definitions.

Three parts hold each other equal: ``theory`` (exact objects), ``numerics`` (cvxpy programs) and
``gpu`` (batched torch). See THEORY.md for every identity (I1, I2, ...) the code names.
"""

from . import gpu, metrics, numerics, rules, testing, theory
from .gpu import explain, hellinger, hellinger_matrix
from .nets import MLPSpec

__all__ = ["MLPSpec", "explain", "hellinger", "hellinger_matrix", "gpu", "metrics", "numerics", "rules",
           "testing", "theory"]
__version__ = "0.1.0"
