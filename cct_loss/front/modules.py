"""The ``nn.Module`` forms: each holds one validated options object and takes the one route.

Every option is an attribute (``crit.t_neg = 5.0`` is validated and takes effect on the next
call; ``crit.temperature`` converts by the current cost). A new attribute named like an option
(``crit.tneg = 5``) is an ``AttributeError`` naming it. Options are not buffers: ``state_dict``
never changes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from typing_extensions import Unpack

from ..checks import closest_name
from ..implementations.table import TABLE
from ..maths.reduction import CCTDetails
from ..options import (
    KEYWORDS,
    OPTION_NAMES,
    CCTOptions,
    ModuleKeywords,
    options_of,
    spell_out_options,
    temperature_from_t_neg,
)
from .route import pairs_loss, views_loss
from .validate import PAIR_LAYOUTS, VIEW_LAYOUTS, check_layout


class _OptionsModule(nn.Module):
    """Holds a :class:`CCTOptions`; its fields read and write as attributes."""

    options: CCTOptions
    _layouts: tuple[str, ...] = ()

    @spell_out_options
    def __init__(self, **options: Unpack[ModuleKeywords]) -> None:
        super().__init__()
        checked = options_of(options, TABLE, type(self).__name__)
        check_layout(checked, self._layouts, type(self).__name__)
        object.__setattr__(self, "options", checked)

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options")
        if options is not None and name in OPTION_NAMES:
            return getattr(options, name)
        if options is not None and name == "temperature":
            return temperature_from_t_neg(options.t_neg, options.cost)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in OPTION_NAMES:  # validated like the constructor's; never silently ignored
            self._set_options(self._with(**{name: value}))
        elif name == "temperature":  # converted by the current cost
            self._set_options(self._with(temperature=value, t_neg=None))
        elif name == "options":
            if not isinstance(value, CCTOptions):
                raise TypeError(f"options must be a CCTOptions, got {type(value).__name__}")
            self._set_options(self._with(**value.as_dict()))
        else:
            self._refuse_misspelt_option(name)
            super().__setattr__(name, value)

    def _with(self, **changes: Any) -> CCTOptions:
        """The module's options with ``changes``, validated as the constructor's are."""
        values = {**self.options.as_dict(), **changes}
        return options_of(values, TABLE, type(self).__name__)

    def _set_options(self, options: CCTOptions) -> None:
        check_layout(options, self._layouts, type(self).__name__)
        object.__setattr__(self, "options", options)

    def _refuse_misspelt_option(self, name: str) -> None:
        """A new public attribute named like an option (``tneg``) is an ``AttributeError``;
        names the class declares, or the instance already holds, are left alone."""
        if name.startswith("_") or name in self.__dict__ or _declared(type(self), name):
            return
        if name in self._modules or name in self._parameters or name in self._buffers:
            return
        close = closest_name(name, sorted(KEYWORDS))
        if close:
            raise AttributeError(
                f"{type(self).__name__} has no option {name!r}; did you mean {close!r}? "
                f"Its options are: {', '.join(sorted(KEYWORDS))}. (To give a subclass an "
                "attribute of that name, declare it on the class.)"
            )

    def _call_name(self) -> str:
        """How messages spell a call of this module: ``CCTLoss(...)(query, ...)``."""
        return f"{type(self).__name__}(...)"

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.as_dict().items())


def _declared(cls: type, name: str) -> bool:
    """Whether ``name`` is a class attribute or an annotation of ``cls`` or a base."""
    return any(name in vars(c) or name in getattr(c, "__annotations__", {}) for c in cls.__mro__)


class CCTLoss(_OptionsModule):
    """Module form of :func:`cct_loss.cct_loss`.

    Takes the options of :func:`cct_loss.cct_loss` as keywords (``layout`` ``"all"`` or
    ``"cross"``); they are checked here, at construction (and when set as attributes), so a bad
    setting fails before training starts.

    Examples:
        >>> import torch
        >>> from cct_loss import CCTLoss
        >>> criterion = CCTLoss(temperature=0.2)  # t_neg = 1 / (2 * 0.2) = 2.5
        >>> loss = criterion(torch.randn(8, 16), torch.randn(8, 16))
        >>> criterion.t_neg = torch.tensor(1.5)  # a schedule: takes effect on the next call
        >>> metric = CCTLoss()(torch.randn(8, 16), labels=torch.randint(0, 3, (8,)))
    """

    _layouts = PAIR_LAYOUTS

    def forward(
        self,
        query: Tensor,
        positive: Tensor | None = None,
        negatives: Tensor | None = None,
        labels: Tensor | None = None,
        negative_labels: Tensor | None = None,
    ) -> Tensor | CCTDetails:
        """See :func:`cct_loss.cct_loss`."""
        tensors = (query, positive, negatives, labels, negative_labels)
        return pairs_loss(*tensors, self.options, entry=self._call_name())


class CCTMultiviewLoss(_OptionsModule):
    """Module form of :func:`cct_loss.cct_loss_multiview`.

    Takes the options of :func:`cct_loss.cct_loss_multiview` as keywords (``layout``
    ``"all"``, symmetric with ``M = V - 1`` positives, or ``"paper"``).

    Examples:
        >>> import torch
        >>> from cct_loss import CCTMultiviewLoss
        >>> criterion = CCTMultiviewLoss(layout="paper", t_neg=0.9, detach_weights=False)
        >>> loss = criterion([torch.randn(8, 16) for _ in range(5)])
    """

    _layouts = VIEW_LAYOUTS

    def forward(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor | CCTDetails:
        """See :func:`cct_loss.cct_loss_multiview`."""
        return views_loss(views, labels, self.options, entry=self._call_name())
