"""``nn.Module`` wrappers: they store (and validate) the options and call the functions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from torch import Tensor, nn

from ._validation import check_choice
from .details import CCTDetails
from .functional import LAYOUTS, cct_loss, cct_loss_multiview
from .options import CCTOptions


class CCTLoss(nn.Module):
    """Module form of :func:`cct_loss.cct_loss`.

    Args:
        t_pos, t_neg, alpha, beta, cost, normalize, detach_weights, reduction, impl,
        chunk_size, return_details, gather_distributed: as in :func:`cct_loss.cct_loss`; checked here, at
        construction, so a bad setting fails before training starts.

    Examples:
        >>> import torch
        >>> from cct_loss import CCTLoss
        >>> criterion = CCTLoss(t_neg=2.0)
        >>> loss = criterion(torch.randn(8, 16), torch.randn(8, 16))
    """

    def __init__(
        self,
        *,
        t_pos: float = 1.0,
        t_neg: float = 1.0,
        alpha: float = 1.0,
        beta: float = 1.0,
        cost: str = "sqeuclidean",
        normalize: bool = True,
        detach_weights: bool = True,
        reduction: str = "mean",
        impl: str = "auto",
        chunk_size: int | None = None,
        return_details: bool = False,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        self.options = CCTOptions(
            t_pos=t_pos,
            t_neg=t_neg,
            alpha=alpha,
            beta=beta,
            cost=cost,
            normalize=normalize,
            detach_weights=detach_weights,
            reduction=reduction,
            impl=impl,
            chunk_size=chunk_size,
            return_details=return_details,
            gather_distributed=gather_distributed,
        )

    def forward(
        self, query: Tensor, positive: Tensor, negatives: Tensor | None = None
    ) -> Tensor | CCTDetails:
        """See :func:`cct_loss.cct_loss`."""
        o = self.options
        return cct_loss(
            query,
            positive,
            negatives,
            t_pos=o.t_pos,
            t_neg=o.t_neg,
            alpha=o.alpha,
            beta=o.beta,
            cost=o.cost,
            normalize=o.normalize,
            detach_weights=o.detach_weights,
            reduction=o.reduction,
            impl=o.impl,
            chunk_size=o.chunk_size,
            return_details=o.return_details,
            gather_distributed=o.gather_distributed,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in asdict(self.options).items())


class CCTMultiviewLoss(nn.Module):
    """Module form of :func:`cct_loss.cct_loss_multiview`.

    Args:
        layout: ``"all"`` (symmetric, ``M = V - 1`` positives) or ``"paper"``.
        **options: as in :func:`cct_loss.cct_loss`.
    """

    def __init__(
        self,
        *,
        layout: str = "all",
        t_pos: float = 1.0,
        t_neg: float = 1.0,
        alpha: float = 1.0,
        beta: float = 1.0,
        cost: str = "sqeuclidean",
        normalize: bool = True,
        detach_weights: bool = True,
        reduction: str = "mean",
        impl: str = "auto",
        chunk_size: int | None = None,
        return_details: bool = False,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        self.layout = check_choice("layout", layout, LAYOUTS)
        self.options = CCTOptions(
            t_pos=t_pos,
            t_neg=t_neg,
            alpha=alpha,
            beta=beta,
            cost=cost,
            normalize=normalize,
            detach_weights=detach_weights,
            reduction=reduction,
            impl=impl,
            chunk_size=chunk_size,
            return_details=return_details,
            gather_distributed=gather_distributed,
        )

    def forward(self, views: Tensor | Sequence[Tensor]) -> Tensor | CCTDetails:
        """See :func:`cct_loss.cct_loss_multiview`."""
        o = self.options
        return cct_loss_multiview(
            views,
            layout=self.layout,
            t_pos=o.t_pos,
            t_neg=o.t_neg,
            alpha=o.alpha,
            beta=o.beta,
            cost=o.cost,
            normalize=o.normalize,
            detach_weights=o.detach_weights,
            reduction=o.reduction,
            impl=o.impl,
            chunk_size=o.chunk_size,
            return_details=o.return_details,
            gather_distributed=o.gather_distributed,
        )

    def extra_repr(self) -> str:
        items = {"layout": self.layout, **asdict(self.options)}
        return ", ".join(f"{k}={v!r}" for k, v in items.items())
