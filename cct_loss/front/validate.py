"""The first step of every call: its arguments checked (docs/specification.md, "Inputs that are
wrong"). Messages name the argument, what it got and what was expected; the mistakes a call site
makes (``positive`` that is ``query``, ``negatives`` that is ``positive``, a stacked tensor as
the views) name the call that was meant. Only shapes, dtypes, devices and addresses are read."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import NamedTuple

import torch
from torch import Tensor

from .. import distributed
from ..checks import (
    check_finite_inputs,
    check_float_tensor,
    check_labels,
    check_same_device,
    is_functorch_wrapped,
    positive_at,
    same_view,
    shape_str,
)
from ..distributed import Field
from ..maths.precision import promoted_dtype
from ..options import CCTOptions

#: The layouts each entry point takes.
PAIR_LAYOUTS = ("all", "cross")
VIEW_LAYOUTS = ("all", "paper")
LAYOUTS = ("all", "cross", "paper")


class PairsCall(NamedTuple):
    """A :func:`cct_loss.cct_loss` call whose arguments passed every check, with their device
    and, when gathering, every rank's rows."""

    query: Tensor
    positive: Tensor
    negatives: Tensor | None
    labels: Tensor | None
    negative_labels: Tensor | None
    device: torch.device
    row_counts: list[int] | None


class ViewsCall(NamedTuple):
    """A :func:`cct_loss.cct_loss_multiview` call that passed every check: the views stacked
    ``(V, N, D)`` in their promoted dtype, the labels and, when gathering, every rank's rows."""

    views: Tensor
    labels: Tensor | None
    row_counts: list[int] | None


def query_of(query: object, options: CCTOptions, entry: str) -> Tensor:
    """The first checks of :func:`cct_loss.cct_loss`: its layout, and ``query`` itself."""
    check_layout(options, PAIR_LAYOUTS, entry.removesuffix("(...)"))
    return check_float_tensor("query", query, (2,), "(N, D)")


def pairs(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None,
    labels: Tensor | None,
    negative_labels: Tensor | None,
    options: CCTOptions,
    entry: str,
) -> PairsCall:
    """The checks of :func:`cct_loss.cct_loss` (``entry``: how the messages spell the call)."""
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
        negatives = check_negatives(negatives, n, d, entry)
        check_no_shared_memory(negatives, positive)
        tensors["negatives"] = negatives
        _check_explicit_negatives(negatives, labels, negative_labels, options)
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
    counts = None
    if gathering:
        given = {"labels": labels, "negatives": negatives, "negative_labels": negative_labels}
        fields = distributed.agreement(
            "cct_loss", query, given,
            Field("the dtype of positive", positive.dtype, distributed.DTYPES),
            Field("the positives per query M", 1 if positive.dim() == 2 else positive.shape[1]),
            Field("the layout", options.layout, LAYOUTS),
        )  # fmt: skip
        counts = distributed.row_counts(n, device, fields=fields)
    return PairsCall(query, positive, negatives, labels, negative_labels, device, counts)


def _check_explicit_negatives(
    negatives: Tensor, labels: Tensor | None, negative_labels: Tensor | None, options: CCTOptions
) -> None:
    """What explicit negatives do not go with."""
    cross = options.layout == "cross"
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


class KeyedCall(NamedTuple):
    """Queries against keys drawn by label or by a miner's pairs (:func:`keyed`), checked:
    ``keys`` ``None`` when the queries are the keys; ``pairs`` the positive and negative
    ``(N, R)`` masks of a miner, or ``None`` (then the labels decide)."""

    query: Tensor
    keys: Tensor | None
    labels: Tensor | None
    key_labels: Tensor | None
    pairs: tuple[Tensor, Tensor] | None
    device: torch.device


def keyed(
    query: Tensor,
    keys: Tensor | None,
    labels: Tensor | None,
    key_labels: Tensor | None,
    pairs: tuple[Tensor, Tensor] | None,
    options: CCTOptions,
    entry: str,
) -> KeyedCall:
    """The checks of a call of queries against keys (pytorch-metric-learning's ``ref_emb``) or
    restricted to a miner's pairs: each key is a positive where its label is the query's (or
    where the miner paired them as positive), a negative where it differs."""
    n, d = query.shape
    if n == 0:
        raise ValueError(f"embeddings is an empty batch: got shape {shape_str(query)}")
    if options.gather_distributed:
        raise ValueError(
            f"{entry} gathers across processes only for the labels of the batch itself "
            "(no reference embeddings, no miner); gather ref_emb yourself, or drop "
            "gather_distributed"
        )
    if options.layout != "all":
        raise ValueError(f"{entry} has one layout, 'all'; got layout={options.layout!r}")
    tensors = {"embeddings": query}
    if keys is not None:
        keys = check_float_tensor("ref_emb", keys, (2,), f"(R, D) = (R, {d})")
        if keys.shape[1] != d:
            raise ValueError(
                f"ref_emb must have shape (R, D) with D = {d} as in embeddings, got "
                f"{shape_str(keys)}"
            )
        tensors["ref_emb"] = keys
    rows = n if keys is None else keys.shape[0]
    if pairs is None:
        if labels is None or key_labels is None:
            raise ValueError(
                f"{entry} needs labels (and ref_labels with ref_emb) or a miner's pairs"
            )
        tensors["labels"] = check_labels("labels", labels, n, "N")
        tensors["ref_labels"] = check_labels("ref_labels", key_labels, rows, "R")
    else:
        for name, mask in zip(("positive pairs", "negative pairs"), pairs, strict=True):
            if mask.dtype != torch.bool or mask.shape != (n, rows):
                raise ValueError(
                    f"the {name} must be a boolean mask of shape ({n}, {rows}), got "
                    f"{mask.dtype} {shape_str(mask)}"
                )
        tensors["indices_tuple"] = pairs[0]
    device = check_same_device(tensors)
    if options.check_finite:
        check_finite_inputs({k: v for k, v in tensors.items() if v.is_floating_point()})
    return KeyedCall(query, keys, labels, key_labels, pairs, device)


def one_view(
    negatives: Tensor | None,
    labels: Tensor | None,
    negative_labels: Tensor | None,
    options: CCTOptions,
    entry: str,
) -> Tensor:
    """``cct_loss(embeddings, labels=labels)``, the metric-learning call (one view with labels,
    which is ``cct_loss_multiview([embeddings], labels=labels)``): its labels."""
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
    return labels


def views(
    views: Sequence[Tensor], labels: Tensor | None, options: CCTOptions, entry: str
) -> ViewsCall:
    """The checks of :func:`cct_loss.cct_loss_multiview`; the views stacked."""
    check_layout(options, VIEW_LAYOUTS, entry.removesuffix("(...)"))
    gathering = options.gather_distributed and distributed.is_active()
    stacked = stack_views(views, labels=labels is not None, gathering=gathering, entry=entry)
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
    counts = None
    if gathering:
        fields = distributed.agreement(
            "cct_loss_multiview", stacked, {"labels": labels},
            Field("the number of views", stacked.shape[0]),
            Field("the layout", options.layout, LAYOUTS),
        )  # fmt: skip
        counts = distributed.row_counts(stacked.shape[1], stacked.device, fields=fields)
    return ViewsCall(stacked, labels, counts)


def distinct(query: Tensor, positive: Tensor, negatives: Tensor | None, entry: str) -> None:
    """What depends on the tensors themselves rather than their shapes: checked at every call,
    replayed ones too (the cheap half of the query check first)."""
    if positive.dim() == 3 or query.data_ptr() == positive.data_ptr():
        check_not_query_itself(query, positive, entry)  # (any of M positives may be query)
    if negatives is not None:
        check_no_shared_memory(negatives, positive)


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


def check_negatives(negatives: Tensor, n: int, d: int, entry: str) -> Tensor:
    """``negatives`` ``(K, D)`` or ``(N, K, D)`` for ``n`` queries of dim ``d``; a number or a
    0-dim tensor in their place (a temperature, open_clip's ``logit_scale``) names the call
    that was meant."""
    if isinstance(negatives, Real) and not isinstance(negatives, bool):
        raise TypeError(
            "negatives must be a torch.Tensor of shape (K, D) or (N, K, D), got "
            f"{type(negatives).__name__} {negatives!r}; to set the temperature, name it: "
            + (
                f"{entry.removesuffix('(...)')}(temperature={negatives!r})(query, positive)"
                if entry.endswith("(...)")
                else f"{entry}(query, positive, temperature={negatives!r})"
            )
        )
    if isinstance(negatives, Tensor) and negatives.dim() == 0:
        raise ValueError(
            "negatives must have shape (K, D) or (N, K, D), got a 0-dim tensor: if it is "
            "open_clip's logit_scale, call "
            f"{entry}(image_features, text_features, layout='cross', temperature=1 / "
            "logit_scale), or swap ClipLoss for CCTClipLoss, which takes "
            "(image_features, text_features, logit_scale)"
        )
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


def stack_views(
    views: Sequence[Tensor],
    *,
    labels: bool,
    gathering: bool,
    entry: str,
    name: str = "views",
    rows_checked: bool = True,
) -> Tensor:
    """``(V, N, D)`` from a list of ``V`` views ``(N, D)`` (``name``: how the messages name the
    list; ``rows_checked=False``: the caller checks the number of rows)."""
    if isinstance(views, Tensor) and views.dim() == 2:
        with_labels = ", labels=labels" if labels else ""
        raise ValueError(
            f"{name} must be a list of V tensors (N, D), got one tensor of shape "
            f"{shape_str(views)}: one view. Pass it in a list: {entry}([embeddings]"
            f"{with_labels}) (one view needs labels: every other row with the same label is "
            "a positive), or the views of each image: "
            f"{entry}([view1, view2]{with_labels})"
        )
    if isinstance(views, Tensor):
        raise ValueError(
            f"{name} must be a list of V tensors (N, D), got one tensor of shape "
            f"{shape_str(views)}: a stacked (V, N, D) and SupCon's (N, V, D) cannot be told "
            f"apart. Pass {entry}(list(x.unbind(0))) for (V, N, D) or "
            f"{entry}(list(x.unbind(1))) for (N, V, D)"
        )
    if not isinstance(views, Sequence) or isinstance(views, str):
        raise TypeError(f"{name} must be a list of V tensors (N, D), got {type(views).__name__}")
    checked = [check_float_tensor(f"{name}[{i}]", v, (2,), "(N, D)") for i, v in enumerate(views)]
    least = 1 if labels else 2
    if len(checked) < least:
        hint = "" if labels else " (or 1 view with labels=)"
        raise ValueError(f"{name} must hold at least {least} views{hint}, got {len(checked)}")
    first = checked[0]
    for i in range(1, len(checked)):
        v = checked[i]
        if v.shape != first.shape:
            raise ValueError(
                f"{name}[{i}] has shape {shape_str(v)} but {name}[0] has {shape_str(first)}; "
                "expected every view to be (N, D) with the same N and D"
            )
    check_same_device({f"{name}[{i}]": v for i, v in enumerate(checked)})
    check_distinct_views(checked, entry, name)
    dtype = promoted_dtype([v.dtype for v in checked])
    stacked = torch.stack([view.to(dtype) for view in checked])
    _, n, d = stacked.shape
    if n < 2 and rows_checked and not (gathering or labels):
        raise ValueError(
            f"multi-view in-batch negatives need N >= 2 rows per view, got shape {shape_str(stacked)}"
        )
    if n == 0 and rows_checked and not gathering:  # across processes: in row_counts
        raise ValueError(f"views are an empty batch: got shape {shape_str(stacked)}")
    if d == 0:
        raise ValueError(f"{name} have embedding dim D = 0: got shape {shape_str(stacked)}")
    return stacked


def check_no_shared_memory(negatives: Tensor, positive: Tensor) -> None:
    """Refuse ``negatives`` that is ``positive`` or a view of its memory (eager mode):
    ``cct_loss(q, k, k)`` counts each query's positive among its negatives, where
    ``layout="cross"`` was meant. Memory ranges are compared; a copy passes."""
    if negatives is positive:
        overlap = True
    elif (
        torch.compiler.is_compiling()
        or negatives.device != positive.device
        or is_functorch_wrapped(negatives)
        or is_functorch_wrapped(positive)
        # different buffers (the usual case) cannot overlap: decided without the ranges
        or negatives.untyped_storage().data_ptr() != positive.untyped_storage().data_ptr()
    ):
        return
    else:
        overlap = _byte_range(negatives, 0) < _byte_range(positive, 1) and _byte_range(
            positive, 0
        ) < _byte_range(negatives, 1)
    if overlap:
        raise ValueError(
            "negatives is the same tensor as positive (or a view of its memory): each query "
            "would count its own positive among its negatives. For MoCo v3 / CLIP, where the "
            "negatives are the other rows of positive, use layout='cross' and no negatives; "
            "if the overlap is intended, pass negatives.clone()"
        )


def check_not_query_itself(query: Tensor, positive: Tensor, entry: str) -> None:
    """Refuse a ``positive`` that is ``query`` itself (:func:`same_view`), as ``(N, D)`` or as
    any of the ``M`` positives of ``(N, M, D)`` (``query.unsqueeze(1).expand(N, M, D)``, a stack
    that holds it): every query would be its own positive, at distance 0, and the loss a number
    that means nothing."""
    own = positive if positive.dim() == 2 else positive_at(query, positive)
    if own is None or not same_view(query, own):
        return
    raise ValueError(
        "positive is query itself (the same memory, shape and strides): every query would be its "
        f"own positive, at distance 0. Pass the other augmented view: {entry}(z1, z2); for one "
        f"view with class labels: {entry}(embeddings, labels=labels); if a copy is really "
        f"meant: {entry}(query, query.clone())"
    )


def check_distinct_views(views: Sequence[Tensor], entry: str, name: str = "views") -> None:
    """Refuse a view given twice (:func:`same_view`): its rows would be their own positives."""
    for i in range(1, len(views)):
        for j in range(i):
            if same_view(views[i], views[j]):
                raise ValueError(
                    f"{name}[{i}] is {name}[{j}] (the same memory, shape and strides): each of "
                    "its rows would be its own positive, at distance 0. Pass the different "
                    f"augmented views of each image: {entry}([view1, view2]); for one view "
                    f"with class labels: {entry}([embeddings], labels=labels)"
                )


def _byte_range(x: Tensor, end: int) -> int:
    """First byte (``end=0``) or one past the last byte (``end=1``) that ``x`` touches."""
    start = x.data_ptr()
    if end == 0:
        return start
    if x.numel() == 0:
        return start
    span = sum((size - 1) * abs(stride) for size, stride in zip(x.shape, x.stride(), strict=True))
    return start + (span + 1) * x.element_size()


class MocoCall(NamedTuple):
    """A :func:`cct_loss.cct_loss_moco` call that passed every check: queries and keys stacked
    ``(V, N, D)`` in one promoted dtype, the ``(K, D)`` queue, and every rank's rows when
    gathering (only the mean's divisor reads them: the in-batch negatives stay local)."""

    queries: Tensor
    keys: Tensor
    queue: Tensor
    row_counts: list[int] | None


def moco(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    queue: Tensor,
    in_batch_weights: object,
    options: CCTOptions,
    entry: str,
) -> MocoCall:
    """The checks of :func:`cct_loss.cct_loss_moco`."""
    check_own_layout(options, entry)
    if in_batch_weights not in IN_BATCH_WEIGHTS:
        raise ValueError(
            "in_batch_weights must be None (the queue's treatment, detach_weights), 'live' or "
            f"'detached', got {in_batch_weights!r}"
        )
    gathering = options.gather_distributed and distributed.is_active()
    stacked = stack_views(
        queries, labels=False, gathering=gathering, entry=entry, name="queries", rows_checked=False
    )
    v, n, d = stacked.shape
    momentum = stack_views(
        keys, labels=False, gathering=gathering, entry=entry, name="keys", rows_checked=False
    )
    if momentum.shape != stacked.shape:
        raise ValueError(
            f"keys must be {v} tensors of shape (N, D) = ({n}, {d}), one per view of queries, "
            f"got {momentum.shape[0]} of shape {shape_str(momentum[0])}"
        )
    queue = _check_queue(queue, d, entry)
    if queue.shape[0] == 0 and n < 2 and not gathering:
        raise ValueError(
            f"an empty queue leaves the in-batch negatives only, which need N >= 2 rows per "
            f"view; got queries of shape ({v}, {n}, {d}) stacked"
        )
    dtype = promoted_dtype([stacked.dtype, momentum.dtype, queue.dtype])
    stacked, momentum, queue = stacked.to(dtype), momentum.to(dtype), queue.to(dtype)
    check_same_device({"queries": stacked, "keys": momentum, "queue": queue})
    if options.check_finite:
        check_finite_inputs({"queries": stacked, "keys": momentum, "queue": queue})
    counts = None
    if gathering:
        fields = distributed.agreement(
            "cct_loss_moco", stacked, {}, Field("the number of views", v),
            Field("the queue length K", queue.shape[0]),
        )  # fmt: skip
        counts = distributed.row_counts(n, stacked.device, fields=fields)
    elif n == 0:
        raise ValueError(f"queries are an empty batch: got {v} views of shape (0, {d})")
    return MocoCall(stacked, momentum, queue, counts)


def _check_queue(queue: object, d: int, entry: str) -> Tensor:
    """The ``(K, D)`` queue of :func:`cct_loss.cct_loss_moco` (a number in its place, a
    temperature, names the keyword; MoCo's ``(D, K)`` buffer, its transpose)."""
    if isinstance(queue, Real) and not isinstance(queue, bool):
        raise TypeError(
            f"queue must be a torch.Tensor of shape (K, D), got {type(queue).__name__} "
            f"{queue!r}; to set the temperature, name it: {entry}(queries, keys, queue, "
            f"temperature={queue!r})"
        )
    checked = check_float_tensor("queue", queue, (2,), "(K, D)")
    if checked.shape[1] != d:
        hint = ""
        if checked.shape[0] == d:
            hint = f"; this looks like MoCo's (D, K) = {shape_str(checked)} buffer: pass queue.T"
        raise ValueError(
            f"queue must have shape (K, D) with D = {d} as the queries, got "
            f"{shape_str(checked)}{hint}"
        )
    return checked


#: What ``in_batch_weights`` of :func:`cct_loss.cct_loss_moco` takes.
IN_BATCH_WEIGHTS = (None, "live", "detached")


class MultiCropCall(NamedTuple):
    """A :func:`cct_loss.cct_loss_multicrop` call that passed every check: the queries
    ``(2 + L, N, D)`` (global views, then local crops) and keys ``(2, N, D)`` in one promoted
    dtype, and every rank's rows when gathering."""

    queries: Tensor
    keys: Tensor
    row_counts: list[int] | None


def multicrop(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    local_queries: Sequence[Tensor],
    options: CCTOptions,
    entry: str,
) -> MultiCropCall:
    """The checks of :func:`cct_loss.cct_loss_multicrop`."""
    check_own_layout(options, entry)
    gathering = options.gather_distributed and distributed.is_active()
    for name, given in (("queries", queries), ("keys", keys)):
        if isinstance(given, Sequence) and not isinstance(given, Tensor) and len(given) != 2:
            pair = "(q1, q2)" if name == "queries" else "(k1, k2)"
            raise ValueError(
                f"{name} must be the two global views' (N, D) {name} {pair}, got {len(given)}; "
                "pass the local crops' queries as local_queries (they have no keys)"
            )
    if isinstance(local_queries, Tensor):
        raise ValueError(
            f"local_queries must be a list of L tensors (N, D), got one tensor of shape "
            f"{shape_str(local_queries)}; pass list(x.unbind(0)) for (L, N, D)"
        )
    if not isinstance(local_queries, Sequence) or isinstance(local_queries, str):
        raise TypeError(
            f"local_queries must be a list of L tensors (N, D), got {type(local_queries).__name__}"
        )
    every = [*queries, *local_queries] if isinstance(queries, Sequence) else queries
    stacked = stack_views(
        every, labels=False, gathering=gathering, entry=entry, name="queries", rows_checked=False
    )
    momentum = stack_views(
        keys, labels=False, gathering=gathering, entry=entry, name="keys", rows_checked=False
    )
    _, n, d = stacked.shape
    if momentum.shape[1:] != stacked.shape[1:]:
        raise ValueError(
            f"keys must be two tensors of shape (N, D) = ({n}, {d}) as the queries, got "
            f"{shape_str(momentum[0])}"
        )
    if n < 2 and not gathering:
        raise ValueError(
            f"the cross layout needs N >= 2 rows so that each query has negatives (the other "
            f"rows' keys), got {n}"
        )
    dtype = promoted_dtype([stacked.dtype, momentum.dtype])
    stacked, momentum = stacked.to(dtype), momentum.to(dtype)
    check_same_device({"queries": stacked, "keys": momentum})
    if options.check_finite:
        check_finite_inputs({"queries": stacked, "keys": momentum})
    counts = None
    if gathering:
        fields = distributed.agreement(
            "cct_loss_multicrop", stacked, {}, Field("the number of query views", len(stacked))
        )
        counts = distributed.row_counts(n, stacked.device, fields=fields)
    return MultiCropCall(stacked, momentum, counts)


def check_own_layout(options: CCTOptions, entry: str) -> None:
    """Refuse a ``layout`` for a call whose layout is its own (the paper's objectives)."""
    if options.layout != "all":
        raise ValueError(
            f"{entry} has its own layout (docs/layouts.md), got layout={options.layout!r}; drop "
            "layout=, or call cct_loss / cct_loss_multiview for their layouts"
        )
