"""Who is a query, a positive and a negative, for each call shape (SPEC section 3).

Each function takes prepared embeddings (see :func:`cct_loss.costs.prepare_embeddings`) and
describes the call as a :class:`cct_loss.transport.Transport`: the queries, the keys, and which
keys are each query's positives and negatives (:class:`cct_loss.transport.Membership`), from
class labels or from the block layout of the batch's instances (:class:`OwnRows`, a few
integers); :func:`cct_loss.dispatch.solve` computes it. No ``N x K x D`` tensor is formed
anywhere, and without labels no mask or id tensor is built on the default path.

Groups: without labels a row's group is its instance (its global row index), so the other
views of a row are its positives and every other row's embeddings its negatives; with labels it
is the row's label.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import torch
from torch import Tensor

from .costs import cost_matrix
from .details import QueryTerms
from .dispatch import solve
from .options import CCTOptions
from .transport import ConditionalExpectation, Membership, OwnRows, Transport


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


def _both(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a & b


def combine(
    attract: ConditionalExpectation | None, repel: ConditionalExpectation | None
) -> QueryTerms:
    """Per-query terms from the two expectations (repulsion is minus the expected cost)."""
    assert attract is not None and repel is not None
    accuracy = None
    if attract.extreme is not None and repel.extreme is not None:
        correct = attract.extreme < repel.extreme
        both = _both(attract.present, repel.present)
        if both is not None:
            correct = correct & both
        accuracy = correct.to(attract.value.dtype)
    return QueryTerms(
        attraction=attract.value,
        repulsion=-repel.value,
        pos_entropy=attract.entropy,
        neg_entropy=repel.entropy,
        accuracy=accuracy,
        pos_weights=attract.weights,
        neg_weights=repel.weights,
        has_positives=attract.present,
        has_negatives=repel.present,
    )


def unused_group(groups: Tensor) -> Tensor:
    """A 0-dim id equal to none of ``groups`` (on the device: no host synchronisation)."""
    low = groups.min()
    return torch.where(low > torch.iinfo(groups.dtype).min, low - 1, groups.max() + 1)


def terms_of(problem: Transport, options: CCTOptions) -> QueryTerms:
    """Per-query terms of a call (:func:`cct_loss.dispatch.solve`, then :func:`combine`)."""
    return combine(*solve(problem, options))


def in_batch_problem(
    views: Tensor, *, labels: Tensor | None = None, global_rows: GlobalRows | None = None
) -> Transport:
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
        The :class:`Transport` over ``V * N`` queries (dense weights: ``pos_weights``
        ``(V*N, V-1)``, or ``(V*N, V*N_all)`` with labels, and ``neg_weights``
        ``(V*N, V*N_all)``, zero where a key does not take part).
    """
    num_views, n, d = views.shape
    flat = views.reshape(num_views * n, d)
    keys, n_all, offset, key_labels = None, n, 0, labels
    if global_rows is not None:
        keys = global_rows.rows.reshape(-1, d)
        n_all, offset, key_labels = (
            global_rows.rows.shape[1],
            global_rows.offset,
            global_rows.labels,
        )
    if labels is None:
        # (the cache is for eager steps: a trace runs once)
        instances = _instances.__wrapped__ if torch.compiler.is_compiling() else _instances
        positives, negatives = instances(num_views, n, n_all, offset)
    else:
        rows = OwnRows(num_views, n, num_views, n_all, offset, includes_self=True)
        assert key_labels is not None
        query_groups = labels.repeat(num_views)
        key_groups = query_groups if global_rows is None else key_labels.repeat(num_views)
        positives = Membership(
            query_groups, key_groups, same_group=True, rows=rows, may_be_empty=True
        )
        negatives = Membership(query_groups, key_groups, may_be_empty=True)
    return Transport(flat, keys, positives, negatives)


@functools.lru_cache(maxsize=64)
def _instances(num_views: int, n: int, n_all: int, offset: int) -> tuple[Membership, Membership]:
    """The in-batch positives and negatives without labels: a row's other views, and every
    other row's embeddings (a few integers, the same at every step: built once)."""
    rows = OwnRows(num_views, n, num_views, n_all, offset, includes_self=True)
    return Membership(same_group=True, rows=rows), Membership(rows=rows)


def cross_problem(
    query: Tensor,
    positive: Tensor,
    *,
    negatives: Tensor | None = None,
    labels: Tensor | None = None,
    negative_labels: Tensor | None = None,
    global_rows: GlobalRows | None = None,
) -> Transport:
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
        The :class:`Transport` over the ``N`` queries.
    """
    n, m, d = positive.shape
    rows, offset, row_labels = positive, 0, labels
    if global_rows is not None:
        rows, offset, row_labels = global_rows.rows, global_rows.offset, global_rows.labels
    n_all = rows.shape[0]
    keys = rows.reshape(n_all * m, d)  # key j * M + w is positive[j, w]
    if negatives is not None:
        keys = torch.cat([keys, negatives])
    if labels is None:
        own = OwnRows(1, n, m, n_all, offset, row_major=m > 1)
        # Its positives are its own row's keys, positive[i]; every other key is a negative (a
        # queue's keys belong to no row).
        return Transport(query, keys, Membership(same_group=True, rows=own), Membership(rows=own))
    assert row_labels is not None
    batch_groups = row_labels.repeat_interleave(m)
    pos_groups = neg_groups = batch_groups
    if negatives is not None:  # the queue holds no positives; its labelled keys no negatives
        unused = unused_group(labels).expand(negatives.shape[0])
        pos_groups = torch.cat([batch_groups, unused])
        extra = unused if negative_labels is None else negative_labels
        neg_groups = torch.cat([batch_groups, extra])
    # Row i always shares its own label: a query always has positives.
    same = Membership(labels, pos_groups, same_group=True)
    other = Membership(labels, neg_groups, may_be_empty=True)
    return Transport(query, keys, same, other)


def explicit_negatives_problem(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor,
    *,
    labels: Tensor | None = None,
    negative_labels: Tensor | None = None,
) -> Transport:
    """MoCo mode of ``layout="all"``: only ``query`` rows are queries, their positives are
    ``positive[i, :]``; negatives shared ``(K, D)`` or per query ``(N, K, D)``.

    Args:
        query: ``(N, D)`` queries.
        positive: ``(N, M, D)`` positives, or ``(N, D)`` for one.
        negatives: ``(K, D)`` or ``(N, K, D)`` negatives.
        labels, negative_labels: ``(N,)`` and ``(K,)`` labels (shared negatives only): a
            negative whose label equals the query's is left out. Both or neither.
    """
    members = Membership()
    if labels is not None and negative_labels is not None:
        members = Membership(labels, negative_labels, may_be_empty=True)
    return Transport(query, negatives, positive, members)


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
    own_views = OwnRows(num_views, n, num_views, n, includes_self=True)
    flat = views.reshape(num_views * n, d)
    attract, _ = solve(
        Transport(flat, None, Membership(same_group=True, rows=own_views), None), options
    )
    assert attract is not None
    offset = 0 if global_rows is None else global_rows.offset
    keys = views if global_rows is None else global_rows.rows
    other_rows = Membership(rows=OwnRows(1, n, 1, keys.shape[1], offset))
    pairs = list(itertools.combinations(range(num_views), 2))
    repels = []
    for x, y in pairs:
        _, repel = solve(Transport(views[x], keys[y], None, other_rows), options)
        assert repel is not None
        repels.append(repel)
    accuracy = None
    if options.return_details:  # does z_y[i] beat every other row of y as z_x[i]'s neighbour?
        with torch.no_grad():
            own = torch.stack(
                [cost_matrix(views[x], views[y].unsqueeze(1), options.cost) for x, y in pairs]
            ).squeeze(-1)
            extremes = torch.stack([r.extreme for r in repels if r.extreme is not None])
            accuracy = (own < extremes).to(own.dtype).mean(0)

    def per_row(x: Tensor) -> Tensor:
        return x.reshape(-1, n).mean(0)

    def mean_over_pairs(xs: list[Tensor | None]) -> Tensor | None:
        kept = [x for x in xs if x is not None]
        return torch.stack(kept).mean(0) if len(kept) == len(xs) else None

    neg_weights = [r.weights for r in repels]
    return QueryTerms(
        attraction=per_row(attract.value),
        repulsion=-torch.stack([r.value for r in repels]).mean(0),
        pos_entropy=None if attract.entropy is None else per_row(attract.entropy),
        neg_entropy=mean_over_pairs([r.entropy for r in repels]),
        accuracy=accuracy,
        pos_weights=None
        if attract.weights is None
        else attract.weights.reshape(num_views, n, num_views - 1),
        neg_weights=None
        if any(w is None for w in neg_weights)
        else torch.stack([w for w in neg_weights if w is not None]),
    )
