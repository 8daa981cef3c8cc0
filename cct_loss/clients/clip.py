""":class:`CCTClipLoss`: the CCT loss with open_clip's ``ClipLoss`` constructor and call,
``loss(image_features, text_features, logit_scale, output_dict=False)``.

Each image is a query whose positive is its caption and whose negatives are the other captions,
and each caption likewise against the images; the loss is the mean of the two directions, as
``ClipLoss``'s two cross-entropies (``cct_loss(image, text, layout="cross")`` and back; where
the dense implementation serves the call, both from one cost matrix).
``logit_scale`` is InfoNCE's ``1 / tau``: it sets ``temperature = 1 / logit_scale``, whose
repulsion weights are ``ClipLoss``'s ``softmax(logit_scale * cos)``. It must be fixed: with
detached weights a scale gets no gradient, and with live weights a learned one collapses
towards uniform weights (docs/clients.md), so a ``logit_scale`` that requires grad is refused
with the fix, ``model.logit_scale.requires_grad_(False)`` (:meth:`CCTClipLoss.for_model` does it
in the swapped line).

Across processes the flags mean what they mean in open_clip: ``world_size > 1`` gathers every
rank's features (``gather_with_grad``: the gathered rows carry gradient back to their rank;
otherwise only this rank's rows do); ``local_loss=True`` takes this rank's rows as the queries
against every rank's candidates, ``local_loss=False`` the whole global batch on every rank."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..front import route
from ..front.modules import OptionsModule
from ..options import CCTOptions, t_neg_from_temperature

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..options import ModuleKeywords

#: Options the call decides: the temperature (``logit_scale``), the layout and the gathering.
_DECIDED = {
    "temperature": "the temperature is 1 / logit_scale, given at each call",
    "t_neg": "t_neg follows logit_scale, given at each call (t_neg = logit_scale / 2)",
    "layout": "the layout is 'cross' (images against captions and back)",
    "gather_distributed": "gathering follows world_size, local_loss and gather_with_grad",
    "return_details": "it returns the loss, as ClipLoss does; for the diagnostics call "
    "cct_loss(image_features, text_features, layout='cross', return_details=True)",
}


class CCTClipLoss(OptionsModule):
    """open_clip's ``ClipLoss`` with the CCT loss inside (module docs above): a one-line swap,
    ``loss = CCTClipLoss.for_model(model, local_loss=args.local_loss, ...)`` for
    ``loss = create_loss(args)`` (docs/clients.md).

    Args:
        local_loss, gather_with_grad, rank, world_size: as in ``ClipLoss``.
        cache_labels: accepted for ``ClipLoss``'s signature; there are no labels to cache.
        use_horovod: refused when True (gathering goes through ``torch.distributed``).
        **options: the options of :func:`cct_loss.cct_loss` but ``temperature``/``t_neg``
            (from ``logit_scale``), ``layout`` and ``gather_distributed`` (from the flags).

    Examples:
        >>> import torch
        >>> from cct_loss import CCTClipLoss
        >>> loss_fn = CCTClipLoss()
        >>> image, text = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = loss_fn(image, text, torch.tensor(100.0))  # temperature 1 / 100
    """

    _layouts = ("cross",)
    local_loss: bool
    gather_with_grad: bool
    cache_labels: bool
    use_horovod: bool
    rank: int
    world_size: int

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        **options: Unpack[ModuleKeywords],
    ) -> None:
        for name in options:
            if name in _DECIDED:
                raise TypeError(f"CCTClipLoss() takes no {name}=: {_DECIDED[name]}")
        options["layout"] = "cross"
        super().__init__(**options)
        flags = {
            "local_loss": local_loss,
            "gather_with_grad": gather_with_grad,
            "cache_labels": cache_labels,
            "use_horovod": use_horovod,
        }
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if use_horovod:
            raise ValueError(
                "use_horovod=True: CCTClipLoss gathers through torch.distributed only; launch "
                "with torchrun (open_clip's default) instead of horovod"
            )
        for name, number in (("rank", rank), ("world_size", world_size)):
            if isinstance(number, bool) or not isinstance(number, int):
                raise TypeError(f"{name} must be an int, got {type(number).__name__}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank and world_size must satisfy 0 <= rank < world_size, got rank={rank}, "
                f"world_size={world_size}"
            )
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.cache_labels, self.use_horovod = cache_labels, use_horovod
        self.rank, self.world_size = rank, world_size

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _DECIDED:  # each call sets these; a value set here would be ignored
            raise AttributeError(f"CCTClipLoss takes no {name}: {_DECIDED[name]}")
        super().__setattr__(name, value)

    @classmethod
    def for_model(cls, model: nn.Module, **arguments: Any) -> CCTClipLoss:
        """``CCTClipLoss(**arguments)`` for an open_clip ``model`` (or its DDP wrapper), whose
        ``logit_scale`` it fixes (``requires_grad_(False)``): the swap in one line. The scale
        keeps its value (``1 / 0.07`` for a new CLIP model), the temperature of every step."""
        inner = getattr(model, "module", model)  # DistributedDataParallel's wrapped model
        scale = getattr(inner, "logit_scale", None)
        if not isinstance(scale, Tensor):
            raise TypeError(
                f"CCTClipLoss.for_model needs a model with a logit_scale parameter (open_clip's "
                f"CLIP), got {type(model).__name__}"
            )
        scale.requires_grad_(False)
        return cls(**arguments)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | None = None,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        """The loss (``{"contrastive_loss": loss}`` with ``output_dict``): image ``(N, D)``
        against text ``(N, D)`` at ``temperature = 1 / logit_scale``. ``logit_bias`` (SigLIP
        models) adds one constant to every logit of a query, which cancels in each softmax:
        it changes nothing, as in ``ClipLoss``."""
        options = self._options_at(logit_scale)
        images, texts = image_features, text_features
        if self.world_size > 1:
            images, texts, own = self._gathered(image_features, text_features)
            if self.local_loss:  # this rank's queries; every rank's candidates
                image_rows, text_rows = _others(images, own), _others(texts, own)
                to_text = self._direction(image_features, text_features, text_rows, options)
                to_image = self._direction(text_features, image_features, image_rows, options)
                loss = (to_text + to_image) / 2
                return {"contrastive_loss": loss} if output_dict else loss
        both = route.two_way_loss(images, texts, options, self._call_name())
        assert isinstance(both, Tensor)
        return {"contrastive_loss": both} if output_dict else both

    def _direction(
        self, query: Tensor, positive: Tensor, others: Tensor | None, options: CCTOptions
    ) -> Tensor:
        """One direction: each ``query`` row against ``positive``'s rows (and ``others``, the
        other ranks' rows under ``local_loss``)."""
        loss = route.pairs_loss(query, positive, others, None, None, options, self._call_name())
        assert isinstance(loss, Tensor)
        return loss

    def _options_at(self, logit_scale: object) -> CCTOptions:
        """The options with ``t_neg`` from ``logit_scale`` (checked: a finite number >= 0, or a
        one-element floating-point tensor that requires no grad; 0 gives uniform weights, as
        ``ClipLoss``'s softmax of zero logits)."""
        if isinstance(logit_scale, Tensor):
            if logit_scale.numel() != 1 or not logit_scale.is_floating_point():
                raise ValueError(
                    "logit_scale must be a number or a one-element floating-point tensor "
                    f"(open_clip's model.logit_scale.exp()), got {logit_scale.dtype} of shape "
                    f"{tuple(logit_scale.shape)}"
                )
            if logit_scale.requires_grad:
                raise ValueError(
                    "logit_scale requires grad, but CCT takes it as a fixed temperature: with "
                    "detached weights (the default) a scale gets no gradient at all, and with "
                    "live weights the loss falls as the scale falls, so a learned scale would "
                    "collapse towards uniform weights. Fix it with "
                    "model.logit_scale.requires_grad_(False) (or build the loss with "
                    "CCTClipLoss.for_model(model, ...), which does)"
                )
            # On the CPU its value is read (no device to wait for), so that a fixed scale makes
            # every step the same call; elsewhere, and while torch.compile traces, it stays a
            # tensor, read by the kernels without a synchronisation.
            read = logit_scale.device.type == "cpu" and not torch.compiler.is_compiling()
            scale: Tensor | float = float(logit_scale) if read else logit_scale.reshape(())
        elif isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
            scale = float(logit_scale)
        else:
            raise TypeError(
                f"logit_scale must be a tensor or a number (open_clip's "
                f"model.logit_scale.exp()), got {type(logit_scale).__name__}"
            )
        if isinstance(scale, float) and not 0 <= scale < math.inf:  # (0: uniform weights)
            raise ValueError(f"logit_scale must be a finite number >= 0, got {scale}")
        t_neg = t_neg_from_temperature(1.0, self.options.cost)  # the scale's factor
        return self._with(t_neg=scale * t_neg)

    def _gathered(self, images: Tensor, texts: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """Every rank's images and texts (rank order) as open_clip gathers them, and this
        rank's ``(offset, rows)`` among them."""
        if not distributed.is_active() or distributed.rank_and_world_size() != (
            self.rank,
            self.world_size,
        ):
            raise ValueError(
                f"CCTClipLoss(rank={self.rank}, world_size={self.world_size}) needs an "
                "initialised torch.distributed process group of that rank and size; got "
                f"(rank, world_size) = {distributed.rank_and_world_size()}"
            )
        counts = distributed.row_counts(images.shape[0], images.device)
        offset = sum(counts[: self.rank])
        own = (offset, images.shape[0])
        gathered = []
        for x in (images, texts):
            if self.gather_with_grad:
                gathered.append(distributed.gather_rows(x, counts)[0])
            else:  # the other ranks' rows without gradient, this rank's own with
                every = distributed.all_gather_no_grad(x, counts)
                gathered.append(torch.cat([every[:offset], x, every[offset + x.shape[0] :]]))
        return gathered[0], gathered[1], own


def _others(rows: Tensor, own: tuple[int, int]) -> Tensor:
    """Every rank's rows but this rank's ``own = (offset, count)``."""
    offset, count = own
    return torch.cat([rows[:offset], rows[offset + count :]])
