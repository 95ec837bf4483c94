"""The engine: read -> trace -> sweep -> report, one route for every model.

:func:`prepare` is the one place that validates a call: the input (floating, finite, batched or
one sample), the model (an ``nn.Module``, or a :class:`backplay.MLPSpec` converted to one), the
device (the input's; every parameter must be there, none on the meta device) and the compute dtype
(the promotion of the input's and the parameters' dtypes, so a float64 input on a float32 model is
computed in float64 and a float64 model is never rounded down; float32 at least: a float16 /
bfloat16 model or input is computed in float32, with a warning, since half-precision sweeps are off
float32 by a few percent). The model is read by :func:`backplay.gpu.read.read` (torch.export,
cached) and never modified: where its floating parameters or buffers are not all in the compute
dtype, a copy of it with them cast is read (a fresh copy, and so a fresh export, per call). A model
in train mode is explained with a warning: the reader exports the eval-mode function.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from backplay.gpu.read import ModelGraph, ReadError, read
from backplay.gpu.trace import ALL_FIELDS, Trace
from backplay.gpu.transformer import transformer_relevance
from backplay.rules import Gradient, Rule, TransformerRule
from backplay.rules.routing import routing_parts

Tensor = torch.Tensor

__all__ = ["ExplainReport", "Prepared", "check_rule_instance", "compute_dtype", "explain", "prepare",
           "resolve_target", "float_tensor"]

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ExplainReport:
    """Per-sample bookkeeping of one :func:`explain` call (tensors [B] in x's dtype; 0-d for one input).

    Attributes:
        logit: f_target(x).
        relevance_sum: the sum of the returned relevance over the input.
        stopped: for the routing laws (AlphaBeta, RG, RGEq, GradientEquilibrium, Anchor, RiskAverse)
            the signed mass the law actually accumulated in the cemetery (empty branches, p = q) and
            the bias sink, so ``relevance_sum + stopped == logit`` (I14) is a real check for the
            conservative ones. For the other rules it is logit - relevance_sum: for GradientXInput
            and LRP-0 on a ReLU net the discounted bias rewards (I4); on a softplus net GxI adds the
            entropy terms (I11); for the plain Gradient (not conservative) only the difference.
        layers: the relevance at the report layers, torch order: [0] the input (x's shape), then
            the output of every layer that each input-to-output path passes through (every layer of
            a chain; the add node of a residual block, not the layers of its body), [-1] the start
            measure at the output. For Gradient it is the gradient wrt those tensors, for
            GradientXInput the tensor times it. Tensors with batch first.
        rule: the rule's name.
    """

    logit: Tensor
    relevance_sum: Tensor
    stopped: Tensor
    rule: str
    layers: list | None = None

    def __repr__(self) -> str:
        batch = "one sample" if self.logit.ndim == 0 else f"batch {self.logit.shape[0]}"
        layers = "none" if self.layers is None else len(self.layers)
        return (f"ExplainReport(rule={self.rule!r}, {batch}, logit {_summary(self.logit)}, relevance_sum "
                f"{_summary(self.relevance_sum)}, stopped {_summary(self.stopped)}, layers: {layers})")


def _summary(t: Tensor) -> str:
    """A per-sample tensor in a few characters: its values (up to 3), else mean and range."""
    v = t.detach().double().flatten().cpu()
    if v.numel() <= 3:
        return ("[" + ", ".join(f"{float(a):.4g}" for a in v) + "]") if t.ndim else f"{float(v[0]):.4g}"
    return f"mean {float(v.mean()):.4g} in [{float(v.min()):.4g}, {float(v.max()):.4g}]"


def check_rule_instance(rule: Any, name: str = "rule") -> None:
    """TypeError (one line) for a class passed where an instance belongs (``rule=LRP0`` for
    ``rule=LRP0()``); ``name``: the argument as the caller wrote it."""
    if isinstance(rule, type):
        write = f"{name}={rule.__name__}()" if name.isidentifier() else f"{rule.__name__}()"
        raise TypeError(f"{name} must be an instance, got the class {rule.__name__}: write {write}")


def float_tensor(x: Any, name: str = "x") -> Tensor:
    """``x`` as a floating torch tensor (numpy arrays converted); clear errors otherwise."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {x.dtype}")
    return x


def resolve_target(target: Any, batch: int, n_out: int, device: torch.device) -> Tensor:
    """``target`` (int, or integer tensor / array of one class per sample) as a LongTensor [B]."""
    if isinstance(target, bool) or isinstance(target, np.bool_):
        raise TypeError("target must be an int or an integer tensor, got a bool")
    if isinstance(target, (int, np.integer)):
        t = torch.full((batch,), int(target), dtype=torch.long, device=device)
    else:
        if isinstance(target, (list, tuple, np.ndarray)):
            target = torch.as_tensor(np.asarray(target))
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be an int or an integer tensor, got {type(target).__name__}")
        if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
            raise TypeError(f"target must hold integers, got dtype {target.dtype}")
        if target.ndim == 0:
            t = target.to(device=device, dtype=torch.long).expand(batch).clone()
        elif target.ndim == 1 and target.shape[0] == batch:
            t = target.to(device=device, dtype=torch.long)
        else:
            raise ValueError(f"target must be an int or have one class per sample (shape [{batch}]), "
                             f"got shape {tuple(target.shape)}")
    if t.numel() > 0:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= n_out:
            bad = lo if lo < 0 else hi
            raise ValueError(f"target {bad} out of range for {n_out} outputs (valid: 0..{n_out - 1})")
    return t


def _module(model: Any, x: Tensor) -> nn.Module:
    from backplay.nets import MLPSpec

    if isinstance(model, MLPSpec):
        return model.to_torch(dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module or a backplay.MLPSpec, got {type(model).__name__}")
    return model


def _first_layer(module: nn.Module) -> nn.Module | None:
    """The first module (registration order) that holds parameters: usually the first layer; when
    that is no Linear / convolution (a cls token, a norm), the first Linear / convolution (a
    transformer's patch embedding)."""
    first = next((m for m in module.modules() if list(m.parameters(recurse=False))), None)
    if first is None or _sample_rank(first) is not None:
        return first
    return next((m for m in module.modules() if _sample_rank(m) is not None), first)


def _first_op(module: nn.Module) -> nn.Module | None:
    """The module that surely runs first: the first leaf of nested ``nn.Sequential`` (None otherwise)."""
    while isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward and len(module):
        module = module[0]
    return None if isinstance(module, nn.Sequential) else module


def _sample_rank(first: nn.Module | None) -> int | None:
    """The rank of ONE sample the model takes, from its first layer if it is a Linear (1) or a
    convolution (channels + spatial dims); None: unknown."""
    if isinstance(first, nn.Linear):
        return 1
    if isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return first.weight.ndim - 1
    return None


def _check_sample(first: nn.Module | None, x: Tensor, name: str) -> None:
    """Clear errors for a sample shape the first layer cannot take (before the export is tried)."""
    if isinstance(first, nn.Linear) and x.shape[-1] != first.in_features:
        raise ValueError(f"{name} has {x.shape[-1]} features per sample (shape {tuple(x.shape)}), "
                         f"the model expects {first.in_features}")
    if isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        d = first.weight.ndim - 1
        if x.ndim >= d and x.shape[-d] != first.in_channels:
            raise ValueError(f"{name} has {x.shape[-d]} channels, the model expects {first.in_channels}")


def compute_dtype(module: nn.Module, x: Tensor) -> torch.dtype:
    """The promotion of x's and the parameters' dtypes; ValueError naming a parameter on another device."""
    dtype = x.dtype
    for pname, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not t.is_floating_point():
            continue
        if t.device != x.device:
            raise ValueError(f"the model's parameters are on {t.device} ({pname}) but the input is on "
                             f"{x.device}; move the model or the input so that they share one device")
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_data(module: nn.Module, x: Tensor, name: str) -> None:
    """ValueError for tensors without data (the meta device): ``x``, or the model's parameters."""
    if x.is_meta:
        raise ValueError(f"{name} is on the meta device and holds no data: pass a tensor with values")
    meta = next((n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise ValueError(f"the model has no data: its parameters are on the meta device ({meta}); load the "
                         "weights first (model.to_empty(device=...) then load_state_dict, or "
                         "load_state_dict(state, assign=True))")


def _in_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` itself when its floating parameters and buffers are all in ``dtype``, else a deep
    copy of it with them cast to ``dtype`` (the model is never modified; only the cast tensors are
    made, not copies of the originals first)."""
    cast = [t for t in list(module.parameters()) + list(module.buffers())
            if t.is_floating_point() and t.dtype != dtype]
    if not cast:
        return module
    memo: dict = {id(t): nn.Parameter(t.detach().to(dtype), t.requires_grad) if isinstance(t, nn.Parameter)
                  else t.detach().to(dtype) for t in cast}
    try:
        return copy.deepcopy(module, memo)
    except Exception as e:  # noqa: BLE001 - a model object that cannot be copied: say what to do
        raise TypeError(f"the model's parameters are not all in the compute dtype {dtype} and a copy of it "
                        f"with them cast could not be made ({type(e).__name__}: {e}); pass a model in "
                        f"{dtype}") from e


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside backplay: a warning names the caller's line."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = inspect.currentframe(), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(root + os.sep):
        frame, level = frame.f_back, level + 1
    return level - 1


def _name_of(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _warn_half(module: nn.Module, x_dtype: torch.dtype | None, dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    """The warning for a float16 / bfloat16 model or input (``x_dtype``; None: token ids): computed in
    ``dtype`` (float32 at least), on a copy of the model when its parameters are half, the relevance
    returned in ``out_dtype``."""
    halves = sorted({_name_of(t.dtype) for t in list(module.parameters()) + list(module.buffers())
                     if t.dtype in _HALF})
    what = [f"the model's parameters are {' / '.join(halves)}"] if halves else []
    what += [f"x is {_name_of(x_dtype)}"] if x_dtype in _HALF else []
    if not what:
        return
    where = f" on a {_name_of(dtype)} copy of the model (the model is not modified)" if halves else ""
    warnings.warn(f"{' and '.join(what)}: backplay computes in {_name_of(dtype)}{where}, since backward sweeps in "
                  f"half precision are off float32 by a few percent (explain returns the relevance cast to "
                  f"{_name_of(out_dtype)}); pass a float32 model and input to skip the cast",
                  UserWarning, stacklevel=_caller_stacklevel())


#: modules whose forward differs between train and eval mode
_TRAIN_SENSITIVE = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)


@functools.lru_cache(maxsize=None)
def _reads_training(cls: type) -> bool:
    """Whether the module class's own forward reads ``self.training`` (a custom dropout, a stochastic
    depth); read from its source once per class."""
    fwd = cls.forward
    if fwd is nn.Module.forward or cls.__module__.startswith("torch.nn."):
        return False
    try:
        return "self.training" in inspect.getsource(fwd)
    except (OSError, TypeError):
        return False


def _warn_train(model: Any) -> None:
    """The warning for a model in train mode whose function train mode changes (a dropout, a batch norm,
    or a module of its own that reads ``self.training``, in train mode): the reader exports the
    eval-mode function. A model in train mode with none of these computes the same in both modes."""
    if not isinstance(model, nn.Module):
        return
    changed = [n or type(model).__name__ for n, m in model.named_modules()
               if m.training and (isinstance(m, _TRAIN_SENSITIVE) or _reads_training(type(m)))]
    if not changed:
        return
    names = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    warnings.warn(f"the model is in train mode ({names}), where dropout is active and BatchNorm uses batch "
                  "statistics; backplay reads and explains the eval-mode function (torch.export in eval mode: "
                  "dropout off, BatchNorm with its running statistics), not what model(x) computes in train "
                  "mode; call model.eval() first (backplay does not switch it: the model is never modified)",
                  UserWarning, stacklevel=_caller_stacklevel())


@dataclass
class Prepared:
    """A validated call: the model read for the batch, the batch in the compute dtype, bookkeeping.
    For a language model (integer token ids) ``x`` holds the ids, the explained tensor is the input
    embeddings, ``inputs`` the keyword inputs (attention mask) and ``position`` the explained
    position per sample."""

    graph: ModelGraph
    x: Tensor  # batched, compute dtype (token ids: long), detached
    dtype: torch.dtype
    squeeze: bool  # the caller passed one sample
    in_dtype: torch.dtype  # the caller's dtype (relevance is returned in it)
    in_shape: tuple  # the caller's shape
    inputs: dict = field(default_factory=dict)
    position: Tensor | None = None

    @property
    def tokens(self) -> bool:
        """Whether the model is explained with respect to its input embeddings (integer input)."""
        return not self.x.is_floating_point()

    def trace(self, fields: frozenset = ALL_FIELDS, x: Tensor | None = None, temperature: float | None = None
              ) -> Trace:
        """The explained pass of the batch (or of ``x``, same sample shape) in the compute dtype;
        ``fields`` / ``temperature``: what each layer keeps and the gates' temperature
        (:attr:`Rule.pass_fields`, :attr:`Rule.pass_temperature`)."""
        return self.graph.trace(self.x if x is None else x, self.dtype, fields=fields, temperature=temperature,
                                inputs=self.inputs, position=self.position)


def _token_ids(x: Any, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be a floating point tensor, or integer token ids [B, T]")
    if x.ndim not in (1, 2):
        raise ValueError(f"token ids must have shape [B, T] (or [T] for one sequence), got {tuple(x.shape)}")
    return x.long()


def _lm_inputs(module: nn.Module, ids: Tensor, attention_mask: Any) -> dict:
    """The keyword inputs of a language model call: the attention mask, no key/value cache."""
    kwargs: dict = {}
    params = inspect.signature(module.forward).parameters
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask, device=ids.device)
        mask = mask.unsqueeze(0) if mask.ndim == 1 else mask
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask must have the token ids' shape {tuple(ids.shape)}, got "
                             f"{tuple(mask.shape)}")
        if "attention_mask" not in params:
            raise ValueError(f"{type(module).__name__}.forward takes no attention_mask")
        kwargs["attention_mask"] = mask.long()
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


def _positions(position: Any, ids: Tensor, mask: Tensor | None) -> Tensor:
    """The explained position per sample: ``position`` (an int, negative from the end, or one per
    sample), by default the last position the attention mask keeps (the last one without a mask)."""
    B, T = ids.shape
    if position is None:
        if mask is None:
            return torch.full((B,), T - 1, dtype=torch.long, device=ids.device)
        keep = (mask != 0).long() * torch.arange(1, T + 1, device=ids.device)
        last = keep.amax(1) - 1
        if bool((last < 0).any()):
            raise ValueError("a sequence has no unmasked token (attention_mask all 0)")
        return last
    pos = torch.as_tensor(position, device=ids.device)
    if pos.is_floating_point() or pos.ndim > 1 or (pos.ndim == 1 and pos.shape[0] != B):
        raise ValueError(f"position must be an int or one int per sample ([{B}]), got {position!r}")
    pos = pos.long().expand(B)
    if bool(((pos < -T) | (pos >= T)).any()):
        raise ValueError(f"position out of range for {T} tokens: {position!r}")
    return (pos % T).contiguous()


def prepare(model: Any, x: Any, name: str = "x", one_sample: bool = False, attention_mask: Any = None,
            position: Any = None) -> Prepared:
    """Validate ``x`` and read ``model`` for it (see the module docstring).

    Batching: ``x`` is a batch [B, ...] unless it is 1-d, or has the rank of ONE sample of a model
    whose first layer is a convolution (channels + spatial dims), or ``one_sample`` is set: then it
    is one sample. Integer ``x``: token ids [B, T] (or [T]) of a language model, explained with
    respect to its input embeddings; ``attention_mask`` ([B, T]) is passed to the model and
    ``position`` picks the position whose logits are explained when the output is [B, T, vocab]."""
    if isinstance(x, (torch.Tensor, np.ndarray)) and not (x.dtype.is_floating_point if isinstance(x, torch.Tensor)
                                                          else np.issubdtype(x.dtype, np.floating)):
        return _prepare_tokens(model, x, name, attention_mask, position)
    if attention_mask is not None or position is not None:
        raise ValueError("attention_mask and position are for language models (integer token ids)")
    x = float_tensor(x, name)
    module = _module(model, x)
    _check_data(module, x, name)
    first = _first_layer(module)
    rank = _sample_rank(first)
    squeeze = one_sample or x.ndim == 1 or (rank is not None and rank > 1 and x.ndim == rank)
    if x.ndim == 0 or (not one_sample and rank is not None and rank > 1 and x.ndim not in (rank, rank + 1)):
        raise ValueError(f"{name} must have shape [B, ...] with {rank} dimensions per sample (or one "
                         f"sample), got shape {tuple(x.shape)}")
    if _first_op(module) is first:  # checks that need the first operation, before the export
        _check_sample(first, x, name)
    dtype = torch.promote_types(compute_dtype(module, x), torch.float32)
    xb = x.detach().unsqueeze(0) if squeeze else x.detach()
    if not bool(torch.isfinite(xb).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    _warn_half(module, x.dtype, dtype, x.dtype)
    _warn_train(model)
    xb = xb.to(dtype)
    graph = read(_in_dtype(module, dtype), xb)
    return Prepared(graph, xb, dtype, squeeze, x.dtype, tuple(x.shape))


def _prepare_tokens(model: Any, x: Any, name: str, attention_mask: Any, position: Any) -> Prepared:
    if not isinstance(model, nn.Module) or not any(isinstance(m, nn.Embedding) for m in model.modules()):
        raise TypeError(f"{name} must be a floating point tensor, or integer token ids of a language model "
                        f"(an nn.Module with an nn.Embedding of the ids); got dtype {x.dtype} for a "
                        f"{type(model).__name__}")
    ids = _token_ids(x, name)
    _check_data(model, ids, name)
    squeeze = ids.ndim == 1
    idb = ids.unsqueeze(0) if squeeze else ids
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(emb, nn.Embedding) and idb.numel() and (int(idb.min()) < 0 or int(idb.max()) >= emb.num_embeddings):
        raise ValueError(f"token ids must lie in [0, {emb.num_embeddings}) (the model's vocabulary), got "
                         f"[{int(idb.min())}, {int(idb.max())}]")
    float_params = [p for p in model.parameters() if p.is_floating_point()]
    if float_params and float_params[0].device != idb.device:
        raise ValueError(f"the model's parameters are on {float_params[0].device} but the token ids are on "
                         f"{idb.device}; move the model or the ids so that they share one device")
    out_dtype = compute_dtype(model, torch.zeros((), dtype=float_params[0].dtype if float_params else
                                                 torch.get_default_dtype(), device=idb.device))
    dtype = torch.promote_types(out_dtype, torch.float32)
    kwargs = _lm_inputs(model, idb, attention_mask)
    _warn_half(model, None, dtype, out_dtype)
    _warn_train(model)
    graph = read(_in_dtype(model, dtype), idb, kwargs)
    pos = None
    out_shape = graph.output_shape()
    if out_shape is not None and len(out_shape) == 3:
        pos = _positions(position, idb, kwargs.get("attention_mask"))
    elif position is not None:
        raise ValueError(f"position= picks a position of an output [B, T, vocab]; this model's output has "
                         f"shape {tuple(out_shape or ())}")
    return Prepared(graph, idb, dtype, squeeze, out_dtype, tuple(ids.shape), kwargs, pos)


def explain(
    model: Any,
    x: Tensor,
    target: Any,
    rule: Rule = Gradient(),
    return_report: bool = False,
    *,
    attention_mask: Any = None,
    position: Any = None,
) -> Tensor | tuple[Tensor, ExplainReport]:
    """Relevance of every input feature for ``target`` under ``rule``.

    Args:
        model: any ``nn.Module`` whose forward ``torch.export`` can capture, made of the operations of
            :data:`backplay.gpu.read.SUPPORTED` (ResNets, VGGs, MobileNets, DenseNets, U-Nets, MLPs
            with norms and gates, vision transformers, Hugging Face ViT / BERT / GPT-2 objects, written
            as you write them), or a :class:`backplay.MLPSpec`. The model returns logits [B, classes]
            (or an output object with ``logits``); its parameters must be on x's device.
        x: a batch (or one sample, see :func:`prepare`), floating, finite; or integer token ids
            [B, T] of a language model (explained with respect to its input embeddings).
        target: an int, or an integer tensor of one class per sample ([B]); for a causal language
            model the token id whose logit at ``position`` is explained.
        rule: a :class:`backplay.rules.Rule` instance (default :class:`~backplay.rules.Gradient`);
            a rule class (``rule=LRP0``) is a TypeError that says to write ``rule=LRP0()``.
        return_report: also return an :class:`ExplainReport`.
        attention_mask: token ids only: the padding mask [B, T], passed to the model.
        position: token ids of a model with logits [B, T, vocab] only: the explained position (an int,
            negative from the end, or one per sample); default the last unmasked position.

    Returns:
        The relevance, in x's shape, dtype and device (detached); for token ids the relevance per
        token [B, T] (summed over the embedding dimension; the report's ``layers[0]`` has it per
        dimension [B, T, D]). With ``return_report`` a pair ``(R, report)``. One batched forward
        pass and one backward sweep, in the compute dtype (:func:`prepare`: a float16 / bfloat16
        model or input is computed in float32 and the result cast back, with a warning).

    Warns (UserWarning) for a half-precision model or input, and for a model in train mode: the
    eval-mode function is explained (dropout off, BatchNorm with its running statistics); the
    model's training flags are left as they are.
    """
    check_rule_instance(rule)
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a backplay.rules.Rule, got {type(rule).__name__}")
    prep = prepare(model, x, attention_mask=attention_mask, position=position)
    if isinstance(rule, TransformerRule):
        with torch.no_grad():
            trace = _trace(prep, frozenset())
        t = resolve_target(target, trace.x.shape[0], trace.output.shape[1], trace.x.device)
        relevance = transformer_relevance(rule, prep, trace, t)
        logit = trace.logit(t)
        return _finish(prep, rule, relevance, logit, None, None, return_report)
    anchor = routing_parts(rule)[1]
    with torch.no_grad():
        trace = _trace(prep, rule.pass_fields, rule.pass_temperature)
        if anchor is not None and anchor.anchor == "token" and trace.n_blocks == 0:
            raise ValueError("Anchor(anchor='token') acts at attention layers: this model has none")
        t = resolve_target(target, trace.x.shape[0], trace.output.shape[1], trace.x.device)
        logit = None
        if return_report:  # the model's logit, also when the rule sweeps a surrogate's pass
            logit = (trace if trace.temperature is None else _trace(prep, frozenset())).logit(t)
        sweep = rule.sweep(trace, t, keep_layers=return_report, release=True)
        del trace
        return _finish(prep, rule, sweep.relevance, logit, sweep.stopped, sweep.layers, return_report)


def _trace(prep: Prepared, fields: frozenset, temperature: float | None = None) -> Trace:
    try:
        return prep.trace(fields, temperature=temperature)
    except RuntimeError as e:  # shapes that do not chain
        raise ReadError(f"the model cannot be applied to x of shape {prep.in_shape}: {e}") from e


def _finish(prep: Prepared, rule: Rule, relevance: Tensor, logit: Tensor | None, stopped: Tensor | None,
            layers: list | None, return_report: bool) -> Tensor | tuple[Tensor, ExplainReport]:
    """The caller's view of a result: shapes, dtype, one sample squeezed; the report."""
    with torch.no_grad():
        total = relevance.flatten(1).sum(1)
        if prep.tokens:  # per token: summed over the embedding dimension
            out = relevance.reshape(relevance.shape[:2] + (-1,)).sum(-1)
        else:
            out = relevance.reshape(prep.x.shape)
        out = out.to(prep.in_dtype)
        if prep.squeeze:
            out = out.squeeze(0)
        if not return_report:
            return out
        stopped = stopped if stopped is not None else logit - total
        fields = [f.to(prep.in_dtype) for f in (logit, total, stopped)]
        if layers is not None:
            layers = [r.to(prep.in_dtype) for r in layers]
            layers[0] = layers[0].reshape(relevance.shape)
        if prep.squeeze:
            layers = None if layers is None else [r.squeeze(0) for r in layers]
            fields = [f.squeeze(0) for f in fields]
    return out, ExplainReport(*fields, rule=rule.name, layers=layers)
