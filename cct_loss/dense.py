"""``impl="dense"``: the repulsion from the full ``(Q, K)`` cost matrix.

One matrix product gives every cost; the in-batch mask is built on the inputs' device from
instance ids; there is no loop and no host synchronisation, so it runs under
``torch.compile(fullgraph=True)``. It is the fastest path while ``Q x K`` fits in memory.
"""

from __future__ import annotations

from torch import Tensor

from .costs import pairwise_cost, rowwise_cost
from .transport import ConditionalExpectation, conditional_expectation


def dense_repulsion(
    query: Tensor,
    keys: Tensor,
    query_ids: Tensor | None,
    key_ids: Tensor | None,
    *,
    cost: str,
    sharpness: float,
    detach_weights: bool,
) -> ConditionalExpectation:
    """Expected cost of each query under ``softmax_k(-t_neg d_k)`` over its negatives.

    Args:
        query: ``(Q, D)`` prepared queries.
        keys: ``(K, D)`` candidate negatives shared by all queries, or ``(Q, K, D)`` per query.
        query_ids: ``(Q,)`` instance ids, or ``None``. With ids, key ``k`` is a negative of
            query ``q`` only when ``key_ids[k] != query_ids[q]`` (shared keys only).
        key_ids: ``(K,)`` instance ids of the keys, or ``None``.
        cost: ``"sqeuclidean"`` or ``"cosine"``.
        sharpness: ``t_neg``.
        detach_weights: treat the weights as constants in the backward pass.

    Returns:
        :class:`ConditionalExpectation` with the ``(Q, K)`` weights.
    """
    costs = pairwise_cost(query, keys, cost) if keys.dim() == 2 else rowwise_cost(query, keys, cost)
    mask = None
    if query_ids is not None and key_ids is not None:
        mask = query_ids[:, None] != key_ids[None, :]
    return conditional_expectation(
        costs, sharpness, farther_weighs_more=False, detach_weights=detach_weights, mask=mask
    )
