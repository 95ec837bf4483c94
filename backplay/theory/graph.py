"""The extended network graph (docs/theory.md section 2) as a networkx DiGraph."""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np
import sympy as sp

from ..nets import MLPSpec, check_input

CEMETERY = "cemetery"
SINK = "sink"


def _sign(w: Any) -> int:
    return 1 if w > 0 else -1


def extended_graph(spec: MLPSpec, x: Any = None) -> nx.DiGraph:
    """Build the extended network graph of ``spec`` (docs/theory.md section 2, section 2 for the game).

    Nodes:
      * ``(l, i, s)`` for 0 <= l <= L, neuron i, copy s in {+1, -1}; attributes ``layer``,
        ``neuron``, ``sign``, ``player`` ("max" at + copies, "min" at - copies, None at inputs),
        ``kind`` ("input", "hidden", "output"), ``can_stop`` (activated layers), ``gamma``
        (sum_j |W^l_ij|), ``bias`` (b^l_i) and, at inputs when ``x`` is given, ``payoff`` = s*x_j.
      * ``"cemetery"`` (stop) and ``"sink"``, where a continue move from a zero row (gamma = 0)
        ends after collecting its reward.

    Edges:
      * continue: (l, i, s) -> (l-1, j, s*sign W^l_ij) for W^l_ij != 0, with ``action="continue"``,
        ``probability`` |W|/gamma, ``multiplier`` gamma, ``reward`` s*b^l_i (collected once per
        continue move) and the signed ``weight`` W^l_ij;
      * stop: (l, i, s) -> cemetery at activated layers (``action="stop"``, probability 1 given the
        choice, multiplier 1, reward 0);
      * zero row: (l, i, s) -> sink with ``action="continue"``, probability 1, multiplier 0, reward s*b.

    Values are kept as given: exact (sympy) for an exact spec, floats otherwise.
    """
    xs = None if x is None else check_input(spec, x)
    g = nx.DiGraph(spec=spec, depth=spec.depth, widths=spec.widths)
    g.add_node(CEMETERY, kind="cemetery")
    g.add_node(SINK, kind="sink")
    zero = sp.Integer(0) if spec.is_exact else 0.0
    for j in range(spec.widths[0]):
        for s in (1, -1):
            attrs = dict(layer=0, neuron=j, sign=s, player=None, kind="input", can_stop=False)
            if xs is not None:
                attrs["payoff"] = s * xs[j]
            g.add_node((0, j, s), **attrs)
    for l in range(1, spec.depth + 1):
        w, b = spec.weight(l), spec.bias(l)
        kind = "output" if l == spec.depth else "hidden"
        can_stop = spec.activated(l)
        for i in range(w.shape[0]):
            gamma = sum((abs(v) for v in w[i]), zero)
            for s in (1, -1):
                node = (l, i, s)
                g.add_node(
                    node, layer=l, neuron=i, sign=s, player="max" if s > 0 else "min",
                    kind=kind, can_stop=can_stop, gamma=gamma, bias=b[i],
                )
                if can_stop:
                    g.add_edge(node, CEMETERY, action="stop", probability=1, multiplier=1, reward=zero)
                if gamma == 0:
                    g.add_edge(node, SINK, action="continue", probability=1, multiplier=zero,
                               reward=s * b[i], weight=zero)
                    continue
                for j in np.flatnonzero([v != 0 for v in w[i]]):
                    g.add_edge(
                        node, (l - 1, int(j), s * _sign(w[i, j])), action="continue",
                        probability=abs(w[i, j]) / gamma, multiplier=gamma, reward=s * b[i],
                        weight=w[i, j],
                    )
    return g


def layer_nodes(g: nx.DiGraph, l: int) -> list:
    """The states of layer l, ordered by (neuron, +/-)."""
    n = g.graph["widths"][l]
    return [(l, i, s) for i in range(n) for s in (1, -1)]


def continue_edges(g: nx.DiGraph, node: Any) -> list[tuple[Any, dict]]:
    """The continue moves out of ``node``: (successor, edge attributes)."""
    return [(v, d) for v, d in g.succ[node].items() if d["action"] == "continue"]
