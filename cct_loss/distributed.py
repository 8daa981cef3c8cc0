"""Process-group helpers: rank, world size and an all-gather that keeps gradients.

Without an initialised ``torch.distributed`` process group (or with a world of one) every
helper is a no-op, so the same trainer runs on one device.

Gradient convention: :func:`all_gather_with_grad` sums, in its backward pass, the gradients
that every rank computed for the gathered tensor and hands each rank the slice of its own rows.
With each rank's loss the mean over its local queries and DDP averaging parameter gradients
over ranks, the gradient every rank applies equals the single-process gradient of the mean
loss over the concatenated global batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_active(group: Any = None) -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world_size(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an active process group."""
    if not is_active(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's ``x`` along dim 0; backward sums gradients over ranks."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        rank, world = rank_and_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.rank, ctx.rows, ctx.group = rank, x.shape[0], group
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def all_gather_with_grad(x: Tensor, group: Any = None) -> Tensor:
    """Every rank's ``x`` (same shape on all ranks) concatenated along dim 0, in rank order.

    Gradients flow back to the rank that produced each row (summed over the ranks that used
    it). Without an active process group, returns ``x``.

    Args:
        x: ``(B, ...)`` tensor, the same shape on every rank.
        group: process group (default: the world).

    Returns:
        ``(world_size * B, ...)`` tensor.
    """
    if not is_active(group):
        return x
    return _AllGatherWithGrad.apply(x, group)  # type: ignore[no-untyped-call, no-any-return]


@torch.no_grad()
def all_gather_no_grad(x: Tensor, group: Any = None) -> Tensor:
    """Like :func:`all_gather_with_grad` for tensors that need no gradient (queue keys)."""
    if not is_active(group):
        return x
    _, world = rank_and_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_sum(x: Tensor, group: Any = None) -> Tensor:
    """The sum of ``x`` over every rank (a copy; ``x`` itself is left alone), no gradient."""
    if not is_active(group):
        return x
    total = x.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total
