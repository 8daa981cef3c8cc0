"""The implementation table: every implementation by its ``impl`` name, the only door to one,
and the rule ``impl="auto"`` follows.

An entry computes a problem's two sides, and may offer the reduced loss in one pass (dense).
Streaming implementations (chunked, sdpa, triton) compute one side at a time
(:class:`StreamingKernel`); :func:`streamed` makes one an entry. A new implementation is a new
file here and one entry in :data:`TABLE`, which option validation, dispatch and the tests read.
The ``auto`` rule (:func:`choose_impl`) and the measurements behind it: docs/implementations.md
and BENCHMARKS.md."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from ..checks import is_functorch_wrapped
from ..maths.expectation import ConditionalExpectation, Side, block_expectation
from ..maths.precision import HALF_DTYPES, tf32_matmul_allowed
from ..options import CCTOptions
from ..problem.description import ContrastiveProblem, KeySet
from . import chunked, dense, dense_mixed, dense_two_way, sdpa, triton_op

Sides = tuple[ConditionalExpectation | None, ConditionalExpectation | None]


class StreamingKernel(Protocol):
    """An implementation that computes one side at a time: ``(query (Q, D), keys (K, D) or
    (Q, K, D), the key set (``KeySet()``: every key), side, options) -> ConditionalExpectation``."""

    def __call__(
        self, query: Tensor, keys: Tensor, key_set: KeySet, *, side: Side, options: CCTOptions
    ) -> ConditionalExpectation: ...


class Implementation(NamedTuple):
    """A table entry: its name; ``expectations(problem, options)``, the two sides;
    ``one_pass(problem, options)`` (or ``None``), a runner giving the reduced loss of every call
    of that signature (one process, ``"mean"``/``"sum"``, no diagnostics); and ``two_way(problem,
    options)`` (or ``None``), the reduced loss of a one-positive cross problem taken both ways
    (CLIP) from one cost matrix."""

    name: str
    expectations: Callable[[ContrastiveProblem, CCTOptions], Sides]
    one_pass: (
        Callable[[ContrastiveProblem, CCTOptions], Callable[[ContrastiveProblem], Tensor]] | None
    ) = None
    two_way: Callable[[ContrastiveProblem, CCTOptions], Tensor] | None = None


def streamed(kernel: StreamingKernel) -> Callable[[ContrastiveProblem, CCTOptions], Sides]:
    """The two sides of a problem from a :class:`StreamingKernel`: the positives drawn from the
    keys (labels) and the negatives through the kernel; a query's own few positives (given, or
    its row's other views) as a small block in plain autograd."""

    def expectations(problem: ContrastiveProblem, options: CCTOptions) -> Sides:
        problem = problem.prepared()
        query = problem.query
        # In-batch the keys are the queries: a view keeps them distinct tensors for the
        # autograd functions (torch.compile cannot trace one tensor passed twice to one).
        keys = query.view_as(query) if problem.keys is None else problem.keys
        attract = repel = None
        positives, fixed = problem.positives, problem.fixed_positives
        if fixed is not None:
            attract = block_expectation(query, fixed, options)
        elif positives is not None and not isinstance(positives, Tensor):
            if positives.own_rows_only:
                assert positives.rows is not None
                own = positives.rows.fixed_positives(keys)
                attract = block_expectation(query, own, options)
            else:
                attract = kernel(query, keys, positives, side="positives", options=options)
        negatives = problem.negatives
        if negatives is not None:
            repel = kernel(query, keys, negatives, side="negatives", options=options)
        return attract, repel

    return expectations


def sdpa_or_chunked(
    query: Tensor, keys: Tensor, key_set: KeySet, *, side: Side, options: CCTOptions
) -> ConditionalExpectation:
    """``impl="sdpa"``'s kernel: the fused attention kernels where they keep the library's
    agreement (:func:`.sdpa.serves`), chunked where not; the diagnostics from chunked's
    streaming statistics without gradient (the fused kernels return no weights)."""
    if not sdpa.serves(query.device.type, side, options):
        return chunked.expected_cost(query, keys, key_set, side=side, options=options)
    result = sdpa.expected_cost(query, keys, key_set, side=side, options=options)
    if not options.return_details:
        return result
    streaming = replace(options, detach_weights=True, chunk_size=None)
    with torch.no_grad():
        stats = chunked.expected_cost(query, keys, key_set, side=side, options=streaming)
    return result._replace(entropy=stats.entropy, extreme=stats.extreme)


#: Every implementation by its ``impl`` name.
TABLE: dict[str, Implementation] = {
    "dense": Implementation("dense", dense.expectations, dense.OnePass, dense_two_way.loss),
    "chunked": Implementation("chunked", streamed(chunked.expected_cost)),
    "sdpa": Implementation("sdpa", streamed(sdpa_or_chunked)),
    "triton": Implementation("triton", streamed(triton_op.expected_cost)),
}

#: Dense for a softmax whose first keys' weights are treated apart (:mod:`.dense_mixed`).
SPLIT_DENSE = Implementation("dense", dense_mixed.expectations)

#: CPU: ``auto`` stays dense while the ``Q x K`` cost matrix has at most this many entries
#: (64 MiB in float32; dense keeps a few such matrices alive for the backward pass).
AUTO_DENSE_MAX_ELEMENTS = 1 << 24
#: CUDA: dense while ``Q x K`` has at most this many entries (1 GiB per float32 matrix).
CUDA_DENSE_MAX_ELEMENTS = 1 << 28
#: CUDA: the largest D for which ``auto`` considers Triton: the kernels take D up to 1024 (tiling
#: D above 256), but only D <= 256 has been timed on a GPU; above, ``auto`` keeps dense or sdpa
#: until a measurement shows the tiled kernels ahead.
TRITON_AUTO_MAX_DIM = 256
#: CUDA: Triton from this many query-key pairs ...
TRITON_MIN_ELEMENTS = 1 << 24
#: ... and this many queries (the forward kernel runs one program per 64 queries: fewer leave
#: most of the GPU idle; BENCHMARKS.md, "Where the constants come from").
TRITON_MIN_QUERIES = 1024


class Call(NamedTuple):
    """What ``auto`` decides from, host values only (deciding costs no synchronisation): the
    device type, ``Q``, ``K``, ``D``, the products' dtype, per-query keys, whether a trace or
    transform is active, whether TF32 is allowed, whether Triton is installed."""

    device_type: str
    num_queries: int
    num_keys: int
    dim: int
    dtype: torch.dtype
    per_query: bool = False
    traced: bool = False
    tf32: bool = False
    triton_installed: bool = False


@functools.cache
def triton_installed() -> bool:
    """Whether the optional ``triton`` package can be imported (checked once)."""
    return importlib.util.find_spec("triton") is not None


def triton_serves(call: Call) -> bool:
    """Whether ``impl="triton"`` takes ``call`` at full speed (see the module docs)."""
    fast_dtype = call.dtype in HALF_DTYPES or (call.dtype == torch.float32 and call.tf32)
    return (
        call.device_type == "cuda"
        and call.triton_installed
        and not call.per_query
        and not call.traced
        and call.dim <= TRITON_AUTO_MAX_DIM
        and fast_dtype
    )


def choose_impl(impl: str, call: Call) -> str:
    """Resolve ``impl="auto"`` for ``call`` (the rule in the module docs); other values are
    returned unchanged. A pure function of its arguments."""
    if impl != "auto":
        return impl
    if call.per_query:
        return "dense"
    elements = call.num_queries * call.num_keys
    if call.device_type != "cuda":
        return "dense" if elements <= AUTO_DENSE_MAX_ELEMENTS else "chunked"
    if (
        triton_serves(call)
        and elements >= TRITON_MIN_ELEMENTS
        and call.num_queries >= TRITON_MIN_QUERIES
    ):
        return "triton"
    return "dense" if elements <= CUDA_DENSE_MAX_ELEMENTS else "sdpa"


def describe_call(query: Tensor, keys: Tensor, dtype: torch.dtype | None = None) -> Call:
    """The :class:`Call` of queries ``(Q, D)`` against keys ``(K, D)`` or ``(Q, K, D)``
    (``dtype``: the products' dtype, when the embeddings are not prepared yet)."""
    device_type = query.device.type
    size = (query.shape[0], keys.shape[-2], query.shape[-1])
    dtype = query.dtype if dtype is None else dtype
    per_query = keys.dim() == 3
    if device_type != "cuda":  # the rule reads nothing else there
        return Call(device_type, *size, dtype, per_query=per_query)
    traced = torch.compiler.is_compiling() or is_functorch_wrapped(query)
    return cuda_call(*size, dtype, per_query=per_query, traced=traced)


def cuda_call(
    num_queries: int,
    num_keys: int,
    dim: int,
    dtype: torch.dtype,
    *,
    per_query: bool = False,
    traced: bool = False,
) -> Call:
    """A CUDA :class:`Call` with the process's state: whether TF32 is allowed (read by
    :func:`cct_loss.maths.precision.tf32_matmul_allowed`, whichever API set it) and whether Triton is
    installed. Host values only."""
    return Call(
        "cuda", num_queries, num_keys, dim, dtype, per_query=per_query, traced=traced,
        tf32=tf32_matmul_allowed(), triton_installed=triton_installed(),
    )  # fmt: skip


def choose(problem: ContrastiveProblem, options: CCTOptions) -> Implementation:
    """The implementation that serves ``problem``: the one ``options.impl`` names, or the one
    ``auto`` picks (``return_details="weights"`` makes it dense, the one that holds them, and so
    do a miner's pairs, which only dense can restrict to)."""
    mined = any(
        isinstance(side, KeySet) and side.pairs is not None
        for side in (problem.positives, problem.negatives)
    )
    if mined and options.impl not in ("auto", "dense"):
        raise ValueError(
            f"impl={options.impl!r} cannot restrict each query to a miner's pairs "
            "(indices_tuple): it streams the keys by class ids, never a mask. Use impl='dense' "
            "(or 'auto', which picks it for mined pairs), or call without indices_tuple"
        )
    negatives = problem.negatives
    if isinstance(negatives, KeySet) and negatives.leading is not None:  # two treatments
        if options.impl not in ("auto", "dense"):
            raise ValueError(
                f"impl={options.impl!r} cannot treat the in-batch negatives' weights apart from "
                "the queue's in one softmax: it takes one treatment per softmax. Use "
                "impl='dense' (or 'auto', which picks it), or give the in-batch weights the "
                "queue's treatment (in_batch_weights=None)"
            )
        return SPLIT_DENSE
    if options.impl != "auto":
        return TABLE[options.impl]
    if options.wants_weights or mined:
        return TABLE["dense"]
    dtype = None if problem.preparation is None else problem.preparation.products
    return TABLE[choose_impl("auto", describe_call(problem.query, problem.key_rows, dtype))]
