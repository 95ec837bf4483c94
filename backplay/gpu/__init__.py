"""backplay.gpu: the fast batched torch path (any device).

``explain`` runs a rule (:mod:`backplay.rules`) on a model for a batch; ``occupation`` returns the
occupation measures of the GV game / entropic game (THEORY.md sections 2-3); ``interval_bounds`` is
IBP, the game's monotone bound on a box (I13). Models: ``nn.Sequential`` of Linear / ReLU /
Softplus (nested Sequential, Identity, Dropout allowed) or a :class:`backplay.MLPSpec`.
"""

from backplay.gpu.engine import ExplainReport, explain
from backplay.gpu.occupation import Occupation, interval_bounds, occupation

__all__ = ["explain", "occupation", "interval_bounds", "Occupation", "ExplainReport"]
