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
from .route import moco_loss, multicrop_loss, pairs_loss, views_loss

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


@overload
def cct_loss_moco(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    queue: Tensor,
    *,
    in_batch_weights: Literal["live", "detached"] | None = None,
    return_details: Literal[False] = False,
    **options: Unpack[OptionKeywords],
) -> Tensor: ...


@overload
def cct_loss_moco(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    queue: Tensor,
    *,
    in_batch_weights: Literal["live", "detached"] | None = None,
    return_details: Literal[True, "weights"],
    **options: Unpack[OptionKeywords],
) -> CCTDetails: ...


@overload
def cct_loss_moco(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    queue: Tensor,
    *,
    in_batch_weights: Literal["live", "detached"] | None = None,
    return_details: bool | str = False,
    **options: Unpack[OptionKeywords],
) -> Tensor | CCTDetails: ...


@spell_out_options
def cct_loss_moco(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    queue: Tensor,
    *,
    in_batch_weights: str | None = None,
    **options: Any,
) -> Tensor | CCTDetails:
    """The paper's MoCo-v2 objective (its ImageNet-1K, ImageNet-100 and WebVision runs): ``V``
    views per image, a queue, and the same view's other queries as negatives (docs/layouts.md).

    For view ``x`` and row ``i`` (``q_x`` from the query encoder, ``k_x`` from the momentum
    encoder)::

        attraction: positives k_j[i] for every j != x (not the query's own view's key),
                    weights softmax_j(+t_pos c(q_x[i], k_j[i]))
        repulsion:  negatives the K queue keys and q_x[m] for m != i (this process's batch),
                    one softmax(-t_neg c) over the K + N - 1 of them

    Each term is averaged over the ``V * N`` queries (over the batch, divided by ``V``).

    Args:
        queries: ``V >= 2`` tensors ``(N, D)``, one per view, from the query encoder.
        keys: ``V`` tensors ``(N, D)``, the same views from the momentum encoder (no gradient
            is needed; one that flows is kept).
        queue: ``(K, D)`` keys of earlier batches (``queue.T`` for MoCo's ``(D, K)`` buffer;
            ``(0, D)``: none yet, the in-batch negatives alone).
        in_batch_weights: how the in-batch negatives' weights are treated: ``None`` (default)
            as every other weight (``detach_weights``); ``"live"`` differentiated, the queue's
            staying constants (with ``detach_weights=True``: the recipe's mix); ``"detached"``
            constants. Gradients reach both rows of an in-batch pair in every case.
        temperature, t_pos, t_neg, alpha, beta, cost, normalize, detach_weights, reduction,
            impl, chunk_size, return_details, gather_distributed, check_finite: as in
            :func:`cct_loss` (``reduction="none"``: ``(V * N,)``, view-major). With
            ``gather_distributed=True`` the mean is the global batch's; the in-batch negatives
            stay this process's. ``in_batch_weights="live"`` with ``detach_weights=True``
            (or ``"detached"`` with ``False``) is served by ``impl="dense"`` only.

    Returns:
        The loss, or a :class:`CCTDetails` (weights ``(V N, V - 1)`` and ``(V N, N + K)``).

    Examples:
        >>> import torch
        >>> from cct_loss import cct_loss_moco
        >>> q = [torch.randn(8, 16, requires_grad=True) for _ in range(2)]
        >>> k = [torch.randn(8, 16) for _ in range(2)]
        >>> loss = cct_loss_moco(q, k, torch.randn(32, 16), t_neg=2.0, in_batch_weights="live")
    """
    checked = options_of(options, TABLE, "cct_loss_moco")
    return moco_loss(queries, keys, queue, in_batch_weights, checked)


@overload
def cct_loss_multicrop(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    local_queries: Sequence[Tensor] = (),
    *,
    return_details: Literal[False] = False,
    **options: Unpack[OptionKeywords],
) -> Tensor: ...


@overload
def cct_loss_multicrop(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    local_queries: Sequence[Tensor] = (),
    *,
    return_details: Literal[True, "weights"],
    **options: Unpack[OptionKeywords],
) -> CCTDetails: ...


@overload
def cct_loss_multicrop(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    local_queries: Sequence[Tensor] = (),
    *,
    return_details: bool | str = False,
    **options: Unpack[OptionKeywords],
) -> Tensor | CCTDetails: ...


@spell_out_options
def cct_loss_multicrop(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    local_queries: Sequence[Tensor] = (),
    **options: Any,
) -> Tensor | CCTDetails:
    """The paper's multi-crop objective (its MoCo-v3-based ImageNet-1K recipe with local
    crops; docs/layouts.md).

    For key view ``i`` in {1, 2}, its query list is every other view's queries: the other
    global view and every local crop. For key row ``b`` each query view ``v`` of the list gets
    the detached weight ``p_v = softmax_v(t_pos c(q_v[b], k_i[b]))`` (the farther view weighs
    more) and its cross-layout term (attraction to ``k_i[b]``, repulsion from every other row's
    key of ``k_i``); the row's loss is ``sum_v p_v term_v``, averaged over the two key views.
    Without local crops ``p = 1``: ``(cct_loss(q2, k1, layout="cross") + cct_loss(q1, k2,
    layout="cross")) / 2``.

    Args:
        queries: the two global views' queries ``(q1, q2)``, each ``(N, D)``.
        keys: their momentum keys ``(k1, k2)``, each ``(N, D)``.
        local_queries: ``L`` local crops' queries ``(N, D)`` (no keys: the recipe's "light"
            mode).
        temperature, t_pos, t_neg, alpha, beta, cost, normalize, detach_weights, reduction,
            impl, chunk_size, return_details, gather_distributed, check_finite: as in
            :func:`cct_loss`; ``t_pos`` is the view weights' sharpness (the recipe's ``1 / T``
            for ``||q - k||^2 / T``: ``t_pos = 1 / T``, or ``2 / T`` with ``cost="cosine"``);
            ``reduction="none"``: ``(N,)``, one per row. ``gather_distributed=True``: the keys
            come from every rank.

    Returns:
        The loss, or a :class:`CCTDetails` (``pos_entropy``: the view weights'; weights
        ``(2, N, L + 1)``, the view weights, and ``(2, L + 1, N, K)``).

    Examples:
        >>> import torch
        >>> from cct_loss import cct_loss_multicrop
        >>> q1, q2, k1, k2 = (torch.randn(8, 16) for _ in range(4))
        >>> crops = [torch.randn(8, 16) for _ in range(4)]
        >>> loss = cct_loss_multicrop((q1, q2), (k1, k2), crops, cost="cosine", t_neg=5.0)
    """
    checked = options_of(options, TABLE, "cct_loss_multicrop")
    return multicrop_loss(queries, keys, local_queries, checked)
