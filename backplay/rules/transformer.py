"""Transformer rules (docs/theory.md section 10): parameters only; computed by
:mod:`backplay.gpu.transformer` on the attention nodes of any model's graph."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import Rule

__all__ = ["TransformerRule", "CPLRP", "AttnLRP", "Rollout", "TransformerAttribution"]


# ----------------------------------------------------------------------------------------------
# transformer rules (docs/theory.md section 10): parameters only; computed on the attention nodes of the
# model's graph by backplay.gpu.transformer (they are not laws on the frozen graph)


def _check_eps(eps: float, strict: bool) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number, got {eps!r}")
    if eps < 0 or (strict and eps == 0):
        raise ValueError(f"eps must be {'> 0' if strict else '>= 0'}, got {eps!r}")


@dataclass(frozen=True)
class TransformerRule(Rule):
    """Base class of the transformer rules: they read the model's attention (its weights, or
    relevance through the softmax into q and k), so :func:`backplay.explain` computes them on the
    attention nodes of the operation graph (:mod:`backplay.gpu.transformer`), on any model the
    reader takes (transformers, and for AttnLRP / CPLRP any other model too)."""


@dataclass(frozen=True)
class CPLRP(TransformerRule):
    """Conservative propagation LRP (Ali et al. 2022, "XAI for Transformers: Better Explanations
    through Conservative Propagation"): normaliser standard deviations, gates (GELU, ...) and
    attention weights are detached (the identity rule through each; attention mixes the value
    tokens with the fixed weights A, no relevance enters q or k), and every dense / convolution layer
    uses LRP-0 (``eps=0``, default) or the epsilon rule ``eps > 0``.

    With ``eps=0`` it is Gradient x Input of the frozen graph (docs/theory.md section 10), i.e.
    ``GradientXInput``: the frozen pass is positively homogeneous of degree 1 in (input, every
    bias-like constant), so ``logit = sum R + sum_p <p, d logit / d p>`` over the bias-like constants
    (zero when they are all zero)."""

    eps: float = 0.0

    def __post_init__(self) -> None:
        _check_eps(self.eps, strict=False)


@dataclass(frozen=True)
class AttnLRP(TransformerRule):
    """AttnLRP (Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation
    for Transformers"), as a modified gradient of one batched pass:

    * dense / convolution layers (patch embedding, q, k, v, proj, MLP, head): epsilon rule
      ``R_u = u * W^T (R_z / (z + eps sign z))`` (sign(0) := +1), ``eps > 0``;
    * normalisers: identity rule (std detached; centring and affine map by LRP-0, the bias absorbs
      its share); gates (GELU, SiLU, an elementwise subgraph read as one gate): identity rule;
    * softmax A = softmax(S): ``R_S = S * (R_A - A * sum_rows R_A)`` (Gradient x Input of the
      softmax w.r.t. its logits; not conservative: it absorbs ``sum(S * A) * sum R_A`` per row);
    * products of two tensors that depend on the input (Q K^T, A V, gated units): uniform rule,
      each factor gets half (``R_a = a * (g @ b^T) / 2``), so relevance flows into q and k.

    Residual adds split by LRP-0 (x * g); constants (cls token, position embeddings) absorb their
    shares. Conservation: every step above except the softmax and the biases is conservative.

    Relation to the authors' code (LXT 2.1): ``lxt/efficient`` computes the same modified gradient
    with LRP-0 linear layers, i.e. this rule as eps -> 0; ``lxt/explicit`` also epsilon-stabilises
    the matmuls, which this rule does not."""

    eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_eps(self.eps, strict=True)


@dataclass(frozen=True)
class Rollout(TransformerRule):
    """Attention rollout (Abnar and Zuidema 2020): per attention layer b the head-mean attention
    A_b, ``A_hat_b = (0.5 A_b + 0.5 I)`` row-normalised, ``Rollout = A_hat_L ... A_hat_1``; the value of
    token t is ``sum_q w_q Rollout[q, t]`` over the tokens q the explained logit reads from the last
    attention layer (w uniform on them: the cls token of a ViT, cls and distillation tokens of a
    DeiT, the explained position of a language model). Each token's value is spread evenly over the
    input units it is made of (the pixels of its patch, its embedding dimensions); tokens made of no
    input (a cls token) keep none. Target-independent up to the choice of the tokens q."""


@dataclass(frozen=True)
class TransformerAttribution(TransformerRule):
    """Gradient-weighted relevance rollout of Chefer et al. 2021 ("Transformer Interpretability
    Beyond Attention Visualization"): per attention layer b
    ``Abar_b = mean_heads[(dlogit_t/dA_b * R_{A_b})^+]`` with the plain gradient of the target
    logit w.r.t. the attention weights A_b (nothing frozen), then ``R = I``,
    ``R = R + Abar_b @ R`` for b = 1..L; token values and their spread over the input as
    :class:`Rollout` (rows: the tokens the logit reads).

    ``relevance`` picks R_A:

    * ``"attnlrp"`` (default): the AttnLRP relevance of A (:class:`AttnLRP` with this ``eps``):
      ``R_A = A * g_A``, i.e. A's half of the uniform rule at A V. This is **not** the paper's own
      LRP (alpha=1, beta=0 linear layers with its normalised rules for add and matmul), which is not
      implemented here;
    * ``"attention"``: R_A = A, i.e. ``Abar = mean_heads[(grad A * A)^+]``: the "GAE" rule of
      Chefer et al. 2021b ("Generic Attention-model Explainability"), self-attention case.
    """

    relevance: str = "attnlrp"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.relevance not in ("attnlrp", "attention"):
            raise ValueError(f"relevance must be 'attnlrp' or 'attention', got {self.relevance!r}")
        _check_eps(self.eps, strict=True)
