"""Reductions across ranks that the training loop needs: the global gradient norm (clipping and the
non-finite check see the same number on every rank) and data-parallel means of logged scalars."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

__all__ = ["all_reduce_mean", "clip_grad_norm_"]


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, *, foreach: bool = True) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most `max_norm`; return that norm (before scaling) as
    a plain tensor, equal on every rank.

    With FSDP/TP the gradients are DTensor shards: the per-shard norms form a `Partial` DTensor, and
    `full_tensor()` all-reduces them into the norm of the whole (unsharded) gradient, as one device would
    compute it. Plain tensors (one process) pass straight through."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=foreach)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=foreach)
    return total


def all_reduce_mean(value: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean of a tensor over the ranks of `group` (a copy; the input is untouched). With NCCL the tensor
    must live on this rank's GPU."""
    out = value.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        out /= dist.get_world_size(group)
    return out
