"""THE reader: any torch model -> one graph of operations (docs/theory.md section 11).

``read(model, x)`` captures the model's forward at the explained input with ``torch.export``
(non-strict first, strict where that fails; a dynamic batch dimension where the model allows it),
functionalises it (in-place ``relu_`` / ``+=`` become plain operations) and classifies every
operation that depends on the input by :data:`SUPPORTED` (the one table of operations):

* a **linear map** with constant coefficients (a layer), a **sum node** (a layer with several
  inputs), a **gate** (fused into the layer before it when that layer feeds nothing else, else a
  layer of its own with the identity map), a **selection** (max pools, amax), a **frozen
  normaliser**, or a **layout** step (an index map: transparent to every rule);
* canonisation (named rewrite steps, done when the pass is traced): an eval-mode BatchNorm, a
  multiplication / division by a constant and a constant added right after a dense or convolution
  layer that feeds nothing else are merged into that layer (a constant added is its bias);
* every tensor that does not depend on the input (weights, buffers, masks, position tables) is a
  constant, evaluated at trace time.

Any other operation raises :class:`UnsupportedOperation` naming the operation, the line of the
model's source that produced it and what to do. The export is paid once per model and input
signature (:func:`read` caches it on the model object, its parameter versions and the per-sample
shape, dtype and device): the first call exports at its batch size (a static export, ~15 ms on a
small model), the first call with another batch size exports once more with a dynamic batch
dimension (~15x slower to capture), reused for every later batch size. The model is never modified: the export runs on the model in eval mode
(the explained function is the eval-mode net) and every training flag is restored afterwards, also
when an error is raised midway; parameters, buffers, requires_grad flags and hooks are not touched.
"""

from __future__ import annotations

import copy
import functools
import linecache
import math
import operator
import os
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from backplay.gpu.ops import (
    AddOp, AttentionOp, ClampGate, ConvOp, DenseOp, FrozenGate, FunctionGate, Gate, GELUGate, IdentityOp,
    LeakyReLUGate, LinearGate, LinearOp, NormOp, PoolOp, ReLUGate, ScaleOp, Selection, SoftplusGate, WeightOp,
)
from backplay.gpu.trace import ALL_FIELDS, LayerTrace, LayoutStep, Trace

Tensor = torch.Tensor
aten = torch.ops.aten

__all__ = ["SUPPORTED", "ReadError", "UnsupportedOperation", "ModelGraph", "read", "supported_table"]


class ReadError(ValueError):
    """The model cannot be read (export failed, output not [B, classes], ...)."""


class UnsupportedOperation(TypeError):
    """An operation of the model's forward that the frozen graph does not cover."""


# --------------------------------------------------------------------------------------------
# the table of supported operations: aten name -> (kind, what it becomes)
# --------------------------------------------------------------------------------------------
SUPPORTED: dict[str, tuple[str, str]] = {}


def _register(kind: str, what: str, *names: str) -> None:
    for n in names:
        SUPPORTED[n] = (kind, what)


_register("linear", "dense map (nn.Linear, F.linear)", "linear")
_register("linear", "dense map with a constant operand (one operand constant)", "matmul", "mm", "bmm", "addmm")
_register("linear", "convolution 1d-3d (groups, stride, dilation, zeros padding) and transposed",
          "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
_register("linear", "average pool (positive weights)", "avg_pool1d", "avg_pool2d", "avg_pool3d",
          "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d")
_register("linear", "mean / sum over dimensions", "mean", "sum")
_register("linear", "eval-mode BatchNorm (merged into the layer before it, else a diagonal map)",
          "_native_batch_norm_legit_no_training", "batch_norm")
_register("linear", "scaling by a constant; a constant added is a bias", "mul", "div", "neg")
_register("sum", "sum node of explained tensors (a constant added: a bias)", "add", "sub", "rsub")
_register("gate", "ReLU (ties z = 0 stop)", "relu")
_register("gate", "LeakyReLU", "leaky_relu")
_register("gate", "ReLU6 / hardtanh / clamp (piecewise-linear policy)", "relu6", "hardtanh", "clamp")
_register("gate", "GELU (erf and tanh forms: the frozen gate Phi)", "gelu")
_register("gate", "SiLU (frozen gate sigmoid)", "silu")
_register("gate", "softplus (the entropic game's Gibbs gate)", "softplus")
_register("gate", "tanh / sigmoid (frozen gate act(z)/z)", "tanh", "sigmoid")
_register("selection", "max pool / adaptive max pool / amax / max along a dim (winner takes all)",
          "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "adaptive_max_pool1d",
          "adaptive_max_pool2d", "amax", "max")
_register("norm", "frozen normaliser (1/std frozen, centring linear)", "layer_norm", "native_layer_norm",
          "group_norm", "native_group_norm", "rms_norm")
_register("attention", "softmax: the frozen attention weights A (docs/theory.md section 11: A in A v is frozen, q k^T carries "
          "no relevance); A v is a layer of token-mixing edges", "softmax", "_softmax", "_safe_softmax")
_register("attention", "fused scaled-dot-product attention: token mixing of v with the frozen softmax(q k^T)",
          "scaled_dot_product_attention")
_register("embedding", "the token embedding lookup of a language model (integer input): the explained tensor "
          "is the input embeddings", "embedding")
_register("elementwise", "inside an elementwise subgraph of one explained tensor z (e.g. a decomposed tanh "
          "GELU): the subgraph is one frozen gate y = f(z)", "pow", "exp", "erf", "sqrt", "rsqrt", "reciprocal",
          "log", "log1p", "expm1", "abs", "square", "sin", "cos")
_register("layout", "layout (copy / selection edges of weight 1)",
          "view", "_unsafe_view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "expand",
          "cat", "slice", "select", "squeeze", "unsqueeze", "pad", "constant_pad_nd", "reflection_pad1d",
          "reflection_pad2d", "replication_pad1d", "replication_pad2d", "upsample_nearest1d",
          "upsample_nearest2d", "upsample_nearest3d", "index_select", "index", "gather", "clone",
          "contiguous", "alias", "_to_copy", "to", "dropout", "split", "split_with_sizes", "chunk",
          "unbind", "repeat", "roll", "flip", "narrow", "movedim", "getitem")

#: value-independent functions of a tensor (its shape only): never explained
_SHAPE_ONLY = {"sym_size", "sym_numel", "sym_stride", "zeros_like", "ones_like", "full_like", "empty_like",
               "new_zeros", "new_ones", "new_full", "new_empty", "scalar_tensor"}


def supported_table() -> str:
    """The table of supported operations as text (kind, aten operations, what each becomes)."""
    rows: dict[tuple[str, str], list] = {}
    for name, key in SUPPORTED.items():
        rows.setdefault(key, []).append(name)
    lines = [f"{kind:<9} {', '.join(names)}: {what}" for (kind, what), names in rows.items()]
    return "\n".join(lines)


def _name(node: Any) -> str:
    """The operation's aten name; an in-place op reads as its out-of-place form (``relu_`` ->
    ``relu``): the reader uses an in-place graph only where that is exact (:func:`_plain_inplace`)."""
    t = node.target
    if t is operator.getitem:
        return "getitem"
    n = getattr(t, "__name__", str(t)).split(".")[0]
    if n.endswith("_") and not n.startswith("_") and n[:-1] in SUPPORTED:
        return n[:-1]
    return n


@functools.lru_cache(maxsize=4096)
def _where_of(trace: str, stack: tuple) -> str:
    """:func:`_where` of a node's recorded stack trace and module stack (cached: a trace asks for it
    at every layer of every call)."""
    return _format_where(trace, stack)


def _value(a: Any, env: dict, alias: dict) -> Any:
    """The value of an fx argument in ``env`` (nodes through ``alias``; lists and tuples element-wise).
    A module-level function, not a recursive closure: a closure that calls itself is a reference
    cycle, which would keep the pass's tensors alive until the next cyclic garbage collection."""
    if hasattr(a, "op"):
        return env[alias.get(a.name, a.name)]
    if isinstance(a, (list, tuple)):
        return type(a)(_value(b, env, alias) for b in a)
    return a


def _where(node: Any) -> str:
    """The model's source line that produced ``node`` (the last frame outside torch), and its module."""
    stack = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                  for k, v in (node.meta.get("nn_module_stack") or {}).items())
    return _where_of(node.meta.get("stack_trace") or "", stack)


def _module(node: Any) -> str:
    """The qualified name of the innermost module whose forward produced ``node`` (torch.export's
    ``nn_module_stack``), e.g. ``"features.0"``; ``""`` for the root module's own forward."""
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


def _format_where(trace: str, stack_items: tuple) -> str:
    torch_dir = os.path.dirname(torch.__file__)
    best = ""
    lines = trace.strip().splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith('File "'):
            path = s.split('"')[1]
            if path.startswith(torch_dir) or os.sep + "backplay" + os.sep + "gpu" + os.sep in path:
                continue
            ln = s.split("line ")[1].split(",")[0] if "line " in s else "?"
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if not code or code.startswith('File "'):  # the trace kept no source text: read the file
                code = linecache.getline(path, int(ln)).strip() if ln.isdigit() else ""
            best = f"{os.path.basename(path)}:{ln} `{code}`"
    mod = ""
    if stack_items:
        path, cls = stack_items[-1][1][:2]
        mod = f"module {path or '(root)'} ({str(cls).split('.')[-1].rstrip(chr(39) + '>')})"
    return ", ".join(p for p in (best, mod) if p) or "(source line not recorded)"


# --------------------------------------------------------------------------------------------
# export (cached)
# --------------------------------------------------------------------------------------------
@dataclass
class _Export:
    program: Any
    dynamic: bool


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_load_state_dict_pre_hooks")
_EXPORTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _state_versions(model: nn.Module) -> tuple:
    return tuple((id(t), t._version) for t in list(model.parameters()) + list(model.buffers()))


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    msg = [m.strip() for m in msg if m.strip() and not m.strip().startswith(("File ", "from user code",
                                                                           "Set TORCH", "For more"))]
    return (msg[0] if msg else type(e).__name__)[:400]


_VIEWS = {"view", "_unsafe_view", "reshape", "slice", "select", "transpose", "t", "permute", "expand", "squeeze",
          "unsqueeze", "alias", "narrow", "unflatten", "flatten", "split", "chunk", "unbind", "as_strided",
          "diagonal", "movedim", "getitem", "detach"}


def _plain_inplace(ep: Any) -> bool:
    """Whether every in-place operation of the exported graph can be read as its out-of-place form:
    it mutates a fresh, non-view tensor that nothing reads after it (``relu_`` on a conv output,
    ``out += identity``). Otherwise the graph is functionalised (``run_decompositions``)."""
    nodes = list(ep.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    for n in nodes:
        if n.op != "call_function" or n.target is operator.getitem:
            continue
        schema = getattr(n.target, "_schema", None)
        mutates = schema is not None and any(a.alias_info is not None and a.alias_info.is_write
                                             for a in schema.arguments)
        if not mutates:
            continue
        src = n.args[0] if n.args else None
        if not hasattr(src, "op") or src.op != "call_function" or _name(src) in _VIEWS:
            return False
        if any(order[u] > order[n] for u in src.users if u is not n):
            return False
        if _name(n).rstrip("_") not in SUPPORTED and _name(n) not in SUPPORTED:
            return False
    return True


def _batch_first_attention(mha: nn.MultiheadAttention) -> Callable:
    """The forward of a batch-first ``nn.MultiheadAttention`` written with the batch first throughout
    (torch's own forward moves the sequence first, which the reader cannot follow through its layers):
    the same math (packed in-projection, scaled dot-product attention, out-projection), used while
    the model is exported; other calls (masks, returned weights) go to torch's forward."""
    original = nn.MultiheadAttention.forward

    def forward(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Any = None, need_weights: bool = True,
                attn_mask: Any = None, average_attn_weights: bool = True, is_causal: bool = False) -> tuple:
        if need_weights or key_padding_mask is not None or attn_mask is not None or is_causal or query.ndim != 3:
            return original(mha, query, key, value, key_padding_mask, need_weights, attn_mask,
                            average_attn_weights, is_causal)
        B, T, E = query.shape
        H = mha.num_heads
        w, b = mha.in_proj_weight, mha.in_proj_bias
        bs = (None, None, None) if b is None else b.chunk(3)
        if query is key and key is value:
            q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
        else:
            q, k, v = (F.linear(t, wi, bi) for t, wi, bi in zip((query, key, value), w.chunk(3), bs))
        q, k, v = (t.reshape(t.shape[0], t.shape[1], H, E // H).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=mha.dropout if mha.training else 0.0)
        out = out.transpose(1, 2).reshape(B, T, E)
        return F.linear(out, mha.out_proj.weight, mha.out_proj.bias), None
    return forward


def _export(model: nn.Module, example: Tensor, kwargs: dict, dynamic: bool) -> _Export:
    """torch.export of ``model`` at ``example`` (batch first; ``kwargs`` passed by name: tensors such as
    an attention mask become inputs, other values are fixed), in eval mode, the model's hooks
    silenced; flags and hooks restored, also on an error. ``dynamic``: a dynamic batch dimension
    (falls back to the static export where the model does not allow it; never with tensor kwargs)."""
    flags = [(m, m.training) for m in model.modules()]
    hooks = [(m, {a: getattr(m, a) for a in _HOOK_DICTS if hasattr(m, a)}) for m in model.modules()]
    errors = []
    dynamic = dynamic and not any(isinstance(v, torch.Tensor) for v in kwargs.values())
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention) and m.batch_first
                 and m._qkv_same_embed_dim and m.bias_k is None and not m.add_zero_attn
                 and "forward" not in vars(m)]
    try:
        model.eval()
        for m, saved in hooks:  # the model's own hooks do not fire on the exporter's fake tensors
            for a, d in saved.items():
                setattr(m, a, type(d)())
        for m in attention:
            m.forward = _batch_first_attention(m)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ex = example if example.shape[0] >= 2 else example.expand((2,) + tuple(example.shape[1:]))
            tries = ((False, True), (False, False), (True, False)) if dynamic else ((False, False), (True, False))
            for strict, dyn in tries:
                try:
                    ep = torch.export.export(model, (ex if dyn else example,), dict(kwargs), strict=strict,
                                             dynamic_shapes=({0: torch.export.Dim("batch")},) if dyn else None)
                    if not _plain_inplace(ep):
                        ep = ep.run_decompositions({})
                    return _Export(ep, dyn)
                except Exception as e:  # noqa: BLE001 - the exporter's reason is reported below
                    errors.append(e)
    finally:
        for m in attention:
            vars(m).pop("forward", None)
        for m, t in flags:
            m.training = t
        for m, saved in hooks:
            for a, d in saved.items():
                setattr(m, a, d)
    raise ReadError(f"torch.export could not capture the model's forward at an input of shape "
                    f"{tuple(example.shape)}: {_one_line(errors[0])} "
                    "(backplay reads a model through torch.export: make the forward exportable, e.g. "
                    "no data-dependent Python control flow; see the README's supported operations)")


# --------------------------------------------------------------------------------------------
# the model graph: the plan of the explained pass
# --------------------------------------------------------------------------------------------
_AFFINE_AFTER = {"_native_batch_norm_legit_no_training", "batch_norm", "mul", "div", "neg", "add", "sub"}


@dataclass
class _Plan:
    node: Any  # the fx node whose value the step produces
    kind: str  # "layer", "gate" (a standalone gate: an identity layer), "layout"
    merged: list = field(default_factory=list)  # affine fx nodes merged into the layer
    gate: Any = None  # the fx node of the fused gate


@dataclass
class ModelGraph:
    """A model read for one input signature: the exported program and the plan of the pass."""

    program: Any
    dynamic: bool
    explained: set  # fx node names on an explained path from the input to the output
    plan: dict  # fx node name -> _Plan (the nodes that are steps)
    alias: dict  # fx node name -> the name of the step whose output it is (fused / merged nodes)
    params: dict  # placeholder name -> tensor
    input_names: list  # the user inputs' placeholders: the model's input first, then the tensor kwargs
    root: str  # the explained tensor: the input, or the embedding lookup of a language model's ids
    output_node: Any
    track_units: bool  # a layout step other than a reshape: the pass checks whether it repeats units
    regions: dict  # fused gate (exit node name) -> (root node, the region's nodes in order)
    internal: dict  # nodes inside a fused gate -> whether the pass also computes them as constants
    kwarg_names: tuple = ()  # the keyword inputs, in the order of input_names[1:]
    #: (layout node name, batch size) -> whether the step keeps the batch first (probed once, then reused)
    batch_first: dict = field(default_factory=dict)
    #: (layout node name, the explained tensor's per-sample shape, batch size) -> (the unit ids of one
    #: sample at its output, whether it repeats units): a function of the graph and the shapes only, so
    #: it is followed on the first pass and reused
    unit_maps: dict = field(default_factory=dict)
    #: (layer node name, compute dtype) -> (weight, bias) of a dense / conv map with its BatchNorm or
    #: affine nodes folded in, where all of them read parameters only: folded on the first pass and
    #: reused (the graph is read again when a parameter changes)
    folded: dict = field(default_factory=dict)
    #: {position of a node in the program: the values the pass reads for the last time there}
    #: (:func:`_last_reads`; made on the first pass)
    last_reads: dict | None = None

    def replay(self, x: Tensor, dtype: torch.dtype, inputs: dict | None = None, position: Tensor | None = None,
               *, frozen: bool = True, eps: float = 0.0, freeze_softmax: bool = False,
               uniform_products: bool = False) -> Replay:
        """The model's pass re-run with autograd from the explained tensor, modified as the
        transformer rules read it (docs/theory.md section 10): ``frozen``: normaliser std and gates frozen
        (the identity rule: y = p z + c with p, c detached); ``eps > 0``: every dense / convolution
        output z's backward signal scaled by z / (z + eps sign z) (the epsilon rule, sign(0) = +1);
        ``freeze_softmax``: attention weights detached (no relevance into q, k); ``uniform_products``:
        a product of two tensors that depend on the input passes half the gradient to each factor
        (q k^T, A v). Then input x gradient is the rule's relevance (LRP as a modified gradient)."""
        return _Runner(self, dtype, ALL_FIELDS, None).replay(x, inputs or {}, position, frozen, eps, freeze_softmax,
                                                        uniform_products)

    def output_shape(self) -> tuple | None:
        """The shape of the model's output at the exported input."""
        return _shape(self.output_node)

    def trace(self, x: Tensor, dtype: torch.dtype, fields: frozenset = ALL_FIELDS, temperature: float | None = None,
              inputs: dict | None = None, position: Tensor | None = None) -> Trace:
        """The explained pass of the batch ``x`` (float inputs: already in ``dtype``) as a
        :class:`Trace`; ``fields``: what each layer keeps besides its map, input and output (a subset of
        :data:`~backplay.gpu.trace.ALL_FIELDS`, see :class:`~backplay.gpu.trace.LayerTrace`); ``temperature``: every game gate at that temperature (the SoftplusGame
        surrogate's pass, docs/theory.md I10), None: the model's own gates; ``inputs``: the tensor
        keyword inputs (attention mask); ``position``: the position per sample whose logits are
        explained when the output is [B, T, V]."""
        if tuple(inputs or {}) and set(inputs) != set(self.kwarg_names):
            raise ValueError(f"the model was read with the keyword inputs {self.kwarg_names}, got {tuple(inputs)}")
        return _Runner(self, dtype, fields, temperature).run(x, inputs or {}, position)


@dataclass
class Replay:
    """:meth:`ModelGraph.replay`'s result: the explained tensor (a leaf that requires grad), the
    output [B, classes] and, per attention (token mixing) of the pass, its weights A [B, ..., T, T]
    and its output A v (both in the autograd graph)."""

    x: Tensor
    output: Tensor
    attention: list
    attention_out: list


def _users(node: Any) -> list:
    return list(node.users)


def _flat_args(node: Any) -> list:
    """A node's positional and keyword arguments, lists and tuples flattened one level."""
    return [b for a in list(node.args) + list(node.kwargs.values())
            for b in (a if isinstance(a, (list, tuple)) else [a])]


def _is_const_arg(a: Any, explained: set) -> bool:
    return not (hasattr(a, "name") and a.name in explained)


def _explained_args(node: Any, explained: set) -> list:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        for b in (a if isinstance(a, (list, tuple)) else [a]):
            if hasattr(b, "op") and b.name in explained and b not in out:
                out.append(b)
    return out


_SOFTMAX = {"softmax", "_softmax", "_safe_softmax"}
_LAYOUT_NAMES = {"_to_copy", "to", "dropout", "clone", "alias", "contiguous", "type_as"}


def _softmax_source(node: Any) -> bool:
    """Whether ``node`` is a softmax seen through identity steps (a cast, dropout in eval)."""
    while hasattr(node, "op") and _name(node) in _LAYOUT_NAMES:
        node = node.args[0]
    return hasattr(node, "op") and _name(node) in _SOFTMAX


def _output_of(ep: Any, outs: list) -> Any:
    """The logits among the exported outputs: the one output, or the ``logits`` field of an output
    object (Hugging Face ``ModelOutput``, a dict)."""
    if len(outs) == 1:
        return outs[0]
    spec = ep.call_spec.out_spec
    obj = torch.utils._pytree.tree_unflatten(list(range(len(outs))), spec)
    idx = obj.get("logits") if isinstance(obj, dict) else getattr(obj, "logits", None)
    if not isinstance(idx, int):
        raise ReadError(f"the model returns {len(outs)} values; backplay explains a model whose forward "
                        "returns one tensor of logits [B, classes] or an output object with a `logits` "
                        "field (wrap it and return the logits)")
    return outs[idx]


def _analyse(ep: Any) -> tuple:
    """(explained, output node, user input names, root): the explained tensor flows from the
    root (the input, or the embedding lookup of integer token ids) through every operation except a
    softmax (attention weights are frozen); a tensor that depends on it is explained when it lies on
    a path to the output (the path into a fused attention goes through v only)."""
    g = ep.graph
    user_inputs = list(ep.graph_signature.user_inputs)
    nodes = {n.name: n for n in g.nodes}
    x = nodes[user_inputs[0]]
    root = x.name
    val = x.meta.get("val")
    if isinstance(val, torch.Tensor) and not val.is_floating_point():
        ids = {x.name}  # the ids and what is computed from them (views)
        for n in g.nodes:
            if n.op == "call_function" and _explained_args(n, ids) and _name(n) != "embedding":
                ids.add(n.name)
        lookups = [n for n in g.nodes if n.op == "call_function" and _name(n) == "embedding"
                   and len(n.args) > 1 and hasattr(n.args[1], "name") and n.args[1].name in ids]
        if len(lookups) != 1:
            raise ReadError(f"the model takes integer input ({val.dtype}) but looks its ids up in "
                            f"{len(lookups)} embedding tables; backplay explains a language model with "
                            "respect to its input embeddings: one nn.Embedding lookup of the ids")
        root = lookups[0].name
    taint = {root}
    output_node = None
    softmax_seen = False
    for node in g.nodes:
        if node.op == "output":
            outs = node.args[0]
            outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
            output_node = _output_of(ep, outs)
            continue
        if node.op != "call_function" or node.name == root:
            continue
        name = _name(node)
        if name in _SHAPE_ONLY or not _explained_args(node, taint):
            continue
        if name in _SOFTMAX:  # frozen attention weights
            softmax_seen = True
            continue
        taint.add(node.name)
    if output_node is None or not hasattr(output_node, "name") or output_node.name not in taint:
        if softmax_seen:
            raise ReadError("the model's output depends on its input only through a softmax: backplay "
                            "reads a softmax as frozen attention weights; explain the logits (return the "
                            "scores before the softmax)")
        raise ReadError("the model's output does not depend on its input: nothing to explain")
    explained = {output_node.name}
    for node in reversed(list(g.nodes)):
        if node.name not in explained or node.name == root:
            continue
        args = _explained_args(node, taint)
        if _name(node) == "scaled_dot_product_attention":  # q, k: frozen weights; v: the edges
            args = [a for a in args if a is node.args[2]]
        explained.update(a.name for a in args)
    return explained, output_node, user_inputs, root


#: elementwise operations: a subgraph of them that depends on one explained tensor is one gate
_ELEMENTWISE = {"mul", "div", "add", "sub", "rsub", "neg", "tanh", "sigmoid", "relu", "gelu", "silu", "softplus",
                "leaky_relu", "hardtanh", "relu6", "clamp", "to", "_to_copy"} | {
    n for n, (k, _) in SUPPORTED.items() if k == "elementwise"}


def _needs_gate(node: Any, explained: set) -> bool:
    """Whether ``node`` cannot be a step of its own (a product of two explained tensors, a
    nonlinear function that is not a gate of the table)."""
    name = _name(node)
    if SUPPORTED.get(name, ("",))[0] == "elementwise":
        return True
    return name in ("mul", "div") and len(_explained_args(node, explained)) > 1


def _regions(ep: Any, explained: set, output_node: Any) -> tuple[dict, dict]:
    """Elementwise subgraphs of one explained tensor z that must be read as one gate y = f(z)
    (docs/theory.md section 11): {exit node name: (root node, region nodes in order)} and the nodes inside those
    gates that are no step of their own ({name: whether something outside the explained graph
    reads it, so that the pass computes it as a constant too})."""
    root: dict = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.name not in explained or _name(node) not in _ELEMENTWISE:
            continue
        args = _explained_args(node, explained)
        roots = {root.get(a.name, a) for a in args}
        if len(roots) == 1:
            r = next(iter(roots))
            if _shape(node) is not None and _shape(node) == _shape(r):
                root[node.name] = r

    def region(node: Any) -> list:
        r, seen, todo = root[node.name], {node.name: node}, [node]
        while todo:
            for a in _explained_args(todo.pop(), explained):
                if root.get(a.name) is r and a.name not in seen:
                    seen[a.name] = todo.append(a) or a
        order = {n: i for i, n in enumerate(ep.graph.nodes)}
        return sorted(seen.values(), key=order.__getitem__)

    exits = [n for n in ep.graph.nodes if n.name in root and (n is output_node or any(
        u.name in explained and root.get(u.name) is not root[n.name] for u in n.users))]
    fused, normal = {}, set()
    for e in exits:
        nodes = region(e)
        if any(_needs_gate(n, explained) for n in nodes):
            fused[e.name] = (root[e.name], nodes)
        else:
            normal.update(n.name for n in nodes)
    inside = {n.name for _, nodes in fused.values() for n in nodes}
    internal = inside - normal - set(fused)
    # an internal node that something outside the explained graph reads is computed too (with what it reads)
    nodes = {n.name: n for n in ep.graph.nodes}
    plain = [n for n in internal if any(u.name not in explained for u in nodes[n].users)]
    needed = set()
    while plain:
        n = plain.pop()
        if n not in needed:
            needed.add(n)
            plain.extend(a.name for a in _explained_args(nodes[n], explained) if a.name in internal)
    return fused, {n: n in needed for n in internal}


def _check_node(node: Any, explained: set) -> None:
    name = _name(node)
    if SUPPORTED.get(name, ("",))[0] == "elementwise":
        raise UnsupportedOperation(
            f"{name} at {_where(node)} combines several explained tensors or changes the shape: an "
            "elementwise function is read as a gate only when it depends on one explained tensor of the "
            "same shape (e.g. GELU written by hand)")
    if name == "scaled_dot_product_attention" and (_arg(node, 4, "dropout_p", 0.0) or _arg(node, 7, "enable_gqa", False)):
        raise UnsupportedOperation(f"scaled_dot_product_attention with dropout or grouped-query heads at "
                                   f"{_where(node)} (dropout: put the model in eval mode)")
    if name not in SUPPORTED:
        raise UnsupportedOperation(
            f"unsupported operation {name} ({node.target}) at {_where(node)}: backplay's frozen graph "
            "has linear maps, sums, gates, selections, normalisers and layout steps (see the README's table "
            "of supported operations); rewrite this step with supported operations or explain a sub-model "
            "that excludes it")
    n_ex = sum(1 for a in node.args if hasattr(a, "name") and a.name in explained)
    if name in ("mul", "div", "matmul", "mm", "bmm", "addmm") and n_ex > 1:
        raise UnsupportedOperation(
            f"a product of two tensors that both depend on the input ({name}) at {_where(node)}: only "
            "attention products are frozen (transformers); write normalisers with nn.LayerNorm / "
            "nn.GroupNorm / nn.RMSNorm and gates with the torch activations")
    if name == "div" and node.args[0] is not None and _is_const_arg(node.args[0], explained):
        raise UnsupportedOperation(f"division by a tensor that depends on the input at {_where(node)}")
    if name in ("linear", "conv1d", "conv2d", "conv3d", "convolution") and any(
            hasattr(a, "name") and a.name in explained for a in node.args[1:3]):
        raise UnsupportedOperation(f"{name} whose weight depends on the input at {_where(node)}")
    if name == "getitem":
        src = node.args[0]
        if _name(src) in ("max", "adaptive_max_pool1d", "adaptive_max_pool2d", "max_pool2d_with_indices",
                          "_native_batch_norm_legit_no_training", "native_layer_norm",
                          "native_group_norm") and node.args[1] != 0:
            raise UnsupportedOperation(f"the indices / statistics output of {_name(src)} used at "
                                       f"{_where(node)}: only the values are part of the frozen graph")
    if name in ("pad", "constant_pad_nd"):
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        if name == "constant_pad_nd":
            value = node.args[2] if len(node.args) > 2 else 0
            mode = "constant"
        if mode == "constant" and value not in (None, 0, 0.0):
            raise UnsupportedOperation(f"constant padding with value {value} at {_where(node)} (only zero "
                                       "padding is a layout step)")
    if name == "dropout" and (node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)):
        raise UnsupportedOperation(f"dropout in training mode at {_where(node)}")
    if name == "clamp":
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
        if (lo is not None and not isinstance(lo, (int, float))) or (hi is not None and not isinstance(hi, (int, float))):
            raise UnsupportedOperation(f"clamp with tensor bounds at {_where(node)}")
    if name == "max" and len(node.args) < 2:
        raise UnsupportedOperation(f"max over a whole tensor at {_where(node)} (use amax along dims)")


_LAYER_KINDS = {"linear": "layer", "sum": "layer", "selection": "layer", "norm": "layer", "gate": "gate",
                "layout": "layout", "attention": "layer"}



def _weight_layer(node: Any, explained: set) -> bool:
    """Whether ``node`` becomes a dense or convolution map whose weight rows are its output channels
    (the layers an affine map after them can be merged into)."""
    name = _name(node)
    if name in ("linear", "conv1d", "conv2d", "conv3d"):
        return True
    if name == "convolution":
        return not node.args[6]  # not transposed
    if name == "addmm":
        return _is_const_arg(node.args[2], explained) and not _is_const_arg(node.args[1], explained)
    return False


def _is_sum_of_explained(node: Any, explained: set) -> bool:
    return _name(node) in ("add", "sub") and sum(
        1 for a in node.args[:2] if hasattr(a, "name") and a.name in explained) == 2


_MULTI_LAYOUT = {"split", "split_with_sizes", "chunk", "unbind"}
#: layout steps that keep every unit once (the transpose is a reshape back)
_RESHAPES = {"view", "_unsafe_view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "_to_copy",
             "dropout", "clone", "alias", "contiguous"}


def _shape(a: Any) -> tuple | None:
    """The shape of an fx node's value (from the exporter's metadata), None for a number."""
    if not hasattr(a, "meta"):
        return None
    v = a.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _merge_ok(layer: Any, node: Any, explained: set) -> bool:
    """Whether the affine ``node`` can be merged into the dense / conv ``layer`` (a scale per output
    channel or a number; any constant added is a bias)."""
    name = _name(node)
    if name in ("_native_batch_norm_legit_no_training", "batch_norm"):
        out = _shape(layer)
        return out is not None and (len(out) == 2 or _name(layer) != "linear")
    if name in ("add", "sub", "neg"):
        return True
    c = node.args[1] if _is_const_arg(node.args[1], explained) else node.args[0]
    shp = _shape(c)
    if shp is None:
        return isinstance(c, (int, float))
    out = _shape(layer)
    if out is None or math.prod(shp) == 1:
        return math.prod(shp) == 1
    shp = tuple(shp[1:]) if len(shp) == len(out) and shp[0] == 1 else tuple(shp)
    if _name(layer) in ("linear", "addmm"):
        return shp == (out[-1],) and len(out) == 2
    return len(shp) == len(out) - 1 and shp[0] == out[1] and all(d == 1 for d in shp[1:])


def _folds_batch(node: Any, explained: set) -> bool:
    """A view [B, ..., D] -> [B * ..., D] read only by dense maps (addmm / mm with a constant weight,
    e.g. Hugging Face's Conv1D) whose outputs are viewed back to [B, ..., D']: the view is
    transparent and the dense map acts on the last dimension (the batch stays first)."""
    if _name(node) not in ("view", "_unsafe_view", "reshape"):
        return False
    shp_in, shp_out = _shape(node.args[0]), _shape(node)
    if shp_in is None or shp_out is None or not all(isinstance(d, int) for d in shp_in + shp_out):
        return False
    if len(shp_in) < 3 or shp_out != (math.prod(shp_in[:-1]), shp_in[-1]):
        return False
    for u in node.users:
        arg = 1 if _name(u) == "addmm" else 0 if _name(u) == "mm" else None
        if arg is None or u.args[arg] is not node or not _is_const_arg(u.args[arg + 1], explained):
            return False
        d_out = _shape(u)[-1]
        if not all(_name(w) in ("view", "_unsafe_view", "reshape") and _shape(w) == shp_in[:-1] + (d_out,)
                   for w in u.users):
            return False
    return True


def _plan(ep: Any, explained: set, output_node: Any, root: str, regions: dict, internal: dict
          ) -> tuple[dict, dict]:
    plan: dict = {}
    alias: dict = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.name not in explained or node.name == root \
                or node.name in internal:
            continue
        if not node.users and node is not output_node:  # a dead output (e.g. unused pool indices)
            alias[node.name] = node.name
            continue
        if _folds_batch(node, explained):  # transparent: the dense map reads the unfolded tensor
            src = node.args[0]
            alias[node.name] = alias.get(src.name, src.name)
            continue
        region = regions.get(node.name)
        if region is None:
            _check_node(node, explained)
        name = _name(node)
        kind = "gate" if region is not None else _LAYER_KINDS[SUPPORTED[name][0]]
        if name in _MULTI_LAYOUT and region is None:  # computed by each getitem that reads it
            continue
        if name == "getitem":
            src = node.args[0]
            owner = alias.get(src.name, src.name)
            if owner in plan and plan[owner].kind != "layout":  # the value output of a layer op
                alias[node.name] = owner
                continue
            kind = "layout"
        # canonise: an affine map right after a dense / conv layer that feeds nothing else is merged
        if region is None and name in _AFFINE_AFTER and not _is_sum_of_explained(node, explained):
            src = _explained_args(node, explained)[0]
            owner = alias.get(src.name, src.name)
            p = plan.get(owner)
            if p is not None and p.kind == "layer" and p.gate is None and _weight_layer(p.node, explained) \
                    and len(_users(src)) == 1 and src is not output_node and _merge_ok(p.node, node, explained):
                p.merged.append(node)
                alias[node.name] = owner
                continue
        # a gate right after a layer that feeds nothing else is that layer's gate
        if kind == "gate":
            src = node.args[0] if region is None else region[0]
            inside = {node.name} if region is None else {n.name for n in region[1]}
            owner = alias.get(src.name, src.name)
            p = plan.get(owner)
            if p is not None and p.kind == "layer" and p.gate is None and src is not output_node \
                    and all(u.name in inside for u in _users(src)):
                p.gate = node
                alias[node.name] = owner
                continue
        plan[node.name] = _Plan(node, kind)
    return plan, alias


def read(model: nn.Module, x: Tensor, kwargs: dict | None = None) -> ModelGraph:
    """The model graph of ``model`` for inputs like the batch ``x`` (cached; see the module docstring).
    ``kwargs``: passed to the forward by name (tensors, e.g. an attention mask, become inputs of the
    graph; other values are fixed)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module or a backplay.MLPSpec, got {type(model).__name__}")
    kwargs = dict(kwargs or {})
    kw_key = tuple((k, (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v))
                   for k, v in kwargs.items())
    key = (tuple(x.shape[1:]), x.dtype, x.device, kw_key)
    versions = _state_versions(model)
    cache = _EXPORTS.setdefault(model, {})
    hit = cache.get(key)
    if hit is not None and hit[0] == versions and (hit[1].dynamic or hit[2] == x.shape[0]):
        return hit[1]
    # the first export is static (fast); a second batch size exports once with a dynamic batch
    # dimension, which every later batch size reuses
    ex = _export(model, x, kwargs, dynamic=hit is not None and hit[0] == versions)
    ep = ex.program
    explained, output_node, input_names, root = _analyse(ep)
    regions, internal = _regions(ep, explained, output_node)
    plan, alias = _plan(ep, explained, output_node, root, regions, internal)
    params = {}
    sig = ep.graph_signature
    state = ep.state_dict
    for ph, target in list(sig.inputs_to_parameters.items()) + list(sig.inputs_to_buffers.items()):
        params[ph] = state[target] if target in state else ep.constants[target]
    for ph, target in getattr(sig, "inputs_to_lifted_tensor_constants", {}).items():
        params[ph] = ep.constants[target]
    track = any(p.kind == "layout" and _name(p.node.args[0] if _name(p.node) == "getitem" else p.node)
                not in _RESHAPES for p in plan.values())
    spec = ep.call_spec.in_spec  # ((args), {kwargs}): the kwargs in the exporter's order
    kw_order = tuple(spec.child(1).context) if kwargs else ()
    graph = ModelGraph(ep, ex.dynamic, explained, plan, alias, params, input_names, root, output_node,
                       track, regions, internal, kw_order)
    cache[key] = (versions, graph, x.shape[0])
    return graph


# --------------------------------------------------------------------------------------------
# running the plan: the explained pass
# --------------------------------------------------------------------------------------------
def _arg(node: Any, i: int, key: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _gate_of(node: Any, env: Callable) -> Gate:
    name = _name(node)
    if name == "relu":
        return ReLUGate()
    if name == "leaky_relu":
        return LeakyReLUGate(_arg(node, 1, "negative_slope", 0.01))
    if name == "relu6":
        return ClampGate(0.0, 6.0)
    if name == "hardtanh":
        return ClampGate(_arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0))
    if name == "clamp":
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
        lo = -math.inf if lo is None else lo
        hi = math.inf if hi is None else hi
        if lo == 0 and hi == math.inf:
            return ReLUGate()
        return ClampGate(lo, hi)
    if name == "gelu":
        return GELUGate(1.0, _arg(node, 1, "approximate", "none"))
    if name == "softplus":
        beta = float(_arg(node, 1, "beta", 1.0))
        if not beta > 0 or beta == math.inf:
            raise UnsupportedOperation(f"softplus needs a finite beta > 0, got {beta} at {_where(node)}")
        return SoftplusGate(1.0 / beta)
    return FrozenGate(name)  # silu, tanh, sigmoid


class _RepeatOp(LinearOp):
    """A layout that repeats units (expand, nearest upsampling, repeat) or writes constants (a cls
    token concatenated to the patch tokens): a layer of copy rows, each output unit a copy of one
    input unit (relevance passes by the transpose whatever the rule), so that a later layer sees
    each copy as its own contribution (docs/theory.md section 11: copy edges); the constant entries are
    the bias (a unit made of a constant only: its relevance goes to the bias sink)."""

    pass_through = True

    def __init__(self, fn: Callable[[Tensor], Tensor], out_shape: tuple, const: Tensor | None = None,
                 batch: int = 1) -> None:
        self.fn, self.out_shape, self.bias, self.batch = fn, out_shape, const, batch

    def apply(self, y: Tensor, part: str = "W") -> Tensor:
        if part in ("neg", "ineg"):
            return y.new_zeros((y.shape[0],) + self.out_shape)
        if y.shape[0] != self.batch:  # the layout's constants have the pass's batch size: chunks of it
            return torch.cat([self.apply(c, part) for c in y.split(self.batch)])
        out = self.fn(y)
        return out if self.bias is None else out - self.bias

    def __repr__(self) -> str:
        return f"RepeatOp(-> {self.out_shape}{', constants' if self.bias is not None else ''})"


def _surrogate(graph: "ModelGraph", dtype: torch.dtype, x: Tensor, inputs: dict, position: Tensor | None
               ) -> Callable[[float], Trace]:
    """The pass of the SoftplusGame surrogate at temperature eps, on demand (holds only the inputs)."""
    return lambda eps: _Runner(graph, dtype, ALL_FIELDS, eps).run(x, inputs, position)


def _last_reads(g: ModelGraph) -> dict:
    """{position of a node in the program: the names (through the aliases) of the values the pass reads
    for the last time at that node}: the node's own arguments, and what a step made at that node reads
    of the nodes it takes in (merged affine nodes, its fused gate, a standalone gate's region: their
    arguments are read when the step is made; a split's piece reads the split's arguments). A layout
    step whose batch is not first extends its origins' reads at run time (:meth:`_Runner.layout`).
    The pass drops each value after its last read,
    so that it holds what autograd would: the trace's own tensors, not every intermediate (q, k, the
    attention scores) until the pass ends."""
    nodes = list(g.program.graph.nodes)
    pos = {n.name: i for i, n in enumerate(nodes)}
    last: dict = {}

    def read_at(arg_nodes: Any, i: int) -> None:
        for n in arg_nodes:
            for a in _flat_args(n):
                if hasattr(a, "op"):
                    name = g.alias.get(a.name, a.name)
                    last[name] = max(last.get(name, -1), i, pos.get(n.name, -1))

    for i, node in enumerate(nodes):
        read_at([node], i)
        if _name(node) == "getitem" and hasattr(node.args[0], "op"):  # a split's piece recomputes the split
            read_at([node.args[0]], i)
        region = g.regions.get(node.name)
        if region is not None:  # a standalone gate reads its region's root and arguments here
            root = g.alias.get(region[0].name, region[0].name)
            last[root] = max(last.get(root, -1), i)
            read_at(region[1], i)
        plan = g.plan.get(node.name)
        if plan is not None:
            taken = list(plan.merged) + ([plan.gate] if plan.gate is not None else [])
            if plan.gate is not None and plan.gate.name in g.regions:
                taken += g.regions[plan.gate.name][1]
            read_at(taken, i)
    out: dict = {}
    for name, i in last.items():
        out.setdefault(i, []).append(name)
    return out


def _select_position(position: Tensor) -> Callable[[Tensor], Tensor]:
    """logits [B, T, V] -> [B, V] at one position per sample."""
    return lambda y: y[torch.arange(y.shape[0], device=y.device), position.to(y.device)]


class _Runner:
    def __init__(self, graph: ModelGraph, dtype: torch.dtype, fields: frozenset, temperature: float | None) -> None:
        self.g, self.dtype, self.fields, self.temperature = graph, dtype, frozenset(fields), temperature
        self.n_layers = 0
        self.n_blocks = 0
        self.units: dict = {}  # tensor -> the unit ids of one sample (float64: 1 + a running count; 0: a constant)
        self.n_units = 0
        self.pending: dict = {}  # layout outputs whose batch is not first -> (fn of origins, origin names)
        # one pass's state (set by _bind, cleared when the pass ends)
        self.env: dict | None = None  # fx node name -> value
        self.val: Callable[[Any], Any] | None = None  # fx arguments -> values
        self.feed: dict | None = None  # graph input name -> x or a keyword input
        self.device: torch.device | None = None  # the pass's device (x's)
        self.ids: dict = {}  # fx node name -> tensor id of the trace
        self.steps: list = []
        self.last: dict = {}  # fx node name -> the position of its last read (:func:`_last_reads`)
        self.dying: dict = {}  # position -> the names read for the last time there

    def const(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            a = a.detach()
            if a.is_floating_point() and a.dtype != self.dtype:
                return a.to(self.dtype)
        return a

    def _bind(self, x: Tensor, inputs: dict, alias: bool) -> tuple[dict, Callable[[Any], Any]]:
        """The environment of one pass over the program: (env, val), ``val`` mapping fx arguments to
        their values (through the graph's aliases when ``alias``); the placeholders are filled by
        :meth:`_placeholder`."""
        g = self.g
        env: dict = {}
        self.device = x.device
        self.feed = {g.input_names[0]: x}
        self.feed.update((n, inputs[n] if n in inputs else inputs[k])
                         for n, k in zip(g.input_names[1:], g.kwarg_names))

        val = functools.partial(_value, env=env, alias=g.alias if alias else {})
        self.env, self.val = env, val
        return env, val

    def _placeholder(self, node: Any, inputs: dict) -> None:
        """A graph input's value: a parameter or buffer (in the compute dtype), x, or a keyword input."""
        g = self.g
        self.env[node.name] = self.const(g.params[node.name]) if node.name in g.params else \
            self.feed[node.name] if node.name in self.feed else inputs[node.name]

    def run(self, x: Tensor, inputs: dict, position: Tensor | None) -> Trace:
        g = self.g
        env, val = self._bind(x, inputs, alias=True)
        ids: dict = {g.root: 0}  # fx node name -> tensor id
        steps: list = []
        self.ids, self.steps = ids, steps
        if g.last_reads is None:
            g.last_reads = _last_reads(g)
        self.dying = {i: list(names) for i, names in g.last_reads.items()}
        self.last = {name: i for i, names in g.last_reads.items() for name in names}
        out_name = g.alias.get(g.output_node.name, g.output_node.name)
        xe = x
        with torch.no_grad():
            for i, node in enumerate(g.program.graph.nodes):
                for name in self.dying.pop(i - 1, ()):  # read for the last time by the node before
                    if self.last[name] == i - 1 and name != out_name:
                        env.pop(name, None)
                if node.op == "placeholder":
                    self._placeholder(node, inputs)
                    if node.name == g.root:
                        self.start(x)
                    continue
                if node.op != "call_function":
                    continue
                if node.name == g.root:  # the embedding lookup of the ids: the explained tensor
                    xe = env[node.name] = self.const(node.target(*val(node.args), **val(node.kwargs)))
                    self.start(xe)
                    continue
                if node.name in g.internal and not g.internal[node.name] or not node.users:
                    continue  # computed inside its fused gate only; a dead value (unused pool indices)
                if node.name in g.alias:
                    continue
                if node.name not in g.explained or node.name in g.internal or _name(node) in _MULTI_LAYOUT:
                    # (a split's pieces: layout steps each; the split itself for frozen readers, views)
                    out = node.target(*val(node.args), **val(node.kwargs))
                    env[node.name] = self.const(out)
                    continue
                p = g.plan[node.name]
                if p.kind == "layout":
                    self.layout(node)
                else:
                    self.layer(p)
        out = env[out_name]
        if position is not None:
            if out.ndim != 3:
                raise ReadError(f"position= picks a position of an output [B, T, vocab]; this model's output "
                                f"has shape {tuple(out.shape)}")
            fn = _select_position(position)
            sel = fn(out)
            tid = len(ids)
            steps.append(LayoutStep(fn, (tuple(out.shape[1:]),), (ids[out_name],), tid, sel, "the explained position"))
            out_id, out = tid, sel
        else:
            out_id = ids[out_name]
        if out.ndim != 2:
            raise ReadError(f"the model's output has shape {tuple(out.shape)}; backplay explains a logit of "
                            "an output [B, classes] (a language model's [B, T, vocab] at one position: give "
                            "integer token ids, or wrap the model so that it returns [B, classes])")
        self.env = self.units = self.val = self.feed = None  # the trace alone holds the pass's tensors from here
        return Trace(xe, steps, out_id, out, _surrogate(g, self.dtype, x, inputs, position), self.temperature)

    def replay(self, x: Tensor, inputs: dict, position: Tensor | None, frozen: bool, eps: float,
               freeze_softmax: bool, uniform_products: bool) -> Replay:
        """See :meth:`ModelGraph.replay`."""
        g = self.g
        env, val = self._bind(x, inputs, alias=False)
        live: set = set()  # nodes that depend on the explained tensor
        attention, attention_out = [], []

        def stabilised(z: Tensor) -> Tensor:
            if eps == 0 or not z.requires_grad:
                return z
            s = (z / (z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype))).detach()
            return z.detach() + (z - z.detach()) * s

        def product(fn: Callable, a: Tensor, b: Tensor) -> Tensor:
            if uniform_products and a.requires_grad and b.requires_grad:
                return 0.5 * fn(a, b.detach()) + 0.5 * fn(a.detach(), b)
            return fn(a, b)

        xe = None
        with torch.enable_grad():
            for node in g.program.graph.nodes:
                if node.op == "placeholder":
                    self._placeholder(node, inputs)
                    if node.name == g.root:
                        xe = env[node.name] = x.detach().requires_grad_(True)
                        live.add(node.name)
                    continue
                if node.op != "call_function":
                    continue
                name = _name(node)
                if node.name == g.root:
                    v = self.const(node.target(*val(node.args), **val(node.kwargs)))
                    xe = env[node.name] = v.detach().requires_grad_(True)
                    live.add(node.name)
                    continue
                args = [a for a in _explained_args(node, live)]
                if not args or name in _SHAPE_ONLY:
                    with torch.no_grad():
                        env[node.name] = self.const(node.target(*val(node.args), **val(node.kwargs)))
                    continue
                live.add(node.name)
                region = g.regions.get(node.name)
                if frozen and node.name in g.internal and not g.internal[node.name]:
                    continue  # inside a fused gate
                if frozen and (region is not None or SUPPORTED.get(name, ("",))[0] == "gate"):
                    z = env[(region[0] if region is not None else node.args[0]).name]
                    gate = self.gate_of(node)
                    _, p = gate(z.detach())
                    c = gate.offset(z.detach(), p)
                    y = p * z
                    env[node.name] = y if c is None else y + c
                elif frozen and name in ("layer_norm", "native_layer_norm", "group_norm", "native_group_norm",
                                         "rms_norm"):
                    z = env[node.args[0].name]
                    op = self.norm(node, name, z.detach())
                    y = op.forward(z)
                    env[node.name] = (y, None, None) if name.startswith("native") else y
                elif name in _SOFTMAX:
                    A = node.target(*val(node.args), **val(node.kwargs))
                    env[node.name] = A.detach() if freeze_softmax else A
                elif name == "scaled_dot_product_attention":
                    q, k, v = (env[a.name] if hasattr(a, "op") else a for a in node.args[:3])
                    scale = _arg(node, 6, "scale")
                    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
                    S = product(torch.matmul, q * scale, k.transpose(-2, -1))
                    if _arg(node, 5, "is_causal", False):
                        keep = torch.ones(S.shape[-2:], dtype=torch.bool, device=S.device).tril()
                        S = S.masked_fill(~keep, -math.inf)
                    mask = val(_arg(node, 3, "attn_mask"))
                    if mask is not None:
                        S = S.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else S + mask
                    A = torch.softmax(S, dim=-1)
                    A = A.detach() if freeze_softmax else A
                    out = product(torch.matmul, A, v)
                    attention.append(A)
                    attention_out.append(out)
                    env[node.name] = out
                elif name in ("matmul", "mm", "bmm", "mul") and len(args) == 2:
                    a0, a1 = val(node.args[0]), val(node.args[1])
                    out = product(node.target, a0, a1)
                    if name != "mul" and _softmax_source(node.args[0]) and node.name in g.explained:
                        attention.append(a0)
                        attention_out.append(out)
                    env[node.name] = out
                else:
                    out = node.target(*val(node.args), **val(node.kwargs))
                    if _weight_layer(node, live) or (name in ("matmul", "mm", "bmm") and len(args) == 1):
                        out = stabilised(out)
                    env[node.name] = out
        out = env[g.output_node.name]
        if position is not None:
            out = _select_position(position)(out)
        self.env = self.val = self.feed = None
        return Replay(xe, out, attention, attention_out)

    def start(self, x: Tensor) -> None:
        """The explained tensor ``x`` (tensor id 0)."""
        if self.g.track_units:  # some layout may repeat units: follow the unit ids of one sample
            n0 = x[0].numel()
            self.units[self.g.root] = torch.arange(1, n0 + 1, dtype=torch.float64).reshape((1,) + tuple(x.shape[1:]))
            self.n_units = n0

    # -- layout steps ----------------------------------------------------------------------------
    def layout(self, node: Any) -> None:
        """A layout step. One whose output does not keep the batch first (timm's
        ``qkv.permute(2, 0, 3, 1, 4)``) is no step of its own: it is composed into the layouts that
        read it, until the batch is first again (a layer may not read it)."""
        env, g = self.env, self.g
        name = _name(node)
        comp = node  # the node whose target computes the step (a split for its getitem)
        if name == "getitem":
            comp = node.args[0]
        srcs = _explained_args(comp, g.explained)
        src_names = [g.alias.get(s.name, s.name) for s in srcs]
        identity = _name(comp) in ("_to_copy", "dropout", "clone", "alias", "contiguous")
        reshape = _name(comp) in _RESHAPES and not any(n in self.pending for n in src_names)
        # the batch-first tensors the step reads (through pending layouts)
        origin: list = []
        for n in src_names:
            for o in (self.pending[n][1] if n in self.pending else [n]):
                if o not in origin:
                    origin.append(o)
        inner = [self.pending.get(n) for n in src_names]
        values = [env[n] for n in origin]

        consts = {}  # the constant arguments only (the step must not keep the pass's other tensors)
        for a in list(comp.args) + list(comp.kwargs.values()):
            for b in (a if isinstance(a, (list, tuple)) else [a]):
                if hasattr(b, "op") and g.alias.get(b.name, b.name) not in src_names:
                    consts[g.alias.get(b.name, b.name)] = env[g.alias.get(b.name, b.name)]

        def own(*ts: Tensor, consts: dict = consts) -> Tensor:
            if identity:
                return ts[0]
            v = functools.partial(_value, env={**consts, **dict(zip(src_names, ts))}, alias=g.alias)
            out = comp.target(*v(comp.args), **{k: v(a) for k, a in comp.kwargs.items()})
            return out[node.args[1]] if comp is not node else out

        def fn(*ts: Tensor, own: Callable = own) -> Tensor:
            if not any(inner):
                return own(*ts)
            sub = dict(zip(origin, ts))
            return own(*[sub[n] if f is None else f[0](*[sub[o] for o in f[1]]) for n, f in zip(src_names, inner)])

        out = fn(*values)
        env[node.name] = out
        where = _where(node)
        B = values[0].shape[0]
        first = self.g.batch_first.get((node.name, B))
        if first is None and not identity and not reshape and B > 0:
            # where the batch goes: each sample's index through the map (constants as zeros); the graph
            # and the batch size fix it, so it is probed on the first pass only
            zero_consts = {k: torch.zeros_like(c) if isinstance(c, Tensor) and c.is_floating_point() else c
                           for k, c in consts.items()}
            probe = [torch.arange(1, B + 1, dtype=v.dtype if v.is_floating_point() else torch.float64,
                                  device=v.device).view((B,) + (1,) * (v.ndim - 1)).expand(v.shape) for v in values]
            mapped = fn(*probe, own=functools.partial(own, consts=zero_consts)) if not any(inner) else None
            if mapped is None:  # composed: the inner layouts' constants stay (an index map of the probe)
                mapped = fn(*probe)
            rows = torch.arange(1, B + 1, dtype=mapped.dtype, device=mapped.device).view((B,) + (1,) * (mapped.ndim - 1))
            first = mapped.shape[0] == B and bool(((mapped == rows) | (mapped == 0)).all())
        elif first is None:
            first = out.shape[0] == B
        self.g.batch_first[(node.name, B)] = first
        if not first:
            self.pending[node.name] = (fn, origin)
            end = self.last.get(node.name, -1)
            for o in origin:  # the layouts that read this one read its origins
                if self.last.get(o, -1) < end:
                    self.last[o] = end
                    self.dying.setdefault(end, []).append(o)
            return
        in_shapes = tuple(tuple(t.shape[1:]) for t in values)
        if any(isinstance(c, Tensor) and c.is_floating_point() for c in consts.values()):
            const = fn(*[torch.zeros_like(v) for v in values])  # the constant entries (a cls token)
            if bool((const != 0).any()):
                if len(set(origin)) > 1:
                    raise UnsupportedOperation(f"{name} combines several explained tensors with constants at "
                                               f"{where}: add the constants in a step of their own")
                k = len(origin)
                op = _RepeatOp(lambda t, fn=fn, k=k: fn(*[t] * k), tuple(out.shape[1:]), const, B)
                self.record(op, "copy", values[0], out, LinearGate(), origin[:1], where, node.name,
                            module=_module(node))
                return
        if not self.g.track_units:
            pass
        elif reshape:
            self.units[node.name] = self.units[origin[0]].reshape((1,) + tuple(out.shape[1:]))
        else:
            key = (node.name, tuple(self.units[self.g.root].shape[1:]), B)
            if key not in self.g.unit_maps:
                units = [self.units[n] for n in origin]
                try:
                    mapped = fn(*units)
                    if mapped.shape[1:] != out.shape[1:]:
                        raise RuntimeError("batch-sized")
                except RuntimeError:  # an argument tied to the batch size: map the ids of the whole batch
                    mapped = fn(*[u.expand((B,) + tuple(u.shape[1:])).contiguous() for u in units])[:1]
                seen = mapped[mapped > 0]
                self.g.unit_maps[key] = (mapped, seen.numel() != torch.unique(seen).numel())
            mapped, repeats = self.g.unit_maps[key]
            self.units[node.name] = mapped
            if repeats:  # the layout repeats units (expand, upsample)
                if len(set(origin)) > 1:
                    raise UnsupportedOperation(f"{name} repeats units of several tensors at {where}: repeat "
                                               "each tensor on its own before combining them")
                k = len(origin)
                op = _RepeatOp(lambda t, fn=fn, k=k: fn(*[t] * k), tuple(out.shape[1:]), None, B)
                self.record(op, "copy", values[0], out, LinearGate(), origin[:1], where, node.name,
                            module=_module(node))
                return
        tid = len(self.ids)
        self.ids[node.name] = tid
        self.steps.append(LayoutStep(fn, in_shapes, tuple(self.ids[n] for n in origin), tid, out, where,
                                     reshape))

    # -- layers ------------------------------------------------------------------------------------
    def layer(self, p: _Plan) -> None:
        node = p.node
        name = _name(node)
        g, env = self.g, self.env
        srcs = _explained_args(node, g.explained)
        if node.name in g.regions:  # a fused elementwise gate reads its region's root
            srcs = [g.regions[node.name][0]]
        elif _is_sum_of_explained(node, g.explained) and node.args[0] is not node.args[1]:
            srcs = list(node.args[:2])
        src_names = [g.alias.get(s.name, s.name) for s in srcs]
        if any(n in self.pending for n in src_names):
            raise UnsupportedOperation(f"{name} at {_where(node)} reads a tensor whose first dimension is not "
                                       "the batch (a permute / transpose of the batch dimension): backplay reads "
                                       "layers on batch-first tensors; keep the batch first (e.g. "
                                       "nn.MultiheadAttention(batch_first=True) with need_weights=False)")
        ins = [env[n] for n in src_names]
        if p.kind == "gate":
            op, kind, y_in, gate = IdentityOp(), "gate", ins[0], self.gate_of(node)
        else:
            op, kind, y_in = self.map_of(node, name, ins)
            if p.merged:
                op = self.folded(op, node, p.merged)
            gate = self.gate_of(p.gate) if p.gate is not None else LinearGate()
        if self.temperature is not None and gate.activated:
            gate = gate.at_temperature(self.temperature)
        z = op.combine(y_in) if isinstance(y_in, tuple) else op.forward(y_in)
        last = p.gate if p.gate is not None else (p.merged[-1] if p.merged else node)
        self.record(op, kind, y_in, z, gate, src_names, _where(last), node.name, ins, _module(node),
                    fresh=isinstance(op, (DenseOp, ConvOp)))

    def gate_of(self, node: Any) -> Gate:
        """The gate of a gate node, or of a fused elementwise subgraph (:class:`FunctionGate`)."""
        region = self.g.regions.get(node.name)
        if region is None:
            return _gate_of(node, self.val)
        root, nodes = region
        inside = {n.name for n in nodes}
        consts = {}
        for n in nodes:
            for a in list(n.args) + list(n.kwargs.values()):
                for b in (a if isinstance(a, (list, tuple)) else [a]):
                    if hasattr(b, "op") and b.name not in inside and b is not root:
                        consts[b.name] = self.val(b)

        def f(z: Tensor) -> Tensor:
            sub = {root.name: z}

            def v(a: Any) -> Any:
                if hasattr(a, "op"):
                    return sub[a.name] if a.name in sub else consts[a.name]
                if isinstance(a, (list, tuple)):
                    return type(a)(v(b) for b in a)
                return a
            for n in nodes:
                sub[n.name] = n.target(*v(n.args), **{k: v(a) for k, a in n.kwargs.items()})
            return sub[node.name]
        return FunctionGate(f, " ".join(_name(n) for n in nodes))

    def record(self, op: LinearOp, kind: str, y_in: Tensor, z: Tensor, gate: Gate, src_names: list, where: str,
               name: str, ins: list | None = None, module: str = "", fresh: bool = False) -> None:
        """Append the layer ``op`` + ``gate`` (its output: a new tensor with fresh unit ids), keeping z and
        p as the pass's fields say (:class:`~backplay.gpu.trace.LayerTrace`); ``module``: the qualified
        name of the module that produced it (:func:`_module`); ``fresh``: z is the map's own new
        buffer (a gate that can may overwrite it when z is not kept)."""
        in_shape = (len(y_in),) + tuple(y_in[0].shape[1:]) if isinstance(y_in, tuple) else tuple(y_in.shape[1:])
        op.bound(in_shape)
        units = self.input_units(src_names, in_shape, z)
        full = self.fields == ALL_FIELDS
        keep_z = full or ("z" in self.fields and not gate.z_where_nonzero)
        if full:
            y, pv = gate(z)
        elif not gate.activated:
            y, pv = z, None  # p = 1
        elif "p" not in self.fields or type(gate).backprop is not Gate.backprop:  # p not read, or read from y
            y, pv = gate.output(z, in_place=fresh and not keep_z), None
        else:
            y, pv = gate(z)
        self.n_layers += 1
        self.env[name] = y
        tid = len(self.ids)
        self.ids[name] = tid
        if self.g.track_units:
            n = y[0].numel()
            self.units[name] = torch.arange(self.n_units + 1, self.n_units + n + 1,
                                            dtype=torch.float64).reshape((1,) + tuple(y.shape[1:]))
            self.n_units += n
        ins = ins if ins is not None else [y_in]
        block = None
        if isinstance(op, AttentionOp):
            block, self.n_blocks = self.n_blocks, self.n_blocks + 1
        rec = LayerTrace(op, gate, y_in, z if keep_z else None, pv, y,
                         index=self.n_layers, kind=kind, sources=tuple(self.ids[n] for n in src_names), out=tid,
                         where=where, in_shapes=tuple(tuple(t.shape[1:]) for t in ins), block=block,
                         module=module, units=units)
        self.steps.append(rec)

    def input_units(self, src_names: list, in_shape: tuple, z: Tensor) -> Tensor | None:
        """Which entries of a layer's input (per-sample shape ``in_shape``; ``z``: the layer's z, for
        the device) are units of the graph (``LayerTrace.units``): the
        unit ids of one sample are 0 at the constants a layout step wrote (F.pad's zeros, a cat with
        zeros; docs/theory.md section 11). None when every entry is a unit."""
        if not self.g.track_units:  # reshapes only: no layout writes constants
            return None
        real = [self.units[n] > 0 for n in src_names]
        if all(bool(r.all()) for r in real):
            return None
        if len(real) > 1:  # a sum node reads its sources stacked along dim 1
            real = [torch.stack([r.expand((1,) + tuple(in_shape[1:])) for r in real], dim=1)]
        return real[0].to(z.device)

    def folded(self, op: LinearOp, node: Any, merged: list) -> LinearOp:
        """``op`` with the affine nodes ``merged`` folded in (:meth:`merge`), from
        :attr:`ModelGraph.folded` when every tensor they and ``node`` read besides the explained one is
        a parameter or buffer of the model."""
        g = self.g
        key = (node.name, self.dtype)
        hit = g.folded.get(key)
        if hit is None:
            for m in merged:
                op = self.merge(op, m)
            if all(not hasattr(a, "op") or a.name in g.explained or a.name in g.params
                   for n in [node] + list(merged) for a in _flat_args(n)):
                g.folded[key] = (op.weight, op.bias)
            return op
        new = copy.copy(op)
        new.drop_parts()
        new.weight, new.bias = hit
        return new

    def merge(self, op: LinearOp, node: Any) -> LinearOp:
        """Merge the affine map ``node`` (BatchNorm, scale, bias; :func:`_merge_ok`) into the dense /
        conv ``op``: a new op with the scaled weight and the combined bias."""
        scale, shift = self.affine_of(node)
        w, b = op.weight, op.bias
        if scale is not None:
            per = scale.reshape(-1)
            if per.numel() == 1:
                w, b = w * per[0], (None if b is None else b * per[0])
            else:
                w = w * per.view((-1,) + (1,) * (w.ndim - 1))
                b = None if b is None else b * per.view((-1,) + (1,) * (b.ndim - 1))
        if shift is not None:
            if isinstance(op, ConvOp):
                shift = shift.reshape(shift.shape[1:]) if shift.ndim == op.dims + 2 else shift
                if shift.ndim < op.dims + 1:
                    shift = shift.reshape((-1,) + (1,) * op.dims) if shift.numel() > 1 else shift
            b = shift if b is None else b + shift
        new = copy.copy(op)
        new.drop_parts()
        new.weight, new.bias = w, b
        return new

    def affine_of(self, node: Any) -> tuple:
        """(scale, bias) of an elementwise affine node, shaped to broadcast against its output
        (channel dim 1); either may be None."""
        name = _name(node)
        val = self.val
        ex = self.g.explained
        if name in ("_native_batch_norm_legit_no_training", "batch_norm"):
            if name == "batch_norm":
                w, b, mean, var = (val(node.args[i]) for i in (1, 2, 3, 4))
                eps = node.args[7]
            else:
                w, b, mean, var = (val(node.args[i]) for i in (1, 2, 3, 4))
                eps = node.args[6]
            s = 1.0 / torch.sqrt(self.const(var) + eps)
            if w is not None:
                s = s * self.const(w)
            t = -self.const(mean) * s
            if b is not None:
                t = t + self.const(b)
            shape = (-1,) + (1,) * (len(_shape(node.args[0])) - 2)
            return s.view(shape), t.view(shape)
        a0, a1 = node.args[0], node.args[1] if len(node.args) > 1 else None
        c = a1 if _is_const_arg(a1, ex) else a0
        c = self.const(val(c))
        if name == "neg":
            return torch.tensor(-1.0, dtype=self.dtype, device=self.device), None
        if name == "mul":
            return torch.as_tensor(c, dtype=self.dtype, device=self.device), None
        if name == "div":
            return 1.0 / torch.as_tensor(c, dtype=self.dtype, device=self.device), None
        alpha = node.kwargs.get("alpha", 1)
        ct = torch.as_tensor(c, dtype=self.dtype, device=self.device) * alpha
        if name == "add":
            return None, ct
        if name == "sub":
            if _is_const_arg(a1, ex):
                return None, -ct
            return torch.tensor(-1.0, dtype=self.dtype, device=self.device), \
                torch.as_tensor(c, dtype=self.dtype, device=self.device)
        if name == "rsub":  # rsub(x, c) = c - alpha x
            return torch.tensor(-float(alpha), dtype=self.dtype, device=self.device), \
                torch.as_tensor(c, dtype=self.dtype, device=self.device)
        raise AssertionError(name)

    def map_of(self, node: Any, name: str, ins: list) -> tuple[LinearOp, str, Tensor]:
        """(map, kind, map input) of a layer node."""
        val, ex = self.val, self.g.explained
        x = ins[0]
        if name == "linear":
            w, b = self.const(val(node.args[1])), self.const(val(_arg(node, 2, "bias")))
            return DenseOp(w, b), "linear", x
        if name == "addmm":
            b, a, m = node.args[0], node.args[1], node.args[2]
            if not _is_const_arg(a, ex) and _is_const_arg(m, ex):
                return DenseOp(self.const(val(m)).t(), self.const(val(b))), "linear", x
            return WeightOp(lambda y, w, c=self.const(val(a)): c @ y, self.const(val(m)), self.const(val(b)),
                            "addmm"), "map", x
        if name in ("matmul", "mm", "bmm"):
            a, m = node.args[0], node.args[1]
            if _is_const_arg(m, ex):
                w = self.const(val(m))
                if w.ndim == 2:
                    return DenseOp(w.t(), None), "linear", x
                return WeightOp(lambda y, w: torch.matmul(y, w), w, None, name), "map", x
            w = self.const(val(a))
            if _softmax_source(a):  # frozen attention weights (a softmax) times v
                return AttentionOp(w), "attention", x
            return WeightOp(lambda y, w: torch.matmul(w, y), w, None, name), "map", x
        if name == "scaled_dot_product_attention":
            return AttentionOp(self.attention_weights(node)), "attention", x
        if name in ("conv1d", "conv2d", "conv3d"):
            w, b = self.const(val(node.args[1])), self.const(val(_arg(node, 2, "bias")))
            return ConvOp(w, b, _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0),
                          _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1)), "conv", x
        if name.startswith("conv_transpose"):  # (x, w, b, stride, padding, output_padding, groups, dilation)
            w, b = self.const(val(node.args[1])), self.const(val(_arg(node, 2, "bias")))
            d = w.ndim - 2
            kw = dict(stride=_arg(node, 3, "stride", 1), padding=_arg(node, 4, "padding", 0),
                      output_padding=_arg(node, 5, "output_padding", 0), groups=_arg(node, 6, "groups", 1),
                      dilation=_arg(node, 7, "dilation", 1))
            fnT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[d]
            bias = None if b is None else b.view((-1,) + (1,) * d)
            return WeightOp(lambda y, w: fnT(y, w, None, **kw), w, bias, name), "conv", x
        if name == "convolution":
            w, b = self.const(val(node.args[1])), self.const(val(node.args[2]))
            stride, pad, dil, transposed, opad, groups = node.args[3:9]
            if not transposed:
                return ConvOp(w, b, stride, pad, dil, groups), "conv", x
            d = w.ndim - 2
            fnT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[d]
            bias = None if b is None else b.view((-1,) + (1,) * d)
            return WeightOp(lambda y, w: fnT(y, w, None, stride, pad, opad, groups, dil), w, bias,
                            "conv_transpose"), "conv", x
        if name in ("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                    "adaptive_avg_pool3d", "mean", "sum"):
            return self.pool(node, name, x), ("pool"), x
        if name in ("_native_batch_norm_legit_no_training", "batch_norm", "mul", "div", "neg", "add", "sub",
                    "rsub"):
            if name in ("add", "sub") and _is_sum_of_explained(node, ex) and len(ins) == 1:  # x + x, x - x
                alpha = float(node.kwargs.get("alpha", 1))
                c = 1.0 + (alpha if name == "add" else -alpha)
                return ScaleOp(torch.tensor(c, dtype=self.dtype, device=x.device), None, name), "scale", x
            if name in ("add", "sub") and len(ins) == 2:
                alpha = float(node.kwargs.get("alpha", 1))
                a, b = ins
                if a.shape != b.shape:
                    shape = torch.broadcast_shapes(a.shape, b.shape)
                    a, b = a.expand(shape), b.expand(shape)
                # the sources, not a stacked copy (LayerTrace.input stacks them when a rule reads it)
                return AddOp((2,) + tuple(a.shape[1:]), (1.0, alpha if name == "add" else -alpha)), "add", (a, b)
            s, b = self.affine_of(node)
            if s is None:
                s = torch.ones((), dtype=self.dtype, device=x.device)
            return ScaleOp(s, b, name), "scale", x
        if name in ("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "adaptive_max_pool1d",
                    "adaptive_max_pool2d", "amax", "max"):
            return self.selection(node, name, x), "maxpool", x
        if name in ("layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "rms_norm"):
            return self.norm(node, name, x), "norm", x
        raise AssertionError(name)

    def attention_weights(self, node: Any) -> Tensor:
        """softmax(q k^T scale + mask) of a fused attention (q, k: frozen), as torch's math form."""
        q, k = self.val(node.args[0]), self.val(node.args[1])
        mask = self.val(_arg(node, 3, "attn_mask"))
        scale = _arg(node, 6, "scale")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        s = torch.matmul(q, k.transpose(-2, -1)) * scale
        if _arg(node, 5, "is_causal", False):
            keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
            s = s.masked_fill(~keep, -math.inf)
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + self.const(mask)
        return torch.softmax(s, dim=-1)

    def pool(self, node: Any, name: str, x: Tensor) -> PoolOp:
        args = [self.val(a) for a in node.args[1:]]
        kwargs = {k: self.val(v) for k, v in node.kwargs.items()}
        if name in ("avg_pool1d", "avg_pool2d", "avg_pool3d"):
            d = int(name[-2])
            names = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
            kw = dict(zip(names, args))
            kw.update(kwargs)
            if not kw.get("stride"):
                kw["stride"] = kw["kernel_size"]
            k = kw["kernel_size"]
            ks = list(k) if isinstance(k, (list, tuple)) else [k] * d
            full = dict(kernel_size=ks, stride=kw["stride"], padding=kw.get("padding", 0),
                        ceil_mode=kw.get("ceil_mode", False), count_include_pad=kw.get("count_include_pad", True))
            if d == 1:  # through the 2d pool (avg_pool1d has no divisor_override)
                def pool1(y, div=None, full=full):
                    k1, s1 = full["kernel_size"][0], full["stride"]
                    s1 = s1[0] if isinstance(s1, (list, tuple)) else s1
                    p1 = full["padding"][0] if isinstance(full["padding"], (list, tuple)) else full["padding"]
                    return F.avg_pool2d(y.unsqueeze(-1), (k1, 1), (s1, 1), (p1, 0), full["ceil_mode"],
                                        full["count_include_pad"], div).squeeze(-1)
                return PoolOp(lambda y: pool1(y, kw.get("divisor_override")), lambda y: pool1(y, 1), name)
            fn = F.avg_pool2d if d == 2 else F.avg_pool3d
            return PoolOp(lambda y: fn(y, **full, divisor_override=kw.get("divisor_override")),
                          lambda y: fn(y, **full, divisor_override=1), name)
        if name.startswith("adaptive_avg_pool"):
            d = int(name[-2])
            size = args[0]
            fn = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[d]

            def window_sum(y: Tensor) -> Tensor:
                out = fn(y, size)
                for i in range(d):  # bin i of n inputs to o outputs: [floor(i n/o), ceil((i+1) n/o))
                    n, o = y.shape[-d + i], out.shape[-d + i]
                    sz = torch.tensor([-(-((j + 1) * n) // o) - (j * n) // o for j in range(o)],
                                      dtype=y.dtype, device=y.device)
                    out = out * sz.view((-1,) + (1,) * (d - 1 - i))
                return out
            return PoolOp(lambda y: fn(y, size), window_sum, name)
        dims = args[0] if args else None
        keep = args[1] if len(args) > 1 else kwargs.get("keepdim", False)
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = list(range(1, x.ndim))
        dims = [dims] if isinstance(dims, int) else list(dims)
        if any(d % x.ndim == 0 for d in dims):
            raise UnsupportedOperation(f"{name} over the batch dimension at {_where(node)}")
        total = lambda y: y.sum(dims, keepdim=keep)  # noqa: E731
        if name == "sum":
            return PoolOp(total, total, name)
        return PoolOp(lambda y: y.mean(dims, keepdim=keep), total, name)

    def selection(self, node: Any, name: str, x: Tensor) -> Selection:
        B = x.shape[0]
        n_in = x[0].numel()
        flat_ids = torch.arange(n_in, device=x.device, dtype=torch.long).view((1,) + tuple(x.shape[1:]))
        args = [self.val(a) for a in node.args[1:]]
        if name in ("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices"):
            d = 2 if name == "max_pool2d_with_indices" else int(name[-2])
            names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode"]
            kw = dict(zip(names, args))
            kw.update({k: self.val(v) for k, v in node.kwargs.items()})
            if not kw.get("stride"):
                kw.pop("stride", None)
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[d]
            out, idx = fn(x, return_indices=True, **kw)
            maximum = lambda y, fn=fn, kw=kw: fn(y, **kw)  # noqa: E731
            # idx indexes the flattened spatial dims of each channel: add the channel offsets
            spatial = math.prod(x.shape[2:])
            C = x.shape[1] if x.ndim == d + 2 else 1
            off = (torch.arange(C, device=x.device) * spatial).view((1, -1) + (1,) * d)
            flat = (idx + off).reshape(B, -1)
        elif name in ("adaptive_max_pool1d", "adaptive_max_pool2d"):
            d = int(name[-2])
            fn = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d}[d]
            out, idx = fn(x, args[0], return_indices=True)
            maximum = lambda y, fn=fn, size=args[0]: fn(y, size)  # noqa: E731
            spatial = math.prod(x.shape[2:])
            off = (torch.arange(x.shape[1], device=x.device) * spatial).view((1, -1) + (1,) * d)
            flat = (idx + off).reshape(B, -1)
        else:  # amax over dims / max along one dim
            if name == "max":
                dims, keep = [args[0]], (args[1] if len(args) > 1 else False)
            else:
                dims = args[0] if args else list(range(1, x.ndim))
                dims = [dims] if isinstance(dims, int) else list(dims)
                keep = args[1] if len(args) > 1 else False
            dims = sorted(d % x.ndim for d in dims)
            if 0 in dims:
                raise UnsupportedOperation(f"{name} over the batch dimension at {_where(node)}")
            rest = [d for d in range(x.ndim) if d not in dims]
            xp = x.permute(rest + dims)
            ip = flat_ids.expand(x.shape).permute(rest + dims)
            lead = xp.shape[:len(rest)]
            arg = xp.reshape(lead + (-1,)).argmax(-1, keepdim=True)
            flat = ip.reshape(lead + (-1,)).gather(-1, arg).reshape(B, -1)
            out_shape = list(x.shape)
            for d in dims:
                out_shape[d] = 1
            out = xp.reshape(lead + (-1,)).gather(-1, arg).reshape(out_shape)
            if not keep:
                out = out.squeeze(dims) if len(dims) > 0 else out
            maximum = lambda y, dims=dims, keep=keep: y.amax(dims, keepdim=keep)  # noqa: E731
        return Selection(flat, tuple(x.shape[1:]), tuple(out.shape[1:]), maximum)

    def norm(self, node: Any, name: str, x: Tensor) -> NormOp:
        val = self.val
        if name in ("layer_norm", "native_layer_norm", "rms_norm"):
            shape = list(val(node.args[1]))
            k = len(shape)
            n = math.prod(shape)
            w = self.const(val(_arg(node, 2, "weight")))
            if name == "rms_norm":
                b, eps = None, _arg(node, 3, "eps")
            else:
                b, eps = self.const(val(_arg(node, 3, "bias"))), _arg(node, 4, "eps", 1e-5)
            group = lambda t: t.reshape(tuple(t.shape[:t.ndim - k]) + (n,))  # noqa: E731
            ungroup = lambda t: t.reshape(tuple(t.shape[:-1]) + tuple(shape))  # noqa: E731
            xg = group(x)
            if eps is None:
                eps = torch.finfo(x.dtype).eps
            if name == "rms_norm":
                std = torch.sqrt((xg * xg).mean(-1, keepdim=True) + eps)
            else:
                xc = xg - xg.mean(-1, keepdim=True)
                std = torch.sqrt((xc * xc).mean(-1, keepdim=True) + eps)
            gamma = torch.ones(n, dtype=x.dtype, device=x.device) if w is None else w.reshape(n)
            beta = None if b is None else b.reshape(shape)
            return NormOp(gamma, beta, 1.0 / std, n, name != "rms_norm", group, ungroup, name)
        # group norm: (x, G, w, b, eps) or native (x, w, b, N, C, HxW, G, eps)
        if name == "group_norm":
            G, w, b, eps = node.args[1], _arg(node, 2, "weight"), _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5)
        else:
            w, b, G, eps = node.args[1], node.args[2], node.args[6], node.args[7]
        w, b = self.const(val(w)), self.const(val(b))
        C = x.shape[1]
        spatial = tuple(x.shape[2:])
        n = (C // G) * math.prod(spatial)
        group = lambda t: t.reshape(t.shape[0], G, n)  # noqa: E731
        ungroup = lambda t: t.reshape((t.shape[0], C) + spatial)  # noqa: E731
        xg = group(x)
        xc = xg - xg.mean(-1, keepdim=True)
        std = torch.sqrt((xc * xc).mean(-1, keepdim=True) + eps)
        ones = torch.ones((C,) + spatial, dtype=x.dtype, device=x.device)
        gamma = (ones if w is None else ones * w.view((C,) + (1,) * len(spatial))).reshape(G, n)
        beta = None if b is None else b.view((C,) + (1,) * len(spatial)).expand((C,) + spatial)
        return NormOp(gamma, beta, 1.0 / std, n, True, group, ungroup, name)


