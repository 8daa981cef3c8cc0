"""``impl="dense"``: vectorised PyTorch that holds the full ``(Q, K)`` cost matrix.

One matrix product gives every cost; masks are built on the inputs' device from instance
ids; there is no Python loop over samples and no host synchronisation, so these functions run
under ``torch.compile(fullgraph=True)``. Inputs are prepared embeddings (see
:func:`cct_loss.costs.prepare_embeddings`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .costs import pairwise_cost, rowwise_cost
from .details import QueryTerms
from .transport import conditional_expectation


def transport_terms(
    pos_cost: Tensor,
    neg_cost: Tensor,
    *,
    t_pos: float,
    t_neg: float,
    detach_weights: bool,
    neg_mask: Tensor | None = None,
) -> QueryTerms:
    """Attraction and repulsion of each query from its positive and negative costs.

    Args:
        pos_cost: ``(Q, M)`` costs to each query's positives.
        neg_cost: ``(Q, K)`` costs to each query's candidate negatives.
        t_pos: positive sharpness.
        t_neg: negative sharpness.
        detach_weights: treat the weights as constants in the backward pass.
        neg_mask: optional ``(Q, K)`` boolean, ``True`` where a column is a negative of the row.

    Returns:
        :class:`QueryTerms` with the weight matrices filled in.
    """
    attract = conditional_expectation(
        pos_cost, t_pos, farther_weighs_more=True, detach_weights=detach_weights
    )
    repel = conditional_expectation(
        neg_cost, t_neg, farther_weighs_more=False, detach_weights=detach_weights, mask=neg_mask
    )
    correct = (attract.extreme < repel.extreme).to(pos_cost.dtype)
    return QueryTerms(
        attraction=attract.value,
        repulsion=-repel.value,
        pos_entropy=attract.entropy,
        neg_entropy=repel.entropy,
        correct=correct,
        pos_weights=attract.weights,
        neg_weights=repel.weights,
    )


def other_views_index(num_views: int, device: torch.device) -> Tensor:
    """``(V, V - 1)`` table whose row ``v`` lists the views other than ``v``, in order."""
    full = torch.arange(num_views, device=device).expand(num_views, num_views)
    keep = ~torch.eye(num_views, dtype=torch.bool, device=device)
    return full[keep].reshape(num_views, num_views - 1)


def in_batch_terms(
    views: Tensor, *, cost: str, t_pos: float, t_neg: float, detach_weights: bool
) -> QueryTerms:
    """Symmetric in-batch layout (NT-Xent): every embedding is a query.

    Row ``r = v * N + i`` is view ``v`` of instance ``i``. Its positives are the other views of
    instance ``i`` (in view order), its negatives every view of every other instance.

    Args:
        views: ``(V, N, D)`` prepared embeddings, ``V >= 2``, ``N >= 2``.

    Returns:
        :class:`QueryTerms` over ``V * N`` queries; ``pos_weights`` is ``(V*N, V-1)`` and
        ``neg_weights`` is ``(V*N, V*N)`` with zeros on same-instance columns.
    """
    num_views, n, d = views.shape
    flat = views.reshape(num_views * n, d)
    costs = pairwise_cost(flat, flat, cost)
    # costs[v*N + i, w*N + i] for every (v, w): the (V, N, V) same-instance block.
    same_instance = costs.view(num_views, n, num_views, n).diagonal(dim1=1, dim2=3)  # (V, V, N)
    same_instance = same_instance.permute(0, 2, 1)  # (V, N, V)
    others = other_views_index(num_views, views.device)  # (V, V-1)
    pos_cost = same_instance.gather(2, others[:, None, :].expand(num_views, n, num_views - 1))
    ids = torch.arange(n, device=views.device).repeat(num_views)
    neg_mask = ids[:, None] != ids[None, :]
    return transport_terms(
        pos_cost.reshape(num_views * n, num_views - 1),
        costs,
        t_pos=t_pos,
        t_neg=t_neg,
        detach_weights=detach_weights,
        neg_mask=neg_mask,
    )


def shared_negatives_terms(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor,
    *,
    cost: str,
    t_pos: float,
    t_neg: float,
    detach_weights: bool,
) -> QueryTerms:
    """Queries against one shared set of negatives (a MoCo queue).

    Args:
        query: ``(N, D)`` prepared queries.
        positive: ``(N, M, D)`` prepared positives.
        negatives: ``(K, D)`` prepared negatives, shared by all queries.
    """
    return transport_terms(
        rowwise_cost(query, positive, cost),
        pairwise_cost(query, negatives, cost),
        t_pos=t_pos,
        t_neg=t_neg,
        detach_weights=detach_weights,
    )


def per_query_negatives_terms(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor,
    *,
    cost: str,
    t_pos: float,
    t_neg: float,
    detach_weights: bool,
) -> QueryTerms:
    """Each query with its own negatives ("paired" mode).

    Args:
        query: ``(N, D)`` prepared queries.
        positive: ``(N, M, D)`` prepared positives.
        negatives: ``(N, K, D)`` prepared negatives of each query.
    """
    return transport_terms(
        rowwise_cost(query, positive, cost),
        rowwise_cost(query, negatives, cost),
        t_pos=t_pos,
        t_neg=t_neg,
        detach_weights=detach_weights,
    )
