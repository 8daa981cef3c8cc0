"""How the library's custom autograd functions are called: cheaply in eager mode, and in the
form ``torch.func`` needs under its transforms.

``torch.func`` (``grad``, ``vmap``) requires an autograd function written with
``setup_context``, and ``Function.apply`` then binds every call's arguments through
:mod:`inspect` and handles its outputs generically: about 25 microseconds per call for a
function with eight inputs and outputs, measured on the CPU, which a small batch's step notices
(a whole NT-Xent step takes about 100). The classic style, ``forward(ctx, ...)``, costs about
7. So each function is written once in the ``setup_context`` style and :func:`eager_twin`
derives a classic twin from the same ``forward``, ``setup_context`` and ``backward``;
:func:`apply` calls the twin, except while a ``torch.func`` transform is active or
``torch.compile`` traces (which handles either).
"""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

import torch

_Function = TypeVar("_Function", bound=type[torch.autograd.Function])

#: The classic twin of each registered function.
_TWINS: dict[type[torch.autograd.Function], type[torch.autograd.Function]] = {}


def eager_twin(function: _Function) -> _Function:
    """Register a classic-style twin of ``function`` (a ``setup_context``-style autograd
    function) for :func:`apply`; returns ``function`` itself (a class decorator).

    A function may set ``saved_outputs = True``: its outputs after the first exist only to be
    saved for the backward pass (``setup_context`` can save nothing else). The twin then
    returns the first output alone and keeps the rest internal, which costs less per call;
    :func:`apply` returns the same tuple either way."""
    forward, setup_context, backward = function.forward, function.setup_context, function.backward
    first_only = getattr(function, "saved_outputs", False)

    class Twin(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *inputs: Any) -> Any:
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output[0] if first_only else output

    Twin.backward = staticmethod(backward)  # type: ignore[method-assign]
    Twin.__name__ = Twin.__qualname__ = f"{function.__name__}Eager"
    _TWINS[function] = Twin
    if first_only:
        _FIRST_ONLY.add(function)
    cache_forward_signature(function)
    return function


#: The registered functions whose twin returns the first output alone.
_FIRST_ONLY: set[type[torch.autograd.Function]] = set()


def apply(function: type[torch.autograd.Function], *inputs: Any) -> Any:
    """``function.apply(*inputs)``, through its classic twin outside ``torch.func`` transforms
    and ``torch.compile``."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*inputs)
    twin = _TWINS[function]
    if function in _FIRST_ONLY:
        return (twin.apply(*inputs),)
    return twin.apply(*inputs)


def cache_forward_signature(function: type[torch.autograd.Function]) -> None:
    """Attach ``forward``'s signature to it: ``Function.apply`` binds the arguments of a
    ``setup_context``-style function through ``inspect.signature`` on every call, which then
    returns the cached one instead of rebuilding it."""
    forward = function.forward
    forward.__signature__ = inspect.signature(forward)  # type: ignore[attr-defined]
