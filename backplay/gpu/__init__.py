"""backplay.gpu: the fast batched torch path (any device).

One reader (:mod:`backplay.gpu.read`) turns any torch model into its operation graph (docs/theory.md
section 9); ``explain`` runs a rule (:mod:`backplay.rules`) on it for a batch; ``unroll`` writes the
explained pass of one input as a :class:`backplay.nets.FrozenNet` (the exact law runs on it);
``occupation`` returns the occupation measures of the GV game / entropic game (docs/theory.md sections
2-3); ``interval_bounds`` is IBP, the game's monotone bound on a box (I13); ``hellinger`` and
``hellinger_matrix`` compare how routing laws compute (I21). Transformers (backplay's ViT, Hugging
Face ViT / BERT / GPT-2 objects, models with ``nn.MultiheadAttention``) are read the same way:
attention is a layer of token-mixing edges with the frozen weights (docs/theory.md section 10); the
transformer rules run on those nodes (:mod:`backplay.gpu.transformer`).
"""

from backplay.gpu.engine import ExplainReport, explain
from backplay.gpu.hellinger import HellingerMatrix, hellinger, hellinger_matrix
from backplay.gpu.modules import Add, Residual
from backplay.gpu.occupation import Occupation, interval_bounds, occupation
from backplay.gpu.unroll import mlp_spec, unroll
from backplay.gpu import vit  # noqa: E402  (bp.gpu.vit.vit_b_16(), bp.gpu.vit.load(path))

__all__ = ["explain", "occupation", "interval_bounds", "unroll", "mlp_spec", "Add", "Residual", "Occupation",
           "ExplainReport", "vit", "hellinger", "hellinger_matrix", "HellingerMatrix"]
