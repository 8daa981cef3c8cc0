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


def cost_matrix(query: Tensor, keys: Tensor, cost: str) -> Tensor:
    """Costs of every query against shared ``(K, D)`` keys, or against its own ``(Q, K, D)``
    keys, in plain, twice-differentiable autograd.

    Used for the ``M`` positives of each query (a small block) and, by the kernels, to
    recompute a block when a backward pass must itself be differentiable (``create_graph=True``).
    The value is clamped at 0; the gradient is the formula's everywhere (see :func:`cost_vjp`).

    Args:
        query: ``(Q, D)`` prepared embeddings.
        keys: ``(K, D)`` shared, or ``(Q, K, D)`` per query.
        cost: ``"sqeuclidean"`` or ``"cosine"``.

    Returns:
        ``(Q, K)`` costs.
    """
    per_query = keys.dim() == 3
    gram = torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1) if per_query else query @ keys.T
    if cost == "cosine":  # inputs are unit vectors (or zero): 1 - cos(a, b)
        raw = 1.0 - gram
    else:
        raw = query.pow(2).sum(-1, keepdim=True) + keys.pow(2).sum(-1) - 2.0 * gram
    # Value clamped at 0 (rounding), gradient of the formula, as in cost_block + cost_vjp.
    return raw + (raw.clamp_min(0.0) - raw).detach()


def cost_block(query: Tensor, query_sq: Tensor, keys: Tensor, cost: str) -> Tensor:
    """Clamped costs of every query against a block of keys (no autograd graph needed).

    Args:
        query: ``(Q, D)`` prepared queries; query_sq: ``(Q, 1)`` their squared norms.
        keys: ``(C, D)`` keys shared by all queries, or ``(Q, C, D)`` keys per query.
        cost: ``"sqeuclidean"`` or ``"cosine"``.

    Returns:
        ``(Q, C)`` costs, a fresh tensor.
    """
    if keys.dim() == 2:
        keys_sq = keys.pow(2).sum(-1)
        if cost == "cosine":
            costs = torch.addmm(torch.ones_like(keys_sq), query, keys.T, alpha=-1.0)
        else:  # |q|^2 + |n|^2 - 2 q.n with one BLAS call and in-place updates
            costs = torch.addmm(keys_sq, query, keys.T, alpha=-2.0).add_(query_sq)
    else:
        gram = torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1)
        if cost == "cosine":
            costs = gram.neg_().add_(1.0)
        else:
            costs = gram.mul_(-2.0).add_(keys.pow(2).sum(-1)).add_(query_sq)
    return costs.clamp_min_(0.0)


def cost_vjp(
    grad_cost: Tensor, query: Tensor, keys: Tensor, cost: str, *, need_keys: bool
) -> tuple[Tensor, Tensor | None]:
    """Pull a gradient on a ``(Q, C)`` cost block back to the queries and the keys.

    ``d cost / d q = 2 (q - n)`` and ``d cost / d n = 2 (n - q)`` (sqeuclidean) or ``-n`` and
    ``-q`` (cosine): the derivative of the formula's cost, also where rounding made the matrix
    product's value slightly negative and the forward pass clamped it to 0 (there the true
    gradient is ``2 (q - n)``, almost zero, not exactly zero).

    Args:
        grad_cost: ``(Q, C)`` gradient with respect to the costs.
        query: ``(Q, D)``; keys: ``(C, D)`` shared or ``(Q, C, D)`` per query.
        cost: ``"sqeuclidean"`` or ``"cosine"``.
        need_keys: whether to compute the keys' gradient.

    Returns:
        ``(Q, D)`` query gradient and the keys' gradient (shaped like ``keys``) or ``None``.
    """
    shared = keys.dim() == 2
    # sum_k G_qk n_k for every query
    toward_keys = grad_cost @ keys if shared else torch.bmm(grad_cost.unsqueeze(1), keys).squeeze(1)
    if cost == "cosine":
        grad_query = toward_keys.neg_()
    else:
        grad_query = torch.addcmul(toward_keys, grad_cost.sum(-1, keepdim=True), query, value=-1.0)
        grad_query.mul_(-2.0)
    if not need_keys:
        return grad_query, None
    if shared:
        toward_query = grad_cost.T @ query
        if cost == "cosine":
            return grad_query, toward_query.neg_()
        grad_keys = torch.addcmul(toward_query, grad_cost.sum(0).unsqueeze(-1), keys, value=-1.0)
        return grad_query, grad_keys.mul_(-2.0)
    g = grad_cost.unsqueeze(-1)
    if cost == "cosine":
        return grad_query, -g * query.unsqueeze(1)
    return grad_query, 2.0 * g * (keys - query.unsqueeze(1))


def weights_vjp(
    weights: Tensor,
    grad_expected: Tensor,
    query: Tensor,
    keys: Tensor,
    cost: str,
    *,
    rows_sum_to_one: bool,
    need_keys: bool,
) -> tuple[Tensor, Tensor | None]:
    """:func:`cost_vjp` of ``grad_cost = weights * grad_expected[:, None]`` (the detached-weights
    backward) for shared ``(K, D)`` keys, without forming that ``(Q, K)`` product.

    ``sum_k G_qk n_k = g_q (W n)_q`` and ``sum_q G_qk q_q = (W^T (g q))_k``: two matrix products
    on the weights, and the row sums of ``G`` are ``g`` itself when every row of ``W`` sums to 1
    (``rows_sum_to_one``; a query without keys has a zero row).

    Args:
        weights: ``(Q, K)`` weights; grad_expected: ``(Q,)``.
        query: ``(Q, D)``; keys: ``(K, D)``.
        cost: ``"sqeuclidean"`` or ``"cosine"``.
        rows_sum_to_one: every row of ``weights`` sums to 1.
        need_keys: whether to compute the keys' gradient.
    """
    g = grad_expected[:, None]
    toward_keys = (weights @ keys).mul_(g)
    if cost == "cosine":
        grad_query = toward_keys.neg_()
    else:
        row_sums = g if rows_sum_to_one else weights.sum(-1, keepdim=True).mul_(g)
        grad_query = torch.addcmul(toward_keys, row_sums, query, value=-1.0).mul_(-2.0)
    if not need_keys:
        return grad_query, None
    toward_query = weights.T @ (query * g)
    if cost == "cosine":
        return grad_query, toward_query.neg_()
    column_sums = (weights.T @ grad_expected).unsqueeze(-1)
    grad_keys = torch.addcmul(toward_query, column_sums, keys, value=-1.0)
    return grad_query, grad_keys.mul_(-2.0)
