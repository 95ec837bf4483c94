"""Attribution rules: one small class per rule (zennit's split), declarations only.

A rule is a frozen, parameter-only object. It never holds a model and never modifies one: the engine
(:func:`backplay.gpu.explain`) reads the model into its operation graph (:mod:`backplay.gpu.read`),
runs ONE batched forward pass and hands the rule the recorded :class:`~backplay.gpu.trace.Trace`. A
rule then maps that trace to the relevance of the input.

Most rules are layer rules (:class:`LayerRule`): a start measure at the output, one backward map per
layer (``backward(layer, upper) -> lower``; ``layer`` is a :class:`~backplay.gpu.trace.LayerTrace`
with ``map`` (apply / transpose with any part of its coefficients), ``gate``, ``input`` = y^{l-1},
``z``, ``p`` and ``y``), and a final step at the input; layout steps (reshape, cat, slice, ...) move
relevance by their transpose for every rule (:meth:`~backplay.gpu.trace.Trace.walk`).

Modules: :mod:`.base` (Rule, LayerRule, Sweep), :mod:`.gradient` (Gradient, GradientXInput, LRP0,
Epsilon, SoftplusGame), :mod:`.routing` (the routing laws of docs/theory.md section 8), :mod:`.lrp` (the
LRP zoo of section 10: Gamma, ZPlus, ZBox, Flat, WSquare, Composite and zennit's presets),
:mod:`.peers` (Attribution
Equilibrium), :mod:`.transformer` (AttnLRP, CPLRP, Rollout, TransformerAttribution). The package
depends on torch only (the gpu package imports it, not the other way round).
"""

from .base import LayerRule, Rule, Sweep, safe_divide
from .gradient import LRP0, Epsilon, Gradient, GradientXInput, SoftplusGame
from .lrp import (
    LAYER_KINDS, Composite, EpsilonAlpha2Beta1, EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlus,
    EpsilonPlusFlat, Flat, Gamma, WSquare, ZBox, ZPlus, first_layers,
)
from .peers import AttributionEquilibrium, AttributionEquilibriumLaw
from .routing import RG, AlphaBeta, Anchor, GradientEquilibrium, RGEq, RiskAverse, RoutingRule
from .transformer import CPLRP, AttnLRP, Rollout, TransformerAttribution, TransformerRule

__all__ = [
    "Rule", "LayerRule", "Gradient", "GradientXInput", "LRP0", "AlphaBeta", "RG", "RGEq",
    "GradientEquilibrium", "Anchor", "RiskAverse", "SoftplusGame", "safe_divide", "Sweep",
    "AttributionEquilibrium", "AttributionEquilibriumLaw", "RoutingRule",
    "TransformerRule", "CPLRP", "AttnLRP", "Rollout", "TransformerAttribution",
    "Epsilon", "Gamma", "ZPlus", "ZBox", "Flat", "WSquare", "Composite", "EpsilonPlus", "EpsilonPlusFlat",
    "EpsilonGammaBox", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat", "LAYER_KINDS", "first_layers",
]
