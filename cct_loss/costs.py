"""Transport costs between embeddings, always from matrix products.

``c(a, b) = ||a - b||^2`` ("sqeuclidean") or ``1 - cos(a, b)`` ("cosine"). Both are computed
from inner products, ``|a|^2 + |b|^2 - 2 a.b`` clamped at 0, so no ``(N, K, D)`` difference
tensor is ever formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: ``eps`` of :func:`torch.nn.functional.normalize`: a zero vector stays zero instead of NaN.
NORMALIZE_EPS = 1e-12


def prepare_embeddings(x: Tensor, *, cost: str, normalize: bool) -> Tensor:
    """Put embeddings in the form the cost expects.

    ``normalize=True`` projects onto the unit sphere (zero vectors stay zero). The cosine cost
    is scale invariant, so it always works on unit vectors whatever ``normalize`` says.

    Args:
        x: ``(..., D)`` embeddings.
        cost: ``"sqeuclidean"`` or ``"cosine"``.
        normalize: project onto the unit sphere.

    Returns:
        ``(..., D)`` tensor.
    """
    if normalize or cost == "cosine":
        return F.normalize(x, p=2.0, dim=-1, eps=NORMALIZE_EPS)
    return x


def unclamped_cost(gram: Tensor, sq_a: Tensor, sq_b: Tensor, cost: str) -> Tensor:
    """Costs from inner products, before clamping at 0 (rounding can make them slightly < 0).

    Args:
        gram: ``(..., Q, K)`` inner products ``a.b`` of prepared embeddings.
        sq_a: ``(..., Q, 1)`` squared norms of the left factors (ignored for cosine).
        sq_b: ``(..., 1, K)`` squared norms of the right factors (ignored for cosine).
        cost: ``"sqeuclidean"`` or ``"cosine"``.

    Returns:
        ``(..., Q, K)`` costs.
    """
    if cost == "cosine":
        # Inputs are unit vectors (or zero): 1 - cos(a, b).
        return 1.0 - gram
    return sq_a + sq_b - 2.0 * gram


def cost_from_gram(gram: Tensor, sq_a: Tensor, sq_b: Tensor, cost: str) -> Tensor:
    """:func:`unclamped_cost` clamped at 0: the non-negative cost."""
    return unclamped_cost(gram, sq_a, sq_b, cost).clamp_min(0.0)


def pairwise_cost(a: Tensor, b: Tensor, cost: str) -> Tensor:
    """Costs between every row of ``a`` and every row of ``b``.

    Args:
        a: ``(Q, D)`` prepared embeddings.
        b: ``(K, D)`` prepared embeddings.
        cost: ``"sqeuclidean"`` or ``"cosine"``.

    Returns:
        ``(Q, K)`` costs.
    """
    gram = a @ b.transpose(-1, -2)
    if cost == "cosine":
        return cost_from_gram(gram, gram, gram, cost)
    sq_a = a.pow(2).sum(-1, keepdim=True)
    sq_b = b.pow(2).sum(-1).unsqueeze(-2)
    return cost_from_gram(gram, sq_a, sq_b, cost)


def rowwise_cost(a: Tensor, b: Tensor, cost: str) -> Tensor:
    """Costs between each row ``a[i]`` and its own set of vectors ``b[i, :]``.

    Used for the M positives of each query and for per-query negatives.

    Args:
        a: ``(N, D)`` prepared embeddings.
        b: ``(N, K, D)`` prepared embeddings.
        cost: ``"sqeuclidean"`` or ``"cosine"``.

    Returns:
        ``(N, K)`` costs.
    """
    gram = torch.bmm(b, a.unsqueeze(-1)).squeeze(-1)
    if cost == "cosine":
        return cost_from_gram(gram, gram, gram, cost)
    sq_a = a.pow(2).sum(-1, keepdim=True)
    sq_b = b.pow(2).sum(-1)
    return cost_from_gram(gram, sq_a, sq_b, cost)
