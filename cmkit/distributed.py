"""Process-group set-up for torchrun, DistributedDataParallel around each phase, and small collectives.

A single process (no ``WORLD_SIZE`` in the environment) needs no distributed set-up at all.

Why DDP wraps a *phase* and not a network: objectives call their networks in many ways inside one
loss (student and no-grad teacher passes of the same module, ``torch.func.jvp`` of the backbone in
sCM, ``functional_call`` of a frozen discriminator in ACT). DDP only needs its own ``forward`` to
run once per backward, so ``PhaseForward`` makes ``phase.loss(batch, progress)`` that forward and
owns the phase module's parameters. DDP then buckets and overlaps the gradient all-reduce with
backward, whatever the loss does inside; JVP passes run inside it untouched because they create no
gradient for DDP's hooks to see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str) -> DistInfo:
    """Join the torchrun process group if launched by torchrun (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device != "cpu" and torch.cuda.is_available():
            # Pin the rank to its GPU before NCCL starts: unpinned, every rank's NCCL communicator and
            # stray allocations land on cuda:0; device_id binds the process group to this GPU eagerly.
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


class PhaseForward(nn.Module):
    """``forward(batch, progress) = phase.loss(batch, progress)`` over the phase module's parameters."""

    def __init__(self, module: nn.Module, loss):
        super().__init__()
        self.module = module
        self._loss = loss

    def forward(self, batch, progress):
        return self._loss(batch, progress)


def wrap_phase(module: nn.Module, loss, info: DistInfo, device: torch.device):
    """The callable the loop runs for one phase: DDP over PhaseForward under torchrun, else loss itself."""
    if info.world_size <= 1:
        return loss
    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    # find_unused_parameters stays off (it costs a graph walk per step); every phase module's
    # trainable parameters take part in its loss in all cmkit objectives (tests/test_ddp.py).
    return nn.parallel.DistributedDataParallel(PhaseForward(module, loss), device_ids=ids,
                                               broadcast_buffers=True)


def any_across_ranks(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if flag is true on any rank (stop signals, skipped steps)."""
    if info.world_size <= 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity in a single process); for objective state such as ACT's penalty EMA."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def average_gradients(params, info: DistInfo) -> None:
    """All-reduce-average the gradients of params across ranks (coalesced into one buffer)."""
    if info.world_size <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if info.world_size <= 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, 0)


def broadcast_json(obj, info: DistInfo, device: torch.device):
    """Rank 0's value of a JSON-able object (floats, ints, dicts) on every rank; no pickle involved."""
    if info.world_size <= 1:
        return obj
    import json

    data = torch.tensor(list(json.dumps(obj).encode()) if info.is_main else [], dtype=torch.uint8)
    n = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(n, 0)
    buf = data.to(device) if info.is_main else torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buf, 0)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
