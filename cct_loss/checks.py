"""Checks of tensors that every layer shares: the public entry points, the queue, the kernels.

Each check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, wrong
shape or value) with a message that names the argument, what it received and what was
expected. They look at shapes, dtypes and devices, never at tensor contents (except
:func:`check_finite_inputs`, which is asked for), so they cost no host synchronisation and trace
cleanly under ``torch.compile``.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Collection, Sequence

import torch
from torch import Tensor

#: How close (difflib's ratio) a name must be to a valid one to be taken for a misspelling of
#: it: ``tneg`` for ``t_neg``, ``temprature`` for ``temperature``, ``detach_weight``. One cutoff
#: for every suggestion the library makes. It is high because a module refuses a new attribute
#: this close to an option's name (``crit.tneg = 5`` would otherwise set nothing that is read),
#: and a looser cutoff would refuse attributes users mean (``cost_fn`` is 0.73 from ``cost``).
TYPO_CUTOFF = 0.8


def closest_name(name: str, valid: Sequence[str]) -> str | None:
    """The valid name ``name`` most likely misspells, or ``None``."""
    close = difflib.get_close_matches(name.lower(), list(valid), n=1, cutoff=TYPO_CUTOFF)
    return close[0] if close else None


def as_int(value: object) -> int | None:
    """``value`` as a Python int where it is an integer (anything with ``__index__``: a Python
    or a NumPy integer; not a bool), else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def shape_str(x: Tensor) -> str:
    """A tensor's shape as ``(a, b, c)``."""
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


def check_float_tensor(name: str, x: object, ndims: Collection[int], layout: str) -> Tensor:
    """``x`` as a floating-point tensor with one of ``ndims`` dims; ``name`` and ``layout``
    (``"(N, D)"``) go into the message."""
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


def check_labels(name: str, labels: object, rows: int, rows_name: str) -> Tensor:
    """``labels`` as a 1-D integer tensor with one entry per row (``rows`` of them)."""
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


def check_same_device(tensors: dict[str, Tensor]) -> torch.device:
    """The one device all ``tensors`` live on (a ``ValueError`` naming two that differ)."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, x in items[1:]:
        if x.device != first.device:
            raise ValueError(
                f"{name} is on device {x.device} but {first_name} is on {first.device}; "
                "expected all inputs on the same device"
            )
    return first.device


def check_finite_inputs(tensors: dict[str, Tensor]) -> None:
    """``check_finite=True``: a ``ValueError`` naming the first input that holds NaN or inf,
    with how many and the first row. It reads the values (one host synchronisation per input),
    so it is refused while ``torch.compile`` traces."""
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


def is_functorch_wrapped(x: Tensor) -> bool:
    """Whether ``x`` is wrapped by a ``torch.func`` transform: it has no storage of its own, and
    its backward runs with grad mode on without being a ``create_graph=True`` backward."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(x)) if check is not None else False


def positive_at(query: Tensor, positive: Tensor) -> Tensor | None:
    """The positive ``positive[:, m]`` of ``(N, M, D)`` positives whose first element is
    ``query``'s first (the candidate for :func:`same_view`), or ``None``; ``None`` under compile
    and ``torch.func`` too, where tensors have no addresses to compare."""
    if torch.compiler.is_compiling() or is_functorch_wrapped(query):
        return None
    if is_functorch_wrapped(positive):
        return None
    if query.device != positive.device or query.dtype != positive.dtype:
        return None
    offset = query.data_ptr() - positive.data_ptr()
    step = positive.stride(1) * positive.element_size()
    if step == 0:  # expanded along M: every positive is the first
        return positive[:, 0] if offset == 0 else None
    m, rest = divmod(offset, step)
    return positive[:, m] if rest == 0 and 0 <= m < positive.shape[1] else None


def same_view(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are exactly the same data (one tensor, or views with the same
    offset, shape and strides, as ``z.detach()``); ``z.chunk(2)``'s parts are not. Under
    compile and ``torch.func`` (no storage) only identity counts."""
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
