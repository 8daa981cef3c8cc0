"""The one route every call takes, in four steps and only downward: **validate** the arguments
(:mod:`~cct_loss.front.validate`); **describe** the problem (:mod:`cct_loss.problem.layouts`,
the candidates gathered first across processes); **compute** it through the implementation
table (:mod:`cct_loss.implementations.table`), per query or as a one-pass loss where the
implementation offers one; **reduce** through the one reduction (:mod:`cct_loss.maths.reduction`).

The first call of a signature leaves a :class:`Replay` (:mod:`cct_loss.shortcuts`): later calls
of that signature check only what depends on the tensors themselves, and describe only them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .. import distributed, shortcuts
from ..implementations import table
from ..maths.costs import Preparation, centred, prepare
from ..maths.precision import (
    autocast_dtype,
    cast,
    own_precision,
    resolve_precision,
    tf32_matmul_allowed,
)
from ..maths.reduction import (
    CCTDetails,
    combine,
    concatenated,
    multicrop_row_terms,
    paper_row_terms,
    reduce,
)
from ..options import CCTOptions
from ..problem import layouts
from ..problem.description import ContrastiveProblem, Leading
from ..problem.layouts import GlobalRows
from . import validate


def pairs_loss(
    query: Tensor,
    positive: Tensor | None,
    negatives: Tensor | None,
    labels: Tensor | None,
    negative_labels: Tensor | None,
    options: CCTOptions,
    entry: str = "cct_loss",
) -> Tensor | CCTDetails:
    """:func:`cct_loss.cct_loss` with its options in one object (see its docstring);
    ``entry``: how the messages spell the call (``"CCTLoss(...)"`` for the module)."""
    signature = _signature(query, positive, negatives, labels, negative_labels, options)
    replay = None if signature is None else _REPLAYS.get(signature)
    if replay is not None:  # a signature checked before: the same checks pass
        assert positive is not None and signature is not None
        validate.distinct(query, positive, negatives, entry)
        problem = layouts.refill(replay.template, query, positive, negatives, options.layout)
        if signature.autocast is None:  # nothing to disable
            return replay.run(problem)
        with own_precision(query.device):
            return replay.run(problem)
    with _gathering(options):  # (never replayed: every rank fails where one does)
        query = validate.query_of(query, options, entry)
        if positive is None:  # the one-view call with labels
            labels = validate.one_view(negatives, labels, negative_labels, options, entry)
            return _views_loss([query], labels, options, entry)
        call = validate.pairs(query, positive, negatives, labels, negative_labels, options, entry)
        tensors = (call.query, call.positive, call.negatives)
        preparation = _preparation(call.device, tensors, options)
        with own_precision(call.device):
            if call.row_counts is None:
                (rows, positives, keys), ready = _for_one_process(tensors, preparation)
                assert rows is not None and positives is not None
                problem = layouts.pairs(rows, positives, keys, options.layout, *call[3:5], ready)
                return _compute_and_reduce(problem, options, None, signature)
            return _compute_and_reduce(
                _across_processes(call, options, preparation), options, call.row_counts
            )


def two_way_loss(
    query: Tensor, positive: Tensor, options: CCTOptions, entry: str
) -> Tensor | CCTDetails:
    """``(cct_loss(query, positive, layout="cross") + cct_loss(positive, query,
    layout="cross")) / 2``, CLIP's two directions. On one process, with ``"mean"`` or ``"sum"``
    and no diagnostics, checked and prepared once: an implementation that offers it computes
    both from one cost matrix (``Implementation.two_way``), another each direction's problem;
    otherwise the two calls."""
    shared = (
        options.reduction != "none"
        and not options.return_details
        and not (options.gather_distributed and distributed.is_active())
        and isinstance(positive, Tensor)
        and positive.dim() == 2
    )
    if shared:
        query = validate.query_of(query, options, entry)
        call = validate.pairs(query, positive, None, None, None, options, entry)
        tensors = (call.query, call.positive)
        preparation = _preparation(call.device, tensors, options)
        with own_precision(call.device):
            (rows, keys), ready = _for_one_process(tensors, preparation)
            assert rows is not None and keys is not None
            problem = layouts.cross(rows, layouts.as_positives(keys), preparation=ready)
            implementation = table.choose(problem, options)
            if implementation.two_way is not None:
                return implementation.two_way(problem, options)
            reverse = layouts.cross(keys, layouts.as_positives(rows), preparation=ready)
            directions = [_compute_and_reduce(one, options, None) for one in (problem, reverse)]
            assert isinstance(directions[0], Tensor) and isinstance(directions[1], Tensor)
            return (directions[0] + directions[1]) / 2
    there = pairs_loss(query, positive, None, None, None, options, entry)
    back = pairs_loss(positive, query, None, None, None, options, entry)
    assert isinstance(there, Tensor) and isinstance(back, Tensor)
    return (there + back) / 2


def keyed_loss(
    query: Tensor,
    keys: Tensor | None,
    labels: Tensor | None,
    key_labels: Tensor | None,
    pairs: tuple[Tensor, Tensor] | None,
    options: CCTOptions,
    entry: str,
    *,
    queries_first: bool = False,
) -> Tensor | CCTDetails:
    """Queries against keys drawn by label, or restricted to a miner's pairs
    (:func:`cct_loss.problem.layouts.keyed`; ``queries_first``: the keys start with the
    queries): pytorch-metric-learning's ``ref_emb`` and ``indices_tuple``
    (:mod:`cct_loss.clients.metric_learning`); one process."""
    query = validate.query_of(query, options, entry)
    call = validate.keyed(query, keys, labels, key_labels, pairs, options, entry)
    tensors = (call.query, call.keys)
    preparation = _preparation(call.device, tensors, options)
    with own_precision(call.device):
        (rows, keys), ready = _for_one_process(tensors, preparation)
        assert rows is not None
        problem = layouts.keyed(
            rows, keys, call.labels, call.key_labels, call.pairs, ready, queries_first=queries_first
        )
        return _compute_and_reduce(problem, options, None)


def _preparation(
    device: torch.device, tensors: Sequence[Tensor | None], options: CCTOptions
) -> Preparation:
    """How a call's embeddings are prepared: the precision policy's dtypes, the cost and
    whether to normalise."""
    given = [x for x in tensors if x is not None]
    return Preparation.of(
        resolve_precision(device, *given), cost=options.cost, normalize=options.normalize
    )


def _for_one_process(
    tensors: Sequence[Tensor | None], preparation: Preparation
) -> tuple[Sequence[Tensor | None], Preparation | None]:
    """The embeddings a one-process problem takes, with the preparation it still owes: unit rows
    as given (the implementation prepares them, differentiably); other rows prepared now, every
    row moved by one centre (:func:`cct_loss.maths.costs.centred`)."""
    if preparation.unit:
        return tensors, preparation
    return centred(tensors, preparation), None


def _gathering(options: CCTOptions) -> contextlib.AbstractContextManager[object]:
    """Around a call that gathers across processes, :func:`distributed.gathering_call` (every
    rank fails where one does); around any other, nothing."""
    if options.gather_distributed and distributed.is_active():
        return distributed.gathering_call()
    return shortcuts.no_context()


def views_loss(
    views: Sequence[Tensor],
    labels: Tensor | None,
    options: CCTOptions,
    *,
    entry: str = "cct_loss_multiview",
) -> Tensor | CCTDetails:
    """:func:`cct_loss.cct_loss_multiview` with its options in one object; ``entry``: how the
    messages name the call."""
    with _gathering(options):
        return _views_loss(views, labels, options, entry)


def _views_loss(
    views: Sequence[Tensor], labels: Tensor | None, options: CCTOptions, entry: str
) -> Tensor | CCTDetails:
    call = validate.views(views, labels, options, entry)
    stacked = call.views
    preparation = _preparation(stacked.device, [stacked], options)
    with own_precision(stacked.device):
        unit = preparation.unit
        if call.row_counts is None and options.layout != "paper":
            (ready_views,), ready = _for_one_process([stacked], preparation)
            assert ready_views is not None
            problem = layouts.in_batch(ready_views, labels=call.labels, preparation=ready)
            return _compute_and_reduce(problem, options, None)
        prepared = prepare(stacked, preparation) if unit else cast(stacked, preparation.compute)
        global_rows = _gather_views(prepared, call.labels, call.row_counts)
        if not unit and global_rows is None:  # the paper's objective on one process
            (prepared,) = centred([prepared], preparation)
        elif not unit:  # every row moved by one centre, the gathered rows' (every rank's)
            assert global_rows is not None
            rows, prepared = centred([global_rows.rows, prepared], preparation)
            global_rows = global_rows._replace(rows=rows)
        if options.layout == "paper":
            return _paper(prepared, global_rows, options, call.row_counts)
        problem = layouts.in_batch(prepared, labels=call.labels, global_rows=global_rows)
        return _compute_and_reduce(problem, options, call.row_counts)


class Replay(NamedTuple):
    """What the first call of a signature worked out, for the calls after it: its problem
    (whose key sets and preparation the later calls share) and the chosen implementation's
    one-pass loss."""

    template: ContrastiveProblem
    run: Callable[[ContrastiveProblem], Tensor]


#: The replays of recent signatures (see :func:`_signature`).
_REPLAYS: shortcuts.Memo[Replay] = shortcuts.Memo()


class Signature(NamedTuple):
    """What decides every check of :func:`pairs_loss` and every choice it makes, so that a
    call with an earlier call's signature can replay it: the options, the inputs' shapes,
    dtypes and devices, and the precision state."""

    options: CCTOptions
    query: tuple[torch.Size, torch.dtype, torch.device]
    positive: tuple[torch.Size, torch.dtype, torch.device]
    negatives: tuple[torch.Size, torch.dtype, torch.device] | None
    autocast: torch.dtype | None
    tf32: bool


def _signature(
    query: object,
    positive: object,
    negatives: object,
    labels: object,
    negative_labels: object,
    options: CCTOptions,
) -> Signature | None:
    """The call's :class:`Signature`, or ``None`` for a call that is not replayed: labels, a
    tensor option, gathering, ``check_finite``, embeddings not normalised, the shortcuts off or
    a trace active."""
    if labels is not None or negative_labels is not None or not options.constant:
        return None
    if not (
        isinstance(query, Tensor)
        and isinstance(positive, Tensor)
        and (negatives is None or isinstance(negatives, Tensor))
    ):
        return None
    if not shortcuts.active() or options.check_finite:
        return None
    if options.gather_distributed and distributed.is_active():
        return None
    if not (options.normalize or options.cost == "cosine"):  # centred each call (_pairs_loss)
        return None
    if negatives is not None and negatives.dim() == 2 and len(negatives) == 0:  # an empty queue
        return None
    device = query.device
    keys = None if negatives is None else (negatives.shape, negatives.dtype, negatives.device)
    return Signature(
        options, (query.shape, query.dtype, device), (positive.shape, positive.dtype, positive.device),
        keys, autocast_dtype(device), device.type == "cuda" and tf32_matmul_allowed(),
    )  # fmt: skip


def _compute_and_reduce(
    problem: ContrastiveProblem,
    options: CCTOptions,
    row_counts: list[int] | None,
    signature: Signature | None = None,
) -> Tensor | CCTDetails:
    """Steps 3 and 4: through the implementation table, then the one reduction (or, on one
    process for ``"mean"`` and ``"sum"`` without diagnostics, the implementation's one-pass
    loss where it offers one, remembered for the replays of ``signature``)."""
    implementation = table.choose(problem, options)
    one_pass = row_counts is None and options.reduction != "none" and not options.return_details
    if one_pass and implementation.one_pass is not None:
        run = implementation.one_pass(problem, options)
        if signature is not None:
            _REPLAYS.put(signature, Replay(problem, run))
        return run(problem)
    sides = implementation.expectations(problem, options)
    return reduce(combine(*sides), options, row_counts)


def _paper(
    views: Tensor,
    global_rows: GlobalRows | None,
    options: CCTOptions,
    row_counts: list[int] | None,
) -> Tensor | CCTDetails:
    """The paper's objective: its problems through the table, its rows' terms, the reduction."""
    problems = layouts.paper(views, global_rows=global_rows, own=bool(options.return_details))
    attract, _ = table.choose(problems.attraction, options).expectations(
        problems.attraction, options
    )
    assert attract is not None
    pairs = []
    for problem in problems.repulsions:
        own, repel = table.choose(problem, options).expectations(problem, options)
        assert repel is not None
        pairs.append((own, repel))
    return reduce(paper_row_terms(attract, pairs, problems.num_views), options, row_counts)


def _across_processes(
    call: validate.PairsCall, options: CCTOptions, preparation: Preparation
) -> ContrastiveProblem:
    """A :func:`cct_loss.cct_loss` call across processes: the embeddings prepared, the
    candidates gathered from every rank, then the call described on them."""

    unit = preparation.unit

    def each(x: Tensor) -> Tensor:  # without normalising: the casts, then one centre (below)
        return prepare(x, preparation) if unit else cast(x, preparation.compute)

    if options.layout != "cross":  # in-batch (explicit negatives are not gathered)
        views = each(layouts.in_batch_views(call.query, call.positive))
        global_rows = _gather_views(views, call.labels, call.row_counts)
        assert global_rows is not None
        if not unit:  # every row moved by one centre, the gathered rows' (every rank's)
            rows, views = centred([global_rows.rows, views], preparation)
            global_rows = global_rows._replace(rows=rows)
        return layouts.in_batch(views, labels=call.labels, global_rows=global_rows)
    positive = each(layouts.as_positives(call.positive))
    query, negatives = each(call.query), None if call.negatives is None else each(call.negatives)
    global_rows = _gather(positive, call.labels, call.row_counts)
    assert global_rows is not None
    if not unit:  # every row moved by one centre, the gathered rows' (every rank's)
        tensors = [global_rows.rows, positive, query, negatives]
        rows, positive, query, negatives = centred(tensors, preparation)
        global_rows = global_rows._replace(rows=rows)
    return layouts.cross(query, positive, negatives, *call[3:5], global_rows)


def _gather(rows: Tensor, labels: Tensor | None, counts: list[int] | None) -> GlobalRows | None:
    """Every rank's ``rows`` (dim 0, rank order; gradients flow back to their rank) and
    labels, given every rank's row count, or ``None`` when not gathering."""
    if counts is None:
        return None
    gathered, offset = distributed.gather_rows(rows, counts)
    gathered_labels = None if labels is None else distributed.all_gather_no_grad(labels, counts)
    return GlobalRows(gathered, gathered_labels, offset)


def _gathered(rows: Tensor, counts: list[int]) -> GlobalRows:
    """:func:`_gather` of unlabelled ``rows``, given every rank's row count."""
    gathered = _gather(rows, None, counts)
    assert gathered is not None
    return gathered


def _gather_views(
    views: Tensor, labels: Tensor | None, counts: list[int] | None
) -> GlobalRows | None:
    """:func:`_gather` of ``(V, N, D)`` views along their rows."""
    gathered = _gather(views.transpose(0, 1), labels, counts)
    if gathered is None:
        return None
    return gathered._replace(rows=gathered.rows.transpose(0, 1))


def moco_loss(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    queue: Tensor,
    in_batch_weights: str | None,
    options: CCTOptions,
    entry: str = "cct_loss_moco",
) -> Tensor | CCTDetails:
    """:func:`cct_loss.cct_loss_moco` with its options in one object: one problem per view
    (:func:`cct_loss.problem.layouts.moco_views`) through the table, the ``V * N`` queries'
    terms through the one reduction (the in-batch negatives stay local; gathering counts the
    global batch for the mean)."""
    with _gathering(options):
        call = validate.moco(queries, keys, queue, in_batch_weights, options, entry)
        tensors = (call.queries, call.keys, call.queue)
        preparation = _preparation(call.queries.device, tensors, options)
        detach = options.detach_weights if in_batch_weights is None else in_batch_weights != "live"
        split = None if detach == options.detach_weights else Leading(call.queries.shape[1], detach)
        with own_precision(call.queries.device):
            (views, momentum, rows), ready = _for_one_process(tensors, preparation)
            assert views is not None and momentum is not None and rows is not None
            problems = layouts.moco_views(views, momentum, rows, split, ready)
            sides = [table.choose(one, options).expectations(one, options) for one in problems]
            return reduce(
                concatenated([combine(*pair) for pair in sides], options), options, call.row_counts
            )


def multicrop_loss(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    local_queries: Sequence[Tensor],
    options: CCTOptions,
    entry: str = "cct_loss_multicrop",
) -> Tensor | CCTDetails:
    """:func:`cct_loss.cct_loss_multicrop` with its options in one object: per key view, one
    cross problem per query view (:func:`cct_loss.problem.layouts.multicrop`, the keys gathered
    once) through the table, the rows' terms weighted over the query views
    (:func:`cct_loss.maths.reduction.multicrop_row_terms`), the one reduction."""
    with _gathering(options):
        call = validate.multicrop(queries, keys, local_queries, options, entry)
        preparation = _preparation(call.queries.device, (call.queries, call.keys), options)
        with own_precision(call.queries.device):
            unit = preparation.unit
            views, momentum = (
                prepare(x, preparation) if unit else cast(x, preparation.compute)
                for x in (call.queries, call.keys)
            )
            global_keys = None
            if call.row_counts is not None:  # each key view once, not once per query view
                global_keys = [_gathered(k.unsqueeze(1), call.row_counts) for k in momentum]
            if not unit:  # every row moved by one centre (the gathered keys' when gathering)
                gathered = [] if global_keys is None else [g.rows for g in global_keys]
                views, momentum, *moved = centred([views, momentum, *gathered], preparation)
                if global_keys is not None:
                    global_keys = [
                        g._replace(rows=r) for g, r in zip(global_keys, moved, strict=True)
                    ]
            found = layouts.multicrop(views, momentum, global_keys)
            sides = [
                [table.choose(one, options).expectations(one, options) for one in listed]
                for listed in found.per_key_view
            ]
            return reduce(multicrop_row_terms(sides, options), options, call.row_counts)
