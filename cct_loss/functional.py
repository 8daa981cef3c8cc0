"""Public functional API: :func:`cct_loss` and :func:`cct_loss_multiview`."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal, overload

import torch
from torch import Tensor

from . import distributed
from ._validation import check_choice, check_float_tensor, check_same_device, shape_str
from .costs import prepare_embeddings
from .details import CCTDetails, QueryTerms, reduce_terms
from .dispatch import repulsion_backend
from .layouts import explicit_negatives_terms, in_batch_terms, paper_terms
from .options import CCTOptions

LAYOUTS = ("all", "paper")


@overload
def cct_loss(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None = None,
    *,
    t_pos: float = 1.0,
    t_neg: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    cost: str = "sqeuclidean",
    normalize: bool = True,
    detach_weights: bool = True,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    return_details: Literal[False] = False,
    gather_distributed: bool = False,
) -> Tensor: ...


@overload
def cct_loss(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None = None,
    *,
    t_pos: float = 1.0,
    t_neg: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    cost: str = "sqeuclidean",
    normalize: bool = True,
    detach_weights: bool = True,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    return_details: Literal[True],
    gather_distributed: bool = False,
) -> CCTDetails: ...


@overload
def cct_loss(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None = None,
    *,
    t_pos: float = 1.0,
    t_neg: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    cost: str = "sqeuclidean",
    normalize: bool = True,
    detach_weights: bool = True,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    return_details: bool = False,
    gather_distributed: bool = False,
) -> Tensor | CCTDetails: ...


def cct_loss(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None = None,
    *,
    t_pos: float = 1.0,
    t_neg: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    cost: str = "sqeuclidean",
    normalize: bool = True,
    detach_weights: bool = True,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    return_details: bool = False,
    gather_distributed: bool = False,
) -> Tensor | CCTDetails:
    r"""Contrastive Conditional Transport (CCT / CACR) loss.

    For each query ``q`` with positives ``p_m`` and negatives ``n_k``::

        d+_m = c(q, p_m)                d-_k = c(q, n_k)
        pi+  = softmax_m(+t_pos d+)     farther positives weigh more
        pi-  = softmax_k(-t_neg d-)     closer negatives weigh more
        loss_q = alpha * sum_m pi+_m d+_m  -  beta * sum_k pi-_k d-_k

    Which rows are queries, positives and negatives depends on ``negatives``:

    * ``None`` (in-batch, symmetric, the NT-Xent layout): every row of ``query`` and of
      ``positive`` is a query; its positives are the other embeddings of the same row index,
      its negatives all embeddings of every other row index. ``cct_loss(z1, z2)`` has ``2N``
      queries with 1 positive and ``2N - 2`` negatives each. Needs ``N >= 2``.
    * ``(K, D)`` (shared, e.g. a MoCo queue): only ``query`` rows are queries, each against all
      ``K`` negatives. A MoCo queue kept as ``(D, K)`` must be passed as ``queue.T``.
    * ``(N, K, D)`` (per query): query ``i`` against its own ``K`` negatives.

    Args:
        query: ``(N, D)`` query embeddings.
        positive: ``(N, D)`` one positive per query, or ``(N, M, D)`` ``M`` positives.
        negatives: ``None``, ``(K, D)`` or ``(N, K, D)``; see above.
        t_pos: positive sharpness (an inverse temperature, multiplies the cost), ``>= 0``.
        t_neg: negative sharpness, ``>= 0``. Paper: 0.9 (CIFAR-10), 2.0 (CIFAR-100, STL-10,
            ImageNet MoCo-v2 recipe).
        alpha: weight of the attraction term (does not enter the softmax).
        beta: weight of the repulsion term (does not enter the softmax).
        cost: ``"sqeuclidean"`` (``||a - b||^2``) or ``"cosine"`` (``1 - cos(a, b)``).
        normalize: L2-normalise embeddings first (zero vectors stay zero, never NaN).
        detach_weights: treat the weights as constants in the backward pass (the official
            large-scale MoCo code); ``False`` differentiates through the softmax (the official
            small-scale CIFAR/STL code).
        reduction: ``"mean"`` or ``"sum"`` over queries, or ``"none"`` for one value per query.
            In-batch, queries are ordered view-major: ``query`` rows first, then
            ``positive[:, 0]``, ``positive[:, 1]``, ... (length ``(M + 1) N``); otherwise ``(N,)``.
        impl: ``"dense"`` (full ``Q x K`` cost matrix; fastest while it fits), ``"chunked"``
            (streams over blocks of negatives with an online softmax; never holds ``Q x K``),
            ``"sdpa"`` (PyTorch's fused attention kernels) or ``"auto"`` (see
            :func:`cct_loss.dispatch.choose_impl`). All give the same values and gradients.
        chunk_size: keys per block for ``impl="chunked"`` (``None``: about 8 MiB per block).
        return_details: return a :class:`CCTDetails` with the terms, weight entropies,
            contrastive accuracy and (dense) the weight matrices.
        gather_distributed: in-batch mode under an initialised ``torch.distributed`` process
            group: negatives come from the global batch (all ranks' embeddings, gathered with
            gradients); the queries are this rank's rows. With ``reduction="mean"`` and DDP's
            gradient averaging, every rank gets the single-process gradient of the loss on the
            concatenated batch. All ranks must pass the same N. No-op without a process group.

    Returns:
        The loss (float32, or float64 for float64 inputs; computed in full precision under
        autocast), or a :class:`CCTDetails`.

    Raises:
        TypeError: a non-tensor, non-floating tensor or non-numeric option.
        ValueError: shapes that disagree, empty inputs, negative or non-finite sharpness,
            an unknown option value, a ``(D, K)`` queue, in-batch mode with ``N = 1``, or
            ``gather_distributed=True`` with explicit negatives (gather a queue with
            :class:`cct_loss.NegativeQueue` instead).

    Examples:
        >>> import torch
        >>> from cct_loss import cct_loss
        >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = cct_loss(z1, z2)  # SimCLR: 16 queries, 1 positive, 14 negatives each
        >>> queue = torch.randn(16, 64)  # MoCo keeps its queue as (D, K)
        >>> loss = cct_loss(z1, z2, queue.T, t_neg=2.0)
    """
    options = CCTOptions(
        t_pos=t_pos,
        t_neg=t_neg,
        alpha=alpha,
        beta=beta,
        cost=cost,
        normalize=normalize,
        detach_weights=detach_weights,
        reduction=reduction,
        impl=impl,
        chunk_size=chunk_size,
        return_details=return_details,
        gather_distributed=gather_distributed,
    )
    query = check_float_tensor("query", query, (2,), "(N, D)")
    positive = check_float_tensor("positive", positive, (2, 3), "(N, D) or (N, M, D)")
    n, d = query.shape
    if n == 0:
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
    if negatives is not None:
        negatives = _check_negatives(negatives, n, d)
        tensors["negatives"] = negatives
        if options.gather_distributed:
            raise ValueError(
                "gather_distributed=True gathers in-batch negatives (negatives=None); with "
                "explicit negatives, gather them yourself, e.g. with "
                "NegativeQueue(..., gather_distributed=True)"
            )
    elif n < 2 and not (options.gather_distributed and distributed.is_active()):
        raise ValueError(
            f"in-batch mode (negatives=None) needs at least 2 rows so that each query has "
            f"negatives; got query of shape {shape_str(query)}. Pass negatives, or a batch N >= 2"
        )
    device = check_same_device(tensors)

    positives = positive if positive.dim() == 3 else positive.unsqueeze(1)
    with _full_precision(device):
        dtype = _compute_dtype(*tensors.values())
        q = prepare_embeddings(query.to(dtype), cost=options.cost, normalize=options.normalize)
        p = prepare_embeddings(positives.to(dtype), cost=options.cost, normalize=options.normalize)
        if negatives is None:
            views = torch.cat([q.unsqueeze(0), p.transpose(0, 1)], dim=0)  # (M + 1, N, D)
            terms = _multiview_terms(views, "all", options)
        else:
            k = prepare_embeddings(
                negatives.to(dtype), cost=options.cost, normalize=options.normalize
            )
            repel = repulsion_backend(options, device, n, k.shape[-2], per_query=k.dim() == 3)
            terms = explicit_negatives_terms(
                q,
                p,
                k,
                cost=options.cost,
                t_pos=options.t_pos,
                detach_weights=options.detach_weights,
                repel=repel,
                with_stats=options.return_details,
            )
        return reduce_terms(
            terms,
            alpha=options.alpha,
            beta=options.beta,
            reduction=options.reduction,
            return_details=options.return_details,
        )


@overload
def cct_loss_multiview(
    views: Tensor | Sequence[Tensor],
    *,
    layout: str = "all",
    t_pos: float = 1.0,
    t_neg: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    cost: str = "sqeuclidean",
    normalize: bool = True,
    detach_weights: bool = True,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    return_details: Literal[False] = False,
    gather_distributed: bool = False,
) -> Tensor: ...


@overload
def cct_loss_multiview(
    views: Tensor | Sequence[Tensor],
    *,
    layout: str = "all",
    t_pos: float = 1.0,
    t_neg: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    cost: str = "sqeuclidean",
    normalize: bool = True,
    detach_weights: bool = True,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    return_details: Literal[True],
    gather_distributed: bool = False,
) -> CCTDetails: ...


@overload
def cct_loss_multiview(
    views: Tensor | Sequence[Tensor],
    *,
    layout: str = "all",
    t_pos: float = 1.0,
    t_neg: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    cost: str = "sqeuclidean",
    normalize: bool = True,
    detach_weights: bool = True,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    return_details: bool = False,
    gather_distributed: bool = False,
) -> Tensor | CCTDetails: ...


def cct_loss_multiview(
    views: Tensor | Sequence[Tensor],
    *,
    layout: str = "all",
    t_pos: float = 1.0,
    t_neg: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    cost: str = "sqeuclidean",
    normalize: bool = True,
    detach_weights: bool = True,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    return_details: bool = False,
    gather_distributed: bool = False,
) -> Tensor | CCTDetails:
    """CCT loss for a multi-view batch (several augmentations of each image).

    Args:
        views: a list of ``V`` tensors ``(N, D)`` or one ``(V, N, D)`` tensor, ``V >= 2``.
            Row ``i`` of every view is the same image.
        layout: ``"all"``: the symmetric in-batch layout with ``M = V - 1`` positives; exactly
            ``cct_loss(views[0], torch.stack(views[1:], dim=1))``, ``V * N`` queries in view-major
            order. ``"paper"``: the official small-scale objective (attraction per view against
            the other views of the same row, averaged over views; repulsion for each pair of
            views ``x < y``, rows of ``x`` against the other rows of ``y``, averaged over pairs).
            To reproduce the paper use ``detach_weights=False``. ``reduction="none"`` gives one
            value per row ``(N,)`` for ``"paper"``.
        **options: as in :func:`cct_loss`; ``gather_distributed=True`` takes the negatives
            from the global batch for both layouts.

    Returns:
        The loss, or a :class:`CCTDetails`.

    Examples:
        >>> import torch
        >>> from cct_loss import cct_loss_multiview
        >>> views = [torch.randn(8, 16) for _ in range(5)]  # 5 views: 4 positives per query
        >>> loss = cct_loss_multiview(views, t_neg=0.9)
        >>> paper = cct_loss_multiview(views, layout="paper", t_neg=0.9, detach_weights=False)
    """
    check_choice("layout", layout, LAYOUTS)
    options = CCTOptions(
        t_pos=t_pos,
        t_neg=t_neg,
        alpha=alpha,
        beta=beta,
        cost=cost,
        normalize=normalize,
        detach_weights=detach_weights,
        reduction=reduction,
        impl=impl,
        chunk_size=chunk_size,
        return_details=return_details,
        gather_distributed=gather_distributed,
    )
    stacked = _stack_views(views, allow_single_row=gather_distributed and distributed.is_active())
    with _full_precision(stacked.device):
        dtype = _compute_dtype(stacked)
        prepared = prepare_embeddings(
            stacked.to(dtype), cost=options.cost, normalize=options.normalize
        )
        terms = _multiview_terms(prepared, layout, options)
        return reduce_terms(
            terms,
            alpha=options.alpha,
            beta=options.beta,
            reduction=options.reduction,
            return_details=options.return_details,
        )


def _check_negatives(negatives: Tensor, n: int, d: int) -> Tensor:
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


def _multiview_terms(views: Tensor, layout: str, options: CCTOptions) -> QueryTerms:
    """Per-query terms of ``(V, N, D)`` prepared views in the symmetric (``"all"``) or the paper
    layout, with negatives from the global batch when ``gather_distributed`` applies."""
    num_views, n, _ = views.shape
    key_views, offset = _global_views(views, options.gather_distributed)
    n_keys = n if key_views is None else key_views.shape[1]
    if layout == "all":
        num_queries, num_keys = num_views * n, num_views * n_keys
        layout_terms = in_batch_terms
    else:  # one (N, N_all) problem per pair of views
        num_queries, num_keys = n, n_keys
        layout_terms = paper_terms
    repel = repulsion_backend(options, views.device, num_queries, num_keys, per_query=False)
    return layout_terms(
        views,
        cost=options.cost,
        t_pos=options.t_pos,
        detach_weights=options.detach_weights,
        repel=repel,
        with_stats=options.return_details,
        key_views=key_views,
        id_offset=offset,
    )


def _global_views(views: Tensor, gather: bool) -> tuple[Tensor | None, int]:
    """``(V, N, D)`` local views -> ``(V, world * N, D)`` global views and this rank's offset.

    ``(None, 0)`` unless ``gather`` is set and a multi-rank process group is initialised.
    """
    if not (gather and distributed.is_active()):
        return None, 0
    rank, _ = distributed.rank_and_world_size()
    gathered = distributed.all_gather_with_grad(views.transpose(0, 1))  # (world * N, V, D)
    return gathered.transpose(0, 1), rank * views.shape[1]


def _stack_views(views: Tensor | Sequence[Tensor], *, allow_single_row: bool = False) -> Tensor:
    if isinstance(views, Tensor):
        stacked = check_float_tensor("views", views, (3,), "(V, N, D)")
    elif isinstance(views, Sequence) and not isinstance(views, str):
        checked = [
            check_float_tensor(f"views[{i}]", v, (2,), "(N, D)") for i, v in enumerate(views)
        ]
        if len(checked) < 2:
            raise ValueError(f"views must hold at least 2 views, got {len(checked)}")
        first = checked[0]
        for i, v in enumerate(checked[1:], start=1):
            if v.shape != first.shape:
                raise ValueError(
                    f"views[{i}] has shape {shape_str(v)} but views[0] has {shape_str(first)}; "
                    "expected every view to be (N, D) with the same N and D"
                )
        check_same_device({f"views[{i}]": v for i, v in enumerate(checked)})
        dtype = _compute_dtype(*checked)
        stacked = torch.stack([view.to(dtype) for view in checked])
    else:
        raise TypeError(
            "views must be a (V, N, D) tensor or a list of V tensors (N, D), "
            f"got {type(views).__name__}"
        )
    num_views, n, d = stacked.shape
    if num_views < 2:
        raise ValueError(f"views must hold at least 2 views, got shape {shape_str(stacked)}")
    if n < 2 and not allow_single_row:
        raise ValueError(
            f"multi-view in-batch negatives need N >= 2 rows per view, got shape {shape_str(stacked)}"
        )
    if d == 0:
        raise ValueError(f"views have embedding dim D = 0: got shape {shape_str(stacked)}")
    return stacked


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float64 if dtype == torch.float64 else torch.float32


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def _full_precision(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Disable autocast on ``device`` so costs, softmax and sums run in float32 or better."""
    if device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
