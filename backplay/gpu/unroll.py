"""``unroll``: the explained forward pass of one input as a layered :class:`backplay.nets.FrozenNet`.

Any model the reader takes (:mod:`backplay.gpu.read`) is unrolled at one input, so the exact law of
:func:`backplay.theory.routing_law` runs on it (docs/theory.md section 11: a small instance of every
architecture has a graph small enough for the exact solvers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from backplay.gpu.engine import prepare
from backplay.gpu.ops import LinearGate, ReLUGate, SoftplusGate
from backplay.nets import FrozenNet, MLPSpec
from backplay.rules.lrp import first_layers

__all__ = ["Unrolled", "mlp_spec", "unroll", "unroll_graph", "unroll_trace"]


@dataclass(frozen=True)
class Unrolled:
    """:func:`unroll_graph`'s result: ``net`` the layered FrozenNet; ``boundaries[k]`` the FrozenNet
    layer of report layer k of :func:`backplay.explain` (the input, the cuts, the output);
    ``gates[l-1]`` the frozen gate p of every row of layer l (1 on copy rows; float64), so the
    frozen-graph gradient is the recursion g^{l-1} = W^T (p g^l)."""

    net: FrozenNet
    boundaries: list
    gates: list = field(repr=False)


def unroll(model: Any, x: torch.Tensor) -> FrozenNet:
    """The forward pass of ``model`` at ONE input ``x`` (a single sample, no batch dimension) as dense affine
    layers in float64 (:func:`unroll_graph`)."""
    return unroll_graph(model, x).net


def unroll_graph(model: Any, x: torch.Tensor, eps: float | None = None, attention_mask: Any = None,
                 position: Any = None) -> Unrolled:
    """The frozen extended graph of ``model`` at ONE input as a layered FrozenNet.

    Layer l of the result is layer l of the explained pass (torch order, ``LayerTrace.index``): its
    dense matrix (the map's action on the basis vectors; BatchNorm merged, a sum node's two
    contributions per unit, a max selection's 0/1 rows) and bias. Layout steps add no layer: they
    are folded into the columns of the next layer. A tensor that a later layer still reads (a
    residual skip, a branch of a ``cat``) is carried through the layers in between by ``"copy"``
    rows (weight 1, relevance passed unchanged whatever the rule); selection rows and the identity
    rows of a standalone gate are ``"copy"`` rows too. Each layer keeps the reader's operation kind,
    module name and whether it reads the input (:func:`backplay.rules.lrp.first_layers`), so a
    composite rule picks the same rule per layer on both sides. Gates are folded into the recorded values
    ``ys``. When the output is a layout of the last layer's output, one last layer of copy rows
    writes it. ``eps``: the SoftplusGame surrogate's pass (every gate at temperature eps). Token ids
    ``x`` [T] of a language model: the graph starts at the input embeddings [T, D] (``attention_mask``
    [T] and ``position`` as in :func:`backplay.explain`); the model's dtype is kept."""

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch tensor, got {type(x).__name__}")
    if x.is_floating_point():
        prep = prepare(model, x.detach().to(torch.float64), one_sample=True)
    else:
        if x.ndim != 1:
            raise ValueError(f"unroll takes the token ids of ONE sequence [T], got shape {tuple(x.shape)}")
        prep = prepare(model, x, attention_mask=attention_mask, position=position)
    with torch.no_grad():
        trace = prep.trace()
        if eps is not None:
            trace = trace.surrogate(eps)
        return unroll_trace(trace)


def unroll_trace(trace: Any) -> Unrolled:
    """The unroll of a trace of ONE sample in float64 (see :func:`unroll_graph`). Token-mixing
    (attention) layers get ``anchors``: each row's own unit (the token anchor)."""
    D = torch.float64
    ids: dict = {}  # tensor id -> float64 tensor [1, *shape]: global unit id + 1 (0: a constant zero)
    values: list = []  # global unit id -> value
    owner: list = []  # global unit id -> real tensor id

    def new_real(tid: int, y: torch.Tensor) -> None:
        n = y[0].numel()
        start = len(values)
        ids[tid] = (torch.arange(start, start + n, dtype=D) + 1).reshape((1,) + tuple(y.shape[1:]))
        values.extend(y[0].reshape(-1).tolist())
        owner.extend([tid] * n)

    new_real(0, trace.x)
    reads: list = []  # per layer: the global ids its input reads
    plan = []
    for step in trace.steps:
        if hasattr(step, "map"):
            ins = [ids[s] for s in step.sources]
            if len(ins) > 1:
                shape = (1,) + step.input_shape[2:]
                local = torch.stack([t.expand(shape) for t in ins], dim=1)
            else:
                local = ins[0]
            g = local.reshape(-1).long() - 1
            reads.append(g)
            plan.append(step)
            new_real(step.out, step.y)
        else:
            ids[step.out] = step.fn(*[ids[s] for s in step.sources])
    out_ids = ids[trace.output_id].reshape(-1).long() - 1
    if bool((out_ids < 0).any()):
        raise ValueError("the model's output holds constant entries (zero padding): cannot unroll it")
    L = len(plan)
    # the last layer that reads each real tensor (L + 1: the output)
    last_use = {}
    for l, g in enumerate(reads, start=1):
        for t in set(owner[i] for i in g.tolist() if i >= 0):
            last_use[t] = l
    for t in set(owner[i] for i in out_ids.tolist()):
        last_use[t] = L + 1

    firsts = first_layers(trace)
    weights, biases, ys, kinds, gates, anchors = [], [], [], [], [], []
    ops, modules, first = [], [], []  # what a composite rule reads per layer (FrozenNet fields)
    boundary_of = {0: 0}
    live: list = [0]  # real tensors carried, in the order of the current value vector
    units = {0: list(range(len(trace.x[0].reshape(-1))))}

    def position(carried: list) -> dict:
        pos, k = {}, 0
        for t in carried:
            for u in units[t]:
                pos[u] = k
                k += 1
        return pos

    for l, (step, g) in enumerate(zip(plan, reads), start=1):
        pos = position(live)
        n_prev = len(pos)
        n_in = g.shape[0]
        shape = step.input_shape[1:]
        eye = torch.eye(n_in, dtype=D).reshape((n_in,) + shape)
        local = step.map.apply(eye).reshape(n_in, -1).T  # [n_out, n_in]
        m = local.shape[0]
        W = np.zeros((m, n_prev))
        cols = [pos[u] if u >= 0 else -1 for u in g.tolist()]
        lw = local.numpy()
        for j, c in enumerate(cols):
            if c >= 0:
                W[:, c] += lw[:, j]
        z = step.map.forward(step.input)
        b = step.map.bias_like(z)
        b = None if b is None else b[0].reshape(-1).numpy()
        p = step.p[0].reshape(-1).numpy() if isinstance(step.p, torch.Tensor) else np.ones(m)
        carry = [t for t in live if last_use.get(t, 0) > l]
        rows_k = ["copy" if step.map.pass_through else "affine"] * m
        blocks, yv, gv, bv = [W], [step.y[0].reshape(-1).numpy()], [p], [b if b is not None else np.zeros(m)]
        for t in carry:
            for u in units[t]:
                row = np.zeros(n_prev)
                row[pos[u]] = 1.0
                blocks.append(row[None])
                rows_k.append("copy")
            yv.append(np.array([values[u] for u in units[t]]))
            gv.append(np.ones(len(units[t])))
            bv.append(np.zeros(len(units[t])))
        own = hasattr(step.map, "own_contribution")  # the row's own lower unit: the same position
        anchors.append(tuple(cols[:m]) + (-1,) * (len(rows_k) - m) if own else None)
        weights.append(np.vstack(blocks))
        biases.append(np.concatenate(bv) if b is not None else None)
        ys.append(np.concatenate(yv))
        kinds.append("maxpool" if not carry and step.map.pass_through else tuple(rows_k))
        gates.append(np.concatenate(gv))
        ops.append(step.kind)
        modules.append(step.module)
        first.append(step.index in firsts)
        start = int(ids[step.out].reshape(-1)[0].item()) - 1
        units[step.out] = list(range(start, start + step.y[0].numel()))
        live = [step.out] + carry
        boundary_of[step.out] = l
    # the output vector: the last layer's output in order, or one layer of copy rows
    pos = position(live)
    outs = out_ids.tolist()
    if live != [plan[-1].out] or outs != units[plan[-1].out]:
        W = np.zeros((len(outs), len(pos)))
        for r, u in enumerate(outs):
            W[r, pos[u]] = 1.0
        weights.append(W)
        biases.append(None)
        ys.append(np.array([values[u] for u in outs]))
        kinds.append(("copy",) * len(outs))
        gates.append(np.ones(len(outs)))
        anchors.append(None)
        ops.append("copy")
        modules.append("")
        first.append(False)
    boundaries = [0] + [boundary_of[c] for c in trace.cuts] + [len(weights)]
    net = FrozenNet(weights, biases, [np.array(values[:trace.x[0].numel()])] + ys, kinds, anchors,
                    ops, modules, first, tuple(trace.x.shape[1:]))
    return Unrolled(net, boundaries, gates)


def mlp_spec(module: Any) -> MLPSpec:
    """An :class:`backplay.MLPSpec` read through the one reader (:mod:`backplay.gpu.read`): any module whose forward is a
    chain of Linear layers (BatchNorm, scalings and constants added merged into them) with ReLU or
    Softplus activations, written as ``nn.Sequential`` or with its own forward.

    ``nn.Softplus(beta)`` gives eps = 1/beta. The spec describes the exact softplus; torch's own
    module switches to the identity above ``threshold`` (default 20 on beta*z).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch nn.Module, got {type(module).__name__}")
    first = next((m for m in module.modules() if list(m.parameters(recurse=False))), None)
    if not isinstance(first, nn.Linear):
        raise TypeError("mlp_spec reads MLPs (Linear layers with ReLU or Softplus); the model's "
                        f"first layer is {type(first).__name__ if first is not None else 'missing'}")
    x = torch.zeros(first.in_features, dtype=first.weight.dtype, device=first.weight.device)
    trace = prepare(module, x).trace()
    cuts = set(trace.cuts)
    weights, biases, acts = [], [], []
    eps = None
    for layer in trace.layers:
        chained = len(layer.sources) == 1 and (layer.out in cuts or layer is trace.layers[-1])
        if layer.kind != "linear" or not chained:
            raise TypeError(f"mlp_spec reads a chain of Linear layers; layer {layer.index} is a "
                            f"{layer.kind} layer at {layer.where}")
        gate = layer.gate
        if isinstance(gate, SoftplusGate):
            if eps is not None and gate.eps != eps:
                raise ValueError("all Softplus modules must share one beta")
            eps = gate.eps
            acts.append("softplus")
        elif isinstance(gate, ReLUGate):
            acts.append("relu")
        elif isinstance(gate, LinearGate):
            acts.append(None)
        else:
            raise TypeError(f"unsupported activation {gate!r} at {layer.where} in mlp_spec "
                            "(supported: ReLU, Softplus)")
        weights.append(layer.map.weight)
        biases.append(layer.map.bias)
    hidden = acts[:-1]
    if any(a is None for a in hidden):
        raise ValueError("every hidden Linear layer must be followed by ReLU or Softplus")
    kinds = set(hidden) | ({acts[-1]} - {None})
    if len(kinds) > 1:
        raise ValueError(f"mixed activations {sorted(kinds)} are not supported")
    activation = kinds.pop() if kinds else "relu"
    output = "linear" if acts[-1] is None else activation
    return MLPSpec(weights, biases, activation, eps if activation == "softplus" else None, output)
