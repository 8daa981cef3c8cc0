"""The options of every entry point: one object, validated once, passed to the private core.

Adding an option touches this file (the field and its check), the public signatures
(:func:`cct_loss.cct_loss`, :func:`cct_loss.cct_loss_multiview` and :class:`CCTKeywords`, which
the modules take) and the docs; nothing else re-lists the options.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor

from ._validation import (
    COSTS,
    LAYOUTS,
    REDUCTIONS,
    check_choice,
    check_chunk_size,
    check_details,
    check_flag,
    check_scalar_option,
)
from .dispatch import IMPLS

#: Which side of the transport a kernel call computes: the attraction over a query's positives
#: (``softmax(+t_pos d)``, farther positives weigh more) or the repulsion over its negatives
#: (``softmax(-t_neg d)``, closer negatives weigh more).
Side = Literal["positives", "negatives"]


@dataclass(frozen=True, eq=False)
class CCTOptions:
    """Validated options of :func:`cct_loss.cct_loss` (see its docstring for their meaning).

    ``t_pos``, ``t_neg``, ``alpha`` and ``beta`` are floats or 0-dim tensors (a tensor is checked
    for its shape, dtype and ``requires_grad``, never for its value: that would synchronise).
    """

    layout: str = "all"
    t_pos: float | Tensor = 1.0
    t_neg: float | Tensor = 1.0
    alpha: float | Tensor = 1.0
    beta: float | Tensor = 1.0
    cost: str = "sqeuclidean"
    normalize: bool = True
    detach_weights: bool = True
    reduction: str = "mean"
    impl: str = "auto"
    chunk_size: int | None = None
    return_details: bool | str = False
    gather_distributed: bool = False
    check_finite: bool = False

    def __post_init__(self) -> None:
        check_choice("layout", self.layout, LAYOUTS)
        # Python numbers become floats; every bad value is refused with a message naming it.
        for name in ("t_pos", "t_neg"):
            value = check_scalar_option(name, getattr(self, name), nonnegative=True)
            object.__setattr__(self, name, value)
        for name in ("alpha", "beta"):
            value = check_scalar_option(name, getattr(self, name), nonnegative=False)
            object.__setattr__(self, name, value)
        check_choice("cost", self.cost, COSTS)
        check_flag("normalize", self.normalize)
        check_flag("detach_weights", self.detach_weights)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("impl", self.impl, IMPLS)
        check_chunk_size(self.chunk_size)
        if self.chunk_size is not None and self.impl not in ("auto", "chunked"):
            raise ValueError(
                f"chunk_size is the block width of impl='chunked'; impl={self.impl!r} has no "
                f"blocks (got chunk_size={self.chunk_size}); drop it or use impl='chunked'"
            )
        check_details(self.return_details)
        if self.wants_weights and self.impl not in ("auto", "dense"):
            raise ValueError(
                f"return_details='weights' needs the weight matrices, which impl={self.impl!r} "
                "never holds; use impl='dense' (or 'auto', which then picks it), or "
                "return_details=True for the statistics without the matrices"
            )
        check_flag("gather_distributed", self.gather_distributed)
        check_flag("check_finite", self.check_finite)
        numbers = (self.t_pos, self.t_neg, self.alpha, self.beta)
        object.__setattr__(self, "constant", not any(isinstance(x, Tensor) for x in numbers))

    #: No option is a tensor (a schedule's value can change between calls with the same
    #: options object); set by validation.
    constant: bool = field(default=True, init=False, repr=False, compare=False)

    @property
    def wants_weights(self) -> bool:
        """``return_details="weights"``: the diagnostics include the weight matrices."""
        return self.return_details == "weights"

    def t_for(self, side: Side) -> float | Tensor:
        """``t_pos`` for the positives, ``t_neg`` for the negatives."""
        return self.t_pos if side == "positives" else self.t_neg

    def as_dict(self) -> dict[str, object]:
        """The options by name (for ``repr`` and :func:`dataclasses.replace`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


#: Names of the options (the fields of :class:`CCTOptions`).
OPTION_NAMES = frozenset(f.name for f in fields(CCTOptions) if f.init)

#: What the public entry points take besides the fields: ``temperature``, InfoNCE's way to set
#: ``t_neg`` (see :func:`t_neg_of`).
KEYWORDS = OPTION_NAMES | {"temperature"}


def t_neg_from_temperature(temperature: float | Tensor, cost: str) -> float | Tensor:
    """The ``t_neg`` whose weights are InfoNCE's ``softmax(cos / temperature)`` on unit vectors:
    ``1 / (2 temperature)`` for the default cost (``d = 2 - 2 cos``), ``1 / temperature`` for
    ``cost="cosine"`` (``d = 1 - cos``)."""
    return (0.5 if cost == "sqeuclidean" else 1.0) / temperature


def temperature_from_t_neg(t_neg: float | Tensor, cost: str) -> float | Tensor:
    """The inverse of :func:`t_neg_from_temperature` (``inf`` for ``t_neg = 0``, uniform
    weights)."""
    scale = 0.5 if cost == "sqeuclidean" else 1.0
    if isinstance(t_neg, Tensor):
        return scale / t_neg
    return math.inf if t_neg == 0 else scale / t_neg


def t_neg_of(
    t_neg: float | Tensor | None, temperature: float | Tensor | None, cost: object
) -> float | Tensor:
    """``t_neg`` as the entry points resolve it: given directly, from ``temperature`` (converted
    by ``cost``), or the default 1.0 (InfoNCE's ``tau = 0.5`` for the default cost). Giving
    both is an error: one of them would be silently ignored."""
    if temperature is None:
        return 1.0 if t_neg is None else t_neg
    if t_neg is not None:
        raise ValueError(
            f"give either temperature= (InfoNCE's tau) or t_neg= (CCT's sharpness, an inverse "
            f"temperature), not both: got temperature={temperature!r} and t_neg={t_neg!r}. "
            "temperature=tau sets t_neg = 1 / (2 tau) (cost='cosine': 1 / tau)"
        )
    checked = check_scalar_option("temperature", temperature, positive=True)
    return t_neg_from_temperature(checked, cost if isinstance(cost, str) else "sqeuclidean")


def options_of(**values: Any) -> CCTOptions:
    """``CCTOptions(**values)`` (``temperature`` resolved into ``t_neg`` by :func:`t_neg_of`),
    validated once per distinct set of values: a trainer calls the loss with the same options
    at every step, and validating fourteen of them costs a few microseconds a call, which a
    small batch's step notices. Values are told apart by type as well (``True`` is not ``1``);
    a tensor option (a schedule) is validated every call."""
    if torch.compiler.is_compiling() or any(
        isinstance(values.get(name), Tensor) for name in _NUMBERS
    ):  # (a trace runs once; the cache is for eager steps)
        return _build(values)
    try:
        return _validated(tuple(values), *values.values())
    except TypeError as error:  # an unhashable value: not an option; let validation say so
        if "unhashable" not in str(error):
            raise
        return _build(values)


def _build(values: dict[str, Any]) -> CCTOptions:
    values = dict(values)
    temperature = values.pop("temperature", None)
    values["t_neg"] = t_neg_of(values.get("t_neg"), temperature, values.get("cost", "sqeuclidean"))
    return CCTOptions(**values)


@functools.lru_cache(maxsize=256, typed=True)  # typed: each value's type is part of the key
def _validated(names: tuple[str, ...], *values: Any) -> CCTOptions:
    return _build(dict(zip(names, values, strict=True)))


#: The options that may be tensors (the others are refused as such by validation).
_NUMBERS = ("t_pos", "t_neg", "alpha", "beta", "temperature")


class OptionKeywords(TypedDict, total=False):
    """Every keyword option but ``return_details`` (the typed overloads spell that one out)."""

    layout: str
    temperature: float | Tensor | None
    t_pos: float | Tensor
    t_neg: float | Tensor | None
    alpha: float | Tensor
    beta: float | Tensor
    cost: str
    normalize: bool
    detach_weights: bool
    reduction: str
    impl: str
    chunk_size: int | None
    gather_distributed: bool
    check_finite: bool


class CCTKeywords(OptionKeywords, total=False):
    """The keyword options of :class:`cct_loss.CCTLoss` and :class:`cct_loss.CCTMultiviewLoss`
    (the same as :func:`cct_loss.cct_loss`'s, whose docstring explains each)."""

    return_details: bool | str
