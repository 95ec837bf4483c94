"""backplay.gpu: the fast batched torch path (any device).

``explain`` runs a rule (:mod:`backplay.rules`) on a model for a batch (MLPs, CNNs with BatchNorm and
pools, residual blocks built with :class:`Residual` / :class:`Add`, and :class:`backplay.gpu.vit.ViT`
on its frozen extended graph, :mod:`backplay.gpu.vit_explain`); ``unroll`` writes the explained
pass of one input as a :class:`backplay.nets.FrozenNet`; ``occupation`` returns the occupation
measures of the GV game / entropic game (THEORY.md sections 2-3); ``interval_bounds`` is IBP, the
game's monotone bound on a box (I13). ``occupation`` and ``interval_bounds`` take ``nn.Sequential`` of
Linear / ReLU / Softplus (nested Sequential, Identity, Dropout allowed) or a :class:`backplay.MLPSpec`.
"""

from backplay.gpu.engine import ExplainReport, explain
from backplay.gpu.modules import Add, Residual
from backplay.gpu.occupation import Occupation, interval_bounds, occupation
from backplay.gpu.unroll import unroll
from backplay.gpu import vit  # noqa: E402  (bp.gpu.vit.vit_b_16(), bp.gpu.vit.load(path))

__all__ = ["explain", "occupation", "interval_bounds", "unroll", "Add", "Residual", "Occupation",
           "ExplainReport", "vit"]
