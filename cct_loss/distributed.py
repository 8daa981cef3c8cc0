"""Process-group helpers: rank, world size, row counts and an all-gather that keeps gradients;
no-ops without an initialised group of two or more ranks.

:func:`gather_rows`'s backward sums every rank's gradient for the gathered rows and hands each
rank its own: with each rank's loss its share of the global mean times the world size, DDP's
averaging gives the single-process gradient of the concatenated batch (docs/distributed.md).
Row counts travel through a group that works on the CPU (:func:`host_group`), so reading them
never waits for the GPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

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


class Field(NamedTuple):
    """One thing every rank of a gathering call must agree on: its ``name`` in the messages,
    this rank's ``value``, and the values it may take (``choices``: sent as an index, so that
    every rank can name the others' values; empty: ``value`` is an integer, sent as it is)."""

    name: str
    value: object
    choices: tuple[object, ...] = ()

    def code(self) -> int:
        if not self.choices:
            assert isinstance(self.value, int)
            return self.value
        return self.choices.index(self.value) if self.value in self.choices else -1

    def read(self, code: int) -> str:
        if not self.choices:
            return str(code)
        return str(self.choices[code]) if 0 <= code < len(self.choices) else "another value"


#: The gathering calls, first among the fields of every exchange (a rank in a different call).
CALLS = (
    "cct_loss", "cct_loss_multiview", "NegativeQueue.enqueue", "cct_loss_moco", "cct_loss_multicrop",
)  # fmt: skip
#: The dtypes and device types the fields name (any other is sent as "another value").
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "meta")
#: How the fields name an input that is there or not.
PRESENCE = ("absent", "given")
#: Fields per exchange: every call sends as many (padded), so that ranks in different calls
#: still exchange tensors of one size (a size mismatch aborts the process).
MAX_FIELDS = 12


def agreement(call: str, rows: Tensor, given: Mapping[str, object], *more: Field) -> list[Field]:
    """What every rank of a gathering ``call`` must agree on: the call, the embedding dim, dtype
    and device type of ``rows``, the fields ``more``, then which of the optional inputs
    ``given`` are there."""
    return [
        Field("the call", call, CALLS),
        Field("the embedding dim D", rows.shape[-1]),
        Field("the dtype", rows.dtype, DTYPES),
        Field("the device type", rows.device.type, DEVICE_TYPES),
        *more,
        *(Field(name, PRESENCE[x is not None], PRESENCE) for name, x in given.items()),
    ]


#: Gathering calls entered on this rank, per process group (see :func:`gathering_call`).
_CALLS_ENTERED: dict[Any, int] = {}
#: The groups whose current gathering call has not yet made its exchange.
_PENDING: set[Any] = set()
#: The row count a rank sends when its call failed before its exchange.
REFUSED = -1


@contextlib.contextmanager
def gathering_call(group: Any = None) -> Iterator[None]:
    """Around one gathering call (every rank makes it): counted on entry, and where it fails on
    this rank before its exchange (a bad batch refused by the checks), the exchange is made
    anyway, marked refused, so that every other rank fails in the same call rather than waiting
    for this one or pairing its batch with this rank's next. Every rank makes one exchange per
    call, failed or not; a rank that never enters a call is the one case no exchange can see."""
    _CALLS_ENTERED[group] = _CALLS_ENTERED.get(group, 0) + 1
    _PENDING.add(group)
    try:
        yield
    except Exception:
        if group in _PENDING:
            _gather_counts(REFUSED, torch.device("cpu"), group, ())
        raise
    finally:
        _PENDING.discard(group)


def row_counts(
    rows: int, device: torch.device, group: Any = None, fields: Sequence[Field] = ()
) -> list[int]:
    """Every rank's number of rows, in rank order, and the ranks' agreement on ``fields`` (see
    :func:`gathered_counts`); a ``ValueError`` on every rank (none hangs in a later
    collective) when a rank has no row."""
    counts = _gather_counts(rows, device, group, fields)
    if min(counts) == 0:
        raise ValueError(
            f"gather_distributed=True: every rank needs at least one row per call, got rows per "
            f"rank {counts} (rank {counts.index(0)} is empty); drop the empty batch on every "
            "rank or use drop_last=True"
        )
    return counts


def gathered_counts(x: Tensor, group: Any = None, fields: Sequence[Field] = ()) -> list[int]:
    """Every rank's ``x.shape[0]`` in rank order (zeros allowed); ``[rows]`` without a group.

    The same exchange carries the number of gathering calls each rank has entered and
    ``fields`` (the call first, then its D, dtype, device type, layout, which inputs it has):
    where the ranks differ in any, every rank raises a ``ValueError`` naming it and each
    rank's value, instead of a gather of mismatched sizes (which aborts the process) or of one
    rank's batch with another's previous one (silently wrong)."""
    if not is_active(group):
        return [x.shape[0]]
    return _gather_counts(x.shape[0], x.device, group, fields)


def _gather_counts(
    rows: int, device: torch.device, group: Any, fields: Sequence[Field]
) -> list[int]:
    """Every rank's ``rows``, exchanged on the CPU with the call count and ``fields`` (one
    all-gather; ``device`` is where the rows live, the counts never go there)."""
    del device
    host = host_group(group)
    _, world = rank_and_world_size(group)
    if len(fields) > MAX_FIELDS:
        raise AssertionError(f"at most {MAX_FIELDS} fields per exchange, got {len(fields)}")
    codes = [f.code() for f in fields] + [0] * (MAX_FIELDS - len(fields))
    mine = torch.tensor(
        [rows, _CALLS_ENTERED.get(group, 0), *codes], dtype=torch.long, device="cpu"
    )
    parts = [torch.empty_like(mine) for _ in range(world)]
    _PENDING.discard(group)
    dist.all_gather(parts, mine, group=host)
    table: list[list[int]] = torch.stack(parts).tolist()  # CPU values: no device to wait for
    if rows != REFUSED:  # a refusing rank raises its own error
        _check_agreement(table, fields, group)
    return [row[0] for row in table]


def _check_agreement(table: list[list[int]], fields: Sequence[Field], group: Any) -> None:
    """Raise on every rank (each holds the same ``table``) where the ranks differ: first a rank
    that refused its call, then the call (the first field), the calls entered, and each field
    in order."""
    refused = [r for r, row in enumerate(table) if row[0] == REFUSED]
    if refused:
        raise ValueError(
            f"gather_distributed=True: rank {refused[0]} refused its part of this call (its "
            "own error says why: a bad batch?); every rank fails the call, so that none waits "
            "for the others or gathers another step's batch"
        )
    checks: list[tuple[int, Field | None]] = [(2, fields[0])] if fields else []
    checks += [(1, None)] + [(2 + i, f) for i, f in enumerate(fields[1:], 1)]
    for column, field in checks:
        values = [row[column] for row in table]
        if len(set(values)) == 1:
            continue
        if field is None:  # the calls entered: realign every rank on the furthest
            _CALLS_ENTERED[group] = max(values)
            each = ", ".join(f"rank {r} at call {v}" for r, v in enumerate(values))
            raise ValueError(
                f"gather_distributed=True: the ranks are not in the same gathering call ({each})."
                " A rank skipped a call (it left one out, or failed before cct-loss saw the "
                "call). Every rank must make the same gathering calls in the same order "
                "(docs/distributed.md)"
            )
        each = ", ".join(f"rank {r}: {field.read(v)}" for r, v in enumerate(values))
        raise ValueError(
            f"gather_distributed=True: the ranks disagree on {field.name} ({each}). "
            + _CAUSES.get(field.name, _CAUSES[""])
        )


#: What a disagreement on a field most likely means.
_CAUSES = {
    "the call": "A rank skipped a call or made another one: every rank must make the same "
    "gathering calls in the same order (docs/distributed.md)",
    "labels": "Labels were given on some ranks only: pass labels= on every rank or on none",
    "negatives": "Negatives were given on some ranks only: pass them on every rank or on none",
    "negative_labels": "negative_labels were given on some ranks only",
    "": "Every rank must call with the same embedding dim D, dtype, device type, layout and "
    "inputs (only the batch size may differ)",
}


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
