"""``impl="triton"``: the expected cost from the Triton kernels
(:mod:`~cct_loss.implementations.triton_kernels`), launched through ``torch.library`` custom
ops with fake implementations, so ``torch.compile(fullgraph=True)`` traces a loss that uses it.

Memory is ``O(Q D + K D)``. A backward pass that must itself be differentiable differentiates
the formula in plain autograd. The kernels run on CUDA, or on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1`` before triton is imported). Refused, each with a message
naming the path that works: per-query keys, float64, ``D > MAX_DIM``, ``torch.func``. IEEE
float32 products are slow and warn (docs/implementations.md)."""

from __future__ import annotations

import os
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..checks import is_functorch_wrapped, same_view
from ..maths.expectation import (
    ConditionalExpectation,
    Side,
    differentiable_backward,
    signed_sharpness,
    streamed_expectation,
)
from ..maths.precision import backward_in_own_precision, tf32_matmul_allowed
from ..options import CCTOptions
from ..problem.description import KeySet, excluded_from_ids
from .triton_tiles import TILES

#: Largest embedding dimension the kernels take: the largest the tile table
#: (:mod:`.triton_tiles`) holds tiles for and the interpreter tests reach (above a feature tile
#: the kernels tile ``D``; from 768 the backward also tiles its output).
MAX_DIM = 1024
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Tiles(NamedTuple):
    """How the kernels cut a problem: rows of queries and of keys per program, the feature tile
    of the products, the output columns per backward program, and the launch's warps and
    pipeline stages."""

    queries: int
    keys: int
    features: int
    outputs: int
    warps: int
    stages: int


#: Tiles in the CPU interpreter: small row blocks (its cost is per block iteration, and the
#: tests need sizes that end mid-block), one feature tile up to D = 256, and above it tiles that
#: make D = 512, 768 and 1000 take several feature tiles and (from 768) two output tiles.
INTERPRETER_TILES = Tiles(16, 32, 256, 512, 4, 1)


def tiles_for(dim: int, dtype: torch.dtype) -> Tiles:
    """The GPU's tiles for ``D = dim`` in ``dtype``: the smallest bucket of
    :data:`.triton_tiles.TILES` that holds ``dim``."""
    kind = "float32" if dtype == torch.float32 else "half"
    buckets = sorted(bound for bound, k in TILES if k == kind)
    bound = next((b for b in buckets if dim <= b), buckets[-1])
    return Tiles(*TILES[(bound, kind)])


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernels() -> Any:
    """The kernel module, or a clear error when Triton is missing."""
    try:
        from . import triton_kernels
    except ImportError as error:
        raise RuntimeError(
            "impl='triton' needs the optional dependency triton (pip install cct-loss[triton]); "
            f"importing it failed ({error}). Use impl='chunked', which streams the same way in "
            "plain PyTorch"
        ) from error
    return triton_kernels


def check_supported(query: Tensor, keys: Tensor) -> None:
    """Refuse, naming the path that works, what the kernels do not take."""
    device = query.device
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "impl='triton' runs on CUDA devices (or on the CPU through Triton's interpreter, "
            "with TRITON_INTERPRET=1 set before triton is imported); got tensors on the CPU. "
            "Use impl='chunked' or 'dense'"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"impl='triton' runs on CUDA devices; got {device}. Use impl='chunked'")
    if keys.dim() == 3:
        raise ValueError(
            "impl='triton' takes shared (K, D) keys; per-query (N, K, D) negatives go through "
            "impl='dense' or 'chunked'"
        )
    if query.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"impl='triton' computes in float32, float16 or bfloat16; got {query.dtype}. "
            "Use impl='dense' or 'chunked' for float64"
        )
    if query.shape[-1] > MAX_DIM:
        raise ValueError(
            f"impl='triton' takes embedding dims up to D = {MAX_DIM}; got D = {query.shape[-1]}. "
            "Use impl='chunked', which streams the same way for any D"
        )
    if not torch.compiler.is_compiling() and (
        is_functorch_wrapped(query) or is_functorch_wrapped(keys)
    ):
        raise RuntimeError(
            "impl='triton' does not support torch.func transforms; use impl='dense' or 'chunked'"
        )


#: Warned (once per place, Python's default) when ``impl="triton"`` runs IEEE float32 products.
IEEE_FLOAT32_WARNING = (
    "impl='triton' with float32 inputs and TF32 off (PyTorch's default) computes its products "
    "in IEEE float32 on CUDA cores, tens of times slower than impl='dense'. impl='auto' "
    "never sends such calls to triton. For speed use autocast (bfloat16/float16), allow TF32 "
    "(torch.backends.cuda.matmul.fp32_precision = 'tf32'), or impl='dense'"
)


def _launch_options(query: Tensor, num_dims: int) -> dict[str, Any]:
    """The kernels' block sizes and flags for ``query``'s dtype and ``D = num_dims`` (every
    kernel takes ``BLOCK_Q``, ``BLOCK_K``, ``BLOCK_D``, ``SINGLE_D``; the backward kernels also
    ``BLOCK_DOUT``, see :func:`_without_output_tile`), and the launch's warps and stages."""
    interpret = interpreting()
    tiles = INTERPRETER_TILES if interpret else tiles_for(num_dims, query.dtype)
    tf32 = query.dtype == torch.float32 and tf32_matmul_allowed()
    if query.dtype == torch.float32 and not tf32 and not interpret:
        warnings.warn(IEEE_FLOAT32_WARNING, stacklevel=2)
    whole = max(16, 1 << (num_dims - 1).bit_length())  # D rounded up to a power of two
    single = whole <= tiles.features
    return {
        # Triton's interpreter computes bfloat16 tl.dot wrongly: widen half operands there.
        "UPCAST": interpret and query.dtype != torch.float32,
        "PRECISION": "tf32" if tf32 and not interpret else "ieee",
        "SINGLE_D": single,
        "BLOCK_Q": tiles.queries,
        "BLOCK_K": tiles.keys,
        "BLOCK_D": whole if single else tiles.features,
        "BLOCK_DOUT": whole if single else tiles.outputs,
        "num_warps": tiles.warps,
        "num_stages": tiles.stages,
    }


def _without_output_tile(launch: dict[str, Any]) -> dict[str, Any]:
    """The forward kernel's options (it writes per-query values: no output tile)."""
    return {k: v for k, v in launch.items() if k != "BLOCK_DOUT"}


def _id_args(ids: tuple[Tensor | None, ...], device: torch.device) -> list[Tensor]:
    """The four id arrays as int64 pointers (an empty array where there are none)."""
    empty = torch.empty(0, dtype=torch.int64, device=device)
    return [empty if x is None else x.to(torch.int64).contiguous() for x in ids]


def _flags(ids: tuple[Tensor | None, ...], same_group: bool, cosine: bool) -> dict[str, bool]:
    return {
        "HAS_GROUPS": ids[0] is not None and ids[1] is not None,
        "SAME_GROUP": same_group,
        "HAS_SELF": ids[2] is not None and ids[3] is not None,
        "COSINE": cosine,
    }


@torch.library.custom_op("cct_loss::triton_expected_cost", mutates_args=())
def _forward_op(
    query: Tensor,
    keys: Tensor,
    query_groups: Tensor | None,
    key_groups: Tensor | None,
    query_self: Tensor | None,
    key_self: Tensor | None,
    signed: Tensor,
    same_group: bool,
    cosine: bool,
    detach: bool,
    farther: bool,
    details: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per query, float32: expected cost, log-normaliser, extreme cost, entropy (the last two 0
    without ``details``); ``signed``, the ``(1,)`` sharpness with its sign, read from memory."""
    kernels = _kernels()
    q, k = query.contiguous(), keys.contiguous()
    (num_queries, num_dims), num_keys = q.shape, k.shape[0]
    ids = (query_groups, key_groups, query_self, key_self)
    launch = _launch_options(q, num_dims)
    outputs = [torch.empty(num_queries, dtype=torch.float32, device=q.device) for _ in range(2)]
    stats = [torch.zeros(num_queries, dtype=torch.float32, device=q.device) for _ in range(2)]
    grid = (triton_cdiv(num_queries, launch["BLOCK_Q"]),)
    kernels.expected_cost_forward[grid](
        q, k, *_id_args(ids, q.device), signed, *outputs, *stats,
        num_queries, num_keys, num_dims,
        **_flags(ids, same_group, cosine), FARTHER=farther, DETAILS=details,
        **_without_output_tile(launch),
    )  # fmt: skip
    expected, log_normaliser = outputs
    entropy, extreme = stats
    return expected, log_normaliser, extreme, entropy


@_forward_op.register_fake
def _forward_shapes(query: Tensor, *_: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    empty = query.new_empty(query.shape[0], dtype=torch.float32)
    return empty, empty.clone(), empty.clone(), empty.clone()


@torch.library.custom_op("cct_loss::triton_expected_cost_backward", mutates_args=())
def _backward_op(
    query: Tensor,
    keys: Tensor,
    query_groups: Tensor | None,
    key_groups: Tensor | None,
    query_self: Tensor | None,
    key_self: Tensor | None,
    signed: Tensor,
    grad_expected: Tensor,
    expected: Tensor,
    log_normaliser: Tensor,
    same_group: bool,
    cosine: bool,
    detach: bool,
    need_query: bool,
    need_keys: bool,
    share: bool,
) -> tuple[Tensor, Tensor]:
    """The float32 gradients of ``sum_q grad_expected_q E_q`` for the queries and the keys (empty
    where not needed); ``share``: the keys are the queries' rows, both go into the first."""
    kernels = _kernels()
    q, k = query.contiguous(), keys.contiguous()
    (num_queries, num_dims), num_keys = q.shape, k.shape[0]
    ids = (query_groups, key_groups, query_self, key_self)
    launch = _launch_options(q, num_dims)
    common = (
        *_id_args(ids, q.device), signed, grad_expected.to(torch.float32).contiguous(),
        expected, log_normaliser,
    )  # fmt: skip
    flags = {**_flags(ids, same_group, cosine), "DETACH": detach, **launch}
    columns = triton_cdiv(num_dims, launch["BLOCK_DOUT"])
    empty = q.new_empty(0, dtype=torch.float32)
    grad_query = grad_keys = empty
    if need_query:
        grad_query = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        grid = (triton_cdiv(num_queries, launch["BLOCK_Q"]), columns)
        kernels.expected_cost_grad_query[grid](
            q, k, *common, grad_query, num_queries, num_keys, num_dims,
            ACCUMULATE=False, **flags,
        )  # fmt: skip
    if need_keys:
        target = grad_query if share else torch.empty(k.shape, dtype=torch.float32, device=k.device)
        grid = (triton_cdiv(num_keys, launch["BLOCK_K"]), columns)
        kernels.expected_cost_grad_keys[grid](
            q, k, *common, target, num_queries, num_keys, num_dims,
            ACCUMULATE=share, **flags,
        )  # fmt: skip
        grad_keys = empty if share else target
    return grad_query, grad_keys


@_backward_op.register_fake
def _backward_shapes(query: Tensor, keys: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    need_query, need_keys, share = args[-3:]
    empty = query.new_empty(0, dtype=torch.float32)
    grad_query = query.new_empty(query.shape, dtype=torch.float32) if need_query else empty
    grad_keys = (
        keys.new_empty(keys.shape, dtype=torch.float32) if need_keys and not share else empty
    )
    return grad_query, grad_keys.clone() if grad_keys is empty else grad_keys


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    expected, log_normaliser, extreme, entropy = output
    ctx.save_for_backward(*inputs[:7], expected, log_normaliser)
    ctx.flags = inputs[7:10]  # same_group, cosine, detach
    ctx.mark_non_differentiable(log_normaliser, extreme, entropy)


@backward_in_own_precision
def _backward(ctx: Any, grad_expected: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
    query, keys, *saved_ids, signed, expected, log_normaliser = ctx.saved_tensors
    ids = (saved_ids[0], saved_ids[1], saved_ids[2], saved_ids[3])
    same_group, cosine, detach = ctx.flags
    need_query, need_keys = ctx.needs_input_grad[:2]
    nones = (None,) * 10
    if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
        grad_query, grad_keys = differentiable_backward(
            grad_expected, query, keys, excluded_from_ids(ids, same_group),
            ctx.needs_input_grad, cost="cosine" if cosine else "sqeuclidean", signed=signed[0],
            detach_weights=detach,
        )  # fmt: skip
        return grad_query, grad_keys, *nones
    # In-batch the keys are the queries (a view of the same rows): one buffer for both.
    share = (
        need_query and need_keys and not torch.compiler.is_compiling() and _same_rows(query, keys)
    )
    grad_query, grad_keys = torch.ops.cct_loss.triton_expected_cost_backward(
        query, keys, *ids, signed, grad_expected, expected, log_normaliser,
        same_group, cosine, detach, need_query, need_keys, share,
    )  # fmt: skip
    return (
        grad_query.to(query.dtype) if need_query else None,
        grad_keys.to(keys.dtype) if need_keys and not share else None,
        *nones,
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _no_vmap(info: Any, in_dims: Any, *args: Any) -> Any:
    raise RuntimeError("impl='triton' has no torch.func.vmap rule; use impl='dense' or 'chunked'")


torch.library.register_vmap("cct_loss::triton_expected_cost", _no_vmap)


def _same_rows(query: Tensor, keys: Tensor) -> bool:
    """Whether ``keys`` are ``query``'s own rows to autograd: the same tensor, or a view of the
    same base with the same layout, so that their gradients land in the same elements either
    way. (Two leaves that merely share memory, ``q.detach().requires_grad_()``, are not.)"""
    if keys is query:
        return True
    base = query if query._base is None else query._base
    return keys._base is base and same_view(query, keys)


def triton_cdiv(a: int, b: int) -> int:
    """Blocks of ``b`` that cover ``a``."""
    return -(-a // b)


def expected_cost(
    query: Tensor, keys: Tensor, key_set: KeySet, *, side: Side, options: CCTOptions
) -> ConditionalExpectation:
    """Each query's expected cost over the keys that take part, by the Triton kernels; a
    :class:`~cct_loss.implementations.table.StreamingKernel`. The entropy and the extreme cost
    come from the forward kernel; no weights."""
    _kernels()  # a clear error first where triton is not installed
    check_supported(query, keys)
    signed = signed_sharpness(options, side)
    # The kernels read the sharpness from memory. A number is written there by a fill on the
    # device (a copy from the host would wait for it); a tensor is cast where it is.
    if isinstance(signed, Tensor):
        scale = signed.detach().to(device=query.device, dtype=torch.float32).reshape(1)
    else:
        scale = torch.full((1,), signed, dtype=torch.float32, device=query.device)
    ids = key_set.ids(keys.shape[0], query.device)
    details = bool(options.return_details)
    expected, log_normaliser, extreme, entropy = _forward_op(
        query, keys, *ids, scale, key_set.same_group, options.cost == "cosine",
        options.detach_weights, side == "positives", details,
    )  # fmt: skip
    if not details:  # the kernel wrote placeholders
        entropy = extreme = None
    return streamed_expectation(expected, log_normaliser, extreme, entropy, key_set.may_be_empty)
