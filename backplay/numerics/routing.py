"""Routing laws (docs/theory.md section 8) with numpy and cvxpy: an independent oracle.

Uses only :mod:`backplay.nets`, the parameter classes of :mod:`backplay.rules`, numpy and cvxpy,
never ``backplay.theory`` or ``backplay.gpu``.

* :func:`gibbs_handover`: the Gibbs hand-over as the maximiser of p*r + tau*H(p) (I16, I18).
* :func:`route_choice`: routing as the maximiser of sum_j pi_j r_j - T*KL(pi || pi0) (I19).
* :func:`routing_kernels`: the local laws of a rule at every neuron, in float64 numpy, following the
  shared convention of :mod:`backplay.rules` (bias as a unit, empty branch to the cemetery, p = q
  stops the token); :func:`check_local_maximisers` solves the local programs and compares.
* :func:`law_occupation`: the signed occupation of any law given as per-layer kernel matrices, as a
  cvxpy equality (flow) system.

Accuracy: the values of the small concave programs are accurate to the solver tolerance (~1e-9 with
the default Clarabel options), their maximisers only to about its square root (the objective is flat
near the optimum): compare values tightly and maximisers loosely (~1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import cvxpy as cp
import numpy as np
from scipy.special import rel_entr

from ..nets import FrozenNet, MLPSpec, check_input, check_target
from ..rules import RG, AlphaBeta, Anchor, GradientEquilibrium, RGEq, RiskAverse, Rule
from .game_graph import binary_entropy
from .game_programs import solve_problem

__all__ = [
    "FlowOccupation", "LocalMaximiserReport", "check_local_maximisers", "gibbs_handover",
    "law_occupation", "route_choice", "routing_kernels",
]


# -- local programs --------------------------------------------------------------------------------
def gibbs_handover(tau: float, reward: float = 1.0, solver: str = "CLARABEL",
                   solver_options: Mapping[str, Any] | None = None) -> tuple[float, float]:
    """I16: max over p in [0, 1] of p*reward + tau*H(p) (cvxpy ``entr``). Returns (maximiser, value),
    the value recomputed with numpy; they equal sigmoid(reward/tau) and tau*log(1 + e^(reward/tau)).
    reward = 1 is RG's hand-over; reward = kappa + nu*log(S+/|S-|), tau = 1 is RG+Eq's (I18)."""
    tau, reward = float(tau), float(reward)
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be finite and > 0, got {tau}")
    if not np.isfinite(reward):
        raise ValueError(f"reward must be finite, got {reward}")
    p = cp.Variable(name="p")
    problem = cp.Problem(cp.Maximize(p * reward + tau * (cp.entr(p) + cp.entr(1 - p))), [p >= 0, p <= 1])
    solve_problem(problem, solver, solver_options, "Gibbs hand-over")
    pv = float(np.clip(p.value, 0.0, 1.0))
    return pv, pv * reward + tau * float(binary_entropy(pv))


def route_choice(r: Sequence[float], pi0: Sequence[float], T: float = 1.0, solver: str = "CLARABEL",
                 solver_options: Mapping[str, Any] | None = None) -> tuple[np.ndarray, float]:
    """I19: max over the simplex of sum_j pi_j r_j - T*KL(pi || pi0), pi0 > 0 (a sub-probability is
    allowed: KL is then sum rel_entr(pi_j, pi0_j)). Returns (maximiser, value recomputed with numpy);
    the unique maximiser is pi0*exp(r/T)/Z, the value T*log(sum_j pi0_j exp(r_j/T))."""
    r, pi0 = np.asarray(r, dtype=np.float64).reshape(-1), np.asarray(pi0, dtype=np.float64).reshape(-1)
    T = float(T)
    if r.shape != pi0.shape or r.size == 0:
        raise ValueError(f"r and pi0 need the same non-empty shape, got {r.shape} and {pi0.shape}")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(pi0)) and np.all(pi0 > 0)):
        raise ValueError("r must be finite and pi0 finite and > 0")
    if not (np.isfinite(T) and T > 0):
        raise ValueError(f"T must be finite and > 0, got {T}")
    pi = cp.Variable(r.size, name="pi")
    problem = cp.Problem(cp.Maximize(r @ pi - T * cp.sum(cp.rel_entr(pi, pi0))), [pi >= 0, cp.sum(pi) == 1])
    solve_problem(problem, solver, solver_options, "route choice")
    pv = np.clip(np.asarray(pi.value, dtype=np.float64), 0.0, None)
    return pv, float(r @ pv - T * np.sum(rel_entr(pv, pi0)))


# -- numpy local laws ------------------------------------------------------------------------------
def _frozen(net: MLPSpec | FrozenNet, x: Any) -> tuple[list, list, list]:
    """(weights, biases (zeros if none), ys) in float64."""
    if isinstance(net, MLPSpec):
        if x is None:
            raise ValueError("an MLPSpec needs the input x")
        spec = net.numeric()
        x = np.asarray(check_input(spec, x), dtype=np.float64)
        ys = [x] + [y for _, y in spec.forward(x)]
        return list(spec.weights), [spec.bias(l) for l in range(1, spec.depth + 1)], ys
    if isinstance(net, FrozenNet):
        if net.has_selections:
            raise ValueError("routing_kernels does not model max-pool (winner-takes-all) or copy rows; "
                             "use a FrozenNet of affine layers")
        ws = [np.asarray(w, dtype=np.float64) for w in net.weights]
        bs = [np.zeros(w.shape[0]) if b is None else np.asarray(b, dtype=np.float64)
              for w, b in zip(ws, net.biases)]
        return ws, bs, [np.asarray(y, dtype=np.float64) for y in net.ys]
    raise TypeError(f"net must be an MLPSpec or a FrozenNet, got {type(net).__name__}")


def _sigmoid(t: float) -> float:
    return float(0.5 * (1.0 + np.tanh(0.5 * t)))


def _handover(rule: Rule, sp_: float, sm: float) -> tuple[float, float, bool]:
    """(p, m, stopped) of a base rule at a neuron with sums S+ = sp_, S- = sm (float64)."""
    if isinstance(rule, AlphaBeta):
        a, b = float(rule.alpha), float(rule.beta)
        return a / (a + b), a + b, False
    if isinstance(rule, RG):
        p = _sigmoid(1.0 / float(rule.tau))
    elif isinstance(rule, GradientEquilibrium):
        z = sp_ + sm
        if z == 0:
            return np.nan, np.nan, True
        return sp_ / (sp_ - sm), (sp_ - sm) / z, False
    elif isinstance(rule, RGEq):
        kappa, nu = float(rule.kappa), float(rule.nu)
        if nu == 0:
            p = _sigmoid(kappa)
        elif sp_ == 0 and sm == 0:
            return np.nan, np.nan, True
        elif sm == 0:
            p = 1.0
        elif sp_ == 0:
            p = 0.0
        else:
            p = _sigmoid(kappa + nu * np.log(sp_ / -sm))
    else:
        raise TypeError(f"not a routing law: {type(rule).__name__}")
    if p == 1 - p:
        return p, np.nan, True
    return p, 1.0 / (2 * p - 1), False


def routing_kernels(net: MLPSpec | FrozenNet, x: Any = None, rule: Rule = RG()) -> list[dict]:
    """The local laws of ``rule`` at every neuron, float64, per layer l = 1..L (index l-1):

    ``p``, ``q``, ``m`` (n_l; m = nan where the token is stopped), ``stopped`` (bool, n_l),
    ``pi_plus`` / ``pi_minus`` (n_l, n_{l-1}) routing to lower neurons in each branch,
    ``bias_plus`` / ``bias_minus`` (n_l) routing to the bias unit, ``s_plus``, ``s_minus``, and the
    flow matrices of :func:`law_occupation`: ``P_keep`` = m p pi(.|+), ``P_flip`` = m q pi(.|-),
    ``stop_keep`` (m p on an empty + branch; 1 where stopped), ``stop_flip`` (m q on an empty -
    branch), ``sink_keep`` = m p pi(bias|+), ``sink_flip`` = m q pi(bias|-).
    RiskAverse is its Doob transform (I20) with m reset to 1/(p - q)."""
    ws, bs, ys = _frozen(net, x)
    base = rule.rule if isinstance(rule, RiskAverse) else rule
    lam_rule = base
    if isinstance(base, Anchor):
        base = base.rule
    if not isinstance(base, (AlphaBeta, RG, RGEq, GradientEquilibrium)):
        raise TypeError(f"not a routing law: {type(rule).__name__}")
    inv_t = 1.0 / float(getattr(base, "route_temp", 1.0))
    depth = len(ws)
    u_prev = None
    if isinstance(rule, RiskAverse):
        theta, sigma = float(rule.theta), float(rule.sigma)
        x0 = ys[0]
        with np.errstate(divide="ignore"):
            u_prev = np.where(x0 != 0, np.exp(-theta * sigma ** 2 / np.where(x0 != 0, x0, 1.0) ** 2),
                              1.0 if theta == 0 else 0.0)
    out = []
    for l in range(1, depth + 1):
        w, b, y = ws[l - 1], bs[l - 1], ys[l - 1]
        lam = float(lam_rule.lam_at(l, depth)) if isinstance(lam_rule, Anchor) else 0.0
        n, k = w.shape
        zc = w * y[None, :]
        route = np.abs(w) * np.abs(y)[None, :] ** inv_t
        K = {key: np.zeros(n) for key in ("p", "q", "m", "s_plus", "s_minus", "bias_plus", "bias_minus")}
        K["stopped"] = np.zeros(n, dtype=bool)
        K["pi_plus"], K["pi_minus"] = np.zeros((n, k)), np.zeros((n, k))
        for i in range(n):
            for sgn, pi_key, b_key in ((1, "pi_plus", "bias_plus"), (-1, "pi_minus", "bias_minus")):
                mask = sgn * zc[i] > 0
                has_b = sgn * b[i] > 0
                tot = route[i][mask].sum() + (abs(b[i]) if has_b else 0.0)
                cnt = mask.sum() + has_b
                if cnt:
                    K[pi_key][i][mask] = (1 - lam) * route[i][mask] / tot + lam / cnt
                    K[b_key][i] = ((1 - lam) * abs(b[i]) / tot + lam / cnt) if has_b else 0.0
            K["s_plus"][i] = zc[i][zc[i] > 0].sum() + max(b[i], 0.0)
            K["s_minus"][i] = zc[i][zc[i] < 0].sum() + min(b[i], 0.0)
            p, m, stop = _handover(base, K["s_plus"][i], K["s_minus"][i])
            K["p"][i], K["q"][i], K["m"][i], K["stopped"][i] = p, 1 - p, m, stop
        if u_prev is not None:
            u_prev = _doob_layer(K, u_prev)
        plus_empty = (K["pi_plus"].sum(1) + K["bias_plus"]) == 0
        minus_empty = (K["pi_minus"].sum(1) + K["bias_minus"]) == 0
        act = ~K["stopped"]
        mp = np.where(act, K["m"] * K["p"], 0.0)
        mq = np.where(act, K["m"] * K["q"], 0.0)
        K["P_keep"], K["P_flip"] = mp[:, None] * K["pi_plus"], mq[:, None] * K["pi_minus"]
        K["stop_keep"] = np.where(plus_empty, mp, 0.0) + K["stopped"]
        K["stop_flip"] = np.where(minus_empty, mq, 0.0)
        K["sink_keep"], K["sink_flip"] = mp * K["bias_plus"], mq * K["bias_minus"]
        out.append(K)
    return out


def _doob_layer(K: dict, u_prev: np.ndarray) -> np.ndarray:
    """I20 at one layer (in place): K_theta = K U(s')/U(s), m = 1/(p - q); returns U of the layer."""
    n = K["p"].shape[0]
    u = np.ones(n)
    for i in range(n):
        if K["stopped"][i]:
            continue
        mass = {}
        for sgn, pi_key, b_key, pk in ((1, "pi_plus", "bias_plus", "p"), (-1, "pi_minus", "bias_minus", "q")):
            tot = K[pi_key][i] @ u_prev + K[b_key][i]
            empty = (K[pi_key][i].sum() + K[b_key][i]) == 0
            if not empty:
                K[pi_key][i] = K[pi_key][i] * u_prev / tot
                K[b_key][i] = K[b_key][i] / tot
            mass[sgn] = K[pk][i] * (1.0 if empty else tot)
        u[i] = mass[1] + mass[-1]
        p = mass[1] / u[i]
        K["p"][i], K["q"][i] = p, 1 - p
        if p == 1 - p:
            K["stopped"][i], K["m"][i] = True, np.nan
        else:
            K["m"][i] = 1.0 / (2 * p - 1)
    return u


# -- the local maximiser check (I16, I18, I19) -----------------------------------------------------
@dataclass(frozen=True)
class LocalMaximiserReport:
    """Worst deviations of the local programs' solutions from the rule's local law (numpy).

    ``handover_p``: |p(program) - p(rule)|; ``handover_value``: |value - tau*log(1 + e^(r/tau))|;
    ``routing_pi``: max |pi(program) - pi(rule)| over neurons and branches; ``routing_value``:
    |value - T*log(sum pi0 e^(r/T))| and, at T = 1, |value - log(|S_b|/gamma_i)|;
    ``programs``: number of programs solved."""

    handover_p: float
    handover_value: float
    routing_pi: float
    routing_value: float
    programs: int


def _reached(kernels: list[dict], target: int) -> list[np.ndarray]:
    """Neurons reached from the target, per layer 1..L (index l-1)."""
    reach = np.zeros(kernels[-1]["p"].shape[0], dtype=bool)
    reach[target] = True
    out = []
    for K in reversed(kernels):
        out.insert(0, reach)
        flow = (K["pi_plus"] + K["pi_minus"])[reach & ~K["stopped"]]
        reach = flow.sum(0) > 0 if flow.size else np.zeros(K["pi_plus"].shape[1], dtype=bool)
    return out


def check_local_maximisers(net: MLPSpec | FrozenNet, x: Any = None, target: int = 0, rule: Rule = RG(),
                           solver: str = "CLARABEL",
                           solver_options: Mapping[str, Any] | None = None) -> LocalMaximiserReport:
    """The check that a rule's local probabilities are their unique maximisers (I16, I18, I19).

    At every neuron reached from ``target`` (and not stopped): the hand-over as the Gibbs program
    of :func:`gibbs_handover` (RG: r = 1, tau; RG+Eq / gradient equilibrium: r = kappa +
    nu*log(S+/|S-|), tau = 1, where both branches are non-empty; alpha-beta with beta > 0: r =
    log(alpha/beta), tau = 1), and the routing in each non-empty branch as :func:`route_choice` with
    r_j = log|y_j| (bias unit: 0), pi0_j = |W_ij|/gamma_i on the branch (gamma_i = sum_j |W_ij| +
    |b_i|). AlphaBeta, RG, RGEq and GradientEquilibrium only: the Anchor mixture and the RiskAverse
    transform are not maximisers of these programs (TypeError)."""
    if isinstance(rule, (Anchor, RiskAverse)) or not isinstance(rule, (AlphaBeta, RG, RGEq, GradientEquilibrium)):
        raise TypeError(f"no local programs for {type(rule).__name__} (AlphaBeta, RG, RGEq, "
                        "GradientEquilibrium only)")
    ws, bs, ys = _frozen(net, x)
    if isinstance(net, MLPSpec):
        target = check_target(net, target)
    elif not 0 <= int(target) < len(ys[-1]):
        raise ValueError(f"target {target} out of range for {len(ys[-1])} outputs")
    kernels = routing_kernels(net, x, rule)
    T = float(getattr(rule, "route_temp", 1.0))
    worst = dict(hp=0.0, hv=0.0, rp=0.0, rv=0.0)
    count = 0

    def handover(tau: float, r: float, p_rule: float) -> None:
        nonlocal count
        p, val = gibbs_handover(tau, r, solver, solver_options)
        count += 1
        worst["hp"] = max(worst["hp"], abs(p - p_rule))
        worst["hv"] = max(worst["hv"], abs(val - tau * np.logaddexp(0.0, r / tau)))

    if isinstance(rule, RG):
        handover(float(rule.tau), 1.0, _sigmoid(1.0 / float(rule.tau)))
    elif isinstance(rule, AlphaBeta) and float(rule.beta) > 0:
        handover(1.0, float(np.log(float(rule.alpha) / float(rule.beta))), kernels[0]["p"][0])
    for l, (K, reach) in enumerate(zip(kernels, _reached(kernels, target)), start=1):
        w, b, y = ws[l - 1], bs[l - 1], ys[l - 1]
        for i in np.flatnonzero(reach & ~K["stopped"]):
            if isinstance(rule, (RGEq, GradientEquilibrium)) and K["s_plus"][i] > 0 and K["s_minus"][i] < 0:
                kappa, nu = (float(rule.kappa), float(rule.nu)) if isinstance(rule, RGEq) else (0.0, 1.0)
                handover(1.0, kappa + nu * np.log(K["s_plus"][i] / -K["s_minus"][i]), K["p"][i])
            gamma = np.abs(w[i]).sum() + abs(b[i])
            for sgn, pi_key, b_key in ((1, "pi_plus", "bias_plus"), (-1, "pi_minus", "bias_minus")):
                mask = sgn * w[i] * y > 0
                has_b = sgn * b[i] > 0
                if not (mask.any() or has_b):
                    continue
                r = np.concatenate([np.log(np.abs(y[mask])), [0.0] if has_b else []])
                pi0 = np.concatenate([np.abs(w[i][mask]), [abs(b[i])] if has_b else []]) / gamma
                pi_rule = np.concatenate([K[pi_key][i][mask], [K[b_key][i]] if has_b else []])
                pi, val = route_choice(r, pi0, T, solver, solver_options)
                count += 1
                worst["rp"] = max(worst["rp"], float(np.max(np.abs(pi - pi_rule))))
                ref = T * np.log(np.sum(pi0 * np.exp(r / T)))
                worst["rv"] = max(worst["rv"], abs(val - ref))
                if T == 1.0:
                    s_b = K["s_plus"][i] if sgn > 0 else -K["s_minus"][i]
                    worst["rv"] = max(worst["rv"], abs(val - np.log(s_b / gamma)))
    return LocalMaximiserReport(worst["hp"], worst["hv"], worst["rp"], worst["rv"], count)


# -- occupation by the flow program ----------------------------------------------------------------
@dataclass(frozen=True)
class FlowOccupation:
    """Solution of the flow system: per layer 0..L the occupations ``nu_plus``, ``nu_minus`` of the
    two copies, ``relevance`` = w0 (nu_plus - nu_minus), and the signed stopped mass (times w0) in
    the ``cemetery`` and the ``bias_sink``; ``status`` of the solver."""

    nu_plus: list
    nu_minus: list
    relevance: list
    cemetery: float
    bias_sink: float
    status: str

    def __repr__(self) -> str:
        widths = [len(r) for r in self.relevance]
        return (f"FlowOccupation(layers {widths}, cemetery {self.cemetery:.6g}, bias_sink {self.bias_sink:.6g}, "
                f"status {self.status!r})")


_FLOW_KEYS = ("P_keep", "P_flip", "stop_keep", "stop_flip", "sink_keep", "sink_flip")


def law_occupation(kernels: Sequence[Mapping[str, Any]], target: int, w0: float = 1.0,
                   solver: str = "CLARABEL",
                   solver_options: Mapping[str, Any] | None = None) -> FlowOccupation:
    """Signed occupation of any sign-symmetric law on the extended graph as a cvxpy equality system.

    ``kernels[l-1]`` (l = 1..L) holds numpy arrays: ``P_keep`` (n_l, n_{l-1}) = multiplier times the
    probability of moving (l, i, s) -> (l-1, j, s), ``P_flip`` likewise to (l-1, j, -s); optional
    vectors (n_l) ``stop_keep`` / ``stop_flip`` (to the cemetery with sign s / -s) and ``sink_keep``
    / ``sink_flip`` (to the bias sink), each multiplier times probability. For a routing law
    P_keep = m p pi(.|+), P_flip = m q pi(.|-) (see :func:`routing_kernels`). The start is
    (L, target, +) with mass 1; constraints nu^{l-1}_+ = P_keep^T nu^l_+ + P_flip^T nu^l_-,
    nu^{l-1}_- = P_keep^T nu^l_- + P_flip^T nu^l_+."""
    if not kernels:
        raise ValueError("need at least one layer of kernels")
    mats = []
    for l, K in enumerate(kernels, start=1):
        missing = [key for key in ("P_keep", "P_flip") if key not in K]
        if missing:
            raise ValueError(f"layer {l} kernels lack {missing}")
        pk, pf = np.asarray(K["P_keep"], dtype=np.float64), np.asarray(K["P_flip"], dtype=np.float64)
        if pk.ndim != 2 or pk.shape != pf.shape:
            raise ValueError(f"layer {l}: P_keep {pk.shape} and P_flip {pf.shape} must be equal 2-d shapes")
        if mats and pk.shape[1] != mats[-1]["P_keep"].shape[0]:
            raise ValueError(f"layer {l}: P_keep has {pk.shape[1]} columns, layer {l - 1} has "
                             f"{mats[-1]['P_keep'].shape[0]} neurons")
        m = {"P_keep": pk, "P_flip": pf}
        for key in _FLOW_KEYS[2:]:
            v = np.asarray(K.get(key, np.zeros(pk.shape[0])), dtype=np.float64).reshape(-1)
            if v.shape != (pk.shape[0],):
                raise ValueError(f"layer {l}: {key} must have {pk.shape[0]} entries, got {v.shape}")
            m[key] = v
        if not all(np.all(np.isfinite(v)) for v in m.values()):
            raise ValueError(f"layer {l}: kernels contain non-finite values (use 0 where stopped)")
        mats.append(m)
    widths = [mats[0]["P_keep"].shape[1]] + [m["P_keep"].shape[0] for m in mats]
    if not 0 <= int(target) < widths[-1]:
        raise ValueError(f"target {target} out of range for {widths[-1]} outputs")
    plus = [cp.Variable(n) for n in widths]
    minus = [cp.Variable(n) for n in widths]
    start = np.zeros(widths[-1])
    start[int(target)] = 1.0
    cons = [plus[-1] == start, minus[-1] == 0]
    for l in range(len(mats), 0, -1):
        m = mats[l - 1]
        cons += [plus[l - 1] == m["P_keep"].T @ plus[l] + m["P_flip"].T @ minus[l],
                 minus[l - 1] == m["P_keep"].T @ minus[l] + m["P_flip"].T @ plus[l]]
    problem = cp.Problem(cp.Minimize(0), cons)
    solve_problem(problem, solver, solver_options, "law occupation")
    nu_p = [np.asarray(v.value, dtype=np.float64) for v in plus]
    nu_m = [np.asarray(v.value, dtype=np.float64) for v in minus]
    cem = sink = 0.0
    for l, m in enumerate(mats, start=1):
        signed = nu_p[l] - nu_m[l]
        cem += float(signed @ (m["stop_keep"] - m["stop_flip"]))
        sink += float(signed @ (m["sink_keep"] - m["sink_flip"]))
    return FlowOccupation(nu_p, nu_m, [w0 * (a - b) for a, b in zip(nu_p, nu_m)], w0 * cem, w0 * sink,
                          problem.status)

