"""The implementations (``impl``), in one table that validation, dispatch and the tests read.

An implementation is an :class:`cct_loss.transport.ExpectedCostKernel`; adding one is a new file
and one entry in :data:`KERNELS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .chunked import chunked_expected_cost
from .dense import dense_expected_cost
from .sdpa import sdpa_expected_cost
from .transport import ExpectedCostKernel
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

#: ``impl="auto"`` stays dense while the ``Q x K`` cost matrix has at most this many entries
#: (64 MiB in float32; dense keeps a few such matrices alive for the backward pass).
AUTO_DENSE_MAX_ELEMENTS = 1 << 24


def choose_impl(
    impl: str, device: torch.device, num_queries: int, num_keys: int, *, per_query: bool
) -> str:
    """Resolve ``impl="auto"``; other values are returned unchanged.

    The rule: ``"dense"`` for per-query negatives (the ``(N, K, D)`` input is already ``D``
    times larger than the cost matrix) and while ``Q * K <= 2**24``; ``"chunked"`` above that,
    on every device. In the CPU benchmarks (BENCHMARKS.md) dense is fastest below that size,
    and above it chunked is as fast or faster while holding no ``Q x K`` matrix. ``"sdpa"`` is
    never picked automatically: it is often the fastest, but PyTorch's fused kernels evaluate
    the softmax less exactly (agreement 1e-4 instead of 1e-5 relative), so it is opt-in.
    ``"triton"`` is never picked automatically either: it is tested on the CPU through Triton's
    interpreter, and ``auto`` will consider it only once a CUDA benchmark shows it ahead.

    The rule may depend on ``device``; the CPU numbers decide the CPU rule. On CUDA it is the
    CPU's rule until a CUDA benchmark table exists (``make gpu-check`` writes one; none has been
    measured yet, see BENCHMARKS.md).
    """
    del device  # one rule for every device until a CUDA table exists
    if impl != "auto":
        return impl
    if per_query or num_queries * num_keys <= AUTO_DENSE_MAX_ELEMENTS:
        return "dense"
    return "chunked"


def kernel_for(
    options: CCTOptions, device: torch.device, num_queries: int, num_keys: int, *, per_query: bool
) -> ExpectedCostKernel:
    """The kernel that serves a ``(num_queries, num_keys)`` problem (see :func:`choose_impl`);
    ``return_details="weights"`` makes ``auto`` pick dense, the kernel that holds the weights."""
    impl = "dense" if options.wants_weights and options.impl == "auto" else options.impl
    return KERNELS[choose_impl(impl, device, num_queries, num_keys, per_query=per_query)]
