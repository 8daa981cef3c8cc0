"""Every per-call speed shortcut of the library, in one place, behind one switch.

At per-GPU batch sizes a step is made of fixed costs: Python-level checks, contexts entered, an
autograd function's argument binding. The shortcuts take them out of the steps after the first:
memo tables (:class:`Memo`: validated options, layouts' block descriptions, replayed call plans),
classic-style twins of ``setup_context`` autograd functions (:func:`apply`; ``Function.apply``
binds such a function's arguments through :mod:`inspect` at every call), and one
reused empty context. None changes a value: with :func:`disabled` every call takes the long way,
and tests/test_shortcuts.py checks that results are bit-identical. They step aside while
``torch.compile`` traces and under ``torch.func`` transforms."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Generic, TypeVar

import torch

_enabled = True


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block every call takes the long way (no memo is read or written, autograd
    functions are applied as they are)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def active() -> bool:
    """Whether the shortcuts apply now: switched on, not tracing, no ``torch.func`` transform."""
    return (
        _enabled
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    )


_Value = TypeVar("_Value")

#: Entries a memo holds before it starts again. A trainer makes a handful of signatures (train,
#: eval, a last partial batch); this bounds the memory of one whose shapes change every step,
#: while a memo in use is never emptied every few calls.
MEMO_ENTRIES = 256

#: The key types a memo accepts: anything else (a tensor option, a list) is built every call.
_PLAIN = frozenset({bool, int, float, str, type(None), torch.dtype, torch.device})


class Memo(Generic[_Value]):
    """A table from plain keys to what an earlier call built for them, emptied when it holds
    ``size`` (a trainer has a handful of signatures)."""

    def __init__(self, size: int = MEMO_ENTRIES) -> None:
        self.size = size
        self._table: dict[Hashable, _Value] = {}

    def get(self, key: Hashable) -> _Value | None:
        """The value remembered for ``key``, or ``None`` (always ``None`` while switched off;
        a caller reads only keys it made while :func:`active`)."""
        return self._table.get(key) if _enabled else None

    def put(self, key: Hashable, value: _Value) -> None:
        """Remember ``value`` for ``key`` (nothing while inactive)."""
        if not active():
            return
        if len(self._table) >= self.size:
            self._table.clear()
        self._table[key] = value

    def lookup(self, key: tuple[Any, ...], build: Callable[[], _Value]) -> _Value:
        """The value for ``key``, built by ``build`` the first time; built every time while
        inactive or when a part of the key is not a plain value (a tensor, a list). Parts are
        told apart by type as well (``True`` is not ``1``, which Python's equality says it is)."""
        types = tuple(map(type, key))
        if not (_PLAIN.issuperset(types) and active()):
            return build()
        typed = (key, types)
        found = self._table.get(typed)
        if found is None:
            found = build()
            self.put(typed, found)
        return found

    def clear(self) -> None:
        self._table.clear()


_Function = TypeVar("_Function", bound=type[torch.autograd.Function])

#: The classic twin of each registered function.
_TWINS: dict[type[torch.autograd.Function], type[torch.autograd.Function]] = {}
#: The registered functions whose twin returns the first output alone.
_FIRST_ONLY: set[type[torch.autograd.Function]] = set()


def eager_twin(function: _Function) -> _Function:
    """Register a classic twin of ``function`` (a ``setup_context`` autograd function) for
    :func:`apply`. With ``saved_outputs = True`` the outputs after the first are only saved for
    the backward, and the twin returns the first alone (cheaper); :func:`apply` hides it."""
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
    # Function.apply binds a setup_context function's arguments through inspect.signature at
    # every call: give it the signature once, rather than rebuilt each time.
    function.forward.__signature__ = inspect.signature(forward)  # type: ignore[attr-defined]
    return function


def apply(function: type[torch.autograd.Function], *inputs: Any) -> Any:
    """``function.apply(*inputs)``, through its classic twin when the shortcuts are active."""
    if not active():
        return function.apply(*inputs)
    twin = _TWINS[function]
    if function in _FIRST_ONLY:
        return (twin.apply(*inputs),)
    return twin.apply(*inputs)


#: Entering a context costs microseconds: the one reused where nothing needs entering.
_NO_CONTEXT = contextlib.nullcontext()


def no_context() -> contextlib.AbstractContextManager[object]:
    """A context manager that does nothing (one reused object while the shortcuts are active)."""
    return _NO_CONTEXT if _enabled else contextlib.nullcontext()
