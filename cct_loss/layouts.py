"""Who is a query, a positive and a negative, for each call shape (SPEC section 3).

Each function takes prepared embeddings (see :func:`cct_loss.costs.prepare_embeddings`) and
describes, with integer ids (:class:`cct_loss.transport.Membership`), which keys take part in
each query's attraction and repulsion; the kernels (dense, chunked, sdpa) compute the two
expected costs. Positives that are a fixed small set per query (``positive[i, :]``, the other
views of a row) are computed directly; positives drawn from the batch by label go through a
kernel like the negatives. No ``N x K x D`` tensor is formed anywhere.

Groups: without labels a row's group is its instance id (its global row index), so the other
views of a row are its positives and every other row's embeddings its negatives; with labels it
is the row's label.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch import Tensor

from .costs import cost_matrix
from .details import QueryTerms
from .dispatch import kernel_for
from .options import CCTOptions
from .transport import ConditionalExpectation, Membership, conditional_expectation


class GlobalRows(NamedTuple):
    """The candidates of every rank, when training across processes.

    Attributes:
        rows: the gathered embeddings (``(V, N_all, D)`` views or ``(N_all, M, D)`` keys).
        labels: ``(N_all,)`` gathered labels, or ``None``.
        offset: index of this rank's first row within ``N_all``.
    """

    rows: Tensor
    labels: Tensor | None
    offset: int


def fixed_attraction(
    query: Tensor, positives: Tensor, options: CCTOptions
) -> ConditionalExpectation:
    """Attraction of each query to its own ``M`` positives (a small block, plain autograd).

    Args:
        query: ``(Q, D)``.
        positives: ``(Q, M, D)``.
    """
    costs = cost_matrix(query, positives, options.cost)
    return conditional_expectation(costs, side="positives", options=options)


def _both(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a & b


def combine(attract: ConditionalExpectation, repel: ConditionalExpectation) -> QueryTerms:
    """Per-query terms from the two expectations (repulsion is minus the expected cost)."""
    accuracy = attract.extreme < repel.extreme
    both = _both(attract.present, repel.present)
    if both is not None:
        accuracy = accuracy & both
    return QueryTerms(
        attraction=attract.value,
        repulsion=-repel.value,
        pos_entropy=attract.entropy,
        neg_entropy=repel.entropy,
        accuracy=accuracy.to(attract.value.dtype),
        pos_weights=attract.weights,
        neg_weights=repel.weights,
        has_positives=attract.present,
        has_negatives=repel.present,
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


def row_groups(labels: Tensor | None, n: int, offset: int, device: torch.device) -> Tensor:
    """``(n,)`` group of each row: its label, or its instance id ``offset + i``."""
    if labels is not None:
        return labels
    return torch.arange(offset, offset + n, device=device)


def unused_group(groups: Tensor) -> Tensor:
    """A 0-dim id equal to none of ``groups`` (on the device: no host synchronisation)."""
    low = groups.min()
    return torch.where(low > torch.iinfo(groups.dtype).min, low - 1, groups.max() + 1)


def in_batch_terms(
    views: Tensor,
    options: CCTOptions,
    *,
    labels: Tensor | None = None,
    global_rows: GlobalRows | None = None,
) -> QueryTerms:
    """Symmetric in-batch layout (``layout="all"``, NT-Xent): every embedding is a query.

    Row ``r = v * N + i`` is view ``v`` of instance ``i``. Without labels its positives are the
    other views of instance ``i`` (in view order) and its negatives every view of every other
    instance. With labels its positives are every embedding of a same-label row except itself
    and its negatives every embedding of a row with another label (either set may be empty).

    Args:
        views: ``(V, N, D)`` prepared embeddings; these rows are the queries. ``V >= 2``
            without labels.
        labels: ``(N,)`` integer labels, or ``None``.
        global_rows: the global batch ``(V, N_all, D)`` across processes (with its labels and
            this rank's offset), or ``None``: the keys are ``views`` themselves.

    Returns:
        :class:`QueryTerms` over ``V * N`` queries (dense: ``pos_weights`` ``(V*N, V-1)``, or
        ``(V*N, V*N_all)`` with labels, and ``neg_weights`` ``(V*N, V*N_all)``, zero where a
        key does not take part).
    """
    num_views, n, d = views.shape
    device = views.device
    flat = views.reshape(num_views * n, d)
    if global_rows is None:
        # The keys are the queries; a view keeps them distinct tensors for the autograd
        # functions (torch.compile cannot trace one tensor passed twice to an autograd.Function).
        keys, n_all, offset, key_labels = flat.view_as(flat), n, 0, labels
    else:
        n_all, offset, key_labels = (
            global_rows.rows.shape[1],
            global_rows.offset,
            global_rows.labels,
        )
        keys = global_rows.rows.reshape(num_views * n_all, d)
    query_groups = row_groups(labels, n, offset, device).repeat(num_views)
    key_groups = row_groups(key_labels, n_all, 0, device).repeat(num_views)
    kernel = kernel_for(options, device, flat.shape[0], keys.shape[0], per_query=False)
    if labels is None:
        attract = fixed_attraction(flat, same_row_positives(views), options)
    else:
        view_starts = torch.arange(num_views, device=device)[:, None] * n_all
        own_key = (view_starts + offset + torch.arange(n, device=device)).reshape(-1)
        positives = Membership(
            query_groups,
            key_groups,
            same_group=True,
            query_self=own_key,
            key_self=torch.arange(keys.shape[0], device=device),
            may_be_empty=True,
        )
        attract = kernel(flat, keys, positives, side="positives", options=options)
    negatives = Membership(query_groups, key_groups, may_be_empty=labels is not None)
    repel = kernel(flat, keys, negatives, side="negatives", options=options)
    return combine(attract, repel)


def cross_terms(
    query: Tensor,
    positive: Tensor,
    options: CCTOptions,
    *,
    negatives: Tensor | None = None,
    labels: Tensor | None = None,
    negative_labels: Tensor | None = None,
    global_rows: GlobalRows | None = None,
) -> QueryTerms:
    """Cross layout (``layout="cross"``; MoCo v3, CLIP): only ``query`` rows are queries.

    Without labels query ``i``'s positives are ``positive[i, :]`` and its negatives every
    embedding of every other row of ``positive``; with labels its positives are every
    embedding of a row of ``positive`` with its label (row ``i`` included) and its negatives
    those of rows with another label. The rows of ``negatives`` are negatives on top, except
    those whose ``negative_labels`` equal the query's label.

    Args:
        query: ``(N, D)`` prepared queries.
        positive: ``(N, M, D)`` prepared positives (this rank's rows).
        negatives: ``(K, D)`` extra negatives (a queue), or ``None``.
        labels: ``(N,)`` labels of the rows of ``query`` and ``positive``, or ``None``.
        negative_labels: ``(K,)`` labels of ``negatives`` (needs ``labels``), or ``None``.
        global_rows: the global ``positive`` ``(N_all, M, D)`` across processes, or ``None``.

    Returns:
        :class:`QueryTerms` over the ``N`` queries.
    """
    n, m, d = positive.shape
    device = query.device
    rows, offset, row_labels = positive, 0, labels
    if global_rows is not None:
        rows, offset, row_labels = global_rows.rows, global_rows.offset, global_rows.labels
    n_all = rows.shape[0]
    batch_keys = rows.reshape(n_all * m, d)
    query_groups = row_groups(labels, n, offset, device)
    batch_groups = row_groups(row_labels, n_all, 0, device).repeat_interleave(m)
    if labels is None:
        attract = fixed_attraction(query, positive, options)
    else:  # row i always shares its own label: never empty
        kernel = kernel_for(options, device, n, batch_keys.shape[0], per_query=False)
        same = Membership(query_groups, batch_groups, same_group=True)
        attract = kernel(query, batch_keys, same, side="positives", options=options)
    keys, key_groups = batch_keys, batch_groups
    if negatives is not None:
        extra = negative_labels
        if extra is None:  # every row of negatives is a negative of every query
            extra = unused_group(query_groups).expand(negatives.shape[0])
        keys = torch.cat([batch_keys, negatives])
        key_groups = torch.cat([batch_groups, extra])
    may_be_empty = labels is not None
    members = Membership(query_groups, key_groups, may_be_empty=may_be_empty)
    kernel = kernel_for(options, device, n, keys.shape[0], per_query=False)
    repel = kernel(query, keys, members, side="negatives", options=options)
    return combine(attract, repel)


def explicit_negatives_terms(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor,
    options: CCTOptions,
    *,
    labels: Tensor | None = None,
    negative_labels: Tensor | None = None,
) -> QueryTerms:
    """MoCo mode of ``layout="all"``: only ``query`` rows are queries, their positives are
    ``positive[i, :]``; negatives shared ``(K, D)`` or per query ``(N, K, D)``.

    Args:
        query: ``(N, D)`` prepared queries.
        positive: ``(N, M, D)`` prepared positives.
        negatives: ``(K, D)`` or ``(N, K, D)`` prepared negatives.
        labels, negative_labels: ``(N,)`` and ``(K,)`` labels (shared negatives only): a
            negative whose label equals the query's is left out. Both or neither.
    """
    attract = fixed_attraction(query, positive, options)
    members = None
    if labels is not None and negative_labels is not None:
        members = Membership(labels, negative_labels, may_be_empty=True)
    per_query = negatives.dim() == 3
    kernel = kernel_for(
        options, query.device, query.shape[0], negatives.shape[-2], per_query=per_query
    )
    return combine(attract, kernel(query, negatives, members, side="negatives", options=options))


def paper_terms(
    views: Tensor, options: CCTOptions, *, global_rows: GlobalRows | None = None
) -> QueryTerms:
    """The objective of the official small-scale (CIFAR/STL) CACR code, per row.

    * attraction of row ``i``: for each view ``x``, ``z_x[i]`` attracts the other views
      ``z_w[i]``; averaged over the ``V`` views.
    * repulsion of row ``i``: for each pair of views ``x < y``, ``z_x[i]`` repels the other rows
      ``z_y[j]`` (``j != i``) of view ``y``, one direction; averaged over the pairs.

    Args:
        views: ``(V, N, D)`` prepared embeddings, ``V >= 2``, ``N >= 2``.
        global_rows: the global batch ``(V, N_all, D)`` across processes (negatives of view
            ``y`` come from all of its rows), or ``None``.

    Returns:
        :class:`QueryTerms` with one entry per row (``(N,)``); the accuracy of a row is the
        fraction of pairs where ``z_y[i]`` is closer to ``z_x[i]`` than every other row of
        ``y``. Dense weights: ``pos_weights`` ``(V, N, V-1)``, ``neg_weights`` ``(P, N, N)``
        for the pairs in lexicographic order, zero on the diagonal.
    """
    num_views, n, d = views.shape
    attract = fixed_attraction(views.reshape(num_views * n, d), same_row_positives(views), options)
    offset = 0 if global_rows is None else global_rows.offset
    keys = views if global_rows is None else global_rows.rows
    ids = torch.arange(offset, offset + n, device=views.device)
    members = Membership(ids, torch.arange(keys.shape[1], device=views.device))
    kernel = kernel_for(options, views.device, n, keys.shape[1], per_query=False)
    pairs = list(itertools.combinations(range(num_views), 2))
    repels = [
        kernel(views[x], keys[y], members, side="negatives", options=options) for x, y in pairs
    ]
    with torch.no_grad():
        if options.return_details:  # does z_y[i] beat every other row of y as z_x[i]'s neighbour?
            own = torch.stack(
                [cost_matrix(views[x], views[y].unsqueeze(1), options.cost) for x, y in pairs]
            ).squeeze(-1)
            accuracy = (own < torch.stack([r.extreme for r in repels])).to(own.dtype)
        else:
            accuracy = torch.full(
                (len(pairs), n), float("nan"), dtype=repels[0].value.dtype, device=views.device
            )

    def per_row(x: Tensor) -> Tensor:
        return x.reshape(-1, n).mean(0)

    neg_weights = [r.weights for r in repels]
    return QueryTerms(
        attraction=per_row(attract.value),
        repulsion=-torch.stack([r.value for r in repels]).mean(0),
        pos_entropy=per_row(attract.entropy),
        neg_entropy=torch.stack([r.entropy for r in repels]).mean(0),
        accuracy=accuracy.mean(0),
        pos_weights=None
        if attract.weights is None
        else attract.weights.reshape(num_views, n, num_views - 1),
        neg_weights=None
        if any(w is None for w in neg_weights)
        else torch.stack([w for w in neg_weights if w is not None]),
    )
