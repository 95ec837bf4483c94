"""cvxpy programs for the ReLU net game and its entropic (softplus) version (docs/theory.md section 7).

An independent oracle: it uses only :class:`backplay.nets.MLPSpec`, numpy, scipy.sparse and cvxpy,
never ``backplay.theory`` or ``backplay.gpu``.

* :func:`best_response`: one player's best response to a fixed policy of the other, as a linear
  program over discounted occupation measures (ReLU game) or an exponential-cone program (entropic
  game, the regulariser nu(s) H(pi(.|s)) = -sum_a rel_entr(mu(s,a), nu(s)), section 6).
* :func:`certify_equilibrium`: both best responses against a candidate pair; exploitability
  (I2, I10).
* :func:`occupation_measure`: discounted and undiscounted occupations of a fixed pair as a flow
  program (I3, I4, I5, I11).
* :func:`entropic_choice`: the one-state variational identity (I9).
* :func:`box_bound`: the game on box terminal payoffs (section 4, I13).

Two practical rules from docs/theory.md section 7 are applied throughout: states unreachable from the
start are dropped before a program is built (their rel_entr(0, 0) terms make Clarabel report an
objective of -inf), and objectives are recomputed with numpy from the variable values instead of
trusting ``problem.value``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import cvxpy as cp
import numpy as np
import scipy.sparse as sps
from scipy.special import rel_entr

from ..nets import MLPSpec, check_target
from .game_graph import (
    PLUS,
    GameGraph,
    binary_entropy,
    check_player,
    check_policy,
    entropic_eps,
    equilibrium_policy,
    float_input,
    numeric_spec,
    policy_state_values,
    policy_value,
    shapley_solution,
    terminal_payoffs,
)

ACCEPTED_STATUS = (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)
#: a kept state counts as reached by a best response when its discounted occupation exceeds
#: REACHED_TOL times its upper bound w(s) (its occupation if the mover always continued).
REACHED_TOL = 1e-7


#: default options per solver, merged under the caller's ``solver_options``: Clarabel's default
#: tolerances (1e-8) give occupations of the entropic programs to only ~1e-5. With these tight
#: targets Clarabel sometimes stops at "almost solved" (cvxpy status optimal_inaccurate); that
#: status is accepted (cvxpy's warning is silenced) and reported in the results' ``status``.
DEFAULT_SOLVER_OPTIONS: dict[str, dict[str, Any]] = {
    "CLARABEL": {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "tol_ktratio": 1e-10},
}


class SolverError(RuntimeError):
    """The convex solver did not return an optimal (or optimal_inaccurate) solution."""


def solve_problem(problem: cp.Problem, solver: str, solver_options: Mapping[str, Any] | None, what: str) -> float:
    """Solve ``problem`` with the named cvxpy solver (default options merged with ``solver_options``);
    :class:`SolverError` naming ``what`` on a solver failure or a status other than optimal (inaccurate
    accepted); returns the solve time in seconds. The one solve step of every program in this package."""
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a cvxpy solver name such as 'CLARABEL' or 'SCS', got {solver!r}")
    name = solver.upper()
    if name not in cp.installed_solvers():
        raise ValueError(f"solver {solver!r} is not installed; installed: {cp.installed_solvers()}")
    t0 = time.perf_counter()
    try:
        options = {**DEFAULT_SOLVER_OPTIONS.get(name, {}), **dict(solver_options or {})}
        with warnings.catch_warnings():
            # optimal_inaccurate is accepted and reported in the results' ``status``
            warnings.filterwarnings("ignore", message="Solution may be inaccurate")
            problem.solve(solver=name, **options)
    except cp.SolverError as exc:
        raise SolverError(f"{what}: solver {name} failed: {exc}") from exc
    elapsed = time.perf_counter() - t0
    if problem.status not in ACCEPTED_STATUS:
        raise SolverError(f"{what}: solver {name} returned status {problem.status!r}")
    return elapsed


# -- best response ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BestResponse:
    """A best response of one player against a fixed policy of the other (docs/theory.md section 7).

    Attributes:
        player: ``"max"`` or ``"min"``.
        value: the optimal payoff to Max, recomputed with numpy from the solution (the objective at
            the variable values; ``problem.value`` is not used).
        policy_payoff: J of the returned policy pair by :func:`policy_value` (the payoff the
            extracted policy really achieves; equals ``value`` up to solver tolerance).
        policy: the pair in the public policy format: the mover's column holds the best response,
            mu_continue / nu at reached states and **0 (stop) at states the solution does not reach**
            (dropped as unreachable, or with occupation <= ``REACHED_TOL`` * its bound); these
            entries do not affect the payoff. The opponent's column is the fixed policy it was
            given. Linear output layers are 1.
        reached: list of L bool arrays (n_l, 2): states kept in the program whose occupation
            exceeds ``REACHED_TOL`` times its upper bound.
        occupation: list of L+1 arrays (n_l, 2): discounted occupation nu of every state (entry 0 =
            the terminal states, i.e. the input layer); 0 at dropped states.
        continue_mass: list of L arrays (n_l, 2) (policy layout): discounted mass that continues.
        state_values: list of L+1 arrays (n_l, 2): the values v(s) read from the duals of the flow
            constraints (entry 0: the terminal payoffs); NaN at states dropped from the program. At
            reached states they are the values of the best-response MDP (at the equilibrium: y and
            -y, I1 / I10); at kept states with zero occupation the LP dual is not unique and they
            are only some dual-feasible value.
        status: the cvxpy status.
        solver: the solver's name.
        n_states: number of non-terminal states in the program (after dropping unreachable ones).
        solve_time: seconds spent in ``problem.solve``.
    """

    player: str
    value: float
    policy_payoff: float
    policy: list
    reached: list
    occupation: list
    continue_mass: list
    state_values: list
    status: str
    solver: str
    n_states: int
    solve_time: float

    def __repr__(self) -> str:
        return (f"BestResponse(player={self.player!r}, value={self.value:.6g}, "
                f"policy_payoff={self.policy_payoff:.6g}, depth {len(self.policy)}, {self.n_states} states, "
                f"status={self.status!r}, solver={self.solver!r}, {self.solve_time:.3g} s)")


def best_response(
    spec: MLPSpec,
    x: Any,
    target: int,
    player: str,
    opponent_policy: Sequence[Any],
    *,
    terminal: tuple[Any, Any] | None = None,
    solver: str = "CLARABEL",
    solver_options: Mapping[str, Any] | None = None,
) -> BestResponse:
    """Best response of ``player`` to the other player's fixed policy (docs/theory.md section 7).

    ReLU game: the linear program over discounted occupation measures of the mover's states,

        maximise / minimise   sum_s mu_c(s) * s * b(s) + sum_t nu(t) * payoff(t)
        subject to            mu_c(s) + mu_stop(s) = nu(s)   at the mover's choice states,
                              nu(s) = [s = start] + sum_{s'} |W| * mu_c(s')   (flow),
                              mu_c = p_opp * nu at the opponent's states, mu_c = nu at a linear
                              output layer, mu >= 0.

    Entropic game (softplus spec, docs/theory.md section 5): the mover's regulariser
    eps * nu(s) H(mu_c(s)/nu(s)) = -eps * (rel_entr(mu_c, nu) + rel_entr(mu_stop, nu)) is added with
    sign +1 for Max and -1 for Min (Min pays its entropy, J contains -eps nu H(q)); the opponent's
    entropy terms are linear in its nu. Max maximises a concave objective, Min minimises a convex
    one: an exponential-cone program. Against the Gibbs policy its value is the softplus net (I10).

    States unreachable from (L, target, +1) (zero weights, or after a continue probability 0 of the
    opponent) are dropped before the program is built, and the value is recomputed with numpy.
    For accuracy on deep nets the program is scaled per state, bounded by a never-active valid
    bound and written with a potential-shaped objective (same optimum, same values; details in
    ``_best_response_program``).

    Args:
        spec, x, target: the net, the input and the explained output.
        player: ``"max"`` or ``"min"``, the player who optimises.
        opponent_policy: a policy pair in the public format. The opponent's column is the fixed
            policy; the mover's column only sets the potential of the shaped objective (see
            below) and does not change the optimum (e.g. pass the candidate pair itself).
        terminal: optional (payoff_plus, payoff_minus) replacing (x, -x) (section 4).
        solver: a cvxpy solver name (default ``"CLARABEL"``; ``"SCS"`` works too).
        solver_options: extra keyword arguments for ``problem.solve``.

    Raises:
        SolverError: the status is not optimal / optimal_inaccurate.
    """
    spec = numeric_spec(spec)
    xf = float_input(spec, x)
    target = check_target(spec, target)
    player = check_player(player)
    opp_policy = check_policy(spec, opponent_policy, "opponent_policy")
    payoff_plus, payoff_minus = terminal_payoffs(spec, xf, terminal)
    graph = GameGraph(spec)
    eps = entropic_eps(spec)
    return _best_response_program(graph, target, player, opp_policy, payoff_plus, payoff_minus, eps,
                                  solver, solver_options)


def _best_response_program(
    graph: GameGraph,
    target: int,
    player: str,
    opp_policy: list[np.ndarray],
    payoff_plus: np.ndarray,
    payoff_minus: np.ndarray,
    eps: float,
    solver: str,
    solver_options: Mapping[str, Any] | None,
) -> BestResponse:
    """Build and solve the best-response program on the reachable part of the graph.

    Variables: mu_continue(s), mu_stop(s) >= 0 at the mover's choice states, nu(s) >= 0 at the
    other kept states (opponent's states: mu_continue = p_opp nu; linear output: mu_continue = nu).
    Two reformulations keep deep nets solvable to tolerance; neither changes the optimum.

    * Scaling: discounted occupations grow like products of gammas. Let w(s) be the occupation of s
      when the mover always continues and the opponent plays its policy: an upper bound of nu(s)
      for every mover policy (the flow is monotone). The valid constraint nu <= 2 w keeps the
      solver's iterates bounded (much better accuracy) and is never active, so the flow duals stay
      the state values. The program is written in units of scale(s) = sqrt(w(s))
      (nu = scale * nu_hat, likewise mu), and the flow row of s is divided by scale(s): transfer
      matrix A_hat = diag(1/scale) A diag(scale). The square root balances the range of the
      variables against that of the objective coefficients; it was the most accurate choice tried
      (w, sqrt(w), 1) on deep He-initialised nets (occupations up to 1e8). The entropy terms are
      homogeneous: rel_entr(k a, k b) = k rel_entr(a, b).
    * Potential shaping: with phi = the values of the given pair (numpy policy evaluation) and
      Q(s) = s b(s) + sum_j |W_ij| phi(successor) the continue value under phi, the objective
      J = sum_s mu_c(s) s b(s) + sum_t nu(t) g(t) (+ entropy) is written as
      J + phi . (start + A mu_c - nu) = phi(start) + sum_s [mu_c(s) (Q(s) - phi(s)) - mu_stop(s) phi(s)]
      (+ entropy), the same function on the feasible set (docs/theory.md section 7's LP, its dual being
      the values). It avoids summing huge + and - occupations; the numpy recomputation of the value
      uses the same form.
    """
    mover_sign = 1.0 if player == "max" else -1.0  # + states for Max, - states for Min
    kappa_mover = mover_sign  # entropy sign: Max earns eps H, Min pays it
    kappa_opp = -kappa_mover
    spec = graph.spec
    payoff_pair = (payoff_plus, payoff_minus)
    g_full = np.concatenate([payoff_plus, payoff_minus])  # terminal payoffs, flat

    # roles of the states; reachability and the occupation bound w
    p_flat = graph.flatten(opp_policy)
    choice = graph.activated
    mover = choice & (graph.sign == mover_sign)
    opponent = choice & (graph.sign != mover_sign)
    forced = ~choice  # linear output layer: continue only
    q_all = np.where(opponent, p_flat, 1.0)  # the mover continues everywhere
    reachable, reachable_T = graph.reachable(target, q_all > 0.0)
    w_full, w_T = graph.occupation(target, q_all)
    keep, keep_T = reachable & (w_full > 0.0), reachable_T & (w_T > 0.0)

    # potential phi = values of the given pair; continue values Q under phi
    phi_full = graph.flatten(policy_state_values(spec, payoff_plus, opp_policy, terminal=payoff_pair)[1:])
    Q_full = graph.reward + graph.A.T @ phi_full + graph.A_T.T @ g_full

    # restriction to the kept states
    R, T = np.flatnonzero(keep), np.flatnonzero(keep_T)
    N = R.size
    w, phi, Q = w_full[R], phi_full[R], Q_full[R]
    scale = np.sqrt(w)
    A_hat = (sps.diags(1.0 / scale) @ graph.A[R][:, R] @ sps.diags(scale)).tocsr()
    i_start = int(np.searchsorted(R, graph.start(target)))
    start = np.zeros(N)
    start[i_start] = 1.0  # w(start) = 1
    q = np.where(forced[R], 1.0, p_flat[R])  # continue probability at the fixed states
    h_opp = np.where(opponent[R], binary_entropy(p_flat[R]), 0.0)
    M, F = np.flatnonzero(mover[R]), np.flatnonzero(~mover[R])  # mover's / fixed states
    K = M.size
    embed_M = sps.csr_matrix((np.ones(K), (M, np.arange(K))), shape=(N, K))
    embed_F = sps.csr_matrix((np.ones(F.size), (F, np.arange(F.size))), shape=(N, F.size))
    # shaped objective coefficients, per unit of scaled mass
    fixed_coef = scale[F] * (q[F] * Q[F] - phi[F] + kappa_opp * eps * h_opp[F])
    continue_coef = scale[M] * (Q[M] - phi[M])
    stop_coef = -scale[M] * phi[M]

    # the program
    nu_hat_F = cp.Variable(F.size, nonneg=True, name="nu_hat_fixed")
    mu_hat_c = cp.Variable(K, nonneg=True, name="mu_hat_continue")
    mu_hat_stop = cp.Variable(K, nonneg=True, name="mu_hat_stop")
    nu_hat_M = mu_hat_c + mu_hat_stop  # sum_a mu(s, a) = nu(s) at the mover's states
    nu_hat = embed_F @ nu_hat_F + embed_M @ nu_hat_M
    continue_hat = embed_F @ cp.multiply(q[F], nu_hat_F) + embed_M @ mu_hat_c
    J = phi[i_start] + fixed_coef @ nu_hat_F + continue_coef @ mu_hat_c + stop_coef @ mu_hat_stop
    if eps > 0.0 and K > 0:
        entropy = -scale[M] @ (cp.rel_entr(mu_hat_c, nu_hat_M) + cp.rel_entr(mu_hat_stop, nu_hat_M))
        J = J + kappa_mover * eps * entropy
    flow = nu_hat == start + A_hat @ continue_hat
    constraints = [flow, nu_hat <= 2.0 * scale]  # nu <= 2 w: valid, never active
    objective = cp.Maximize(J) if player == "max" else cp.Minimize(J)
    problem = cp.Problem(objective, constraints)
    solve_time = solve_problem(problem, solver, solver_options, f"best response of {player}")

    # recompute the (shaped) objective with numpy from the variable values
    def _value_of(var: cp.Variable) -> np.ndarray:
        if var.size == 0:
            return np.zeros(0)
        return np.maximum(np.asarray(var.value, dtype=np.float64).reshape(-1), 0.0)

    nf, mc, ms = _value_of(nu_hat_F), _value_of(mu_hat_c), _value_of(mu_hat_stop)
    value = float(phi[i_start] + fixed_coef @ nf + continue_coef @ mc + stop_coef @ ms)
    if eps > 0.0 and K > 0:
        nm = mc + ms
        value += kappa_mover * eps * float(-scale[M] @ (rel_entr(mc, nm) + rel_entr(ms, nm)))
    nu_hat_v = np.zeros(N)
    nu_hat_v[F], nu_hat_v[M] = nf, mc + ms
    c_hat_v = np.zeros(N)
    c_hat_v[F], c_hat_v[M] = q[F] * nf, mc
    nu_v = scale * nu_hat_v
    c_v = scale * c_hat_v
    nu_T_v = graph.A_T[T][:, R] @ c_v

    # back to the full graph
    widths = graph.widths
    nu_full = np.zeros(graph.n_states)
    nu_full[R] = nu_v
    c_full = np.zeros(graph.n_states)
    c_full[R] = c_v
    nu_T_full = np.zeros(2 * widths[0])
    nu_T_full[T] = nu_T_v
    reached_flat = np.zeros(graph.n_states, dtype=bool)
    reached_flat[R] = nu_v > REACHED_TOL * w
    br = np.zeros(graph.n_states)
    ok = reached_flat & mover
    br[ok] = np.clip(c_full[ok] / nu_full[ok], 0.0, 1.0)
    pair_flat = np.where(mover, br, p_flat)
    pair_flat[forced] = 1.0
    policy = graph.unflatten(pair_flat)
    # state values from the duals of the flow rows: for the shaped objective the multiplier of
    # the row of s is v(s) - phi(s) (per unit of mass injected at s); cvxpy's dual of `lhs == rhs`
    # is d optimum / d rhs for Maximize and minus that for Minimize; the row was divided by scale(s)
    dual_sign = 1.0 if player == "max" else -1.0
    v_full = np.full(graph.n_states, np.nan)
    v_full[R] = phi + dual_sign * np.asarray(flow.dual_value, dtype=np.float64).reshape(-1) / scale

    return BestResponse(
        player=player,
        value=value,
        policy_payoff=policy_value(spec, payoff_plus, target, policy, terminal=payoff_pair),
        policy=policy,
        reached=graph.unflatten(reached_flat),
        occupation=[graph.terminal_layer(nu_T_full)] + graph.unflatten(nu_full),
        continue_mass=graph.unflatten(c_full),
        state_values=[graph.terminal_layer(g_full)] + graph.unflatten(v_full),
        status=problem.status,
        solver=solver.upper(),
        n_states=N,
        solve_time=solve_time,
    )


# -- equilibrium certificate -----------------------------------------------------------------------
@dataclass(frozen=True)
class Certificate:
    """Best-response certificate of a candidate policy pair (docs/theory.md I2, I10, section 6).

    Attributes:
        policy: the candidate pair (public format).
        value: J(candidate) by :func:`policy_value` (numpy).
        max_value: Max's best-response value against the candidate's Min column.
        min_value: Min's best-response value against the candidate's Max column.
        max_gain: max_value - value (>= 0 up to solver tolerance).
        min_gain: value - min_value (>= 0 up to solver tolerance).
        exploitability: max_gain + min_gain; 0 (to solver tolerance) iff the pair is a saddle point.
        max_response, min_response: the two :class:`BestResponse` objects (duals included).
        state_values: values of every state under the candidate pair (numpy recursion), list of
            L+1 arrays (n_l, 2).
    """

    policy: list
    value: float
    max_value: float
    min_value: float
    max_gain: float
    min_gain: float
    exploitability: float
    max_response: BestResponse
    min_response: BestResponse
    state_values: list

    def __repr__(self) -> str:
        return (f"Certificate(value={self.value:.6g}, max_value={self.max_value:.6g}, "
                f"min_value={self.min_value:.6g}, exploitability={self.exploitability:.3g} "
                f"(max_gain {self.max_gain:.3g}, min_gain {self.min_gain:.3g}), depth {len(self.policy)}, "
                f"solver={self.max_response.solver!r})")


def certify_equilibrium(
    spec: MLPSpec,
    x: Any,
    target: int,
    policy: Sequence[Any] | None = None,
    *,
    terminal: tuple[Any, Any] | None = None,
    solver: str = "CLARABEL",
    solver_options: Mapping[str, Any] | None = None,
) -> Certificate:
    """Certify a candidate policy pair by the two best-response programs (docs/theory.md section 7).

    The default candidate is :func:`equilibrium_policy` (I2 for ReLU nets, I10 for softplus nets).
    At an equilibrium max_value = value = min_value, so the exploitability is 0 up to solver
    tolerance; a wrong policy that matters gives a strictly positive exploitability.
    """
    spec = numeric_spec(spec)
    xf = float_input(spec, x)
    target = check_target(spec, target)
    cand = equilibrium_policy(spec, xf) if policy is None else check_policy(spec, policy)
    payoff_plus, payoff_minus = terminal_payoffs(spec, xf, terminal)
    graph = GameGraph(spec)
    eps = entropic_eps(spec)
    J_values = policy_state_values(spec, xf, cand, terminal=(payoff_plus, payoff_minus))
    J = float(J_values[-1][target, PLUS])
    max_br = _best_response_program(graph, target, "max", cand, payoff_plus, payoff_minus, eps,
                                    solver, solver_options)
    min_br = _best_response_program(graph, target, "min", cand, payoff_plus, payoff_minus, eps,
                                    solver, solver_options)
    max_gain = max_br.value - J
    min_gain = J - min_br.value
    return Certificate(
        policy=cand,
        value=J,
        max_value=max_br.value,
        min_value=min_br.value,
        max_gain=max_gain,
        min_gain=min_gain,
        exploitability=max_gain + min_gain,
        max_response=max_br,
        min_response=min_br,
        state_values=J_values,
    )


# -- occupation measures ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Occupation:
    """Occupation measures of the start state (L, target, +1) under a fixed policy pair.

    Attributes:
        nu_plus, nu_minus: discounted terminal occupation at (0, j, +1) and (0, j, -1), length n_0.
        rho_plus, rho_minus: undiscounted probabilities of ending at (0, j, +1) / (0, j, -1).
        rho: rho_plus + rho_minus.
        states: list of L+1 arrays (n_l, 2): discounted occupation nu of every state (entry 0 = the
            terminal states, columns +, -).
        undiscounted_states: the same for the undiscounted probabilities.
        continue_mass: list of L arrays (n_l, 2) in the policy layout (entry l-1 is layer l):
            nu * p, the discounted mass that continues.
        gradient: nu_plus - nu_minus (I3 / I11: df_target/dx at the equilibrium).
        bias_share: sum over states of nu * p * s * b (I4 / I5, discounted bias rewards).
        entropy_share: eps * sum over activated states of nu * s * H(p) (I11; 0 for ReLU nets).
        value: x . gradient + bias_share + entropy_share = J of the pair (I4 / I11).
        stopped: probability that the trajectory ends by a stop action (sum over activated states of
            rho * (1 - p)).
        sink: probability that it ends by continuing at a zero row (gamma = 0: the reward is
            collected and the trajectory ends there). rho.sum() + stopped + sink = 1.
        status, solver: of the flow program.
    """

    nu_plus: np.ndarray
    nu_minus: np.ndarray
    rho_plus: np.ndarray
    rho_minus: np.ndarray
    rho: np.ndarray
    states: list
    undiscounted_states: list
    continue_mass: list
    gradient: np.ndarray
    bias_share: float
    entropy_share: float
    value: float
    stopped: float
    sink: float
    status: str
    solver: str

    def __repr__(self) -> str:
        return (f"Occupation({len(self.nu_plus)} inputs, depth {len(self.continue_mass)}; value={self.value:.6g}, "
                f"bias_share={self.bias_share:.6g}, entropy_share={self.entropy_share:.6g}, "
                f"rho.sum={float(np.sum(self.rho)):.6g}, stopped={self.stopped:.6g}, sink={self.sink:.6g}, "
                f"status={self.status!r}, solver={self.solver!r})")


def occupation_measure(
    spec: MLPSpec,
    x: Any,
    target: int,
    policy: Sequence[Any] | None = None,
    *,
    solver: str = "CLARABEL",
    solver_options: Mapping[str, Any] | None = None,
) -> Occupation:
    """Occupation measures of a fixed policy pair as a flow program (docs/theory.md I3-I5, I7, I11).

    Variables nu >= 0 (discounted) and r >= 0 (undiscounted) over the non-terminal states with

        nu = [s = start] + A @ (p * nu),       r = [s = start] + P @ (p * r),

    where A carries |W_ij| and P carries |W_ij| / gamma_i along each edge of the extended graph;
    the terminal occupations are A_T @ (p * nu) and P_T @ (p * r). The objective is 0: the flow
    system on the DAG has a unique solution. The default policy is :func:`equilibrium_policy`.
    For accuracy on deep nets nu is written in units of sqrt(w), w the occupation if every state
    continued, with never-active valid bounds nu <= 2 w, r <= 2 (as in :func:`best_response`).

    Zero rows: continuing at a neuron with gamma = 0 collects the reward and ends the trajectory
    (the ``sink`` mass); stopping ends it in the cemetery (the ``stopped`` mass).
    """
    spec = numeric_spec(spec)
    xf = float_input(spec, x)
    target = check_target(spec, target)
    pol = equilibrium_policy(spec, xf) if policy is None else check_policy(spec, policy)
    graph = GameGraph(spec)
    eps = entropic_eps(spec)
    p = graph.flatten(pol)
    start = np.zeros(graph.n_states)
    start[graph.start(target)] = 1.0
    # scaling as in the best-response program: w = occupation if every state continued (numpy
    # sweep, independent of the policy) bounds nu; variables in units of sqrt(w), rows divided
    # by sqrt(w); the bounds nu <= 2 w and r <= 2 are valid and never active
    w, _ = graph.occupation(target, np.ones(graph.n_states))
    scale = np.sqrt(np.where(w > 0.0, w, 1.0))
    A_hat = sps.diags(1.0 / scale) @ graph.A @ sps.diags(p * scale)  # discounted transfer of nu_hat
    P_p = graph.P @ sps.diags(p)  # undiscounted transfer of r

    nu_hat = cp.Variable(graph.n_states, nonneg=True, name="nu_hat")  # nu = sqrt(w) * nu_hat
    r = cp.Variable(graph.n_states, nonneg=True, name="r")  # undiscounted occupation
    constraints = [
        nu_hat == start + A_hat @ nu_hat,
        r == start + P_p @ r,
        nu_hat <= 2.0 * scale,
        r <= 2.0,
    ]
    problem = cp.Problem(cp.Minimize(0), constraints)
    solve_problem(problem, solver, solver_options, "occupation flow program")

    nu_v = scale * np.maximum(np.asarray(nu_hat.value, dtype=np.float64), 0.0)
    r_v = np.maximum(np.asarray(r.value, dtype=np.float64), 0.0)
    nu_T = graph.A_T @ (p * nu_v)
    r_T = graph.P_T @ (p * r_v)
    n0 = graph.widths[0]
    bias_share = float(np.sum(nu_v * p * graph.reward))
    entropy_share = 0.0
    if eps > 0.0:
        act = graph.activated
        entropy_share = float(eps * np.sum((nu_v * graph.sign * binary_entropy(p))[act]))
    stopped = float(np.sum((r_v * (1.0 - p))[graph.activated]))
    sink = float(np.sum((r_v * p)[graph.zero_row]))
    gradient = nu_T[:n0] - nu_T[n0:]
    return Occupation(
        nu_plus=nu_T[:n0].copy(),
        nu_minus=nu_T[n0:].copy(),
        rho_plus=r_T[:n0].copy(),
        rho_minus=r_T[n0:].copy(),
        rho=r_T[:n0] + r_T[n0:],
        states=[graph.terminal_layer(nu_T)] + graph.unflatten(nu_v),
        undiscounted_states=[graph.terminal_layer(r_T)] + graph.unflatten(r_v),
        continue_mass=graph.unflatten(nu_v * p),
        gradient=gradient,
        bias_share=bias_share,
        entropy_share=entropy_share,
        value=float(xf @ gradient + bias_share + entropy_share),
        stopped=stopped,
        sink=sink,
        status=problem.status,
        solver=solver.upper(),
    )


# -- local entropic choice -------------------------------------------------------------------------
def entropic_choice(
    c: float, eps: float, solver: str = "CLARABEL", solver_options: Mapping[str, Any] | None = None
) -> tuple[float, float]:
    """The variational identity I9: max over p in [0, 1] of p * c + eps * H(p).

    Solved with cvxpy (``entr``); returns (maximiser p, value), the value recomputed with numpy at
    the maximiser. They equal sigmoid(c / eps) and softplus_eps(c) = eps * log(1 + exp(c / eps)).
    """
    c = float(c)
    eps = float(eps)
    if not np.isfinite(c):
        raise ValueError(f"c must be finite, got {c}")
    if not (np.isfinite(eps) and eps > 0.0):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    p = cp.Variable(name="p")
    H = cp.entr(p) + cp.entr(1 - p)
    problem = cp.Problem(cp.Maximize(p * c + eps * H), [p >= 0, p <= 1])
    solve_problem(problem, solver, solver_options, "entropic choice")
    p_v = float(np.clip(p.value, 0.0, 1.0))
    return p_v, float(p_v * c + eps * binary_entropy(p_v))


# -- box bounds ------------------------------------------------------------------------------------
def box_bound(
    spec: MLPSpec,
    lo: Any,
    hi: Any,
    target: int,
    *,
    solver: str = "CLARABEL",
    solver_options: Mapping[str, Any] | None = None,
) -> tuple[float, float]:
    """Certified bounds of f_target on the box [lo, hi] by the game (docs/theory.md section 6, I13).

    Lower bound: the game with terminal payoffs (lo, -hi); upper bound: with (hi, -lo). Each is
    computed by a cvxpy best response against the policies of a numpy Shapley recursion on those
    payoffs (continue iff continuing beats stopping, ties stop): the lower bound is Min's best
    response to the Shapley Max policy (min_tau J(sigma, tau), sound for any sigma), the upper
    bound is Max's best response to the Shapley Min policy. Both equal interval bound propagation
    (I13). ReLU nets only.
    """
    spec = numeric_spec(spec)
    if spec.activation != "relu":
        raise ValueError("box_bound is defined for ReLU nets only (docs/theory.md section 6)")
    target = check_target(spec, target)
    lo_v = float_input(spec, lo)
    hi_v = float_input(spec, hi)
    if np.any(lo_v > hi_v):
        raise ValueError("box_bound needs lo <= hi componentwise")
    graph = GameGraph(spec)
    bounds = []
    for player, (tp, tm) in (("min", (lo_v, -hi_v)), ("max", (hi_v, -lo_v))):
        _values, shapley_policy = shapley_solution(spec, tp, tm)
        br = _best_response_program(graph, target, player, shapley_policy, tp, tm, 0.0,
                                    solver, solver_options)
        bounds.append(br.value)
    return bounds[0], bounds[1]
