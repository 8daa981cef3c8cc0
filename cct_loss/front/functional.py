"""The public functions :func:`cct_loss` and :func:`cct_loss_multiview`: each validates its
keyword options into one object (their one list is :class:`cct_loss.options.CCTOptions`, which
also gives the signatures ``help()`` shows) and takes the one route (:mod:`.route`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

from torch import Tensor

from ..implementations.table import TABLE
from ..maths.reduction import CCTDetails
from ..options import options_of, spell_out_options
from .route import pairs_loss, views_loss

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..options import OptionKeywords


@overload
def cct_loss(
    query: Tensor,
    positive: Tensor | None = None,
    negatives: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    negative_labels: Tensor | None = None,
    return_details: Literal[False] = False,
    **options: Unpack[OptionKeywords],
) -> Tensor: ...


@overload
def cct_loss(
    query: Tensor,
    positive: Tensor | None = None,
    negatives: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    negative_labels: Tensor | None = None,
    return_details: Literal[True, "weights"],
    **options: Unpack[OptionKeywords],
) -> CCTDetails: ...


@overload
def cct_loss(
    query: Tensor,
    positive: Tensor | None = None,
    negatives: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    negative_labels: Tensor | None = None,
    return_details: bool | str = False,
    **options: Unpack[OptionKeywords],
) -> Tensor | CCTDetails: ...


@spell_out_options
def cct_loss(
    query: Tensor,
    positive: Tensor | None = None,
    negatives: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    negative_labels: Tensor | None = None,
    **options: Any,
) -> Tensor | CCTDetails:
    r"""Contrastive Conditional Transport (CCT / CACR) loss (docs/specification.md).

    For each query ``q`` with positives ``p_m`` and negatives ``n_k``, ``c`` the cost::

        loss_q = alpha * sum_m softmax_m(+t_pos c(q, p_m)) c(q, p_m)      farther weigh more
               - beta  * sum_k softmax_k(-t_neg c(q, n_k)) c(q, n_k)      closer weigh more

    Who is a query, a positive and a negative (docs/layouts.md):

    * ``negatives=None`` (layout ``"all"``): in-batch, the NT-Xent layout: every embedding is a
      query, its positives the other embeddings of its row, its negatives every embedding of
      every other row (``cct_loss(z1, z2)``: ``2N`` queries, ``2N - 2`` negatives each).
    * ``negatives`` ``(K, D)`` (a MoCo queue; pass MoCo's ``(D, K)`` queue as ``queue.T``) or
      ``(N, K, D)`` per query: only ``query`` rows are queries, their positives ``positive[i]``.
    * ``layout="cross"`` (MoCo v3, CLIP): only ``query`` rows are queries; query ``i``'s
      positives are ``positive[i]``, its negatives every other row of ``positive`` (and
      ``negatives`` ``(K, D)`` when given).
    * ``labels``: rows with the same label are positives of each other, others negatives; with
      no ``positive`` this is the one-view metric-learning call. ``negative_labels`` leaves out
      same-label rows of ``(K, D)`` negatives. A query with no positive (negative) has no
      attraction (repulsion) term.

    Args:
        query: ``(N, D)`` query embeddings.
        positive: ``(N, D)``, or ``(N, M, D)`` for ``M`` positives per query; ``None`` with
            ``labels`` for one view. It may not be ``query`` itself.
        negatives: ``None``, ``(K, D)`` or ``(N, K, D)``.
        layout: ``"all"`` or ``"cross"``.
        labels: ``(N,)`` integer class labels; negative_labels: ``(K,)`` for ``(K, D)``
            negatives.
        temperature: InfoNCE's ``tau``: sets ``t_neg = 1 / (2 tau)`` (``cost="cosine"``:
            ``1 / tau``), whose weights are InfoNCE's ``softmax(cos / tau)``.
        t_pos, t_neg: the sharpness of each softmax (inverse temperatures, ``>= 0``;
            ``t_neg=None`` is 1.0 unless ``temperature`` is given).
        alpha, beta: the weights of the two terms. These four may be 0-dim tensors (a
            schedule), checked for shape and dtype but not value (that would synchronise).
        cost: ``"sqeuclidean"`` (``|a - b|^2``) or ``"cosine"`` (``1 - cos``).
        normalize: L2-normalise the embeddings first (zero vectors stay zero).
        detach_weights: the weights are constants to autograd (the paper's large-scale code);
            ``False`` differentiates through them (its small-scale code).
        reduction: ``"mean"`` (each term over the queries that have it), ``"sum"`` or
            ``"none"`` (in-batch: view-major, ``query`` rows first).
        impl: ``"auto"``, ``"dense"``, ``"chunked"``, ``"sdpa"`` or ``"triton"``
            (docs/implementations.md); all give the same values and gradients.
        chunk_size: keys per block of ``impl="chunked"``.
        return_details: ``True`` returns a :class:`CCTDetails`; ``"weights"`` adds the weight
            matrices (dense).
        gather_distributed: under ``torch.distributed``, the in-batch candidates come from
            every rank, and the mean is the global batch's (docs/distributed.md).
        check_finite: raise naming an input that holds NaN or inf (one synchronisation).

    Returns:
        The loss (float32, float64 for float64 inputs), or a :class:`CCTDetails`.

    Raises:
        TypeError, ValueError: an argument of the wrong kind, shape or value, named with what
            was expected and, for the mistakes a call site makes, the call that was meant.

    Examples:
        >>> import torch
        >>> from cct_loss import cct_loss
        >>> z1, z2, queue = torch.randn(8, 16), torch.randn(8, 16), torch.randn(16, 64)
        >>> loss = cct_loss(z1, z2, temperature=0.5)  # SimCLR
        >>> loss = cct_loss(z1, z2, queue.T, temperature=0.2)  # MoCo: (D, K) queue
        >>> loss = cct_loss(z1, z2, layout="cross")  # MoCo v3 / CLIP
        >>> loss = cct_loss(z1, labels=torch.randint(0, 3, (8,)))  # metric learning
    """
    checked = options_of(options, TABLE, "cct_loss")
    return pairs_loss(query, positive, negatives, labels, negative_labels, checked)


@overload
def cct_loss_multiview(
    views: Sequence[Tensor],
    *,
    labels: Tensor | None = None,
    return_details: Literal[False] = False,
    **options: Unpack[OptionKeywords],
) -> Tensor: ...


@overload
def cct_loss_multiview(
    views: Sequence[Tensor],
    *,
    labels: Tensor | None = None,
    return_details: Literal[True, "weights"],
    **options: Unpack[OptionKeywords],
) -> CCTDetails: ...


@overload
def cct_loss_multiview(
    views: Sequence[Tensor],
    *,
    labels: Tensor | None = None,
    return_details: bool | str = False,
    **options: Unpack[OptionKeywords],
) -> Tensor | CCTDetails: ...


@spell_out_options
def cct_loss_multiview(
    views: Sequence[Tensor], *, labels: Tensor | None = None, **options: Any
) -> Tensor | CCTDetails:
    """CCT loss for a multi-view batch (several augmentations of each image).

    Args:
        views: a list of ``V`` tensors ``(N, D)``, ``V >= 2`` (``V >= 1`` with ``labels``); row
            ``i`` of every view is the same image. A stacked tensor is refused: ``(V, N, D)``
            and SupCon's ``(N, V, D)`` cannot be told apart.
        layout: ``"all"``: ``cct_loss(views[0], torch.stack(views[1:], dim=1))``, ``V * N``
            queries with ``V - 1`` positives; ``"paper"``: the paper's small-scale objective
            (docs/layouts.md), one value per row for ``reduction="none"``.
        labels: ``(N,)`` integer class labels (``"all"`` only).
        temperature, t_pos, t_neg, alpha, beta, cost, normalize, detach_weights, reduction,
            impl, chunk_size, return_details, gather_distributed, check_finite: as in
            :func:`cct_loss`.

    Returns:
        The loss, or a :class:`CCTDetails`.

    Examples:
        >>> import torch
        >>> from cct_loss import cct_loss_multiview
        >>> views = [torch.randn(8, 16) for _ in range(5)]  # 5 views: 4 positives per query
        >>> loss = cct_loss_multiview(views, t_neg=0.9)
        >>> paper = cct_loss_multiview(views, layout="paper", t_neg=0.9, detach_weights=False)
    """
    checked = options_of(options, TABLE, "cct_loss_multiview")
    return views_loss(views, labels, checked)
