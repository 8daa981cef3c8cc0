"""The implementations (``impl``), the rule ``impl="auto"`` follows, and :func:`solve`.

An implementation is an :class:`cct_loss.transport.ExpectedCostKernel`; adding one is a new file
and one entry in :data:`KERNELS`. :func:`solve` computes a layout's
:class:`cct_loss.transport.Transport` with the implementation :func:`choose_impl` picks: dense
computes both terms in one autograd function (:func:`cct_loss.dense.dense_transport`); the
others compute each side with their kernel, and a query's own few positives as a small block.

The ``auto`` rule, from the benchmark tables in BENCHMARKS.md:

* **CPU** (2 threads, float32 and bfloat16): ``dense`` while ``Q * K <= 2**24`` (the cost
  matrix within 64 MiB in float32), ``chunked`` above it, where it is as fast or faster and
  holds no ``Q x K`` matrix. Per-query negatives: always ``dense`` (their ``(N, K, D)`` input is
  already ``D`` times larger than the cost matrix).
* **CUDA** (one H200, bfloat16 autocast; gpu-check's first table, commit ca10ed9): ``triton``
  where it serves the call (installed; ``D <= 256``, the dimensions timed on a GPU; half
  precision, or float32 with TF32 allowed; shared keys; not while tracing) and the problem is
  large enough to fill the GPU
  (``Q * K >= 2**24`` and ``Q >= 1024``); below that ``dense``, while ``Q * K <= 2**28``; above
  that, without Triton, ``sdpa`` (PyTorch's fused attention: memory-lean, and exact at any
  sharpness with detached weights; with gradients through the weights above
  :data:`cct_loss.sdpa.SDPA_MAX_SHARPNESS`, 100 on CUDA, it hands the call to ``chunked``
  itself).
  ``chunked`` is not picked on CUDA: it ran at 11-27 TFLOP/s there, a tenth of ``triton``.
  In IEEE float32 (PyTorch's default, TF32 off) ``triton`` ran at 63-111x dense, so float32
  goes there only when TF32 is allowed. Under ``torch.compile`` or a ``torch.func`` transform,
  which the Triton kernels do not support, ``auto`` stays with ``dense`` and ``sdpa``.
* ``return_details="weights"`` always gets ``dense``, the implementation that holds them.

The measured table behind the CUDA thresholds was taken with the fixed per-call cost that
this version removes; ``make gpu-check`` times ``auto`` beside every implementation (the rows
near the thresholds first) so that the next CUDA run confirms or moves them.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from ._validation import is_functorch_wrapped
from .chunked import chunked_expected_cost
from .costs import Preparation
from .dense import OnePass, dense_expected_cost, dense_transport, one_pass
from .precision import tf32_matmul_allowed
from .sdpa import sdpa_expected_cost
from .transport import (
    ConditionalExpectation,
    ExpectedCostKernel,
    Transport,
    fixed_attraction,
)
from .triton_impl import triton_expected_cost

if TYPE_CHECKING:
    from .options import CCTOptions

#: Every implementation by its ``impl`` name.
KERNELS: dict[str, ExpectedCostKernel] = {
    "dense": dense_expected_cost,
    "chunked": chunked_expected_cost,
    "sdpa": sdpa_expected_cost,
    "triton": triton_expected_cost,
}

#: The accepted values of ``impl``.
IMPLS = ("auto", *KERNELS)

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
#: most of the GPU idle; MoCo N=512, K=65536 ran at 1.26x dense, N=4096 at 0.71x).
TRITON_MIN_QUERIES = 1024
HALF_DTYPES = (torch.float16, torch.bfloat16)


class Call(NamedTuple):
    """What ``auto`` decides from (host values only: deciding costs no synchronisation).

    Attributes:
        device_type: ``"cpu"``, ``"cuda"``, ...
        num_queries, num_keys: the ``Q x K`` problem.
        dim: the embedding dimension ``D``.
        dtype: the products' dtype (half precision under autocast).
        per_query: the keys are ``(Q, K, D)`` per query.
        traced: under ``torch.compile`` or a ``torch.func`` transform.
        tf32: float32 products may use TF32
            (:func:`cct_loss.precision.tf32_matmul_allowed`).
        triton_installed: the optional dependency is importable.
    """

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
    :func:`cct_loss.precision.tf32_matmul_allowed`, whichever API set it) and whether Triton is
    installed. Host values only."""
    return Call(
        "cuda",
        num_queries,
        num_keys,
        dim,
        dtype,
        per_query=per_query,
        traced=traced,
        tf32=tf32_matmul_allowed(),
        triton_installed=triton_installed(),
    )


def impl_for(
    options: CCTOptions, query: Tensor, keys: Tensor, dtype: torch.dtype | None = None
) -> str:
    """The implementation that serves queries against ``keys`` (``return_details="weights"``
    makes ``auto`` pick dense, the implementation that holds the weights; ``dtype``: the
    products' dtype, when the embeddings are not prepared yet)."""
    if options.impl != "auto":
        return options.impl
    if options.wants_weights:
        return "dense"
    return choose_impl("auto", describe_call(query, keys, dtype))


def loss_in_one_pass(
    problem: Transport, options: CCTOptions, preparation: Preparation
) -> OnePass | None:
    """How ``problem`` (on raw embeddings) gets its reduced loss straight from the
    implementation, where it computes one (dense, with its gradient in the forward pass:
    :func:`cct_loss.dense.one_pass`); ``None`` where the caller reduces the per-query terms of
    :func:`solve` itself. For one process, ``reduction`` ``"mean"`` or ``"sum"`` and no
    diagnostics."""
    impl = impl_for(options, problem.query, problem.key_rows, preparation.products)
    if impl != "dense":
        return None
    return one_pass(problem, options, preparation)


def solve(
    problem: Transport, options: CCTOptions
) -> tuple[ConditionalExpectation | None, ConditionalExpectation | None]:
    """The attraction and repulsion expectations of ``problem`` (``None`` for a side it does
    not have), computed by the implementation :func:`impl_for` picks.

    Dense computes both in one autograd function. The other implementations compute each side
    with their kernel; a query's own few positives (a fixed block, or its row's other views)
    are a small plain-autograd block (:func:`cct_loss.transport.fixed_attraction`).
    """
    query = problem.query
    impl = impl_for(options, query, problem.key_rows)
    if impl == "dense":
        return dense_transport(problem, options)
    kernel = KERNELS[impl]
    # The keys are the queries in-batch: a view keeps them distinct tensors for the autograd
    # functions (torch.compile cannot trace one tensor passed twice to an autograd.Function).
    keys = query.view_as(query) if problem.keys is None else problem.keys
    attract = repel = None
    positives = problem.positives
    if isinstance(positives, Tensor):
        fixed = positives if positives.dim() == 3 else positives.unsqueeze(1)
        attract = fixed_attraction(query, fixed, options)
    elif positives is not None and positives.own_rows_only:
        assert positives.rows is not None
        attract = fixed_attraction(query, positives.rows.fixed_positives(keys), options)
    elif positives is not None:
        attract = kernel(query, keys, positives, side="positives", options=options)
    negatives = problem.negatives
    if negatives is not None:
        members = None if negatives.every_key else negatives
        repel = kernel(query, keys, members, side="negatives", options=options)
    return attract, repel
