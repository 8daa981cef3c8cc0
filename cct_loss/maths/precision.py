"""The precision policy (docs/precision.md): under autocast, or for half-precision inputs, the
matrix products run in the low-precision dtype with float32 accumulation, as InfoNCE's
``q @ k.T`` does in the same trainer; everything else (norms, softmax, sums, the result) runs in
float32, or float64 for float64 inputs. The library disables autocast around its own work and
casts explicitly, so the policy does not depend on which ops autocast lists."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from .. import shortcuts

HALF_DTYPES = (torch.float16, torch.bfloat16)
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


class Precision(NamedTuple):
    """A call's two dtypes: ``compute`` (float32 or float64: norms, softmax, sums, the result)
    and ``products`` (the matrix products' operands: ``compute`` or a half dtype)."""

    compute: torch.dtype
    products: torch.dtype


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of an enabled :func:`torch.autocast` on ``device``'s type, or ``None``."""
    if device.type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def tf32_matmul_allowed() -> bool:
    """Whether float32 matrix products on CUDA may use TF32, whichever API set it: the legacy
    ``torch.backends.cuda.matmul.allow_tf32``, or the newer ``fp32_precision`` of
    ``torch.backends.cuda.matmul`` or ``torch.backends`` (``"none"`` inherits). The legacy read
    raises after the new API set TF32 ("mix of the legacy and new APIs"), so the new one is read
    where it exists. Host values only."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # a torch without the new API
        return bool(matmul.allow_tf32)
    if precision == "none":  # inherits the global setting
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def promoted_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """:func:`torch.promote_types` over ``dtypes`` (which is itself a dispatched operator:
    skipped when they agree, as they do in a well-formed call)."""
    first = dtypes[0]
    if all(d == first for d in dtypes):
        return first
    return functools.reduce(torch.promote_types, dtypes)


_FLOAT32 = Precision(torch.float32, torch.float32)


def resolve_precision(device: torch.device, *tensors: Tensor) -> Precision:
    """The policy (module docs) for inputs ``tensors`` on ``device``; call it before
    :func:`own_precision` disables autocast."""
    autocast_on = device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type)
    if not autocast_on and all(t.dtype == torch.float32 for t in tensors):
        return _FLOAT32  # the common case, decided without building anything
    promoted = promoted_dtype([t.dtype for t in tensors])
    if promoted == torch.float64:
        return Precision(torch.float64, torch.float64)
    low = autocast_dtype(device)
    if low is None and promoted in HALF_DTYPES:
        low = promoted
    return Precision(torch.float32, torch.float32 if low is None else low)


def own_precision(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Disable autocast on ``device``: inside, every dtype is the one the policy casts to.
    Without an enabled autocast there is nothing to disable (and no context to enter)."""
    if device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return shortcuts.no_context()


_Backward = TypeVar("_Backward", bound=Callable[..., Any])


def backward_in_own_precision(backward: _Backward) -> _Backward:
    """Run a custom ``backward(ctx, *grads)`` with autocast disabled on the gradients' device,
    as its forward ran (a backward called inside the user's autocast region would otherwise
    have its float32 sums cast to half precision)."""

    @functools.wraps(backward)
    def wrapped(ctx: Any, *grads: Tensor | None) -> Any:
        device = next((g.device for g in grads if g is not None), None)
        if device is None:
            return backward(ctx, *grads)
        with own_precision(device):  # (no context at all without an enabled autocast)
            return backward(ctx, *grads)

    return wrapped  # type: ignore[return-value]


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, without the call when ``x`` already has it (a no-op ``Tensor.to``
    still costs most of a microsecond, which a small batch's step notices)."""
    return x if x.dtype == dtype else x.to(dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What sums over embeddings of ``dtype`` run in: float32 for a half dtype, else ``dtype``
    itself (float32 or float64)."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def product(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``a @ b`` with both operands in ``dtype`` (the products'), the result widened to
    :func:`accumulation_dtype`: a half-precision product accumulates in float32 and rounds its
    output to half, as ``F.linear`` does under autocast."""
    if a.dtype == b.dtype == dtype and dtype in (torch.float32, torch.float64):
        return a @ b  # full precision: no casts (a small batch's per-call overhead counts)
    out = cast(a, dtype) @ cast(b, dtype)
    return cast(out, accumulation_dtype(dtype))


def squared_norms(x: Tensor, *, keepdim: bool = False) -> Tensor:
    """``|x|^2`` over the last dim, in :func:`accumulation_dtype`."""
    return cast(x, accumulation_dtype(x.dtype)).pow(2).sum(-1, keepdim=keepdim)


def as_input_grads(
    needs_input_grad: tuple[bool, ...],
    inputs: tuple[Tensor, Tensor],
    grads: tuple[Tensor | None, Tensor | None],
) -> tuple[Tensor | None, Tensor | None]:
    """A custom backward's gradients for its first two inputs, each in its input's dtype (the
    products' dtype: a half dtype under the policy) or ``None`` where not needed."""
    return tuple(  # type: ignore[return-value]
        cast(g, x.dtype) if need and g is not None else None
        for need, x, g in zip(needs_input_grad[:2], inputs, grads, strict=True)
    )
