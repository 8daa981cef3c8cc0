"""Argument checks shared by every public entry point.

Each check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, wrong
shape or value) with a message that names the argument, what it received and what was
expected. The checks only look at Python values, shapes, dtypes and devices, never at tensor
contents, so they cost no host synchronisation and trace cleanly under ``torch.compile``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from collections.abc import Callable, Collection, Sequence
from numbers import Real
from typing import Any, TypeVar

import torch
from torch import Tensor

COSTS = ("sqeuclidean", "cosine")
REDUCTIONS = ("mean", "sum", "none")
LAYOUTS = ("all", "cross", "paper")


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


def check_scalar_option(
    name: str, value: object, *, nonnegative: bool = False, positive: bool = False
) -> float | Tensor:
    """Check ``t_pos``/``t_neg`` (``nonnegative``: an inverse temperature ``>= 0``),
    ``temperature`` (``positive``: ``> 0``) or ``alpha``/``beta`` (any finite number).

    A Python number is checked for its value and returned as a float. A 0-dim floating-point
    tensor is checked for its shape, dtype and ``requires_grad`` but not for its value: reading
    it would cost a host synchronisation (and a recompile per value under ``torch.compile``).
    A tensor that requires grad is refused: these are constants to autograd.
    """
    if positive:
        what = "a temperature > 0"
    elif nonnegative:
        what = "an inverse temperature >= 0"
    else:
        what = "a finite number"
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(
                f"{name} must be a real number or a 0-dim floating-point tensor ({what}), "
                f"got a tensor of shape {shape_str(value)} and dtype {value.dtype}"
            )
        if value.requires_grad:
            raise ValueError(
                f"{name} must not require grad: the options are constants to autograd. With "
                "detach_weights=True a sharpness gets no gradient at all, and with "
                "detach_weights=False the loss falls as t_neg falls, so a learned sharpness "
                f"collapses towards uniform weights; pass {name}.detach() (a schedule is fine)"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{name} must be a real number or a 0-dim tensor ({what}), got {type(value).__name__}"
        )
    v = float(value)
    if positive and not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0 (InfoNCE's tau), got {v}")
    if nonnegative and not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 (an inverse temperature), got {v}")
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


def check_details(value: object) -> bool | str:
    """Check ``return_details``: a bool, or ``"weights"`` for the weight matrices too."""
    if value == "weights" or isinstance(value, bool):
        return value
    raise TypeError(
        f'return_details must be a bool or "weights", got {type(value).__name__} ({value!r})'
    )


def check_chunk_size(value: object) -> int | None:
    """Check ``chunk_size``: ``None`` or an int >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"chunk_size must be None or an int >= 1, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {value}")
    return value


def check_labels(name: str, labels: object, rows: int, rows_name: str) -> Tensor:
    """Check integer class labels: a 1-D integer tensor with one entry per row."""
    if not isinstance(labels, Tensor):
        raise TypeError(
            f"{name} must be a 1-D integer tensor ({rows_name},), got {type(labels).__name__}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (class labels), got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(
            f"{name} must have shape ({rows_name},) = ({rows},), one label per row, "
            f"got {shape_str(labels)}"
        )
    return labels


def check_no_shared_memory(negatives: Tensor, positive: Tensor) -> None:
    """Refuse ``negatives`` that is ``positive`` or a view of its memory (eager mode only).

    ``cct_loss(q, k, k)`` runs and is wrong: every query would count its own positive among its
    negatives. What was meant is ``layout="cross"``. Memory ranges are compared, so a
    ``negatives`` that merely interleaves with ``positive`` in one buffer is refused too; the
    message says how to pass it anyway (a copy).
    """
    if negatives is positive:
        overlap = True
    elif (
        torch.compiler.is_compiling()
        or negatives.device != positive.device
        or is_functorch_wrapped(negatives)
        or is_functorch_wrapped(positive)
        # different buffers (the usual case) cannot overlap: decided without the ranges
        or negatives.untyped_storage().data_ptr() != positive.untyped_storage().data_ptr()
    ):
        return
    else:
        overlap = _byte_range(negatives, 0) < _byte_range(positive, 1) and _byte_range(
            positive, 0
        ) < _byte_range(negatives, 1)
    if overlap:
        raise ValueError(
            "negatives is the same tensor as positive (or a view of its memory): each query "
            "would count its own positive among its negatives. For MoCo v3 / CLIP, where the "
            "negatives are the other rows of positive, use layout='cross' and no negatives; "
            "if the overlap is intended, pass negatives.clone()"
        )


def same_view(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are exactly the same data: one tensor, or views of one memory
    with the same offset, shape and strides (``z`` and ``z.detach()``). Views that merely share
    a buffer (``z.chunk(2)``, ``feats.unbind(1)``) are not. Decided from metadata only; under
    ``torch.compile`` and ``torch.func`` (no storage to compare) only identity counts."""
    if a is b:
        return True
    if torch.compiler.is_compiling() or is_functorch_wrapped(a) or is_functorch_wrapped(b):
        return False
    return (
        a.device == b.device
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.numel() > 0
    )


def check_not_query_itself(query: Tensor, positive: Tensor, entry: str) -> None:
    """Refuse a ``positive`` that is ``query`` itself (:func:`same_view`; also as the single
    positive of an ``(N, 1, D)`` view): every query would be its own positive, at distance 0,
    and the loss a number that means nothing."""
    own = positive if positive.dim() == 2 else positive[:, 0] if positive.shape[1] == 1 else None
    if own is None or not same_view(query, own):
        return
    raise ValueError(
        "positive is query itself (the same memory, shape and strides): every query would be "
        "its own positive, at distance 0. Pass the other augmented view: "
        f"{entry}(z1, z2); for one view with class labels: {entry}(embeddings, "
        "labels=labels); if a copy is really meant: "
        f"{entry}(query, query.clone())"
    )


def check_distinct_views(views: Sequence[Tensor], entry: str) -> None:
    """Refuse a view given twice (:func:`same_view`): its rows would be their own positives."""
    for i in range(1, len(views)):
        for j in range(i):
            if same_view(views[i], views[j]):
                raise ValueError(
                    f"views[{i}] is views[{j}] (the same memory, shape and strides): each of "
                    "its rows would be its own positive, at distance 0. Pass the different "
                    f"augmented views of each image: {entry}([view1, view2]); for one view "
                    f"with class labels: {entry}([embeddings], labels=labels)"
                )


def check_finite_inputs(tensors: dict[str, Tensor]) -> None:
    """``check_finite=True``: raise a ``ValueError`` naming the first input that holds NaN or
    inf, with how many and the first row. Reads the values: one host synchronisation per
    input; refused while ``torch.compile`` traces (a graph cannot hold it)."""
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "check_finite=True reads the inputs' values (a host synchronisation), which a "
            "compiled graph cannot hold: leave check_finite off inside torch.compile and check "
            "the embeddings outside it, e.g. with torch.isfinite(z).all()"
        )
    for name, x in tensors.items():
        bad = ~torch.isfinite(x.detach())
        if bool(bad.any()):
            rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()
            count = int(bad.sum())
            raise ValueError(
                f"{name} holds {count} non-finite value{'s' if count > 1 else ''} (NaN or inf), "
                f"the first in row {int(rows[0])} (check_finite=True): the loss and its "
                "gradient would be NaN. Look for a diverged encoder or a bad batch upstream"
            )


def _byte_range(x: Tensor, end: int) -> int:
    """First byte (``end=0``) or one past the last byte (``end=1``) that ``x`` touches."""
    start = x.data_ptr()
    if end == 0:
        return start
    if x.numel() == 0:
        return start
    span = sum((size - 1) * abs(stride) for size, stride in zip(x.shape, x.stride(), strict=True))
    return start + (span + 1) * x.element_size()


def is_functorch_wrapped(x: Tensor) -> bool:
    """True for a tensor wrapped by a torch.func transform: it has no storage of its own, and
    its backward runs with grad mode on without being a ``create_graph=True`` backward."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(x)) if check is not None else False


_Callable = TypeVar("_Callable", bound=Callable[..., Any])


def names_valid_keywords(function: _Callable) -> _Callable:
    """Make an unknown keyword argument of ``function`` a ``TypeError`` that lists the valid
    ones and suggests the closest (``tneg`` -> ``t_neg``), naming only ``function`` itself.

    Only a keyword Python refuses at the call is rewritten: a ``TypeError`` raised inside
    ``function`` passes through unchanged. A successful call costs one extra frame."""
    parameters = inspect.signature(function).parameters
    keywords = [
        name
        for name, p in parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "self"
    ]
    method = "self" in parameters

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except TypeError as error:
            unknown = [k for k in kwargs if k not in parameters]
            raised_at_the_call = error.__traceback__ is not None and (
                error.__traceback__.tb_next is None
            )
            if not (raised_at_the_call and unknown):
                raise
            # A constructor is named by the class called (a subclass's own name), not by
            # the base class that defines __init__.
            where = type(args[0]).__name__ if method and args else function.__name__
            raise TypeError(unknown_keyword_message(where, unknown[0], keywords)) from None

    return checked  # type: ignore[return-value]


def unknown_keyword_message(where: str, name: str, valid: Sequence[str]) -> str:
    """``where`` got ``name``, which is none of ``valid``: the message, with the closest."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    return (
        f"{where}() got an unexpected keyword argument {name!r}{hint} "
        f"The valid keywords are: {', '.join(valid)}"
    )
