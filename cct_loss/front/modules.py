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
    ALIASES,
    KEYWORDS,
    OPTION_NAMES,
    CCTOptions,
    ModuleKeywords,
    options_of,
    spell_out_options,
    temperature_from_t_neg,
)
from ..problem.layouts import flat_keys
from ..queue import NegativeQueue
from .route import pairs_loss, views_loss
from .validate import PAIR_LAYOUTS, VIEW_LAYOUTS, check_layout


class OptionsModule(nn.Module):
    """Holds a :class:`CCTOptions`; its fields read and write as attributes. The base of every
    loss module, the clients' (:mod:`cct_loss.clients`) too; not exported from ``cct_loss``."""

    options: CCTOptions
    _layouts: tuple[str, ...] = ()

    @spell_out_options
    def __init__(self, *positional: object, **options: Unpack[ModuleKeywords]) -> None:
        if positional:
            raise TypeError(positional_options_message(type(self).__name__, positional))
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
        """A new public attribute named like an option (``tneg``), or as another library names
        one (``tau``, :data:`cct_loss.options.ALIASES`), is an ``AttributeError``;
        names the class declares, or the instance already holds, are left alone."""
        if name.startswith("_") or name in self.__dict__ or _declared(type(self), name):
            return
        if name in self._modules or name in self._parameters or name in self._buffers:
            return
        close = closest_name(name, sorted(KEYWORDS))
        meant = ALIASES.get(name.lower()) or (close and f"{close!r}")
        if meant:
            raise AttributeError(
                f"{type(self).__name__} has no option {name!r}; did you mean {meant}? "
                f"Its options are: {', '.join(sorted(KEYWORDS))}. (To give a subclass an "
                "attribute of that name, declare it on the class.)"
            )

    def _call_name(self) -> str:
        """How messages spell a call of this module: ``CCTLoss(...)(query, ...)``."""
        return f"{type(self).__name__}(...)"

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.as_dict().items())


def positional_options_message(module: str, positional: tuple[object, ...]) -> str:
    """``CCTLoss(0.5)``: the options are keywords; the message names the module and, for a
    number, the ``temperature=`` it most likely meant."""
    first = positional[0]
    count = f"{len(positional)} positional argument{'s' if len(positional) > 1 else ''}"
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        hint = (
            f"did you mean {module}(temperature={first!r}) (InfoNCE's tau) or "
            f"{module}(t_neg={first!r}) (CCT's sharpness, an inverse temperature)?"
        )
    elif isinstance(first, NegativeQueue):
        hint = f"pass the queue by name: {module}(queue=...)"
    else:
        hint = f"its options are: {', '.join(KEYWORDS)}"
    return f"{module}() takes its options as keywords only, got {count} ({first!r}): {hint}"


def _declared(cls: type, name: str) -> bool:
    """Whether ``name`` is a class attribute or an annotation of ``cls`` or a base."""
    return any(name in vars(c) or name in getattr(c, "__annotations__", {}) for c in cls.__mro__)


class CCTLoss(OptionsModule):
    """Module form of :func:`cct_loss.cct_loss`, optionally owning a queue of negatives.

    Takes the options of :func:`cct_loss.cct_loss` as keywords (``layout`` ``"all"`` or
    ``"cross"``); they are checked here, at construction (and when set as attributes), so a bad
    setting fails before training starts.

    Args:
        queue: a :class:`cct_loss.NegativeQueue` the loss owns (lightly's
            ``NTXentLoss(memory_bank_size=...)`` and MoCo's pattern): ``criterion(q, k)`` takes
            the queue's keys as the negatives, then enqueues ``k`` (every positive, detached;
            with the labels for a queue ``with_labels=True``) when ``q`` requires grad: an
            evaluation under ``torch.no_grad()`` leaves the queue as it was. While the queue is
            empty (the first step) the other rows' keys of the batch are the negatives, so no
            step needs a special case (docs/queue.md). The queue is a submodule:
            ``state_dict`` saves it, ``.to()`` moves it; across processes, build it with
            ``gather_distributed=True``.
        **options: as :func:`cct_loss.cct_loss`.

    Examples:
        >>> import torch
        >>> from cct_loss import CCTLoss, NegativeQueue
        >>> criterion = CCTLoss(temperature=0.2)  # t_neg = 1 / (2 * 0.2) = 2.5
        >>> loss = criterion(torch.randn(8, 16), torch.randn(8, 16))
        >>> criterion.t_neg = torch.tensor(1.5)  # a schedule: takes effect on the next call
        >>> metric = CCTLoss()(torch.randn(8, 16), labels=torch.randint(0, 3, (8,)))
        >>> moco = CCTLoss(temperature=0.2, queue=NegativeQueue(4096, 16))
        >>> loss = moco(torch.randn(8, 16), torch.randn(8, 16))  # then enqueues the keys
    """

    _layouts = PAIR_LAYOUTS
    queue: NegativeQueue | None

    @spell_out_options
    def __init__(
        self,
        *positional: object,
        queue: NegativeQueue | None = None,
        **options: Unpack[ModuleKeywords],
    ) -> None:
        super().__init__(*positional, **options)
        if queue is not None and not isinstance(queue, NegativeQueue):
            raise TypeError(f"queue must be a NegativeQueue or None, got {type(queue).__name__}")
        if queue is not None and self.options.gather_distributed:
            raise ValueError(_GATHERING_WITH_A_QUEUE)
        self.queue = queue

    def forward(
        self,
        query: Tensor,
        positive: Tensor | None = None,
        negatives: Tensor | None = None,
        labels: Tensor | None = None,
        negative_labels: Tensor | None = None,
    ) -> Tensor | CCTDetails:
        """See :func:`cct_loss.cct_loss`; with a queue, ``criterion(query, keys)`` (and
        ``labels=``), the negatives coming from the queue."""
        tensors = (query, positive, negatives, labels, negative_labels)
        if self.queue is None:
            return pairs_loss(*tensors, self.options, entry=self._call_name())
        return self._with_queue(self.queue, *tensors)

    def _with_queue(
        self,
        queue: NegativeQueue,
        query: Tensor,
        positive: Tensor | None,
        negatives: Tensor | None,
        labels: Tensor | None,
        negative_labels: Tensor | None,
    ) -> Tensor | CCTDetails:
        """The loss against the queue's keys, then the keys enqueued (a training step)."""
        entry = self._call_name()
        if self.options.gather_distributed:  # (set as an attribute after construction)
            raise ValueError(_GATHERING_WITH_A_QUEUE)
        if negatives is not None or negative_labels is not None:
            raise ValueError(
                f"this {type(self).__name__} owns a queue, whose keys are the negatives: call "
                "it as criterion(query, keys) (with labels=... for a queue with labels), or "
                "build it without queue= to pass negatives yourself"
            )
        if positive is None:
            raise TypeError(
                f"{entry} with a queue needs the keys: criterion(query, keys), the keys then "
                "enqueued as later negatives"
            )
        if queue.with_labels != (labels is not None):
            raise ValueError(
                "labels go with a queue that keeps them: build it with NegativeQueue(size, dim, "
                "with_labels=True) and call criterion(query, keys, labels=labels)"
                if labels is not None
                else "this queue keeps labels (with_labels=True): call "
                "criterion(query, keys, labels=labels)"
            )
        negatives = queue.negatives()
        negative_labels = queue.labels() if queue.with_labels else None
        loss = pairs_loss(
            query, positive, negatives, labels, negative_labels, self.options, entry=entry
        )
        keys, key_labels = flat_keys(positive, labels)
        if query.requires_grad:  # a training step (lightly's rule: evaluation leaves it be)
            queue.enqueue(keys, key_labels, check_finite=self.options.check_finite)
        return loss


_GATHERING_WITH_A_QUEUE = (
    "CCTLoss(gather_distributed=True) gathers in-batch negatives, which a queue replaces; to "
    "share the queue across processes build it with NegativeQueue(size, dim, "
    "gather_distributed=True) and leave the loss's gather_distributed=False"
)


class CCTMultiviewLoss(OptionsModule):
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
