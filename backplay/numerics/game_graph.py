"""The numpy side of the numerics oracle: the extended graph, input checks, policies, recursions.

Everything here follows docs/theory.md sections 1-3 and uses only :class:`backplay.nets.MLPSpec`, numpy
and scipy; it deliberately does not import ``backplay.theory`` or ``backplay.gpu`` (the numerics
package is an independent oracle).

Conventions
-----------
* Layers l = 1..L, ``W^l = spec.weight(l)`` of shape (n_l, n_{l-1}), ``b^l = spec.bias(l)``.
* States (l, i, s) with s = +1 (column 0, Max moves) and s = -1 (column 1, Min moves). Terminal
  states are the input coordinates (0, j, s), paying ``s * x_j`` unless ``terminal`` overrides it.
* Policy format (shared by every public function): a list of length L whose entry l-1 is a float
  array of shape (n_l, 2); column 0 is the probability of *continuing* at (l, i, +1), column 1 at
  (l, i, -1). At a linear output layer both columns must be 1 (continue is the only action).
* Flat layout (internal): the non-terminal states of layer l are numbered
  ``offset[l] + i`` (+ copy) and ``offset[l] + n_l + i`` (- copy).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import scipy.sparse as sps
from scipy.special import entr, expit

from ..nets import MLPSpec, check_input, check_target

PLAYERS = ("max", "min")
PLUS, MINUS = 0, 1


# -- input checks ----------------------------------------------------------------------------------
def numeric_spec(spec: MLPSpec) -> MLPSpec:
    """The float64 copy of ``spec`` (exact specs are accepted and converted)."""
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec must be a backplay.nets.MLPSpec, got {type(spec).__name__}")
    return spec.numeric()


def float_input(spec: MLPSpec, x: Any) -> np.ndarray:
    """One input vector as float64 (exact sympy entries are rounded), checked by ``check_input``."""
    arr = check_input(spec, x)
    return np.asarray(arr, dtype=np.float64).reshape(-1)


def check_player(player: str) -> str:
    """``"max"`` or ``"min"`` (case-insensitive)."""
    if not isinstance(player, str) or player.lower() not in PLAYERS:
        raise ValueError(f"player must be 'max' or 'min', got {player!r}")
    return player.lower()


def terminal_payoffs(
    spec: MLPSpec, x: np.ndarray, terminal: tuple[Any, Any] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Terminal payoffs (at (0, j, +1), at (0, j, -1)): (x, -x), or the given override pair."""
    if terminal is None:
        return x.copy(), -x
    if not isinstance(terminal, (tuple, list)) or len(terminal) != 2:
        raise ValueError("terminal must be a pair (payoff_plus, payoff_minus) of arrays of length n_0")
    n0 = spec.widths[0]
    out = []
    for name, arr in zip(("payoff_plus", "payoff_minus"), terminal):
        a = np.asarray(arr, dtype=np.float64).reshape(-1)
        if a.shape[0] != n0:
            raise ValueError(f"terminal {name} has {a.shape[0]} entries, the net has {n0} inputs")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"terminal {name} contains non-finite values")
        out.append(a)
    return out[0], out[1]


def check_policy(spec: MLPSpec, policy: Sequence[Any], name: str = "policy") -> list[np.ndarray]:
    """Validate a policy in the public format; returns float64 copies.

    Raises ``ValueError`` for a wrong length or shape, non-finite entries, probabilities outside
    [0, 1], or a linear output layer whose entries are not 1.
    """
    if isinstance(policy, np.ndarray) or not isinstance(policy, (list, tuple)):
        raise TypeError(f"{name} must be a list of L = {spec.depth} arrays of shape (n_l, 2)")
    if len(policy) != spec.depth:
        raise ValueError(f"{name} has {len(policy)} layers, the net has L = {spec.depth}")
    out = []
    widths = spec.widths
    for l in range(1, spec.depth + 1):
        p = np.asarray(policy[l - 1], dtype=np.float64)
        if p.shape != (widths[l], 2):
            raise ValueError(f"{name}[{l - 1}] (layer {l}) must have shape {(widths[l], 2)}, got {p.shape}")
        if not np.all(np.isfinite(p)):
            raise ValueError(f"{name}[{l - 1}] (layer {l}) contains non-finite values")
        if np.any(p < 0.0) or np.any(p > 1.0):
            raise ValueError(f"{name}[{l - 1}] (layer {l}) has probabilities outside [0, 1]")
        if not spec.activated(l) and not np.all(p == 1.0):
            raise ValueError(
                f"{name}[{l - 1}]: layer {l} is a linear output layer, where continue is the only "
                "action; its continue probabilities must be 1"
            )
        out.append(p.copy())
    return out


# -- small numeric helpers -------------------------------------------------------------------------
def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) = -p log p - (1-p) log(1-p) (natural log, 0 log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    return entr(p) + entr(1.0 - p)


def softplus(z: np.ndarray, eps: float) -> np.ndarray:
    """softplus_eps(z) = eps * log(1 + exp(z / eps)), stable."""
    return eps * np.logaddexp(0.0, np.asarray(z, dtype=np.float64) / eps)


def entropic_eps(spec: MLPSpec) -> float:
    """eps of the entropic game (0.0 for a ReLU net)."""
    return float(spec.eps) if spec.activation == "softplus" else 0.0


# -- forward pass and candidate policy -------------------------------------------------------------
def equilibrium_policy(spec: MLPSpec, x: Any) -> list[np.ndarray]:
    """Candidate equilibrium policy from a float64 forward pass (docs/theory.md I2 and I10).

    ReLU net: both copies of neuron (l, i) continue iff z^l_i > 0 (ties z = 0 stop, I2).
    Softplus net: both copies continue with probability sigmoid(z^l_i / eps) (I10).
    A linear output layer always continues (probability 1).

    Returns the policy in the public format (list of L arrays of shape (n_l, 2)). This is only the
    candidate that :func:`certify_equilibrium` checks; nothing here is certified.
    """
    spec = numeric_spec(spec)
    xf = float_input(spec, x)
    policy = []
    for l, (z, _y) in enumerate(spec.forward(xf), start=1):
        if not spec.activated(l):
            p = np.ones_like(z)
        elif spec.activation == "relu":
            p = (z > 0.0).astype(np.float64)
        else:
            p = expit(z / float(spec.eps))
        policy.append(np.column_stack([p, p]))
    return policy


# -- numpy recursions ------------------------------------------------------------------------------
def _continue_values(W: np.ndarray, b: np.ndarray, v_plus: np.ndarray, v_minus: np.ndarray):
    """c(l,i,+) and c(l,i,-) from the values of layer l-1 (docs/theory.md section 3, Shapley operator)."""
    Wp, Wn = np.maximum(W, 0.0), np.maximum(-W, 0.0)
    c_plus = b + Wp @ v_plus + Wn @ v_minus
    c_minus = -b + Wp @ v_minus + Wn @ v_plus
    return c_plus, c_minus


def policy_state_values(
    spec: MLPSpec, x: Any, policy: Sequence[Any], *, terminal: tuple[Any, Any] | None = None
) -> list[np.ndarray]:
    """Values J_s(sigma, tau) of every state under a fixed policy pair (numpy backward recursion).

    Returns a list of length L+1; entry l has shape (n_l, 2) (columns +, -); entry 0 holds the
    terminal payoffs. In the entropic game (softplus spec) the value at an activated state includes
    the entropy term s * eps * H(p) (+ for Max, - for Min, docs/theory.md section 5).
    """
    spec = numeric_spec(spec)
    xf = float_input(spec, x)
    pol = check_policy(spec, policy)
    tp, tm = terminal_payoffs(spec, xf, terminal)
    eps = entropic_eps(spec)
    values = [np.column_stack([tp, tm])]
    v_plus, v_minus = tp, tm
    for l in range(1, spec.depth + 1):
        c_plus, c_minus = _continue_values(spec.weight(l), spec.bias(l), v_plus, v_minus)
        p = pol[l - 1]
        v_plus = p[:, 0] * c_plus
        v_minus = p[:, 1] * c_minus
        if eps > 0.0 and spec.activated(l):
            v_plus = v_plus + eps * binary_entropy(p[:, 0])
            v_minus = v_minus - eps * binary_entropy(p[:, 1])
        values.append(np.column_stack([v_plus, v_minus]))
    return values


def policy_value(
    spec: MLPSpec, x: Any, target: int, policy: Sequence[Any], *, terminal: tuple[Any, Any] | None = None
) -> float:
    """Payoff J(sigma, tau) to Max of a policy pair, by a numpy backward recursion (no cvxpy).

    The recursion is the policy-evaluation form of the Shapley operator (docs/theory.md section 3):
    v(l,i,s) = p(l,i,s) * c(l,i,s) (+ s * eps * H(p) at activated layers of a softplus net,
    section 3), with c the continue value. At the equilibrium this is f_target(x) (I1, I10).

    Args:
        spec: the network (exact specs are converted to float64).
        x: the input (terminal payoffs (x, -x) unless ``terminal`` is given).
        target: output index; the start state is (L, target, +1).
        policy: the pair, in the public policy format.
        terminal: optional (payoff_plus, payoff_minus) replacing (x, -x) (docs/theory.md section 6).
    """
    spec = numeric_spec(spec)
    target = check_target(spec, target)
    values = policy_state_values(spec, x, policy, terminal=terminal)
    return float(values[-1][target, PLUS])


def shapley_solution(
    spec: MLPSpec, payoff_plus: np.ndarray, payoff_minus: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Shapley recursion of the ReLU game on given terminal payoffs (docs/theory.md sections 3 and 6).

    Returns (values, policy): values is a list of L+1 arrays (n_l, 2); policy continues iff
    continuing beats stopping strictly (c > 0 at +, c < 0 at -; ties stop), and always at a linear
    output layer.
    """
    spec = numeric_spec(spec)
    values = [np.column_stack([payoff_plus, payoff_minus]).astype(np.float64)]
    policy = []
    v_plus, v_minus = values[0][:, 0], values[0][:, 1]
    for l in range(1, spec.depth + 1):
        c_plus, c_minus = _continue_values(spec.weight(l), spec.bias(l), v_plus, v_minus)
        if spec.activated(l):
            p_plus = (c_plus > 0.0).astype(np.float64)
            p_minus = (c_minus < 0.0).astype(np.float64)
        else:
            p_plus = p_minus = np.ones_like(c_plus)
        v_plus, v_minus = p_plus * c_plus, p_minus * c_minus
        values.append(np.column_stack([v_plus, v_minus]))
        policy.append(np.column_stack([p_plus, p_minus]))
    return values, policy


# -- the extended graph as sparse matrices ---------------------------------------------------------
class GameGraph:
    """The extended network graph (docs/theory.md section 2) as scipy.sparse matrices.

    Attributes:
        widths: (n_0, ..., n_L).
        offsets: ``offsets[l]`` is the flat index of (l, 0, +1) among the non-terminal states
            (layers 1..L); ``offsets[0]`` is unused (0).
        n_states: number of non-terminal states, 2 * (n_1 + ... + n_L).
        blocks: ``blocks[l]`` (l = 1..L; entry 0 is None) is the discounted transfer from layer l to
            layer l-1, shape (2 n_{l-1}, 2 n_l): entry (j', i') = |W^l_ij| when the edge goes from
            copy i' = (i, s) to copy j' = (j, s * sign W^l_ij). Flow: inflow = block @ continue_mass.
        prob_blocks: the same with |W^l_ij| / gamma^l_i (undiscounted transition probabilities).
        A, A_T: transfer among non-terminal states (n_states x n_states) and to terminal states
            (2 n_0 x n_states).
        P, P_T: the undiscounted versions of A, A_T.
        reward: s * b^l_i at every non-terminal state (collected when continuing).
        sign: +1 / -1 per non-terminal state; layer: l per state; activated: whether the layer
            applies the activation (a choice state) per state; zero_row: gamma^l_i == 0 per state.
    """

    def __init__(self, spec: MLPSpec) -> None:
        spec = numeric_spec(spec)
        self.spec = spec
        self.L = spec.depth
        self.widths = spec.widths
        self.offsets = [0] * (self.L + 1)
        total = 0
        for l in range(1, self.L + 1):
            self.offsets[l] = total
            total += 2 * self.widths[l]
        self.n_states = total
        self.blocks: list[Any] = [None]
        self.prob_blocks: list[Any] = [None]
        reward, sign, layer, activated, zero_row = [], [], [], [], []
        for l in range(1, self.L + 1):
            W = spec.weight(l)
            b = spec.bias(l)
            Wp = sps.csr_matrix(np.maximum(W, 0.0).T)
            Wn = sps.csr_matrix(np.maximum(-W, 0.0).T)
            block = sps.bmat([[Wp, Wn], [Wn, Wp]], format="csr")
            block.eliminate_zeros()
            gamma = np.abs(W).sum(axis=1)
            inv = np.divide(1.0, gamma, out=np.zeros_like(gamma), where=gamma > 0)
            prob = (block @ sps.diags(np.concatenate([inv, inv]))).tocsr()
            self.blocks.append(block)
            self.prob_blocks.append(prob)
            n = self.widths[l]
            reward.append(np.concatenate([b, -b]))
            sign.append(np.concatenate([np.ones(n), -np.ones(n)]))
            layer.append(np.full(2 * n, l))
            activated.append(np.full(2 * n, spec.activated(l)))
            zero_row.append(np.concatenate([gamma == 0, gamma == 0]))
        self.reward = np.concatenate(reward)
        self.sign = np.concatenate(sign)
        self.layer = np.concatenate(layer)
        self.activated = np.concatenate(activated)
        self.zero_row = np.concatenate(zero_row)
        self.A, self.A_T = self._assemble(self.blocks)
        self.P, self.P_T = self._assemble(self.prob_blocks)

    def _assemble(self, blocks: list[Any]) -> tuple[sps.csr_matrix, sps.csr_matrix]:
        L = self.L
        grid: list[list[Any]] = [[None] * L for _ in range(L)]  # rows/cols: layers 1..L
        for l in range(2, L + 1):
            grid[l - 2][l - 1] = blocks[l]
        for l in range(1, L + 1):  # make every block row/column sized
            n = 2 * self.widths[l]
            if grid[l - 1][l - 1] is None:
                grid[l - 1][l - 1] = sps.csr_matrix((n, n))
        A = sps.bmat(grid, format="csr")
        A_T = sps.hstack(
            [blocks[1]] + [sps.csr_matrix((2 * self.widths[0], 2 * self.widths[l])) for l in range(2, L + 1)],
            format="csr",
        )
        return A, A_T

    def start(self, target: int) -> int:
        """Flat index of the start state (L, target, +1)."""
        return self.offsets[self.L] + target

    def flatten(self, per_layer: Sequence[np.ndarray]) -> np.ndarray:
        """Policy-format list (entry l-1 of shape (n_l, 2)) -> flat vector over non-terminal states."""
        return np.concatenate([np.asarray(a)[:, 0:2].T.reshape(-1) for a in per_layer])

    def unflatten(self, vec: np.ndarray) -> list[np.ndarray]:
        """Flat vector over non-terminal states -> list of L arrays of shape (n_l, 2)."""
        out = []
        for l in range(1, self.L + 1):
            n = self.widths[l]
            seg = vec[self.offsets[l] : self.offsets[l] + 2 * n]
            out.append(seg.reshape(2, n).T.copy())
        return out

    @staticmethod
    def terminal_layer(vec: np.ndarray) -> np.ndarray:
        """Flat terminal vector (length 2 n_0) -> array (n_0, 2)."""
        return np.asarray(vec).reshape(2, -1).T.copy()

    def occupation(
        self, target: int, p: np.ndarray, discounted: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Occupation of the start under continue probabilities ``p`` (flat), by a numpy sweep.

        Used to scale the programs (not as the oracle: :func:`occupation_measure` solves the flow
        program with cvxpy). Returns (per non-terminal state, per terminal state).
        """
        blocks = self.blocks if discounted else self.prob_blocks
        nu = np.zeros(self.n_states)
        nu[self.start(target)] = 1.0
        for l in range(self.L, 0, -1):
            sl = slice(self.offsets[l], self.offsets[l] + 2 * self.widths[l])
            inflow = blocks[l] @ (p[sl] * nu[sl])
            if l == 1:
                return nu, inflow
            lo = self.offsets[l - 1]
            nu[lo : lo + 2 * self.widths[l - 1]] += inflow
        raise AssertionError("unreachable")  # pragma: no cover

    def reachable(self, target: int, propagates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """States reachable from the start (L, target, +1).

        ``propagates`` (bool per non-terminal state) says whether a reached state can pass mass on
        (for a best response: every state of the mover, opponent states with a positive continue
        probability, forced states). Edges exist only where W^l_ij != 0. Returns (mask over
        non-terminal states, mask over the 2 n_0 terminal states).
        """
        mask = np.zeros(self.n_states, dtype=bool)
        mask[self.start(target)] = True
        for l in range(self.L, 0, -1):
            sl = slice(self.offsets[l], self.offsets[l] + 2 * self.widths[l])
            active = (mask[sl] & propagates[sl]).astype(np.float64)
            nxt = (abs(self.blocks[l]) @ active) > 0
            if l == 1:
                return mask, nxt
            lo = self.offsets[l - 1]
            mask[lo : lo + 2 * self.widths[l - 1]] |= nxt
        raise AssertionError("unreachable")  # pragma: no cover
