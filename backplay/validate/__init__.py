"""``validate_rule``: is a rule (backplay's, a user's, another library's) a law on the game's graph,
which one, and where it breaks (docs/theory.md, sections on validation and the LRP zoo; I14, I21, I23).

A tool that composes the three parts: the torch engine runs and probes the rule, a cvxpy program
fits the law, the exact laws of :mod:`backplay.theory` name it. :mod:`~backplay.validate.rule` holds
the probe, the program and the report; :mod:`~backplay.validate.external` reads rules implemented in
other libraries (zennit, captum, any hook-based implementation) as black boxes.
"""

from .external import LayerMap, as_layer_map, black_box, captum_rule, zennit_rule
from .rule import LAW_ROW, SIGNED, SINGLE, Finding, FoundLaw, RuleReport, validate_rule

__all__ = ["Finding", "FoundLaw", "LAW_ROW", "LayerMap", "RuleReport", "SIGNED", "SINGLE", "as_layer_map",
           "black_box", "captum_rule", "validate_rule", "zennit_rule"]
