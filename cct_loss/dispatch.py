"""Choosing the repulsion implementation (``impl``) and binding its options."""

from __future__ import annotations

import functools

import torch

from .chunked import chunked_repulsion
from .dense import dense_repulsion
from .layouts import RepulsionBackend
from .options import CCTOptions
from .sdpa import sdpa_repulsion

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
    ``device`` is accepted so the rule can depend on it once GPU measurements exist.
    """
    del device  # same rule on every device for now (no GPU measurements yet)
    if impl != "auto":
        return impl
    if per_query or num_queries * num_keys <= AUTO_DENSE_MAX_ELEMENTS:
        return "dense"
    return "chunked"


def repulsion_backend(
    options: CCTOptions,
    device: torch.device,
    num_queries: int,
    num_keys: int,
    *,
    per_query: bool,
) -> RepulsionBackend:
    """The repulsion function for these options and problem size, options bound."""
    impl = choose_impl(options.impl, device, num_queries, num_keys, per_query=per_query)
    cost, t_neg, detach = options.cost, options.t_neg, options.detach_weights
    if impl == "dense":
        return functools.partial(
            dense_repulsion,
            cost=cost,
            sharpness=t_neg,
            detach_weights=detach,
            with_stats=options.return_details,
        )
    if impl == "chunked":
        return functools.partial(
            chunked_repulsion,
            cost=cost,
            sharpness=t_neg,
            detach_weights=detach,
            chunk_size=options.chunk_size,
            with_stats=options.return_details,
        )
    return functools.partial(
        sdpa_repulsion,
        cost=cost,
        sharpness=t_neg,
        detach_weights=detach,
        with_stats=options.return_details,
    )
