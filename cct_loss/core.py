"""The private core behind :func:`cct_loss.cct_loss`, :func:`cct_loss.cct_loss_multiview` and
the modules: tensor checks, precision, the distributed gather, the layout, the reduction.

Each entry point builds (or holds) one :class:`cct_loss.options.CCTOptions` and calls
:func:`loss_of_pairs` or :func:`loss_of_views` with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import distributed
from ._validation import (
    check_distinct_views,
    check_finite_inputs,
    check_float_tensor,
    check_labels,
    check_no_shared_memory,
    check_not_query_itself,
    check_same_device,
    shape_str,
)
from .costs import Preparation, prepare
from .dense import OnePass
from .details import CCTDetails, MeanScale, QueryTerms, reduce_terms, term_counts
from .dispatch import loss_in_one_pass
from .layouts import (
    GlobalRows,
    cross_problem,
    explicit_negatives_problem,
    in_batch_problem,
    paper_terms,
    terms_of,
)
from .options import CCTOptions
from .precision import (
    autocast_dtype,
    own_precision,
    promoted_dtype,
    resolve_precision,
    tf32_matmul_allowed,
)
from .transport import Transport

#: The layouts each entry point takes.
PAIR_LAYOUTS = ("all", "cross")
VIEW_LAYOUTS = ("all", "paper")


def check_layout(options: CCTOptions, allowed: tuple[str, ...], entry: str) -> None:
    """Refuse a layout that this entry point does not serve, saying which one does."""
    if options.layout in allowed:
        return
    elsewhere = {
        "paper": "cct_loss_multiview(views, layout='paper')",
        "cross": "cct_loss(query, positive, layout='cross')",
    }
    raise ValueError(
        f"layout must be one of {', '.join(map(repr, allowed))} for {entry}; got "
        f"{options.layout!r} (use {elsewhere[options.layout]})"
    )


def loss_of_pairs(
    query: Tensor,
    positive: Tensor | None,
    negatives: Tensor | None,
    labels: Tensor | None,
    negative_labels: Tensor | None,
    options: CCTOptions,
    *,
    entry: str = "cct_loss",
) -> Tensor | CCTDetails:
    """:func:`cct_loss.cct_loss` with its options in one object (see its docstring);
    ``entry``: how the messages spell the call (``"CCTLoss(...)"`` for the module)."""
    signature = _pairs_signature(query, positive, negatives, labels, negative_labels, options)
    replay = None if signature is None else _REPLAYS.get(signature)
    if replay is not None:  # checked before with this signature: the same checks pass
        assert signature is not None and positive is not None
        # (what depends on the tensors themselves is checked at every call)
        if query.data_ptr() == positive.data_ptr():  # (the cheap half of the check first)
            check_not_query_itself(query, positive, entry)
        if negatives is not None:
            check_no_shared_memory(negatives, positive)
        if signature[_AUTOCAST] is None:  # nothing to disable
            return replay.loss(_describe_pairs(query, positive, negatives, options.layout))
        with own_precision(query.device):
            return replay.loss(_describe_pairs(query, positive, negatives, options.layout))
    check_layout(options, PAIR_LAYOUTS, entry.removesuffix("(...)"))
    query = check_float_tensor("query", query, (2,), "(N, D)")
    if positive is None:
        return _one_view_with_labels(query, negatives, labels, negative_labels, options, entry)
    if isinstance(positive, Tensor) and not positive.is_floating_point():
        raise TypeError(
            f"positive must have a floating-point dtype (embeddings), got {positive.dtype}. "
            f"To pass class labels, name them: {entry}(query, labels=labels) for one view "
            f"(metric learning), {entry}(query, positive, labels=labels) for two"
        )
    positive = check_float_tensor("positive", positive, (2, 3), "(N, D) or (N, M, D)")
    check_not_query_itself(query, positive, entry)
    n, d = query.shape
    gathering = options.gather_distributed and distributed.is_active()
    if n == 0 and not gathering:  # across processes every rank raises, in row_counts
        raise ValueError(f"query is an empty batch: got shape {shape_str(query)}, expected N >= 1")
    if d == 0:
        raise ValueError(f"query has embedding dim D = 0: got shape {shape_str(query)}")
    if positive.shape[0] != n or positive.shape[-1] != d:
        raise ValueError(
            f"positive must have shape (N, D) = ({n}, {d}) or (N, M, D) = ({n}, M, {d}) to match "
            f"query {shape_str(query)}, got {shape_str(positive)}"
        )
    if positive.dim() == 3 and positive.shape[1] == 0:
        raise ValueError(
            f"positive has M = 0 positives per query (shape {shape_str(positive)}); expected M >= 1"
        )
    tensors = {"query": query, "positive": positive}
    if labels is not None:
        tensors["labels"] = check_labels("labels", labels, n, "N")
    cross = options.layout == "cross"
    if negatives is not None:
        negatives = _check_negatives(negatives, n, d, entry)
        check_no_shared_memory(negatives, positive)
        tensors["negatives"] = negatives
        if negatives.dim() == 3 and (cross or labels is not None):
            what = "layout='cross'" if cross else "labels"
            raise ValueError(
                f"{what} takes shared negatives of shape (K, D), got per-query negatives "
                f"{shape_str(negatives)}"
            )
        if options.gather_distributed and not cross:
            raise ValueError(
                "gather_distributed=True gathers in-batch negatives (negatives=None, or "
                "layout='cross'); with explicit negatives, gather them yourself, e.g. with "
                "NegativeQueue(..., gather_distributed=True)"
            )
        if labels is not None and negative_labels is None and not cross:
            raise ValueError(
                "labels with explicit negatives (the MoCo mode of layout='all') need "
                "negative_labels= (K,) to leave out same-label negatives; to draw same-label "
                "positives from the batch use layout='cross'"
            )
    if negative_labels is not None:
        if negatives is None or negatives.dim() != 2:
            raise ValueError(
                "negative_labels labels the rows of (K, D) negatives; got negatives="
                f"{None if negatives is None else shape_str(negatives)}"
            )
        if labels is None:
            raise ValueError("negative_labels needs labels= (N,) for the queries' rows")
        k = negatives.shape[0]
        tensors["negative_labels"] = check_labels("negative_labels", negative_labels, k, "K")
    if negatives is None and n < 2 and labels is None and not gathering:
        mode = "layout='cross'" if cross else "in-batch mode (negatives=None)"
        raise ValueError(
            f"{mode} needs at least 2 rows so that each query has negatives; got query of "
            f"shape {shape_str(query)}. Pass negatives, or a batch N >= 2"
        )
    device = check_same_device(tensors)
    if options.check_finite:
        check_finite_inputs({k: v for k, v in tensors.items() if v.is_floating_point()})
    counts = distributed.row_counts(n, device) if gathering else None

    precision = resolve_precision(
        device, query, positive, *([] if negatives is None else [negatives])
    )
    preparation = Preparation.of(precision, cost=options.cost, normalize=options.normalize)
    with own_precision(device):
        if counts is None:  # one process: the call, described on the raw embeddings
            problem = _describe_pairs(
                query, positive, negatives, options.layout, labels, negative_labels
            )
            return _loss(problem, options, preparation, signature=signature)

        # Across processes: prepare, gather the candidates, then describe the call.
        def prep(x: Tensor) -> Tensor:
            return prepare(x, preparation)

        if negatives is None and not cross:
            views = prep(_in_batch_views(query, positive))
            problem = in_batch_problem(
                views, labels=labels, global_rows=_gather_views(views, labels, counts)
            )
        else:
            q, p = prep(query), prep(_positives(positive))
            assert cross  # (explicit negatives in layout "all" cannot be gathered)
            problem = cross_problem(
                q,
                p,
                negatives=None if negatives is None else prep(negatives),
                labels=labels,
                negative_labels=negative_labels,
                global_rows=_gather(p, labels, counts),
            )
        return _reduce(terms_of(problem, options), options, row_counts=counts)


def _one_view_with_labels(
    query: Tensor,
    negatives: Tensor | None,
    labels: Tensor | None,
    negative_labels: Tensor | None,
    options: CCTOptions,
    entry: str,
) -> Tensor | CCTDetails:
    """``cct_loss(embeddings, labels=labels)``: the metric-learning call, one view with labels,
    which is ``cct_loss_multiview([embeddings], labels=labels)``."""
    if labels is None:
        raise TypeError(
            f"{entry}() needs positive= (the second view: {entry}(z1, z2)), or labels= for "
            f"one view with class labels: {entry}(embeddings, labels=labels)"
        )
    if negatives is not None or negative_labels is not None or options.layout != "all":
        raise ValueError(
            "leaving out positive is the one-view call with labels (in-batch, layout='all', "
            "no negatives): every other row with the same label is a positive. With "
            f"explicit negatives pass each query's positive too: {entry}(query, positive, "
            "negatives, labels=labels, negative_labels=negative_labels)"
        )
    return loss_of_views([query], labels, options, entry=entry)


def _describe_pairs(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None,
    layout: str,
    labels: Tensor | None = None,
    negative_labels: Tensor | None = None,
) -> Transport:
    """A :func:`cct_loss.cct_loss` call on one process, described on its raw embeddings."""
    if negatives is None and layout != "cross":
        return in_batch_problem(_in_batch_views(query, positive), labels=labels)
    if layout == "cross":
        return cross_problem(
            query,
            _positives(positive),
            negatives=negatives,
            labels=labels,
            negative_labels=negative_labels,
        )
    assert negatives is not None
    return explicit_negatives_problem(
        query, positive, negatives, labels=labels, negative_labels=negative_labels
    )


def _in_batch_views(query: Tensor, positive: Tensor) -> Tensor:
    """``(M + 1, N, D)``: the query rows, then each view of ``positive``."""
    if positive.dim() == 2:
        return torch.stack([query, positive])
    return torch.cat([query.unsqueeze(0), positive.transpose(0, 1)])


def _positives(positive: Tensor) -> Tensor:
    """``(N, M, D)`` positives (``M = 1`` for an ``(N, D)`` positive)."""
    return positive if positive.dim() == 3 else positive.unsqueeze(1)


#: How calls of a given signature (see :func:`_pairs_signature`) compute their loss, learned
#: from a first call that went through every check: the one-pass dense loss, replayed.
_REPLAYS: dict[tuple[object, ...], OnePass] = {}
_REPLAYS_MAX = 256


def _pairs_signature(
    query: object,
    positive: object,
    negatives: object,
    labels: object,
    negative_labels: object,
    options: CCTOptions,
) -> tuple[object, ...] | None:
    """What decides every check of :func:`loss_of_pairs` and every choice it makes: the
    options, the inputs' shapes, dtypes and devices, and the autocast state; ``None`` for a
    call that is not replayed (labels, tensor options, across processes, while tracing).

    A trainer calls the loss with one signature at every step: the first call checks and
    plans, the others replay the plan. The checks and choices cost about twenty
    microseconds a call on a CPU, a fifth of a small NT-Xent step; what depends on the
    tensors themselves (whether two of them share memory) is checked at every call."""
    if labels is not None or negative_labels is not None:
        return None
    if not (
        isinstance(query, Tensor)
        and isinstance(positive, Tensor)
        and (negatives is None or isinstance(negatives, Tensor))
    ):
        return None
    if not options.constant:
        return None  # a schedule: options validated anew at every call
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    if options.gather_distributed and distributed.is_active():
        return None
    if options.check_finite:
        return None  # the check reads the tensors at every call
    device = query.device
    keys = None if negatives is None else (negatives.shape, negatives.dtype, negatives.device)
    tf32 = device.type == "cuda" and tf32_matmul_allowed()
    return (
        options,
        query.shape,
        query.dtype,
        device,
        positive.shape,
        positive.dtype,
        positive.device,
        keys,
        autocast_dtype(device),
        tf32,
    )


#: Where the autocast dtype sits in a signature.
_AUTOCAST = 8


def _remember(signature: tuple[object, ...], replay: OnePass) -> None:
    if len(_REPLAYS) >= _REPLAYS_MAX:
        _REPLAYS.clear()
    _REPLAYS[signature] = replay


def loss_of_views(
    views: Sequence[Tensor],
    labels: Tensor | None,
    options: CCTOptions,
    *,
    entry: str = "cct_loss_multiview",
) -> Tensor | CCTDetails:
    """:func:`cct_loss.cct_loss_multiview` with its options in one object; ``entry``: how
    the messages name the call."""
    check_layout(options, VIEW_LAYOUTS, entry.removesuffix("(...)"))
    gathering = options.gather_distributed and distributed.is_active()
    stacked = _stack_views(views, labels=labels is not None, gathering=gathering, entry=entry)
    if options.check_finite:
        check_finite_inputs({f"views[{i}]": view for i, view in enumerate(stacked)})
    if labels is not None:
        if options.layout == "paper":
            raise ValueError(
                "labels are not defined for layout='paper' (the official objective has no "
                "classes); use layout='all'"
            )
        labels = check_labels("labels", labels, stacked.shape[1], "N")
        check_same_device({"views": stacked, "labels": labels})
    precision = resolve_precision(stacked.device, stacked)
    preparation = Preparation.of(precision, cost=options.cost, normalize=options.normalize)
    with own_precision(stacked.device):
        counts = distributed.row_counts(stacked.shape[1], stacked.device) if gathering else None
        if counts is None and options.layout != "paper":
            return _loss(in_batch_problem(stacked, labels=labels), options, preparation)
        prepared = prepare(stacked, preparation)
        global_rows = _gather_views(prepared, labels, counts)
        if options.layout == "paper":
            terms = paper_terms(prepared, options, global_rows=global_rows)
        else:
            terms = terms_of(
                in_batch_problem(prepared, labels=labels, global_rows=global_rows), options
            )
        return _reduce(terms, options, row_counts=counts)


def _loss(
    problem: Transport,
    options: CCTOptions,
    preparation: Preparation,
    *,
    signature: tuple[object, ...] | None = None,
) -> Tensor | CCTDetails:
    """The loss (or the diagnostics) of a call on one process, described on the raw
    embeddings: in one pass where the implementation computes the reduced loss itself
    (``"mean"`` or ``"sum"``, no diagnostics; remembered for replays of ``signature``), else
    from the per-query terms of the prepared embeddings."""
    if options.reduction != "none" and not options.return_details:
        once = loss_in_one_pass(problem, options, preparation)
        if once is not None:
            if signature is not None:
                _remember(signature, once)
            return once.loss(problem)
    prepared = problem.prepared(lambda x: prepare(x, preparation))
    return _reduce(terms_of(prepared, options), options, row_counts=None)


def _reduce(
    terms: QueryTerms, options: CCTOptions, *, row_counts: list[int] | None
) -> Tensor | CCTDetails:
    """Reduce with the mean over the queries that have each term, global across processes
    (``row_counts``: every rank's rows when gathering, else ``None``)."""
    scale = MeanScale()
    flagged = terms.has_positives is not None or terms.has_negatives is not None
    if options.reduction == "mean" and row_counts is None and flagged:
        # One process: each term's sum over the queries that have it, divided by their count.
        scale = MeanScale(_count(terms.has_positives), _count(terms.has_negatives))
    elif options.reduction == "mean" and row_counts is not None:
        world = len(row_counts)
        if flagged:  # the counts depend on the labels: one small all-reduce across processes
            counts = distributed.all_reduce_sum(term_counts(terms)).clamp_min(1.0) / world
            scale = MeanScale(counts[0], counts[1])
        else:  # every query has both terms: the global count is known on the host
            rank, _ = distributed.rank_and_world_size()
            queries_per_row = terms.attraction.shape[0] // row_counts[rank]
            same = queries_per_row * sum(row_counts) / world
            scale = MeanScale(same, same)
    return reduce_terms(
        terms,
        alpha=options.alpha,
        beta=options.beta,
        reduction=options.reduction,
        return_details=bool(options.return_details),
        weights=options.wants_weights,
        mean_scale=scale,
    )


def _count(flags: Tensor | None) -> Tensor | None:
    """How many queries have a term (at least 1, so that an absent term divides 0 by 1), or
    ``None`` when every query has it."""
    return None if flags is None else flags.sum().clamp_min(1)


def _gather(rows: Tensor, labels: Tensor | None, counts: list[int] | None) -> GlobalRows | None:
    """Every rank's ``rows`` (dim 0, rank order; gradients flow back to their rank) and
    labels, given every rank's row count, or ``None`` when not gathering."""
    if counts is None:
        return None
    gathered, offset = distributed.gather_rows(rows, counts)
    gathered_labels = None if labels is None else distributed.all_gather_no_grad(labels, counts)
    return GlobalRows(gathered, gathered_labels, offset)


def _gather_views(
    views: Tensor, labels: Tensor | None, counts: list[int] | None
) -> GlobalRows | None:
    """:func:`_gather` of ``(V, N, D)`` views along their rows."""
    if counts is None:
        return None
    gathered = _gather(views.transpose(0, 1), labels, counts)
    if gathered is None:
        return None
    return gathered._replace(rows=gathered.rows.transpose(0, 1))


def _check_negatives(negatives: Tensor, n: int, d: int, entry: str) -> Tensor:
    if isinstance(negatives, Tensor) and not negatives.is_floating_point():
        raise TypeError(
            f"negatives must have a floating-point dtype (embeddings), got {negatives.dtype}. "
            f"To pass class labels, name them: {entry}(query, positive, labels=labels)"
        )
    negatives = check_float_tensor("negatives", negatives, (2, 3), "(K, D) or (N, K, D)")
    if negatives.dim() == 2:
        rows, cols = negatives.shape
        if cols != d:
            hint = ""
            if rows == d:
                hint = (
                    f"; this looks like a MoCo queue stored as (D, K) = ({rows}, {cols}): "
                    "pass queue.T"
                )
            raise ValueError(
                f"negatives must have shape (K, D) with D = {d} as in query, got "
                f"{shape_str(negatives)}{hint}"
            )
        if rows == 0:
            raise ValueError(
                f"negatives has K = 0 rows (shape {shape_str(negatives)}); expected K >= 1"
            )
        return negatives
    if negatives.shape[0] != n or negatives.shape[2] != d:
        raise ValueError(
            f"per-query negatives must have shape (N, K, D) = ({n}, K, {d}) to match query, got "
            f"{shape_str(negatives)}"
        )
    if negatives.shape[1] == 0:
        raise ValueError(
            f"negatives has K = 0 per query (shape {shape_str(negatives)}); expected K >= 1"
        )
    return negatives


def _stack_views(views: Sequence[Tensor], *, labels: bool, gathering: bool, entry: str) -> Tensor:
    """``(V, N, D)`` from a list of ``V`` views ``(N, D)``."""
    if isinstance(views, Tensor) and views.dim() == 2:
        with_labels = ", labels=labels" if labels else ""
        raise ValueError(
            f"views must be a list of V tensors (N, D), got one tensor of shape "
            f"{shape_str(views)}: one view. Pass it in a list: {entry}([embeddings]"
            f"{with_labels}) (one view needs labels: every other row with the same label is "
            "a positive), or the views of each image: "
            f"{entry}([view1, view2]{with_labels})"
        )
    if isinstance(views, Tensor):
        raise ValueError(
            f"views must be a list of V tensors (N, D), got one tensor of shape "
            f"{shape_str(views)}: a stacked (V, N, D) and SupCon's (N, V, D) cannot be told "
            f"apart. Pass {entry}(list(x.unbind(0))) for (V, N, D) or "
            f"{entry}(list(x.unbind(1))) for (N, V, D)"
        )
    if not isinstance(views, Sequence) or isinstance(views, str):
        raise TypeError(f"views must be a list of V tensors (N, D), got {type(views).__name__}")
    checked = [check_float_tensor(f"views[{i}]", v, (2,), "(N, D)") for i, v in enumerate(views)]
    least = 1 if labels else 2
    if len(checked) < least:
        hint = "" if labels else " (or 1 view with labels=)"
        raise ValueError(f"views must hold at least {least} views{hint}, got {len(checked)}")
    first = checked[0]
    for i in range(1, len(checked)):
        v = checked[i]
        if v.shape != first.shape:
            raise ValueError(
                f"views[{i}] has shape {shape_str(v)} but views[0] has {shape_str(first)}; "
                "expected every view to be (N, D) with the same N and D"
            )
    check_same_device({f"views[{i}]": v for i, v in enumerate(checked)})
    check_distinct_views(checked, entry)
    dtype = promoted_dtype([v.dtype for v in checked])
    stacked = torch.stack([view.to(dtype) for view in checked])
    _, n, d = stacked.shape
    if n < 2 and not (gathering or labels):
        raise ValueError(
            f"multi-view in-batch negatives need N >= 2 rows per view, got shape {shape_str(stacked)}"
        )
    if n == 0 and not gathering:  # across processes every rank raises, in row_counts
        raise ValueError(f"views are an empty batch: got shape {shape_str(stacked)}")
    if d == 0:
        raise ValueError(f"views have embedding dim D = 0: got shape {shape_str(stacked)}")
    return stacked
