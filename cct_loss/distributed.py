"""Process-group helpers: rank, world size, row counts and an all-gather that keeps gradients;
no-ops without an initialised group of two or more ranks.

:func:`gather_rows`'s backward sums every rank's gradient for the gathered rows and hands each
rank its own: with each rank's loss its share of the global mean times the world size, DDP's
averaging gives the single-process gradient of the concatenated batch (docs/distributed.md).
Row counts travel through a group that works on the CPU (:func:`host_group`), so reading them
never waits for the GPU."""

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


def row_counts(rows: int, device: torch.device, group: Any = None) -> list[int]:
    """Every rank's number of rows, in rank order (one small all-gather on the CPU); a
    ``ValueError`` on every rank (none hangs in a later collective) when a rank has none."""
    counts = _gather_counts(rows, device, group)
    if min(counts) == 0:
        raise ValueError(
            f"gather_distributed=True: every rank needs at least one row per call, got rows per "
            f"rank {counts} (rank {counts.index(0)} is empty); drop the empty batch on every "
            "rank or use drop_last=True"
        )
    return counts


def gathered_counts(x: Tensor, group: Any = None) -> list[int]:
    """Every rank's ``x.shape[0]`` in rank order (zeros allowed); ``[rows]`` without a group."""
    if not is_active(group):
        return [x.shape[0]]
    return _gather_counts(x.shape[0], x.device, group)


def _gather_counts(rows: int, device: torch.device, group: Any) -> list[int]:
    """Every rank's ``rows``, exchanged on the CPU (``device`` is where the rows live; the
    counts never go there)."""
    del device
    host = host_group(group)
    _, world = rank_and_world_size(group)
    mine = torch.tensor([rows], dtype=torch.long, device="cpu")
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=host)
    counts: list[int] = torch.cat(parts).tolist()  # CPU values: no device to wait for
    return counts


#: The CPU-capable twin of each process group (``None``: the default group).
_HOST_GROUPS: dict[Any, Any] = {}


def host_group(group: Any = None) -> Any:
    """A process group over ``group``'s ranks that exchanges CPU tensors: ``group`` itself when
    its backend works on the CPU (gloo, or a mixed ``"cpu:gloo,cuda:nccl"``), else a gloo group
    created once, on the first call, by every rank (as every collective is)."""
    if group in _HOST_GROUPS:
        return _HOST_GROUPS[group]
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        host = group
    else:
        ranks = None if group is None else dist.get_process_group_ranks(group)
        host = dist.new_group(ranks=ranks, backend="gloo")
    _HOST_GROUPS[group] = host
    return host


def _all_gather_rows(x: Tensor, counts: list[int], group: Any) -> Tensor:
    """Concatenate every rank's rows (``counts[r]`` of them) in rank order; ranks may differ."""
    biggest = max(counts)
    padded = x.contiguous()
    if x.shape[0] < biggest:
        padded = torch.cat([padded, padded.new_zeros(biggest - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's ``x`` along dim 0; backward sums gradients over ranks."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, counts: list[int], group: Any) -> Tensor:
        rank, _ = rank_and_world_size(group)
        ctx.start, ctx.rows, ctx.group = sum(counts[:rank]), x.shape[0], group
        return _all_gather_rows(x, counts, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        # Every rank holds the same global shape: sum the gradients all ranks computed for each
        # row, then keep this rank's rows.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.start + ctx.rows], None, None


def gather_rows(x: Tensor, counts: list[int], group: Any = None) -> tuple[Tensor, int]:
    """Every rank's ``x`` concatenated along dim 0 in rank order (``counts`` rows each, from
    :func:`row_counts`), and this rank's offset; gradients flow back to each row's rank.
    ``(x, 0)`` without an active group."""
    if not is_active(group):
        return x, 0
    rank, _ = rank_and_world_size(group)
    gathered = _AllGatherWithGrad.apply(x, counts, group)  # type: ignore[no-untyped-call]
    return gathered, sum(counts[:rank])


@torch.no_grad()
def all_gather_no_grad(x: Tensor, counts: list[int], group: Any = None) -> Tensor:
    """Like :func:`gather_rows` for tensors that need no gradient (queue keys, labels), given
    every rank's row count (:func:`gathered_counts` or :func:`row_counts`); a rank may
    contribute no rows."""
    if not is_active(group):
        return x
    return _all_gather_rows(x, counts, group)


@torch.no_grad()
def all_reduce_sum(x: Tensor, group: Any = None) -> Tensor:
    """The sum of ``x`` over every rank (a copy; ``x`` itself is left alone), no gradient."""
    if not is_active(group):
        return x
    total = x.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total
