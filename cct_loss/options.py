"""The options of every entry point: the one list (:class:`CCTOptions`), their checks, and
``temperature``, InfoNCE's way to set ``t_neg``.

The entry points take their options as ``**options`` and get their signatures from this list
(:func:`spell_out_options`), so ``help()`` and ``inspect`` show every option with its default.
:class:`OptionKeywords` repeats the list for type checkers and IDEs, which read the source;
tests/test_api.py holds it to :class:`CCTOptions`."""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from numbers import Real
from typing import Any, TypedDict, TypeVar

from torch import Tensor

from . import shortcuts
from .checks import as_int, closest_name, shape_str

#: The largest ``t_pos``/``t_neg`` taken: on unit vectors (costs up to 4) the logits of every
#: implementation stay finite in float32 up to it, and the weights are one-hot long before
#: (BENCHMARKS.md, "Where the constants come from"). Without normalising, the sharpness times
#: the largest cost must stay below it too (docs/specification.md).
MAX_SHARPNESS = 1e38
COSTS = ("sqeuclidean", "cosine")
REDUCTIONS = ("mean", "sum", "none")
LAYOUTS = ("all", "cross", "paper")


@dataclass(frozen=True, eq=False)
class CCTOptions:
    """The validated options of one call (their meaning: :func:`cct_loss.cct_loss`); a tensor
    ``t_pos``, ``t_neg``, ``alpha`` or ``beta`` is checked for shape and dtype, not value."""

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

    #: No option is a tensor (a schedule can change between calls with one options object);
    #: set by validation.
    constant: bool = field(default=True, init=False, repr=False)

    def __post_init__(self) -> None:
        check_choice("layout", self.layout, LAYOUTS)
        # Python numbers become floats; every bad value is refused with a message naming it.
        for name in ("t_pos", "t_neg"):
            value = check_scalar_option(name, getattr(self, name), nonnegative=True)
            object.__setattr__(self, name, value)
        for name in ("alpha", "beta"):
            value = check_scalar_option(name, getattr(self, name))
            object.__setattr__(self, name, value)
        check_choice("cost", self.cost, COSTS)
        check_flag("normalize", self.normalize)
        check_flag("detach_weights", self.detach_weights)
        check_choice("reduction", self.reduction, REDUCTIONS)
        object.__setattr__(self, "chunk_size", check_chunk_size(self.chunk_size))
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

    @property
    def wants_weights(self) -> bool:
        """``return_details="weights"``: the diagnostics include the weight matrices."""
        return self.return_details == "weights"

    def as_dict(self) -> dict[str, object]:
        """The options by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


#: The options' names, in the order of :class:`CCTOptions`.
OPTION_NAMES = tuple(f.name for f in fields(CCTOptions) if f.init)

#: Every keyword the entry points take, in their order, with its default: the options, and
#: ``temperature`` before ``t_pos``; ``t_neg`` defaults to ``None`` there (1.0 unless
#: ``temperature`` is given).
_DEFAULTS = {f.name: f.default for f in fields(CCTOptions) if f.init}
KEYWORDS: dict[str, object] = {
    "layout": _DEFAULTS["layout"],
    "temperature": None,
    **_DEFAULTS,
    "t_neg": None,
}


def options_of(
    given: Mapping[str, Any], implementations: Collection[str], where: str
) -> CCTOptions:
    """The validated :class:`CCTOptions` of the keywords an entry point was ``given`` (others at
    their defaults): ``impl`` among ``implementations``, an unknown keyword a ``TypeError`` naming
    ``where``. Validated once per set of plain values (:mod:`cct_loss.shortcuts`)."""
    if not given.keys() <= _NAMES:
        unknown = next(name for name in given if name not in _NAMES)
        raise TypeError(unknown_keyword_message(where, unknown, list(KEYWORDS), given[unknown]))
    impl = given.get("impl", "auto")
    if impl != "auto" and (not isinstance(impl, str) or impl not in implementations):
        check_choice("impl", impl, ("auto", *implementations))
    key = tuple(itertools.chain.from_iterable(given.items()))
    return _VALIDATED.lookup(key, lambda: _build({**KEYWORDS, **given}))


#: The names other libraries give our options, and what to write instead (docs/options.md).
ALIASES = {
    "temp": "'temperature'",
    "tau": "'temperature'",
    "t": "'temperature'",
    "temperature_init": "'temperature'",
    "t_negative": "'t_neg'",
    "negative_temperature": "'t_neg' (an inverse temperature) or 'temperature'",
    "inverse_temperature": "'t_neg'",
    "t_positive": "'t_pos'",
    "logit_scale": "temperature=1 / logit_scale (or CCTClipLoss for open_clip)",
    "memory_bank_size": "queue=NegativeQueue(size, dim) on CCTLoss",
    "queue_size": "queue=NegativeQueue(size, dim) on CCTLoss",
    "symmetric": "layout='all' (symmetric) or layout='cross' (one direction)",
    "negative_mode": "the shape of negatives: (K, D) shared, (N, K, D) per query",
    "gather_with_grad": "'gather_distributed'",
    "all_gather": "'gather_distributed'",
    "distributed": "'gather_distributed'",
    "lambda_pos": "'alpha'",
    "lambda_neg": "'beta'",
}


def unknown_keyword_message(where: str, name: str, valid: list[str], value: object = None) -> str:
    """``where`` got ``name`` (``= value``), which is none of ``valid``: the message, with what
    other libraries' name means here (:data:`ALIASES`) or else the closest valid name."""
    close = closest_name(name, valid)
    alias = ALIASES.get(name.lower())
    if name == "memory_bank_size" and isinstance(value, tuple) and len(value) == 2:
        hint = f"; did you mean CCTLoss(queue=NegativeQueue({value[0]!r}, {value[1]!r}))?"
    elif alias is not None:
        hint = f"; did you mean {alias}?"
    else:
        hint = f"; did you mean {close!r}?" if close else "."
    return (
        f"{where}() got an unexpected keyword argument {name!r}{hint} "
        f"The valid keywords are: {', '.join(valid)}"
    )


_Function = TypeVar("_Function", bound=Callable[..., Any])


def spell_out_options(function: _Function) -> _Function:
    """Give ``function``, which takes its options as ``**options``, the signature that spells
    out every option with its default and type (from :class:`CCTOptions`), for ``help()`` and
    :func:`inspect.signature`. Returns ``function`` itself."""
    signature = inspect.signature(function)
    # (a ``*positional`` catch-all only refuses positional options with a message: not shown)
    own = [
        p for p in signature.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    spelt = [name for name in KEYWORDS if name not in signature.parameters]
    options = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=KEYWORDS[name],
                          annotation=_ANNOTATIONS[name])
        for name in spelt
    ]  # fmt: skip
    function.__signature__ = signature.replace(parameters=[*own, *options])  # type: ignore[attr-defined]
    return function


#: Options validated by earlier calls, by their keywords.
_VALIDATED: shortcuts.Memo[CCTOptions] = shortcuts.Memo()


_NAMES = frozenset(KEYWORDS)
_ANNOTATIONS = {f.name: f.type for f in fields(CCTOptions)} | dict.fromkeys(
    ("t_neg", "temperature"), "float | Tensor | None"
)


def _build(values: Mapping[str, Any]) -> CCTOptions:
    chosen = {name: values[name] for name in OPTION_NAMES}
    chosen["t_neg"] = t_neg_of(values["t_neg"], values["temperature"], values["cost"])
    return CCTOptions(**chosen)


def t_neg_from_temperature(temperature: float | Tensor, cost: str) -> float | Tensor:
    """The ``t_neg`` whose weights are InfoNCE's ``softmax(cos / temperature)`` on unit vectors:
    ``1 / (2 temperature)`` for the default cost (``d = 2 - 2 cos``), ``1 / temperature`` for
    ``cost="cosine"`` (``d = 1 - cos``)."""
    return (0.5 if cost == "sqeuclidean" else 1.0) / temperature


def temperature_from_t_neg(t_neg: float | Tensor, cost: str) -> float | Tensor:
    """The inverse of :func:`t_neg_from_temperature` (``inf`` for ``t_neg = 0``: uniform
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
    known = cost if isinstance(cost, str) else "sqeuclidean"
    t_neg = t_neg_from_temperature(checked, known)
    if not isinstance(t_neg, Tensor) and t_neg > MAX_SHARPNESS:
        smallest = t_neg_from_temperature(MAX_SHARPNESS, known)
        raise ValueError(
            f"temperature must be at least {smallest:g} for cost={known!r}, got {checked:g}: it "
            f"sets t_neg = {t_neg:g}, beyond the largest sharpness {MAX_SHARPNESS:g} (a sharpness "
            "times a cost beyond that overflows float32 logits)"
        )
    return t_neg


def check_scalar_option(
    name: str, value: object, *, nonnegative: bool = False, positive: bool = False
) -> float | Tensor:
    """A sharpness (``nonnegative``), a temperature (``positive``) or a weight: a number checked
    and made a float, or a 0-dim float tensor checked for everything but its value (that would
    synchronise). One that requires grad is refused: options are constants to autograd."""
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
        if value.requires_grad and name in ("alpha", "beta"):
            raise ValueError(
                f"{name} must not require grad: the options are constants to autograd. The loss "
                "is linear in each weight, so gradient descent would not balance the terms: it "
                "drives alpha down without bound (the attraction is >= 0) and beta up (the "
                "repulsion is <= 0), switching one term off or letting the other take over. "
                "To weight the terms yourself, ask for them: details = cct_loss(..., "
                "return_details=True); loss = details.attraction + w * details.repulsion"
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
    if nonnegative and v > MAX_SHARPNESS:
        raise ValueError(
            f"{name} must be at most {MAX_SHARPNESS:g}, got {v:g}: a sharpness times a cost "
            "beyond that overflows float32 logits (every implementation is exact up to it; "
            "there the weights are already one-hot)"
        )
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` as one of the allowed strings."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_flag(name: str, value: object) -> bool:
    """``value`` as a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def check_details(value: object) -> bool | str:
    """``return_details``: a bool, or ``"weights"`` for the weight matrices too."""
    if value == "weights" or isinstance(value, bool):
        return value
    raise TypeError(
        f'return_details must be a bool or "weights", got {type(value).__name__} ({value!r})'
    )


def check_chunk_size(value: object) -> int | None:
    """``chunk_size``: ``None`` or an int >= 1."""
    if value is None:
        return None
    number = as_int(value)
    if number is None:
        raise TypeError(f"chunk_size must be None or an int >= 1, got {type(value).__name__}")
    if number < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {number}")
    return number


class OptionKeywords(TypedDict, total=False):
    """The keyword options, for type checkers and IDEs (``return_details`` apart: the typed
    overloads spell it, since it decides what is returned); held to :data:`KEYWORDS` by a test."""

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


class ModuleKeywords(OptionKeywords, total=False):
    """The keyword options of the modules' constructors (``return_details`` too)."""

    return_details: bool | str
