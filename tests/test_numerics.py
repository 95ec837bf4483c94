"""Tests of backplay.numerics: the cvxpy oracle for the ReLU net game and its entropic version.

Checks docs/theory.md I1-I5, I9-I11, I13 and section 6 to solver tolerance on small hand-made and random
nets, against the numpy forward pass (spec.forward), torch autograd, finite differences, interval
bound propagation and numpy best-response recursions written here.
"""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
import torch

import backplay.numerics as bn
from backplay.nets import MLPSpec

REL = 1e-6


def close(a, b, tol=REL):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.all(np.abs(a - b) <= tol * np.maximum(1.0, np.abs(b)))


# -- nets -----------------------------------------------------------------------------------------
X_HAND = np.array([1.0, 1.0, 2.0])


def hand_net(output: str = "linear") -> MLPSpec:
    """3-4-4-2, mixed signs, zero weights, a tie (z^1_1 = 0 at X_HAND), a zero row (neuron 1 of
    layer 2, bias 0.75), biases. At X_HAND: z1 = [0.5, 0, -1, 2], z2 = [1.25, 0.75, 2, -0.15],
    z3 = [2.975, 0.3]."""
    W1 = [[1, -2, 0.5], [-1, 1, 0], [0.5, 0.25, -1], [2, -1, 1]]
    b1 = [0.5, 0, 0.25, -1]
    W2 = [[1, -1, 0.5, 0.5], [0, 0, 0, 0], [-1, 2, 0, 1], [0.5, 0, -2, -0.25]]
    b2 = [-0.25, 0.75, 0.5, 0.1]
    W3 = [[1, -0.5, 1, 2], [-1, 1, 0.5, -1]]
    b3 = [0.1, -0.2]
    return MLPSpec([W1, W2, W3], [b1, b2, b3], "relu", output=output)


def random_net(widths, seed, activation="relu", eps=None, output="linear", bias=True):
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(size=(b, a)) / np.sqrt(a) * 1.5 for a, b in zip(widths[:-1], widths[1:])]
    for W in Ws:  # some exact zero weights
        W[rng.random(W.shape) < 0.15] = 0.0
    bs = [rng.normal(size=b) * 0.3 for b in widths[1:]] if bias else None
    if output != "linear":
        output = activation
    return MLPSpec(Ws, bs, activation, eps, output), rng.normal(size=widths[0])


def softplus_net(seed=3, output="linear"):
    """A 3-4-4-2 softplus net with eps = 0.7."""
    return random_net((3, 4, 4, 2), seed, "softplus", 0.7, output)[0]


def torch_grads(spec: MLPSpec, x, target):
    """d f_target / dx and d f_target / db^l by torch autograd (float64)."""
    model = spec.to_torch()
    xt = torch.tensor(np.asarray(x, dtype=float), requires_grad=True)
    out = model(xt)[target]
    out.backward()
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    db = [None if lin.bias is None else lin.bias.grad.numpy().copy() for lin in linears]
    return xt.grad.numpy().copy(), db


def softplus(z, eps):
    return eps * np.logaddexp(0.0, np.asarray(z) / eps)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=float)))


def entropy(p):
    p = np.asarray(p, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0) - np.where(p < 1, (1 - p) * np.log(1 - p), 0.0)
    return h


def numpy_best_response(spec: MLPSpec, x, target, player, policy, terminal=None):
    """Backward recursion for one player's best response against the other's fixed policy."""
    eps = float(spec.eps) if spec.activation == "softplus" else 0.0
    vp, vm = (np.array(x, float), -np.array(x, float)) if terminal is None else map(np.asarray, terminal)
    for l in range(1, spec.depth + 1):
        W, b = spec.weight(l), spec.bias(l)
        Wp, Wn = np.maximum(W, 0), np.maximum(-W, 0)
        cp_, cm = b + Wp @ vp + Wn @ vm, -b + Wp @ vm + Wn @ vp
        p, q = policy[l - 1][:, 0], policy[l - 1][:, 1]
        if not spec.activated(l):
            vp, vm = cp_, cm
            continue
        if player == "max":
            vp = softplus(cp_, eps) if eps else np.maximum(cp_, 0)
            vm = q * cm - eps * entropy(q)
        else:
            vp = p * cp_ + eps * entropy(p)
            vm = -softplus(-cm, eps) if eps else np.minimum(cm, 0)
    return float(vp[target])


def ibp(spec: MLPSpec, lo, hi, target):
    """Interval bound propagation, written independently of the game."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    for l in range(1, spec.depth + 1):
        W, b = spec.weight(l), spec.bias(l)
        Wp, Wn = np.maximum(W, 0), np.minimum(W, 0)
        lo, hi = Wp @ lo + Wn @ hi + b, Wp @ hi + Wn @ lo + b
        if spec.activated(l):
            lo, hi = np.maximum(lo, 0), np.maximum(hi, 0)
    return lo[target], hi[target]


# -- equilibrium policy and policy value ---------------------------------------------------------
def test_equilibrium_policy_hand_net():
    pol = bn.equilibrium_policy(hand_net(), X_HAND)
    assert [p.shape for p in pol] == [(4, 2), (4, 2), (2, 2)]
    np.testing.assert_array_equal(pol[0][:, 0], [1, 0, 0, 1])  # tie z = 0 stops
    np.testing.assert_array_equal(pol[1][:, 1], [1, 1, 1, 0])
    np.testing.assert_array_equal(pol[2], np.ones((2, 2)))  # linear output


@pytest.mark.parametrize("output", ["linear", "relu"])
def test_policy_value_is_network_I1(output):
    spec = hand_net(output)
    pol = bn.equilibrium_policy(spec, X_HAND)
    f = spec(X_HAND)
    for k in range(2):
        assert bn.policy_value(spec, X_HAND, k, pol) == pytest.approx(f[k], abs=1e-12)
    values = bn.policy_state_values(spec, X_HAND, pol)
    for l, (_z, y) in enumerate(spec.forward(X_HAND), start=1):
        np.testing.assert_allclose(values[l][:, 0], y, atol=1e-12)
        np.testing.assert_allclose(values[l][:, 1], -y, atol=1e-12)


def test_policy_value_softplus_I10():
    spec = softplus_net()
    x = np.array([0.3, -1.2, 0.8])
    pol = bn.equilibrium_policy(spec, x)
    assert np.all((pol[0] > 0) & (pol[0] < 1))
    f = spec(x)
    for k in range(2):
        assert bn.policy_value(spec, x, k, pol) == pytest.approx(f[k], abs=1e-12)


# -- best responses and certificates (ReLU) --------------------------------------------------------
@pytest.mark.parametrize("output", ["linear", "relu"])
@pytest.mark.parametrize("target", [0, 1])
def test_certificate_hand_net_I2(output, target):
    spec = hand_net(output)
    f = spec(X_HAND)[target]
    cert = bn.certify_equilibrium(spec, X_HAND, target)
    assert cert.value == pytest.approx(f, abs=1e-12)
    assert close(cert.max_value, f) and close(cert.min_value, f)
    assert close(cert.max_response.policy_payoff, f)
    assert abs(cert.exploitability) < 1e-6
    assert cert.max_gain > -1e-6 and cert.min_gain > -1e-6
    assert cert.max_response.status in ("optimal", "optimal_inaccurate")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("output", ["linear", "relu"])
def test_certificate_random_nets_I2(seed, output):
    spec, x = random_net((4, 6, 5, 5, 3), seed, output=output)
    f = spec(x)
    for k in range(3):
        cert = bn.certify_equilibrium(spec, x, k)
        assert close(cert.max_value, f[k]) and close(cert.min_value, f[k])
        assert abs(cert.exploitability) < 1e-6


def test_wrong_policy_max_stops_on_path():
    spec = hand_net()
    pol = bn.equilibrium_policy(spec, X_HAND)
    pol[1][2, 0] = 0.0  # Max stops at (2, 2, +): active (z = 2), reached from (3, 0, +) via W = 1
    cert = bn.certify_equilibrium(spec, X_HAND, 0, pol)
    assert cert.value < spec(X_HAND)[0] - 1.0
    assert cert.max_gain > 1e-3 and cert.exploitability > 1e-3
    assert close(cert.max_value, spec(X_HAND)[0])  # Max's best response recovers f
    assert abs(cert.min_gain) < 1e-6  # Min cannot gain: Max's part is what is wrong


def test_wrong_policy_min_continues_at_inactive():
    spec = hand_net()
    pol = bn.equilibrium_policy(spec, X_HAND)
    pol[1][3, 1] = 1.0  # Min continues at (2, 3, -): z = -0.15, continuing pays Max 0.15
    cert = bn.certify_equilibrium(spec, X_HAND, 1, pol)  # reached from (3, 1, +) via W = -1
    assert cert.value == pytest.approx(spec(X_HAND)[1] + 0.15, abs=1e-12)
    assert cert.min_gain == pytest.approx(0.15, abs=1e-6)
    assert cert.exploitability > 1e-3


def test_wrong_policy_off_path_does_not_matter():
    spec = hand_net()
    pol = bn.equilibrium_policy(spec, X_HAND)
    pol[1][3, 1] = 1.0  # (2, 3, -) is not reachable from (3, 0, +)
    cert = bn.certify_equilibrium(spec, X_HAND, 0, pol)
    assert abs(cert.exploitability) < 1e-6


@pytest.mark.parametrize("player", ["max", "min"])
@pytest.mark.parametrize("seed", range(3))
def test_best_response_matches_numpy_recursion(player, seed):
    spec, x = random_net((4, 5, 5, 2), seed, output="relu" if seed % 2 else "linear")
    rng = np.random.default_rng(100 + seed)
    pol = [rng.random((n, 2)) for n in spec.widths[1:]]
    pol = [np.where(rng.random(p.shape) < 0.3, np.round(p), p) for p in pol]  # some exact 0 / 1
    if not spec.activated(spec.depth):
        pol[-1][:] = 1.0
    br = bn.best_response(spec, x, 1, player, pol)
    ref = numpy_best_response(spec, x, 1, player, pol)
    assert close(br.value, ref) and close(br.policy_payoff, ref)


def test_best_response_duals_are_values_I1():
    spec, x = random_net((4, 6, 6, 2), 7)
    pol = bn.equilibrium_policy(spec, x)
    br = bn.best_response(spec, x, 0, "max", pol)
    for l, (_z, y) in enumerate(spec.forward(x), start=1):
        reached = br.reached[l - 1]
        v = br.state_values[l]
        np.testing.assert_allclose(v[:, 0][reached[:, 0]], y[reached[:, 0]], atol=1e-6)
        np.testing.assert_allclose(v[:, 1][reached[:, 1]], -y[reached[:, 1]], atol=1e-6)
    assert br.state_values[-1][0, 0] == pytest.approx(spec(x)[0], abs=1e-6)


def test_best_response_policy_and_occupation():
    spec, x = random_net((4, 6, 6, 2), 11)  # no ties: the best response is the equilibrium
    pol = bn.equilibrium_policy(spec, x)
    br = bn.best_response(spec, x, 1, "max", pol)
    occ = bn.occupation_measure(spec, x, 1)
    for l in range(spec.depth + 1):
        np.testing.assert_allclose(br.occupation[l], occ.states[l], atol=1e-7)
    for l in range(1, spec.depth + 1):
        r = br.reached[l - 1][:, 0]
        np.testing.assert_allclose(br.policy[l - 1][r, 0], pol[l - 1][r, 0], atol=1e-6)
        np.testing.assert_array_equal(br.policy[l - 1][:, 1], pol[l - 1][:, 1])  # Min's column kept
        np.testing.assert_allclose(br.continue_mass[l - 1], occ.continue_mass[l - 1], atol=1e-7)


def test_best_response_at_a_tie_is_still_optimal():
    spec = hand_net()  # (1, 1) has z = 0: Max is indifferent there
    pol = bn.equilibrium_policy(spec, X_HAND)
    br = bn.best_response(spec, X_HAND, 0, "max", pol)
    assert close(br.value, 2.975) and close(br.policy_payoff, 2.975)


def test_exact_spec_accepted():
    spec = hand_net().exact()
    cert = bn.certify_equilibrium(spec, X_HAND.tolist(), 0)
    assert close(cert.max_value, 2.975) and abs(cert.exploitability) < 1e-6


def test_scs_solver():
    spec = hand_net()
    pol = bn.equilibrium_policy(spec, X_HAND)
    br = bn.best_response(spec, X_HAND, 0, "max", pol, solver="SCS",
                          solver_options={"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 200000})
    assert br.solver == "SCS"
    assert br.value == pytest.approx(2.975, abs=1e-5)


@pytest.mark.skipif("HIGHS" not in __import__("cvxpy").installed_solvers(), reason="HiGHS missing")
def test_highs_solver_for_the_lp():
    spec, x = random_net((4, 6, 5, 2), 5)
    cert = bn.certify_equilibrium(spec, x, 0, solver="HIGHS")
    assert cert.max_response.solver == "HIGHS"
    assert close(cert.max_value, spec(x)[0]) and abs(cert.exploitability) < 1e-6


# -- occupation measures (I3, I4, I5) --------------------------------------------------------------
@pytest.mark.parametrize("output", ["linear", "relu"])
def test_occupation_gradient_hand_net_I3_I4(output):
    spec = hand_net(output)
    for k in range(2):
        occ = bn.occupation_measure(spec, X_HAND, k)
        gx, gb = torch_grads(spec, X_HAND, k)
        np.testing.assert_allclose(occ.gradient, gx, atol=1e-6)
        np.testing.assert_allclose(occ.gradient, occ.nu_plus - occ.nu_minus)
        # I4: f = x . grad + discounted bias rewards
        assert occ.value == pytest.approx(spec(X_HAND)[k], abs=1e-6)
        assert X_HAND @ occ.gradient + occ.bias_share == pytest.approx(spec(X_HAND)[k], abs=1e-6)
        # I5: df/db^l_i = sum_s s * (continue mass at (l, i, s))
        for l in range(1, spec.depth + 1):
            cm = occ.continue_mass[l - 1]
            np.testing.assert_allclose(cm[:, 0] - cm[:, 1], gb[l - 1], atol=1e-6)
        # mass balance: terminal + stopped + sink = 1; the zero row (2, 1) is a sink
        assert occ.rho.sum() + occ.stopped + occ.sink == pytest.approx(1.0, abs=1e-7)
        assert occ.entropy_share == 0.0


def test_occupation_sink_of_zero_row():
    spec = hand_net()
    occ = bn.occupation_measure(spec, X_HAND, 0)
    # (3, 0, +) -> (2, 1, -) with probability 0.5 / 4.5; (2, 1) is active and has a zero row
    assert occ.sink == pytest.approx(0.5 / 4.5, abs=1e-7)
    assert occ.states[2][1, 1] == pytest.approx(0.5, abs=1e-7)


@pytest.mark.parametrize("seed", range(3))
def test_occupation_gradient_finite_differences(seed):
    spec, x = random_net((5, 6, 6, 3), seed)
    h = 1e-6
    for k in range(3):
        occ = bn.occupation_measure(spec, x, k)
        fd = np.array([(spec(x + h * e)[k] - spec(x - h * e)[k]) / (2 * h) for e in np.eye(5)])
        np.testing.assert_allclose(occ.gradient, fd, atol=1e-6)
        assert np.all(occ.rho_plus >= -1e-9) and np.all(occ.rho_minus >= -1e-9)


def test_occupation_with_explicit_policy():
    spec = hand_net()
    pol = bn.equilibrium_policy(spec, X_HAND)
    pol[0][:] = 0.5
    occ = bn.occupation_measure(spec, X_HAND, 0, pol)
    assert occ.value == pytest.approx(bn.policy_value(spec, X_HAND, 0, pol), abs=1e-7)
    assert occ.stopped > 0


# -- entropic game (I9, I10, I11) ------------------------------------------------------------------
@pytest.mark.parametrize("c", [-3.0, -0.4, 0.0, 0.5, 2.5])
@pytest.mark.parametrize("eps", [0.3, 1.0])
def test_entropic_choice_I9(c, eps):
    p, value = bn.entropic_choice(c, eps)
    assert value == pytest.approx(softplus(c, eps), abs=1e-7)
    assert p == pytest.approx(sigmoid(c / eps), abs=1e-5)


@pytest.mark.parametrize("output", ["linear", "softplus"])
def test_softplus_best_response_is_net_I10_I11(output):
    spec = softplus_net(output=output)
    x = np.array([0.3, -1.2, 0.8])
    gibbs = bn.equilibrium_policy(spec, x)
    f = spec(x)
    for k in range(2):
        br = bn.best_response(spec, x, k, "max", gibbs)
        assert close(br.value, f[k])
        assert np.isfinite(br.value)
        gx, gb = torch_grads(spec, x, k)
        occ0 = br.occupation[0]
        np.testing.assert_allclose(occ0[:, 0] - occ0[:, 1], gx, atol=1e-6)
        # Max's best response is the Gibbs policy (I9) at reached states
        for l in range(1, spec.depth + 1):
            r = br.reached[l - 1][:, 0]
            np.testing.assert_allclose(br.policy[l - 1][r, 0], gibbs[l - 1][r, 0], atol=1e-5)
        cert = bn.certify_equilibrium(spec, x, k)
        assert abs(cert.exploitability) < 1e-6
        assert close(cert.min_value, f[k])


def test_softplus_occupation_I11():
    spec = softplus_net()
    x = np.array([0.3, -1.2, 0.8])
    for k in range(2):
        occ = bn.occupation_measure(spec, x, k)
        gx, gb = torch_grads(spec, x, k)
        np.testing.assert_allclose(occ.gradient, gx, atol=1e-6)
        f = spec(x)[k]
        assert x @ occ.gradient + occ.bias_share + occ.entropy_share == pytest.approx(f, abs=1e-6)
        assert occ.entropy_share != 0.0
        for l in range(1, spec.depth + 1):
            cm = occ.continue_mass[l - 1]
            np.testing.assert_allclose(cm[:, 0] - cm[:, 1], gb[l - 1], atol=1e-6)


def test_softplus_wrong_policy_exploitable():
    spec = softplus_net()
    x = np.array([0.3, -1.2, 0.8])
    pol = bn.equilibrium_policy(spec, x)
    pol[1][:, 0] = 0.5  # Max not Gibbs in layer 2
    cert = bn.certify_equilibrium(spec, x, 0, pol)
    assert cert.max_gain > 1e-3 and cert.exploitability > 1e-3


@pytest.mark.parametrize("player", ["max", "min"])
def test_entropic_program_unreachable_subtrees_not_inf(player):
    """Zero column, zero row and exact-zero opponent choices leave unreachable subtrees; the
    Clarabel exponential-cone program stays finite (docs/theory.md section 7)."""
    W1 = np.array([[1.0, -0.5, 0.3], [0.7, 0.2, -1.0], [-0.4, 0.9, 0.5], [0.6, -0.8, 0.2]])
    W2 = np.array([[0.8, -0.6, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-0.5, 0.9, 0.0, 0.0], [0.3, 0.4, 0.0, 0.0]])
    W3 = np.array([[1.0, 0.5, -0.7, 0.4], [0.2, -0.3, 0.6, 0.9]])
    spec = MLPSpec([W1, W2, W3], [np.full(4, 0.1), np.array([0.2, 0.5, -0.1, 0.3]), np.zeros(2)],
                   "softplus", eps=0.7)
    x = np.array([0.5, -1.0, 1.5])
    pol = bn.equilibrium_policy(spec, x)
    col = 1 if player == "max" else 0  # the opponent's column
    pol[1][2, col] = 0.0  # the opponent never continues at (2, 2, opp)
    pol[0][0, col] = 0.0
    br = bn.best_response(spec, x, 0, player, pol)
    ref = numpy_best_response(spec, x, 0, player, pol)
    assert np.isfinite(br.value) and close(br.value, ref)
    assert br.n_states < 2 * 10 - 1  # states were dropped
    assert np.all(br.occupation[1][2:4] == 0.0)  # neurons 2, 3 of layer 1 are unreachable


# -- box bounds (I13) ------------------------------------------------------------------------------
@pytest.mark.parametrize("output", ["linear", "relu"])
@pytest.mark.parametrize("seed", range(3))
def test_box_bound_is_ibp_I13(output, seed):
    spec, x = random_net((4, 5, 5, 2), seed, output=output)
    rng = np.random.default_rng(seed)
    lo = x - rng.random(4)
    hi = x + rng.random(4)
    for k in range(2):
        lb, ub = bn.box_bound(spec, lo, hi, k)
        ref_lo, ref_hi = ibp(spec, lo, hi, k)
        assert close(lb, ref_lo) and close(ub, ref_hi)
        for _ in range(5):  # soundness on samples
            xs = lo + rng.random(4) * (hi - lo)
            assert lb - 1e-6 <= spec(xs)[k] <= ub + 1e-6


def test_box_bound_degenerate_box_is_value():
    spec = hand_net()
    lb, ub = bn.box_bound(spec, X_HAND, X_HAND, 0)
    assert close(lb, 2.975) and close(ub, 2.975)


def test_terminal_override_matches_policy_value():
    spec = hand_net()
    tp, tm = np.array([1.0, 0.5, 2.0]), np.array([-1.5, -0.5, -2.5])
    pol = bn.equilibrium_policy(spec, X_HAND)
    br = bn.best_response(spec, X_HAND, 0, "max", pol, terminal=(tp, tm))
    assert close(br.value, numpy_best_response(spec, X_HAND, 0, "max", pol, terminal=(tp, tm)))
    assert close(br.value, br.policy_payoff)


# -- validation ------------------------------------------------------------------------------------
def test_input_validation():
    spec = hand_net()
    pol = bn.equilibrium_policy(spec, X_HAND)
    with pytest.raises(ValueError, match="player"):
        bn.best_response(spec, X_HAND, 0, "mini", pol)
    with pytest.raises(ValueError, match="shape"):
        bn.best_response(spec, X_HAND, 0, "max", [pol[0], pol[1], np.ones((3, 2))])
    with pytest.raises(ValueError, match="layers"):
        bn.policy_value(spec, X_HAND, 0, pol[:2])
    bad = [p.copy() for p in pol]
    bad[0][0, 0] = 1.5
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        bn.certify_equilibrium(spec, X_HAND, 0, bad)
    bad = [p.copy() for p in pol]
    bad[2][0, 0] = 0.5
    with pytest.raises(ValueError, match="linear output"):
        bn.occupation_measure(spec, X_HAND, 0, bad)
    with pytest.raises(ValueError, match="entries"):
        bn.certify_equilibrium(spec, [1.0, 2.0], 0)
    with pytest.raises(ValueError, match="out of range"):
        bn.certify_equilibrium(spec, X_HAND, 5)
    with pytest.raises(ValueError, match="terminal"):
        bn.best_response(spec, X_HAND, 0, "max", pol, terminal=(np.ones(2), np.ones(3)))
    with pytest.raises(ValueError, match="lo <= hi"):
        bn.box_bound(spec, X_HAND + 1, X_HAND, 0)
    with pytest.raises(ValueError, match="ReLU"):
        bn.box_bound(softplus_net(), X_HAND, X_HAND + 1, 0)
    with pytest.raises(ValueError, match="not installed"):
        bn.best_response(spec, X_HAND, 0, "max", pol, solver="NO_SUCH_SOLVER")
    with pytest.raises(ValueError, match="eps"):
        bn.entropic_choice(1.0, 0.0)
    with pytest.raises(TypeError):
        bn.policy_value(spec, X_HAND, 0, np.ones((4, 2)))


def test_numerics_is_independent_of_theory_and_gpu():
    """The oracle must not import backplay.theory, backplay.gpu or the validate tool (which composes
    all three and lives above them, backplay.validate): no exception in the package."""
    pkg = pathlib.Path(bn.__file__).parent
    for path in pkg.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                for banned in ("theory", "gpu", "validate"):
                    assert banned not in name.split("."), f"{path.name} imports {name}"
