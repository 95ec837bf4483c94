"""Input validation shared by the gpu entry points (explain, occupation, interval_bounds).

One place decides: which device (the input's), which compute dtype (the promotion of the input's
and the parameters' dtypes, so a float64 input on a float32 model is computed in float64 and a
float64 model is never rounded down), how a 1-d input is batched, and which targets are valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from backplay.gpu.layers import (
    Network,
    check_device,
    model_dtype,
    network_from_structure,
    read_structure,
)

__all__ = ["Prepared", "as_input", "prepare", "resolve_target"]


@dataclass
class Prepared:
    """A validated call: the network in the compute dtype, the batch x [B, n_0], and bookkeeping."""

    net: Network
    x: torch.Tensor  # [B, n_0], compute dtype, detached
    squeeze: bool  # the caller passed a 1-d input
    in_dtype: torch.dtype  # the caller's dtype (relevance is returned in it)


def float_tensor(x: Any, name: str = "x") -> torch.Tensor:
    """``x`` as a floating torch tensor (numpy arrays converted); clear errors otherwise."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {x.dtype}")
    return x


def as_input(x: Any, name: str = "x") -> torch.Tensor:
    """A floating tensor of rank 1 or 2 (not yet batched); clear errors otherwise."""
    x = float_tensor(x, name)
    if x.ndim not in (1, 2):
        raise ValueError(
            f"{name} must have shape [B, n_0] (or [n_0] for one input), got shape {tuple(x.shape)}"
        )
    return x


def _to_module(model: Any, x: torch.Tensor) -> nn.Module:
    from backplay.nets import MLPSpec

    if isinstance(model, MLPSpec):
        return model.to_torch(dtype=x.dtype, device=x.device)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch nn.Module or a backplay.MLPSpec, got {type(model).__name__}"
        )
    return model


def build_network(model: Any, x: torch.Tensor) -> tuple[Network, torch.dtype]:
    """Read ``model`` for input ``x`` (device check, dtype promotion). Returns (net, compute dtype)."""
    module = _to_module(model, x)
    structure = read_structure(module)
    check_device(structure, x.device)
    dtype = torch.promote_types(x.dtype, model_dtype(structure))
    return network_from_structure(structure, dtype), dtype


def prepare(model: Any, x: Any, name: str = "x") -> Prepared:
    """Validate ``x`` (floating, rank 1 or 2, width, finite) and read ``model`` for it."""
    x = as_input(x, name)
    net, dtype = build_network(model, x)
    squeeze = x.ndim == 1
    xb = x.detach().reshape(1, -1) if squeeze else x.detach()
    n0 = net.in_features
    if xb.shape[1] != n0:
        raise ValueError(
            f"{name} has {xb.shape[1]} features per sample (shape {tuple(x.shape)}), "
            f"the model expects {n0}"
        )
    if not bool(torch.isfinite(xb).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return Prepared(net, xb.to(dtype), squeeze, x.dtype)


def resolve_target(target: Any, batch: int, n_out: int, device: torch.device) -> torch.Tensor:
    """``target`` (int, or integer tensor / array of one class per sample) as a LongTensor [B]."""
    if isinstance(target, bool) or isinstance(target, np.bool_):
        raise TypeError("target must be an int or an integer tensor, got a bool")
    if isinstance(target, (int, np.integer)):
        t = torch.full((batch,), int(target), dtype=torch.long, device=device)
    else:
        if isinstance(target, (list, tuple, np.ndarray)):
            target = torch.as_tensor(np.asarray(target))
        if not isinstance(target, torch.Tensor):
            raise TypeError(
                f"target must be an int or an integer tensor, got {type(target).__name__}"
            )
        if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
            raise TypeError(f"target must hold integers, got dtype {target.dtype}")
        if target.ndim == 0:
            t = target.to(device=device, dtype=torch.long).expand(batch).clone()
        elif target.ndim == 1 and target.shape[0] == batch:
            t = target.to(device=device, dtype=torch.long)
        else:
            raise ValueError(
                f"target must be an int or have one class per sample (shape [{batch}]), "
                f"got shape {tuple(target.shape)}"
            )
    if t.numel() > 0:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= n_out:
            bad = lo if lo < 0 else hi
            raise ValueError(f"target {bad} out of range for {n_out} outputs (valid: 0..{n_out - 1})")
    return t
