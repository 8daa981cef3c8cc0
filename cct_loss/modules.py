"""``nn.Module`` wrappers: they hold one validated options object and call the private core.

Every option is an attribute: reading ``crit.t_neg`` gives the current value and setting it
(``crit.t_neg = 5.0``) validates the new value and takes effect on the next call. Options are
not buffers or parameters, so ``state_dict`` never changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from .core import PAIR_LAYOUTS, VIEW_LAYOUTS, check_layout, loss_of_pairs, loss_of_views
from .details import CCTDetails
from .options import OPTION_NAMES, CCTOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .options import CCTKeywords


class _OptionsModule(nn.Module):
    """Holds a :class:`CCTOptions`; its fields read and write as attributes."""

    options: CCTOptions
    _layouts: tuple[str, ...] = ()
    _entry: str = ""

    def __init__(self, **options: Unpack[CCTKeywords]) -> None:
        super().__init__()
        checked = CCTOptions(**options)
        check_layout(checked, self._layouts, self._entry)
        object.__setattr__(self, "options", checked)

    def __getattr__(self, name: str) -> Any:
        if name in OPTION_NAMES:
            return getattr(self.__dict__["options"], name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in OPTION_NAMES:  # validated like the constructor's; never silently ignored
            updated = replace(self.options, **{name: value})
            check_layout(updated, self._layouts, self._entry)
            object.__setattr__(self, "options", updated)
        elif name == "options":
            if not isinstance(value, CCTOptions):
                raise TypeError(f"options must be a CCTOptions, got {type(value).__name__}")
            check_layout(value, self._layouts, self._entry)
            object.__setattr__(self, "options", value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.as_dict().items())


class CCTLoss(_OptionsModule):
    """Module form of :func:`cct_loss.cct_loss`.

    Args:
        **options: ``layout``, ``t_pos``, ``t_neg``, ``alpha``, ``beta``, ``cost``,
            ``normalize``, ``detach_weights``, ``reduction``, ``impl``, ``chunk_size``,
            ``return_details``, ``gather_distributed``: as in :func:`cct_loss.cct_loss`;
            checked here, at construction (and when set as attributes), so a bad setting fails
            before training starts.

    Examples:
        >>> import torch
        >>> from cct_loss import CCTLoss
        >>> criterion = CCTLoss(t_neg=2.0)
        >>> loss = criterion(torch.randn(8, 16), torch.randn(8, 16))
        >>> criterion.t_neg = torch.tensor(1.5)  # a schedule: takes effect on the next call
        >>> supervised = CCTLoss(layout="cross")(
        ...     torch.randn(8, 16), torch.randn(8, 16), labels=torch.randint(0, 3, (8,))
        ... )
    """

    _layouts = PAIR_LAYOUTS
    _entry = "CCTLoss"

    def forward(
        self,
        query: Tensor,
        positive: Tensor,
        negatives: Tensor | None = None,
        labels: Tensor | None = None,
        negative_labels: Tensor | None = None,
    ) -> Tensor | CCTDetails:
        """See :func:`cct_loss.cct_loss`."""
        return loss_of_pairs(query, positive, negatives, labels, negative_labels, self.options)


class CCTMultiviewLoss(_OptionsModule):
    """Module form of :func:`cct_loss.cct_loss_multiview`.

    Args:
        **options: ``layout`` (``"all"``, symmetric with ``M = V - 1`` positives, or
            ``"paper"``) and the options of :func:`cct_loss.cct_loss`.
    """

    _layouts = VIEW_LAYOUTS
    _entry = "CCTMultiviewLoss"

    def forward(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor | CCTDetails:
        """See :func:`cct_loss.cct_loss_multiview`."""
        return loss_of_views(views, labels, self.options)
