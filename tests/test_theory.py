"""Exact objects on hand-checked nets: the extended graph, the game, paths, bounds, the symbolic
entropic game, and tests that check the checker (broken games must fail the identity checks)."""

import networkx as nx
import pytest
import sympy as sp
from hypothesis import given, settings

import backplay as bp
from backplay.testing import assert_identity, check_identity, nets_with_inputs
from backplay.theory import CEMETERY, SINK, ReLUNetGame, exact_forward, extended_graph, ibp

R = sp.Rational

# 2-2-2-1 net with a negative weight, a zero weight, a zero row and biases
SPEC = bp.MLPSpec(
    weights=[[[1, -2], [0.5, 0]], [[1, -1], [0, 0]], [[1, 1]]],
    biases=[[0, 1], [0.25, 0.5], None],
)
X = [1, 2]


def test_graph_structure():
    g = extended_graph(SPEC, X)
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    assert {CEMETERY, SINK} <= set(g.nodes)
    assert g.number_of_nodes() == 2 * (2 + 2 + 2 + 1) + 2
    e = g.edges[(1, 0, 1), (0, 1, -1)]  # W^1_01 = -2: + hands the move to the - copy
    assert e["action"] == "continue" and e["probability"] == 2 / 3 and e["multiplier"] == 3
    assert e["weight"] == -2 and e["reward"] == 0
    assert not g.has_edge((1, 1, 1), (0, 1, 1))  # zero weight: no edge
    assert g.edges[(2, 1, -1), SINK]["reward"] == -0.5  # zero row: continue collects -b only
    assert g.edges[(2, 1, -1), SINK]["multiplier"] == 0
    assert g.has_edge((1, 0, 1), CEMETERY) and not g.has_edge((3, 0, 1), CEMETERY)  # linear output
    assert g.nodes[(0, 1, -1)]["payoff"] == -2 and g.nodes[(2, 0, -1)]["player"] == "min"
    assert all(sum(d["probability"] for _, _, d in g.out_edges(n, data=True) if d["action"] == "continue") == 1
               for n in g.nodes if n not in (CEMETERY, SINK) and n[0] > 0)


def test_worked_example_by_hand():
    # z1 = (1 - 4, 0.5 + 1) = (-3, 1.5) -> y1 = (0, 1.5); z2 = (0.25 - 1.5, 0.5) -> y2 = (0, 0.5); f = 0.5
    sol = ReLUNetGame(SPEC).solve(X, 0)
    assert sol.value == R(1, 2)
    assert [list(p[:, 0]) for p in sol.policy] == [[0, 1], [0, 1], [1]]
    assert list(sol.gradient) == [0, 0]  # only the zero row's bias reaches the output
    assert sol.bias_share == R(1, 2) and sol.stopped == R(1, 2) and sol.sink == R(1, 2)
    assert list(sol.bias_gradient[1]) == [0, 1] and list(sol.bias_gradient[0]) == [0, 0]
    assert exact_forward(SPEC, X)[-1][0] == R(1, 2)


def test_exact_copy_is_the_binary_value():
    spec = bp.MLPSpec([[[0.1]]]).exact()
    assert spec.weights[0][0, 0] == sp.Rational(0.1) and spec.weights[0][0, 0] != R(1, 10)


def test_paths_enumerate_the_value():
    game = ReLUNetGame(SPEC)
    paths = game.paths(X, 0)
    assert sum(p.probability * p.payoff for p in paths) == R(1, 2)
    assert {p.end for p in paths} == {CEMETERY, SINK}


def test_bounds_equal_ibp_by_hand():
    spec = bp.MLPSpec([[[1, -1]], [[2]]], [[R(1, 2)], [-1]])
    lo, hi = ReLUNetGame(spec).bounds([0, 0], [1, 1], 0)
    # z1 in [-1/2, 3/2] -> y1 in [0, 3/2] -> f in [-1, 2]
    assert (lo, hi) == (-1, 2)
    assert tuple(v[0] for v in ibp(spec, [0, 0], [1, 1])) == (-1, 2)
    with pytest.raises(ValueError, match="lo <= hi"):
        ReLUNetGame(spec).bounds([1, 0], [0, 1], 0)


def test_symbolic_eps_limit_is_the_relu_value():
    """I12 as a symbolic limit on a tiny net, and I10 with eps a Symbol."""
    eps = sp.Symbol("epsilon", positive=True)
    w, b = [[[1, -2], [R(1, 2), 0]], [[1, -1]]], [[0, 1], [R(1, 4)]]
    sol = ReLUNetGame(bp.MLPSpec(w, b, "softplus", eps)).solve(X, 0)
    relu = ReLUNetGame(bp.MLPSpec(w, b)).solve(X, 0).value
    assert sp.limit(sol.value, eps, 0, "+") == relu
    ys = exact_forward(bp.MLPSpec(w, b, "softplus", eps), X)
    assert sp.simplify(sol.value - ys[-1][0]) == 0


def test_entropic_paths_include_entropy():
    spec = bp.MLPSpec([[[1, -1]], [[1]]], [[R(1, 4)], None], "softplus", R(1, 2))
    game = ReLUNetGame(spec)
    paths = game.paths([1, -1], 0)
    value = game.solve([1, -1], 0).value
    assert abs(sum(p.probability * p.payoff for p in paths) - value) < 1e-40


# ---- checking the checker ------------------------------------------------------------------------
class TiesContinue(ReLUNetGame):
    """Broken on purpose: a tie z = 0 continues."""

    def continues(self, player, c):
        return c >= 0 if player == "max" else c <= 0


class NoSignFlip(ReLUNetGame):
    """Broken on purpose: a negative weight keeps the copy instead of handing over the move."""

    def graph(self):
        g = extended_graph(self.spec)
        for u, v, d in list(g.edges(data=True)):
            if d["action"] == "continue" and v not in (CEMETERY, SINK) and d["weight"] < 0:
                g.remove_edge(u, v)
                g.add_edge(u, (v[0], v[1], u[2]), **d)
        return g


TIE_SPEC = bp.MLPSpec([[[1, 1]], [[2]]], [[-3], None])  # z = 0 at x = (1, 2)


def test_broken_ties_fail_on_a_tie():
    res = check_identity("I3", TIE_SPEC, X, 0, game_cls=TiesContinue)
    assert not res.exact and res.torch_err > 0.5 and res.cvxpy_err > 0.5
    assert check_identity("I3", TIE_SPEC, X, 0).ok


def test_broken_sign_flip_fails():
    spec = bp.MLPSpec([[[1, -1]], [[1]]])
    with pytest.raises(AssertionError):
        assert_identity("I1", spec, [1, -2], 0, game_cls=NoSignFlip)
    assert_identity("I1", spec, [1, -2], 0)


@pytest.mark.parametrize("broken,name", [(TiesContinue, "I3"), (TiesContinue, "I5"),
                                         (NoSignFlip, "I1"), (NoSignFlip, "I3")])
def test_property_tests_catch_broken_games(broken, name):
    """The hypothesis property test itself finds a counterexample for a broken game."""

    @settings(max_examples=200, derandomize=True, database=None)
    @given(case=nets_with_inputs(ties=True, activation="relu", max_depth=3, max_width=3))
    def prop(case):
        spec, x, target = case
        assert_identity(name, spec, x, target, game_cls=broken)

    with pytest.raises(AssertionError):
        prop()
