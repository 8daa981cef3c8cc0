"""The public functions: :func:`cct_loss` and :func:`cct_loss_multiview`.

Each takes its options as keywords (their one list is :class:`cct_loss.options.CCTOptions`;
the signatures spell them out for ``help()`` and IDEs, and a test holds them to the list),
validates them into one options object and takes the one route (:mod:`cct_loss.front.route`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, overload

from torch import Tensor

from ..implementations.table import TABLE
from ..maths.reduction import CCTDetails
from ..options import options_of
from .route import pairs_loss, views_loss
from .validate import names_valid_keywords

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


@names_valid_keywords
def cct_loss(
    query: Tensor,
    positive: Tensor | None = None,
    negatives: Tensor | None = None,
    *,
    layout: str = "all",
    labels: Tensor | None = None,
    negative_labels: Tensor | None = None,
    temperature: float | Tensor | None = None,
    t_pos: float | Tensor = 1.0,
    t_neg: float | Tensor | None = None,
    alpha: float | Tensor = 1.0,
    beta: float | Tensor = 1.0,
    cost: str = "sqeuclidean",
    normalize: bool = True,
    detach_weights: bool = True,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    return_details: bool | str = False,
    gather_distributed: bool = False,
    check_finite: bool = False,
) -> Tensor | CCTDetails:
    r"""Contrastive Conditional Transport (CCT / CACR) loss.

    For each query ``q`` with positives ``p_m`` and negatives ``n_k``::

        d+_m = c(q, p_m)                d-_k = c(q, n_k)
        pi+  = softmax_m(+t_pos d+)     farther positives weigh more
        pi-  = softmax_k(-t_neg d-)     closer negatives weigh more
        loss_q = alpha * sum_m pi+_m d+_m  -  beta * sum_k pi-_k d-_k

    Which rows are queries, positives and negatives:

    * ``layout="all"``, ``negatives=None`` (in-batch, symmetric, the NT-Xent layout): every row
      of ``query`` and of ``positive`` is a query; its positives are the other embeddings of
      the same row index, its negatives all embeddings of every other row index.
      ``cct_loss(z1, z2)`` has ``2N`` queries with 1 positive and ``2N - 2`` negatives each.
    * ``layout="all"``, ``negatives`` ``(K, D)`` (shared, e.g. a MoCo queue): only ``query`` rows
      are queries, each against all ``K`` negatives. A MoCo queue kept as ``(D, K)`` must be
      passed as ``queue.T``. ``(N, K, D)``: query ``i`` against its own ``K`` negatives.
    * ``layout="cross"`` (MoCo v3, CLIP): only ``query`` rows are queries; query ``i``'s
      positives are ``positive[i]`` (all ``M`` of ``positive[i, :]``) and its negatives every
      embedding of every *other* row of ``positive``, plus the rows of ``negatives`` ``(K, D)``
      when given. MoCo v3: ``cct_loss(q1, k2, layout="cross") + cct_loss(q2, k1,
      layout="cross")``; CLIP: the mean of ``cct_loss(img, txt, layout="cross")`` and
      ``cct_loss(txt, img, layout="cross")``.
    * ``labels`` ``(N,)`` (supervised): among a layout's candidates (``"all"`` in-batch: every
      embedding of every row; ``"cross"``: the rows of ``positive``), every embedding of a
      same-label row other than the query itself is a positive and every embedding of a row
      with another label a negative, so queries have a variable number of positives. With
      ``(K, D)`` negatives, ``negative_labels`` ``(K,)`` leaves out same-label negatives (in the
      MoCo mode of ``"all"`` the positives stay ``positive[i]``). A query with no positive has
      no attraction term (0) and one with no negative no repulsion term (0).
    * ``labels`` without ``positive`` (metric learning, pytorch-metric-learning's
      ``loss(embeddings, labels)``): one view; every other row with the same label is a
      positive, every row with another label a negative. Equal to
      ``cct_loss_multiview([query], labels=labels)``.

    Temperatures: ``t_pos`` and ``t_neg`` multiply the cost (inverse temperatures, the paper's
    parameters). On unit vectors ``d = 2 - 2 cos``, so ``softmax(-t d)`` equals InfoNCE's
    ``softmax(cos / tau)`` at ``t = 1 / (2 tau)`` for the default cost and at ``t = 1 / tau``
    for ``cost="cosine"``: ``temperature=tau`` sets ``t_neg`` that way.

    Args:
        query: ``(N, D)`` query embeddings.
        positive: ``(N, D)`` one positive per query, or ``(N, M, D)`` ``M`` positives; may be
            left out when ``labels`` is given (one view, see above). A ``positive`` that is
            ``query`` itself (the same memory, shape and strides) is refused: every query would
            be its own positive, at distance 0.
        negatives: ``None``, ``(K, D)`` or ``(N, K, D)`` (``"all"`` only); see above.
        layout: ``"all"`` (default) or ``"cross"``; see above.
        labels: ``(N,)`` integer class labels of the rows, or ``None``.
        negative_labels: ``(K,)`` integer labels of ``(K, D)`` negatives (needs ``labels``).
        temperature: InfoNCE's ``tau`` (``> 0``), the familiar way to set ``t_neg``: it
            becomes ``t_neg = 1 / (2 tau)`` (``cost="cosine"``: ``1 / tau``), so that the
            repulsion's weights are InfoNCE's ``softmax(cos / tau)``. Giving both
            ``temperature`` and ``t_neg`` is a ``ValueError``.
        t_pos: positive sharpness (an inverse temperature, multiplies the cost), ``>= 0``.
        t_neg: negative sharpness, ``>= 0``; ``None`` (default) means 1.0 (InfoNCE's
            ``tau = 0.5``) unless ``temperature`` is given. Paper: 0.9 (CIFAR-10), 2.0
            (CIFAR-100, STL-10, ImageNet MoCo-v2 recipe).
        alpha: weight of the attraction term (does not enter the softmax).
        beta: weight of the repulsion term (does not enter the softmax).
            ``t_pos``, ``t_neg``, ``alpha`` and ``beta`` may be Python numbers or 0-dim tensors
            (a schedule under ``torch.compile`` without recompiling). A tensor is checked for
            its shape, dtype and ``requires_grad``, not for its value (that would cost a host
            synchronisation): a negative or non-finite tensor sharpness is not caught.
        cost: ``"sqeuclidean"`` (``||a - b||^2``) or ``"cosine"`` (``1 - cos(a, b)``).
        normalize: L2-normalise embeddings first (zero vectors stay zero, never NaN).
        detach_weights: treat the weights as constants in the backward pass (the official
            large-scale MoCo code); ``False`` differentiates through the softmax (the official
            small-scale CIFAR/STL code).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``. ``"mean"`` is ``alpha *`` the mean
            attraction over the queries that have positives ``+ beta *`` the mean repulsion
            over the queries that have negatives (without labels: the mean over queries).
            ``"none"``: in-batch ``"all"``, queries are ordered view-major: ``query`` rows
            first, then ``positive[:, 0]``, ``positive[:, 1]``, ... (length ``(M + 1) N``);
            otherwise ``(N,)``.
        impl: ``"dense"`` (full ``Q x K`` cost matrix; fastest while it fits), ``"chunked"``
            (streams over blocks of keys with an online softmax; never holds ``Q x K``),
            ``"sdpa"`` (PyTorch's fused attention kernels), ``"triton"`` (hand-written fused
            kernels; CUDA, optional dependency, shared keys only) or ``"auto"`` (see
            :func:`cct_loss.dispatch.choose_impl`). All give the same values and gradients.
        chunk_size: keys per block for ``impl="chunked"`` (``None``: about 8 MiB per float32
            block on the CPU, 256 MiB on CUDA); with an explicit ``impl`` other than
            ``"chunked"`` it is an error.
        return_details: ``True`` returns a :class:`CCTDetails` with the terms, weight
            entropies, contrastive accuracy and counts (the same fields whichever
            implementation runs); ``"weights"`` adds the weight matrices, which makes ``auto``
            pick dense (an explicit ``"chunked"`` or ``"sdpa"`` is then an error).
        gather_distributed: under an initialised ``torch.distributed`` process group, the
            in-batch candidates come from the global batch (``"all"``: every rank's
            embeddings; ``"cross"``: every rank's ``positive``, with gradients when it requires
            grad), labels gathered too; the queries are this rank's rows. The returned value
            with ``reduction="mean"`` is ``world_size`` times this rank's share of the global
            mean (each term's sum over this rank's queries divided by the global number of
            queries that have it), so that DDP's gradient averaging applies the single-process
            gradient of the concatenated batch. Ranks may hold different N (at least one row
            each; an empty rank is a ``ValueError`` on every rank). No-op without a process
            group.
        check_finite: raise a ``ValueError`` naming the input when an embedding (or a
            negative) holds NaN or inf. Off by default, as in torch's own losses: the check
            reads the tensors' values, one host synchronisation per call, and a compiled graph
            cannot hold it. Without it a non-finite input gives a NaN loss.

    Returns:
        The loss (float32, or float64 for float64 inputs; under autocast the matrix products
        run in the autocast dtype and the rest in float32, see :mod:`cct_loss.precision`), or
        a :class:`CCTDetails`.

    Raises:
        TypeError: a non-tensor, non-floating embedding tensor, non-integer labels or a
            non-numeric option.
        ValueError: shapes that disagree, empty inputs, negative or non-finite sharpness,
            an unknown option value, a ``(D, K)`` queue, in-batch mode with ``N = 1``,
            ``negatives`` that is ``positive`` (use ``layout="cross"``), a ``positive`` that
            is ``query`` itself, both ``temperature`` and ``t_neg``, non-finite inputs with
            ``check_finite=True``, or
            ``gather_distributed=True`` with explicit negatives in ``"all"`` (gather a queue
            with :class:`cct_loss.NegativeQueue` instead).

    Examples:
        >>> import torch
        >>> from cct_loss import cct_loss
        >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = cct_loss(z1, z2, temperature=0.5)  # SimCLR: 16 queries, 14 negatives each
        >>> queue = torch.randn(16, 64)  # MoCo keeps its queue as (D, K)
        >>> loss = cct_loss(z1, z2, queue.T, temperature=0.2)
        >>> loss = cct_loss(z1, labels=torch.randint(0, 3, (8,)))  # metric learning
        >>> loss = cct_loss(z1, z2, layout="cross")  # MoCo v3: q1 against k2's other rows
        >>> loss = cct_loss(z1, z2, labels=torch.randint(0, 3, (8,)))  # supervised
    """
    options = options_of(locals(), TABLE)
    return pairs_loss(query, positive, negatives, labels, negative_labels, options)


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


@names_valid_keywords
def cct_loss_multiview(
    views: Sequence[Tensor],
    *,
    layout: str = "all",
    labels: Tensor | None = None,
    temperature: float | Tensor | None = None,
    t_pos: float | Tensor = 1.0,
    t_neg: float | Tensor | None = None,
    alpha: float | Tensor = 1.0,
    beta: float | Tensor = 1.0,
    cost: str = "sqeuclidean",
    normalize: bool = True,
    detach_weights: bool = True,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    return_details: bool | str = False,
    gather_distributed: bool = False,
    check_finite: bool = False,
) -> Tensor | CCTDetails:
    """CCT loss for a multi-view batch (several augmentations of each image).

    Args:
        views: a list (or tuple) of ``V`` tensors ``(N, D)``, ``V >= 2`` (``V >= 1`` with
            ``labels``). Row ``i`` of every view is the same image. A single stacked tensor is
            refused: ``(V, N, D)`` and SupCon's ``(N, V, D)`` cannot be told apart (pass
            ``list(x.unbind(0))`` or ``list(x.unbind(1))``).
        layout: ``"all"``: the symmetric in-batch layout with ``M = V - 1`` positives; exactly
            ``cct_loss(views[0], torch.stack(views[1:], dim=1))``, ``V * N`` queries in view-major
            order. ``"paper"``: the official small-scale objective (attraction per view against
            the other views of the same row, averaged over views; repulsion for each pair of
            views ``x < y``, rows of ``x`` against the other rows of ``y``, averaged over pairs).
            To reproduce the paper use ``detach_weights=False``. ``reduction="none"`` gives one
            value per row ``(N,)`` for ``"paper"``.
        labels: ``(N,)`` integer class labels (``layout="all"`` only): every view of every
            same-label row is a positive (the query itself excluded), every view of every row
            with another label a negative. ``cct_loss_multiview([embeddings], labels=labels)``
            is the metric-learning call (pytorch-metric-learning's ``loss(embeddings, labels)``).
        temperature: InfoNCE's ``tau``, as in :func:`cct_loss` (sets ``t_neg``).
        t_pos: positive sharpness, as in :func:`cct_loss`.
        t_neg: negative sharpness (``None``: 1.0 unless ``temperature`` is given).
        alpha: weight of the attraction term.
        beta: weight of the repulsion term.
        cost: ``"sqeuclidean"`` or ``"cosine"``.
        normalize: L2-normalise the views first.
        detach_weights: treat the weights as constants in the backward pass (``False`` for the
            paper's configuration).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        impl: the implementation, as in :func:`cct_loss`.
        chunk_size: keys per block for ``impl="chunked"``.
        return_details: ``True`` (or ``"weights"``) returns a :class:`CCTDetails`.
        gather_distributed: as in :func:`cct_loss`; it takes the candidates from the global
            batch for both layouts.
        check_finite: raise a ``ValueError`` naming a view that holds NaN or inf (one host
            synchronisation per call).

    Returns:
        The loss, or a :class:`CCTDetails`.

    Examples:
        >>> import torch
        >>> from cct_loss import cct_loss_multiview
        >>> views = [torch.randn(8, 16) for _ in range(5)]  # 5 views: 4 positives per query
        >>> loss = cct_loss_multiview(views, t_neg=0.9)
        >>> paper = cct_loss_multiview(views, layout="paper", t_neg=0.9, detach_weights=False)
        >>> supcon = cct_loss_multiview(views[:2], labels=torch.randint(0, 3, (8,)))
    """
    options = options_of(locals(), TABLE)
    return views_loss(views, labels, options)
