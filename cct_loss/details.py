"""Per-query terms produced by the implementations and the diagnostics returned to users."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class QueryTerms(NamedTuple):
    """What every implementation returns: one entry per query (or per row, paper layout).

    Attributes:
        attraction: ``(Q,)`` ``sum_m pi_m^+ d_m^+``.
        repulsion: ``(Q,)`` ``-sum_k pi_k^- d_k^-``.
        pos_entropy: ``(Q,)`` entropy of the positive weights (nats, no gradient).
        neg_entropy: ``(Q,)`` entropy of the negative weights (nats, no gradient).
        correct: ``(Q,)`` 1.0 where the farthest positive is closer than the nearest negative.
        pos_weights: positive weights, or ``None`` when the implementation does not store them.
        neg_weights: negative weights, or ``None`` when the implementation does not store them.
    """

    attraction: Tensor
    repulsion: Tensor
    pos_entropy: Tensor
    neg_entropy: Tensor
    correct: Tensor
    pos_weights: Tensor | None = None
    neg_weights: Tensor | None = None


class CCTDetails(NamedTuple):
    """Result of ``cct_loss(..., return_details=True)``.

    ``loss == alpha * attraction + beta * repulsion`` holds for every reduction.

    Attributes:
        loss: the loss, reduced as asked (scalar, or ``(Q,)`` for ``reduction="none"``).
        attraction: the attraction term, reduced like the loss.
        repulsion: the repulsion term, reduced like the loss.
        pos_entropy: entropy (nats) of each query's positive weights; averaged over queries
            for ``"mean"`` and ``"sum"``, per query for ``"none"``. Its exponential is the
            effective number of positives (1 to M).
        neg_entropy: the same for the negative weights (effective number of negatives).
        accuracy: fraction of queries whose farthest positive is closer than their nearest
            negative (per query 0/1 for ``"none"``): the analogue of InfoNCE's top-1.
        pos_weights: the positive weights (dense and paper paths), else ``None``.
        neg_weights: the negative weights (dense and paper paths), else ``None``.
    """

    loss: Tensor
    attraction: Tensor
    repulsion: Tensor
    pos_entropy: Tensor
    neg_entropy: Tensor
    accuracy: Tensor
    pos_weights: Tensor | None
    neg_weights: Tensor | None


def reduce_terms(
    terms: QueryTerms, *, alpha: float, beta: float, reduction: str, return_details: bool
) -> Tensor | CCTDetails:
    """Combine per-query terms into the loss (and, if asked, the diagnostics)."""
    per_query = alpha * terms.attraction + beta * terms.repulsion
    if not return_details:
        return _reduce(per_query, reduction)

    def stat(x: Tensor) -> Tensor:
        return x if reduction == "none" else x.mean()

    return CCTDetails(
        loss=_reduce(per_query, reduction),
        attraction=_reduce(terms.attraction, reduction),
        repulsion=_reduce(terms.repulsion, reduction),
        pos_entropy=stat(terms.pos_entropy),
        neg_entropy=stat(terms.neg_entropy),
        accuracy=stat(terms.correct),
        pos_weights=terms.pos_weights,
        neg_weights=terms.neg_weights,
    )


def _reduce(x: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    return x
