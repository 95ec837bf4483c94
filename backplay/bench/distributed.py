"""Sharding the benchmark over processes launched by ``torchrun`` (``torch.distributed``).

:func:`communicator` returns a :class:`Comm`: a single-process one, or, when the ``torchrun``
environment variables ``RANK`` and ``WORLD_SIZE`` are set (and ``WORLD_SIZE`` > 1), one over a
process group initialised with ``gloo`` on the CPU or ``nccl`` on CUDA. The evaluation images are cut
into fixed chunks in index order and chunk ``c`` goes to rank ``c % world``, so every chunk is
computed with the same batch composition whatever the number of processes; rank 0 gathers the
per-image scores and builds the table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["Comm", "communicator", "shard_chunks", "merge_shards"]


@dataclass
class Comm:
    """Rank, world size and the three collectives the benchmark needs (identity when world == 1)."""

    rank: int = 0
    world: int = 1
    distributed: bool = False

    def gather(self, obj: Any) -> list | None:
        """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out if self.rank == 0 else None

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        """Destroy the process group this communicator created."""
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def communicator(device: str = "cpu") -> Comm:
    """A :class:`Comm` for this process: distributed when launched by ``torchrun`` with more than one
    process (``gloo`` for a CPU ``device``, ``nccl`` for CUDA), else single-process. An already
    initialised default process group is reused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or world <= 1:
        return Comm()
    dist = torch.distributed
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return Comm(rank=dist.get_rank(), world=dist.get_world_size(), distributed=True)


def shard_chunks(n: int, chunk: int, rank: int, world: int) -> list[np.ndarray]:
    """The index chunks ``[c * chunk, (c + 1) * chunk)`` of ``range(n)`` with ``c % world == rank``."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    starts = range(0, n, chunk)
    return [np.arange(s, min(s + chunk, n)) for c, s in enumerate(starts) if c % world == rank]


def merge_shards(parts: list[dict[str, tuple[np.ndarray, np.ndarray]]], n: int) -> dict[str, np.ndarray]:
    """Merge per-rank ``{key: (indices, scores [k, M])}`` into ``{key: scores [n, M]}`` in index
    order; every index must be covered exactly once."""
    keys = list(parts[0])
    out = {}
    for key in keys:
        idx = np.concatenate([p[key][0] for p in parts])
        val = np.concatenate([p[key][1] for p in parts])
        if np.sort(idx).tolist() != list(range(n)):
            raise RuntimeError(f"shards of {key!r} do not cover the {n} images exactly once")
        full = np.empty((n,) + val.shape[1:], dtype=val.dtype)
        full[idx] = val
        out[key] = full
    return out
