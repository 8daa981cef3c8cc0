"""Argument checks shared by every public entry point.

Each check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, wrong
shape or value) with a message that names the argument, what it received and what was
expected. The checks only look at Python values, shapes, dtypes and devices, never at tensor
contents, so they cost no host synchronisation and trace cleanly under ``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from numbers import Real

import torch
from torch import Tensor

COSTS = ("sqeuclidean", "cosine")
REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "dense", "chunked", "sdpa")


def shape_str(x: Tensor) -> str:
    """Format a tensor's shape as ``(a, b, c)``."""
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


def check_float_tensor(name: str, x: object, ndims: Collection[int], layout: str) -> Tensor:
    """Check that ``x`` is a floating-point tensor with one of the allowed numbers of dims.

    Args:
        name: argument name used in the message.
        x: the value received.
        ndims: allowed values of ``x.dim()``.
        layout: human-readable expected layout, e.g. ``"(N, D)"``.

    Returns:
        ``x``, typed as a tensor.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must have a floating-point dtype (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}"
        )
    if x.dim() not in ndims:
        raise ValueError(
            f"{name} must have shape {layout} ({' or '.join(str(n) for n in sorted(ndims))} dims), "
            f"got {x.dim()} dims with shape {shape_str(x)}"
        )
    return x


def check_same_device(tensors: dict[str, Tensor]) -> torch.device:
    """Check that all tensors live on one device and return it."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, x in items[1:]:
        if x.device != first.device:
            raise ValueError(
                f"{name} is on device {x.device} but {first_name} is on {first.device}; "
                "expected all inputs on the same device"
            )
    return first.device


def check_sharpness(name: str, value: object) -> float:
    """Check an inverse temperature (``t_pos``/``t_neg``): a finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{name} must be a real number (an inverse temperature >= 0), "
            f"got {type(value).__name__}"
        )
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (an inverse temperature), got {v}")
    return v


def check_coefficient(name: str, value: object) -> float:
    """Check a loss coefficient (``alpha``/``beta``): any finite real number."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Check that ``value`` is one of the allowed strings."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_flag(name: str, value: object) -> bool:
    """Check a boolean option."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def check_chunk_size(value: object) -> int | None:
    """Check ``chunk_size``: ``None`` or an int >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"chunk_size must be None or an int >= 1, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {value}")
    return value
