"""Who is a query, a positive and a negative for each call shape (docs/specification.md): each
function describes a call as a :class:`ContrastiveProblem` and computes nothing. Without labels
a row's group is its instance (its other views are its positives, every other row's embeddings
its negatives) and no mask or id tensor is built; with labels it is the row's label."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch import Tensor

from .. import shortcuts
from ..maths.costs import Preparation
from .description import ContrastiveProblem, KeySet, Leading, OwnRows


class GlobalRows(NamedTuple):
    """The candidates of every rank when gathering: the rows (``(V, N_all, D)`` views or
    ``(N_all, M, D)`` keys), their labels, and this rank's offset among them."""

    rows: Tensor
    labels: Tensor | None
    offset: int


def pairs(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None,
    layout: str,
    labels: Tensor | None = None,
    negative_labels: Tensor | None = None,
    preparation: Preparation | None = None,
) -> ContrastiveProblem:
    """A :func:`cct_loss.cct_loss` call on one process: in-batch (``negatives=None``, layout
    ``"all"``), cross, or the MoCo mode of ``"all"`` (explicit negatives)."""
    rest = (labels, negative_labels)
    if layout == "cross":  # (an empty queue's (0, D) negatives add nothing)
        return cross(query, as_positives(positive), negatives, *rest, preparation=preparation)
    if negatives is None:
        return in_batch(in_batch_views(query, positive), labels=labels, preparation=preparation)
    if negatives.dim() == 2 and negatives.shape[0] == 0:
        return before_the_queue(query, positive, labels, preparation)
    return explicit_negatives(query, positive, negatives, *rest, preparation=preparation)


def before_the_queue(
    query: Tensor,
    positive: Tensor,
    labels: Tensor | None = None,
    preparation: Preparation | None = None,
) -> ContrastiveProblem:
    """The MoCo mode of ``"all"`` with an empty queue's ``(0, D)`` negatives (the first step):
    no queue yet, so the other rows' keys of the batch are the negatives. Without labels that
    is the cross layout (``positive[i]`` stay the positives); with labels the batch's keys are
    labelled negatives, a key with the query's label left out as a queue's would be."""
    if labels is None:
        return cross(query, as_positives(positive), preparation=preparation)
    keys, key_labels = flat_keys(positive, labels)
    return explicit_negatives(query, positive, keys, labels, key_labels, preparation=preparation)


def flat_keys(positive: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Every key of ``positive`` ``(N, D)`` or ``(N, M, D)`` as ``(N M, D)``, row by row, with
    each row's label repeated for its ``M`` keys."""
    if positive.dim() == 2:
        return positive, labels
    m = positive.shape[1]
    return positive.flatten(0, 1), None if labels is None else labels.repeat_interleave(m)


def in_batch_views(query: Tensor, positive: Tensor) -> Tensor:
    """``(M + 1, N, D)``: the query rows, then each view of ``positive``."""
    if positive.dim() == 2:
        return torch.stack([query, positive])
    return torch.cat([query.unsqueeze(0), positive.transpose(0, 1)])


def as_positives(positive: Tensor) -> Tensor:
    """``(N, M, D)`` positives (``M = 1`` for an ``(N, D)`` positive)."""
    return positive if positive.dim() == 3 else positive.unsqueeze(1)


def in_batch(
    views: Tensor,
    *,
    labels: Tensor | None = None,
    global_rows: GlobalRows | None = None,
    preparation: Preparation | None = None,
) -> ContrastiveProblem:
    """The symmetric in-batch layout (``"all"``, NT-Xent) of ``(V, N, D)`` views: every
    embedding is a query, row ``v * N + i`` view ``v`` of instance ``i``. Without labels its
    positives are the other views of ``i``, its negatives every view of every other instance;
    with ``(N,)`` labels, same-label embeddings but itself, and the other labels' (either may be
    empty). ``global_rows``: the candidates across processes."""
    num_views, n, d = views.shape
    flat = views.reshape(num_views * n, d)
    keys, n_all, offset, key_labels = None, n, 0, labels
    if global_rows is not None:
        keys = global_rows.rows.reshape(-1, d)
        n_all, offset = global_rows.rows.shape[1], global_rows.offset
        key_labels = global_rows.labels
    if labels is None:
        sets = _INSTANCES.lookup(
            (num_views, n, n_all, offset), lambda: _instances(num_views, n, n_all, offset)
        )
        return ContrastiveProblem(flat, keys, sets[0], sets[1], preparation)
    rows = OwnRows(num_views, n, num_views, n_all, offset, includes_self=True)
    assert key_labels is not None
    query_groups = labels.repeat(num_views)
    key_groups = query_groups if global_rows is None else key_labels.repeat(num_views)
    positives = KeySet(query_groups, key_groups, same_group=True, rows=rows, may_be_empty=True)
    negatives = KeySet(query_groups, key_groups, may_be_empty=True)
    return ContrastiveProblem(flat, keys, positives, negatives, preparation)


def _instances(num_views: int, n: int, n_all: int, offset: int) -> tuple[KeySet, KeySet]:
    """The in-batch positives and negatives without labels: a row's other views, and every
    other row's embeddings (a few integers, the same at every step)."""
    rows = OwnRows(num_views, n, num_views, n_all, offset, includes_self=True)
    return KeySet(same_group=True, rows=rows), KeySet(rows=rows)


#: The in-batch key sets built by earlier calls, by their shape.
_INSTANCES: shortcuts.Memo[tuple[KeySet, KeySet]] = shortcuts.Memo()


def cross(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None = None,
    labels: Tensor | None = None,
    negative_labels: Tensor | None = None,
    global_rows: GlobalRows | None = None,
    preparation: Preparation | None = None,
) -> ContrastiveProblem:
    """The cross layout (MoCo v3, CLIP): only ``query`` rows ``(N, D)`` are queries. Without
    labels query ``i``'s positives are ``positive[i, :]`` (``(N, M, D)``) and its negatives every
    other row of ``positive``; with labels the rows with its label (``i`` included) and those
    with another. ``negatives`` ``(K, D)`` are negatives on top, but for those whose
    ``negative_labels`` equal the query's. ``global_rows``: ``positive`` across processes."""
    n, m, _ = positive.shape
    rows, offset, row_labels = positive, 0, labels
    if global_rows is not None:
        rows, offset, row_labels = global_rows.rows, global_rows.offset, global_rows.labels
    n_all = rows.shape[0]
    keys = _cross_keys(rows, negatives)
    if labels is None:
        own = OwnRows(1, n, m, n_all, offset, row_major=m > 1)
        # Its positives are its own row's keys, positive[i]; every other key is a negative (a
        # queue's keys belong to no row).
        return ContrastiveProblem(
            query, keys, KeySet(same_group=True, rows=own), KeySet(rows=own), preparation
        )
    assert row_labels is not None
    batch_groups = row_labels.repeat_interleave(m)
    pos_groups = neg_groups = batch_groups
    if negatives is not None:  # the queue holds no positives; its labelled keys no negatives
        unused = unused_group(labels).expand(negatives.shape[0])
        pos_groups = torch.cat([batch_groups, unused])
        extra = unused if negative_labels is None else negative_labels
        neg_groups = torch.cat([batch_groups, extra])
    # Row i always shares its own label: a query always has positives.
    same = KeySet(labels, pos_groups, same_group=True)
    other = KeySet(labels, neg_groups, may_be_empty=True)
    return ContrastiveProblem(query, keys, same, other, preparation)


def _cross_keys(rows: Tensor, negatives: Tensor | None) -> Tensor:
    """The keys of the cross layout: every row's ``M`` positives (key ``j * M + w`` is
    ``rows[j, w]``), then the rows of ``negatives``."""
    keys = rows.reshape(rows.shape[0] * rows.shape[1], rows.shape[2])
    return keys if negatives is None else torch.cat([keys, negatives])


def refill(
    template: ContrastiveProblem,
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None,
    layout: str,
) -> ContrastiveProblem:
    """The problem of a :func:`pairs` call (one process, no labels) on new tensors, with the
    key sets of ``template``, an earlier call of the same shapes and options: the replay of a
    trainer's step describes only its tensors (:mod:`cct_loss.shortcuts`)."""
    _, _, positives, key_set, preparation = template
    if layout == "cross":
        keys = _cross_keys(as_positives(positive), negatives)
        return ContrastiveProblem(query, keys, positives, key_set, preparation)
    if negatives is None:
        views = in_batch_views(query, positive)
        flat = views.reshape(-1, views.shape[-1])
        return ContrastiveProblem(flat, None, positives, key_set, preparation)
    return ContrastiveProblem(query, negatives, positive, key_set, preparation)


def unused_group(groups: Tensor) -> Tensor:
    """A 0-dim int64 id equal to none of ``groups``, whatever their integer dtype and range, on
    the device (no host synchronisation): one below the smallest, else one above the largest,
    else the first gap between the sorted ids (there is one: they are fewer than 2**64). No step
    wraps: ``labels.max() + 1`` in uint8 is 0, a real label."""
    ids = groups.to(torch.int64)
    int64 = torch.iinfo(torch.int64)
    low, high = ids.min(), ids.max()
    unused = torch.where(low > int64.min, low - 1, high + 1)  # (only kept where it cannot wrap)
    if ids.numel() < 2:
        return unused
    ordered = ids.sort().values
    below, above = ordered[:-1], ordered[1:]
    # where below < above, below + 1 cannot wrap (it may between equal ids at int64.max)
    opens = (below < above) & (below + 1 < above)
    gap = torch.where(opens, below + 1, int64.max).amin()
    return torch.where((low > int64.min) | (high < int64.max), unused, gap)


def explicit_negatives(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor,
    labels: Tensor | None = None,
    negative_labels: Tensor | None = None,
    preparation: Preparation | None = None,
) -> ContrastiveProblem:
    """The MoCo mode of ``"all"``: ``query`` rows are the queries, ``positive[i]`` their
    positives, ``negatives`` ``(K, D)`` shared or ``(N, K, D)`` per query; with ``labels`` and
    ``negative_labels`` a negative with the query's label is left out."""
    key_set = KeySet()
    if labels is not None and negative_labels is not None:
        key_set = KeySet(labels, negative_labels, may_be_empty=True)
    return ContrastiveProblem(query, negatives, positive, key_set, preparation)


def keyed(
    query: Tensor,
    keys: Tensor | None,
    labels: Tensor | None = None,
    key_labels: Tensor | None = None,
    pairs: tuple[Tensor, Tensor] | None = None,
    preparation: Preparation | None = None,
    *,
    queries_first: bool = False,
) -> ContrastiveProblem:
    """Queries ``(N, D)`` against keys ``(R, D)`` (``None``: the queries themselves, as a miner
    pairs them): with ``pairs``, a miner's ``(N, R)`` positive and negative masks decide alone;
    otherwise a key is a positive where its label is the query's and a negative where it
    differs. ``queries_first``: the first ``N`` keys are the queries (a memory after the
    batch), each left out of its own positives; otherwise no key is a query itself."""
    if pairs is not None:
        positives = KeySet(same_group=True, may_be_empty=True, pairs=pairs[0])
        negatives = KeySet(may_be_empty=True, pairs=pairs[1])
        return ContrastiveProblem(query, keys, positives, negatives, preparation)
    assert keys is not None and labels is not None and key_labels is not None
    n = query.shape[0]
    rows = OwnRows(1, n, 1, n, includes_self=True) if queries_first else None
    positives = KeySet(labels, key_labels, same_group=True, rows=rows, may_be_empty=True)
    negatives = KeySet(labels, key_labels, may_be_empty=True)
    return ContrastiveProblem(query, keys, positives, negatives, preparation)


class PaperProblems(NamedTuple):
    """The paper's objective as problems: the attraction of every embedding to its row's other
    views, and per pair of views ``x < y`` the repulsion of view ``x``'s rows from the other
    rows of ``y`` (with ``own``, ``z_y[i]`` as ``z_x[i]``'s one positive: the accuracy test)."""

    attraction: ContrastiveProblem
    repulsions: list[ContrastiveProblem]
    num_views: int


def paper(
    views: Tensor, *, global_rows: GlobalRows | None = None, own: bool = False
) -> PaperProblems:
    """The objective of the official small-scale (CIFAR/STL) code on prepared ``(V, N, D)``
    views: attraction of each view to the other views of its row, averaged over views;
    repulsion, for each pair ``x < y``, of view ``x``'s rows from the other rows of ``y``,
    averaged over pairs. ``global_rows``: the views across processes; ``own``: see
    :class:`PaperProblems`."""
    num_views, n, d = views.shape
    own_views = OwnRows(num_views, n, num_views, n, includes_self=True)
    flat = views.reshape(num_views * n, d)
    attraction = ContrastiveProblem(flat, None, KeySet(same_group=True, rows=own_views), None)
    offset = 0 if global_rows is None else global_rows.offset
    keys = views if global_rows is None else global_rows.rows
    other_rows = KeySet(rows=OwnRows(1, n, 1, keys.shape[1], offset))
    repulsions = [
        ContrastiveProblem(views[x], keys[y], views[y] if own else None, other_rows)
        for x, y in itertools.combinations(range(num_views), 2)
    ]
    return PaperProblems(attraction, repulsions, num_views)


def moco_views(
    queries: Tensor,
    keys: Tensor,
    queue: Tensor,
    in_batch: Leading | None = None,
    preparation: Preparation | None = None,
) -> list[ContrastiveProblem]:
    """The paper's MoCo-v2 objective (docs/layouts.md) on ``(V, N, D)`` queries and momentum
    keys and a ``(K, D)`` queue, one problem per view ``x``: the queries ``queries[x]``, their
    positives the other views' keys of their row ``(N, V - 1, D)`` (not their own view's), their
    negatives one softmax over the same view's other queries and the queue (keys
    ``queries[x]`` then ``queue``; ``in_batch``: the first ``N`` keys' weights treated apart)."""
    num_views, n, _ = queries.shape
    own = OwnRows(1, n, 1, n)  # the in-batch keys are the rows; the queue's belong to none
    negatives = KeySet(rows=own, leading=in_batch)
    problems = []
    for x in range(num_views):
        others = [keys[j] for j in range(num_views) if j != x]
        positives = others[0].unsqueeze(1) if len(others) == 1 else torch.stack(others, dim=1)
        rows = torch.cat([queries[x], queue])
        problems.append(ContrastiveProblem(queries[x], rows, positives, negatives, preparation))
    return problems


class MultiCropProblems(NamedTuple):
    """The multi-crop objective as problems: for each of the two key views ``i``, one cross
    problem per view of its query list (the other global view, then every local crop)."""

    per_key_view: list[list[ContrastiveProblem]]


def multicrop(
    queries: Tensor, keys: Tensor, global_keys: list[GlobalRows] | None = None
) -> MultiCropProblems:
    """The paper's multi-crop objective (docs/layouts.md) on prepared ``(2 + L, N, D)`` queries
    (the two global views, then ``L`` local crops) and ``(2, N, D)`` momentum keys: for key view
    ``i``, each query view ``v`` but ``i`` against ``keys[i]`` in the cross layout (its own row's
    key the positive, every other row's key a negative; ``global_keys[i]``: ``keys[i]`` across
    processes)."""
    problems = []
    for i in range(2):
        own_keys = keys[i].unsqueeze(1)
        rows = None if global_keys is None else global_keys[i]
        listed = [v for v in range(queries.shape[0]) if v != i]
        problems.append([cross(queries[v], own_keys, global_rows=rows) for v in listed])
    return MultiCropProblems(problems)
