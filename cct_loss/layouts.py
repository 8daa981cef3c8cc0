"""Who is a query, a positive and a negative, for each call shape (SPEC section 3).

Each function takes prepared embeddings (see :func:`cct_loss.costs.prepare_embeddings`), computes
the attraction over each query's ``M`` positives (always small, so always dense) and hands the
negatives to a *repulsion backend* (dense, chunked or sdpa), which is the only part whose cost
grows with ``K``. No ``N x K x D`` tensor is formed anywhere.
"""

from __future__ import annotations

import itertools
from typing import Protocol

import torch
from torch import Tensor

from .costs import rowwise_cost
from .details import QueryTerms
from .transport import ConditionalExpectation, conditional_expectation


class RepulsionBackend(Protocol):
    """``(query (Q, D), keys (K, D) or (Q, K, D), query_ids, key_ids) -> expectation``.

    With ids, key ``k`` is a negative of query ``q`` only when their ids differ.
    """

    def __call__(
        self, query: Tensor, keys: Tensor, query_ids: Tensor | None, key_ids: Tensor | None
    ) -> ConditionalExpectation: ...


def attraction(
    query: Tensor,
    positives: Tensor,
    *,
    cost: str,
    t_pos: float,
    detach_weights: bool,
    with_stats: bool,
) -> ConditionalExpectation:
    """Expected cost of each query under ``softmax_m(+t_pos d_m)`` over its positives.

    Args:
        query: ``(Q, D)``.
        positives: ``(Q, M, D)``.
    """
    return conditional_expectation(
        rowwise_cost(query, positives, cost),
        t_pos,
        farther_weighs_more=True,
        detach_weights=detach_weights,
        with_stats=with_stats,
    )


def combine(attract: ConditionalExpectation, repel: ConditionalExpectation) -> QueryTerms:
    """Per-query terms from the two expectations (repulsion is minus the expected cost)."""
    return QueryTerms(
        attraction=attract.value,
        repulsion=-repel.value,
        pos_entropy=attract.entropy,
        neg_entropy=repel.entropy,
        correct=(attract.extreme < repel.extreme).to(attract.value.dtype),
        pos_weights=attract.weights,
        neg_weights=repel.weights,
    )


def same_row_positives(views: Tensor) -> Tensor:
    """``(V * N, V - 1, D)``: for row ``v * N + i``, the other views of instance ``i``."""
    num_views, n, d = views.shape
    # Built by stacking slices (a loop over views, not samples): unlike an advanced-index
    # gather, whose backward accumulates repeated indices in a thread-dependent order on the
    # CPU, its backward is deterministic.
    gathered = torch.stack(
        [
            torch.stack([views[w] for w in range(num_views) if w != v], dim=1)
            for v in range(num_views)
        ]
    )  # (V, N, V-1, D)
    return gathered.reshape(num_views * n, num_views - 1, d)


def negative_mask(query_ids: Tensor | None, key_ids: Tensor | None) -> Tensor | None:
    """``(Q, K)`` boolean, True where key ``k`` is a negative of query ``q`` (their instance
    ids differ); ``None`` when there are no ids (every key is a negative)."""
    if query_ids is None or key_ids is None:
        return None
    return query_ids[:, None] != key_ids[None, :]


def instance_ids(num_views: int, n: int, device: torch.device, offset: int = 0) -> Tensor:
    """``(V * N,)`` instance id of each row of the view-major flattened batch."""
    return torch.arange(offset, offset + n, device=device).repeat(num_views)


def in_batch_terms(
    views: Tensor,
    *,
    cost: str,
    t_pos: float,
    detach_weights: bool,
    repel: RepulsionBackend,
    with_stats: bool = False,
    key_views: Tensor | None = None,
    id_offset: int = 0,
) -> QueryTerms:
    """Symmetric in-batch layout (NT-Xent): every embedding is a query.

    Row ``r = v * N + i`` is view ``v`` of instance ``i``; its positives are the other views of
    instance ``i`` (in view order), its negatives every view of every other instance.

    Args:
        views: ``(V, N, D)`` prepared embeddings, ``V >= 2``; these rows are the queries.
        key_views: ``(V, N_all, D)``, the global batch when training across processes (the
            local rows are ``id_offset .. id_offset + N - 1`` of it), or ``None``: the keys are
            ``views`` themselves.
        id_offset: instance id of the first local row within ``key_views``.

    Returns:
        :class:`QueryTerms` over ``V * N`` queries (dense: ``pos_weights`` ``(V*N, V-1)`` and
        ``neg_weights`` ``(V*N, V*N_all)`` with zeros on same-instance columns).
    """
    num_views, n, d = views.shape
    flat = views.reshape(num_views * n, d)
    ids = instance_ids(num_views, n, views.device, offset=id_offset)
    attract = attraction(
        flat,
        same_row_positives(views),
        cost=cost,
        t_pos=t_pos,
        detach_weights=detach_weights,
        with_stats=with_stats,
    )
    if key_views is None:
        # The keys are the queries; a view keeps them distinct tensors for the autograd
        # functions (torch.compile cannot trace one tensor passed twice to an autograd.Function).
        keys, key_ids = flat.view_as(flat), ids
    else:
        keys = key_views.reshape(-1, d)
        key_ids = instance_ids(num_views, key_views.shape[1], views.device)
    return combine(attract, repel(flat, keys, ids, key_ids))


def explicit_negatives_terms(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor,
    *,
    cost: str,
    t_pos: float,
    detach_weights: bool,
    repel: RepulsionBackend,
    with_stats: bool = False,
) -> QueryTerms:
    """Only ``query`` rows are queries; negatives shared ``(K, D)`` or per query ``(N, K, D)``.

    Args:
        query: ``(N, D)`` prepared queries.
        positive: ``(N, M, D)`` prepared positives.
        negatives: ``(K, D)`` or ``(N, K, D)`` prepared negatives.
    """
    attract = attraction(
        query,
        positive,
        cost=cost,
        t_pos=t_pos,
        detach_weights=detach_weights,
        with_stats=with_stats,
    )
    return combine(attract, repel(query, negatives, None, None))


def paper_terms(
    views: Tensor,
    *,
    cost: str,
    t_pos: float,
    detach_weights: bool,
    repel: RepulsionBackend,
    with_stats: bool = False,
    key_views: Tensor | None = None,
    id_offset: int = 0,
) -> QueryTerms:
    """The objective of the official small-scale (CIFAR/STL) CACR code, per row.

    * attraction of row ``i``: for each view ``x``, ``z_x[i]`` attracts the other views
      ``z_w[i]``; averaged over the ``V`` views.
    * repulsion of row ``i``: for each pair of views ``x < y``, ``z_x[i]`` repels the other rows
      ``z_y[j]`` (``j != i``) of view ``y``, one direction; averaged over the pairs.

    Args:
        views: ``(V, N, D)`` prepared embeddings, ``V >= 2``, ``N >= 2``.
        key_views: ``(V, N_all, D)`` global batch across processes (negatives of view ``y``
            come from all of its rows), or ``None``.
        id_offset: instance id of the first local row within ``key_views``.

    Returns:
        :class:`QueryTerms` with one entry per row (``(N,)``); the accuracy of a row is the
        fraction of pairs where ``z_y[i]`` is closer to ``z_x[i]`` than every other row of
        ``y``. Dense weights: ``pos_weights`` ``(V, N, V-1)``, ``neg_weights`` ``(P, N, N)``
        for the pairs in lexicographic order, zero on the diagonal.
    """
    num_views, n, d = views.shape
    attract = attraction(
        views.reshape(num_views * n, d),
        same_row_positives(views),
        cost=cost,
        t_pos=t_pos,
        detach_weights=detach_weights,
        with_stats=with_stats,
    )
    ids = torch.arange(id_offset, id_offset + n, device=views.device)
    keys = views if key_views is None else key_views
    key_ids = torch.arange(keys.shape[1], device=views.device)
    pairs = list(itertools.combinations(range(num_views), 2))
    repels = [repel(views[x], keys[y], ids, key_ids) for x, y in pairs]
    with torch.no_grad():
        if with_stats:  # does z_y[i] beat every other row of view y as z_x[i]'s neighbour?
            own = torch.stack(
                [rowwise_cost(views[x], views[y].unsqueeze(1), cost) for x, y in pairs]
            ).squeeze(-1)
            correct = (own < torch.stack([r.extreme for r in repels])).to(views.dtype)
        else:
            correct = torch.full(
                (len(pairs), n), float("nan"), dtype=views.dtype, device=views.device
            )

    def per_row(x: Tensor) -> Tensor:
        return x.reshape(-1, n).mean(0)

    neg_weights = [r.weights for r in repels]
    return QueryTerms(
        attraction=per_row(attract.value),
        repulsion=-torch.stack([r.value for r in repels]).mean(0),
        pos_entropy=per_row(attract.entropy),
        neg_entropy=torch.stack([r.entropy for r in repels]).mean(0),
        correct=correct.mean(0),
        pos_weights=None
        if attract.weights is None
        else attract.weights.reshape(num_views, n, num_views - 1),
        neg_weights=None
        if any(w is None for w in neg_weights)
        else torch.stack([w for w in neg_weights if w is not None]),
    )
