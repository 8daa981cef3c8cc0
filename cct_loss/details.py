"""Per-query terms produced by the layouts, the reductions, and the diagnostics returned."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class QueryTerms(NamedTuple):
    """What every layout returns: one entry per query (or per row, paper layout).

    Attributes:
        attraction: ``(Q,)`` ``sum_m pi_m^+ d_m^+`` (0 for a query without positives).
        repulsion: ``(Q,)`` ``-sum_k pi_k^- d_k^-`` (0 for a query without negatives).
        pos_entropy: ``(Q,)`` entropy of the positive weights (nats, no gradient), or ``None``
            when the diagnostics were not asked for (so too the next two).
        neg_entropy: ``(Q,)`` entropy of the negative weights.
        accuracy: ``(Q,)`` 1.0 where the farthest positive is closer than the nearest negative.
        pos_weights: positive weights, or ``None`` when the kernel does not hold them.
        neg_weights: negative weights, or ``None`` when the kernel does not hold them.
        has_positives: ``(Q,)`` bool, or ``None`` when every query has positives.
        has_negatives: ``(Q,)`` bool, or ``None`` when every query has negatives.
    """

    attraction: Tensor
    repulsion: Tensor
    pos_entropy: Tensor | None
    neg_entropy: Tensor | None
    accuracy: Tensor | None
    pos_weights: Tensor | None = None
    neg_weights: Tensor | None = None
    has_positives: Tensor | None = None
    has_negatives: Tensor | None = None


class CCTDetails(NamedTuple):
    """Result of ``cct_loss(..., return_details=True)``.

    ``loss == alpha * attraction + beta * repulsion`` holds for every reduction.

    Attributes:
        loss: the loss, reduced as asked (scalar, or ``(Q,)`` for ``reduction="none"``).
        attraction: the attraction term, reduced like the loss (``"mean"``: over the queries
            that have positives).
        repulsion: the repulsion term, reduced like the loss (``"mean"``: over the queries
            that have negatives).
        pos_entropy: entropy (nats) of each query's positive weights; averaged over the
            queries that have positives for ``"mean"`` and ``"sum"``, per query for ``"none"``.
            Its exponential is the effective number of positives.
        neg_entropy: the same for the negative weights (effective number of negatives).
        accuracy: fraction of queries whose farthest positive is closer than their nearest
            negative, among the queries that have both (per query 0/1 for ``"none"``): the
            analogue of InfoNCE's top-1.
        pos_weights: the positive weights with ``return_details="weights"``, else ``None``.
        neg_weights: the negative weights with ``return_details="weights"``, else ``None``.
            What the tuple holds never depends on the implementation ``auto`` picked.
        queries_with_positives: how many of this call's queries have at least one positive
            (per query, bool, for ``"none"``). Without labels, every query.
        queries_with_negatives: the same for negatives.
    """

    loss: Tensor
    attraction: Tensor
    repulsion: Tensor
    pos_entropy: Tensor
    neg_entropy: Tensor
    accuracy: Tensor
    pos_weights: Tensor | None
    neg_weights: Tensor | None
    queries_with_positives: Tensor
    queries_with_negatives: Tensor


class MeanScale(NamedTuple):
    """What ``reduction="mean"`` divides each term's sum by.

    ``attraction`` and ``repulsion`` are numbers or 0-dim tensors (counts that depend on the
    labels), or ``None`` for a plain mean over the queries. Across processes a term's sum is
    divided by its global count over the world size, so that DDP's averaging gives the
    gradient of the mean over the concatenated batch.
    """

    attraction: float | Tensor | None = None
    repulsion: float | Tensor | None = None


def term_counts(terms: QueryTerms) -> Tensor:
    """``(2,)`` float: how many queries have positives and how many have negatives."""
    num = terms.attraction.shape[0]

    def count(flags: Tensor | None) -> Tensor:
        if flags is None:
            return terms.attraction.new_full((), float(num))
        return flags.sum().to(terms.attraction.dtype)

    return torch.stack([count(terms.has_positives), count(terms.has_negatives)])


def reduce_terms(
    terms: QueryTerms,
    *,
    alpha: float | Tensor,
    beta: float | Tensor,
    reduction: str,
    return_details: bool,
    weights: bool,
    mean_scale: MeanScale,
) -> Tensor | CCTDetails:
    """Combine per-query terms into the loss (and, if asked, the diagnostics).

    ``"mean"`` is ``alpha * mean(attraction over queries with positives) + beta *
    mean(repulsion over queries with negatives)``, a term that no query has being 0 (without
    labels every query has both, and this is the plain mean). ``"sum"`` and ``"none"`` use the
    per-query values, which are 0 for a missing term.
    """
    plain_mean = mean_scale.attraction is None and mean_scale.repulsion is None
    if not return_details and plain_mean:  # one reduction of the weighted sum
        return _reduce(_weighted(terms.attraction, alpha, terms.repulsion, beta), reduction, None)
    attraction = _reduce(terms.attraction, reduction, mean_scale.attraction)
    repulsion = _reduce(terms.repulsion, reduction, mean_scale.repulsion)
    loss = _weighted(attraction, alpha, repulsion, beta)
    if not return_details:
        return loss
    assert terms.pos_entropy is not None and terms.neg_entropy is not None
    assert terms.accuracy is not None

    def stat(x: Tensor, flags: Tensor | None) -> Tensor:
        if reduction == "none":
            return x if flags is None else torch.where(flags, x, 0.0)
        if flags is None:
            return x.mean()
        return torch.where(flags, x, 0.0).sum() / flags.sum().clamp_min(1)

    def present(flags: Tensor | None) -> Tensor:
        if flags is None:
            flags = torch.ones_like(terms.attraction, dtype=torch.bool)
        return flags if reduction == "none" else flags.sum()

    both = terms.has_positives
    if terms.has_negatives is not None:
        both = terms.has_negatives if both is None else both & terms.has_negatives
    return CCTDetails(
        loss=loss,
        attraction=attraction,
        repulsion=repulsion,
        pos_entropy=stat(terms.pos_entropy, terms.has_positives),
        neg_entropy=stat(terms.neg_entropy, terms.has_negatives),
        accuracy=stat(terms.accuracy, both),
        pos_weights=terms.pos_weights if weights else None,
        neg_weights=terms.neg_weights if weights else None,
        queries_with_positives=present(terms.has_positives),
        queries_with_negatives=present(terms.has_negatives),
    )


def _weighted(a: Tensor, alpha: float | Tensor, b: Tensor, beta: float | Tensor) -> Tensor:
    """``alpha * a + beta * b``, without multiplying by a Python 1."""

    def times(x: Tensor, w: float | Tensor) -> Tensor:
        return x if isinstance(w, float) and w == 1.0 else x * w

    return times(a, alpha) + times(b, beta)


def _reduce(x: Tensor, reduction: str, divisor: float | Tensor | None) -> Tensor:
    if reduction == "mean":
        return x.mean() if divisor is None else x.sum() / divisor
    if reduction == "sum":
        return x.sum()
    return x
