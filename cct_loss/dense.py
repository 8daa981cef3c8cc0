"""``impl="dense"``: the repulsion from the full ``(Q, K)`` cost matrix.

One matrix product gives every cost; the in-batch mask is built on the inputs' device from
instance ids; there is no loop and no host synchronisation. A small custom autograd function
keeps the work to what InfoNCE does (one product forward, one or two backward, a softmax): it
saves the weights (and, without detaching, the costs) and writes the backward in closed form:

* ``detach_weights=True``: ``dE/dd_k = pi_k``;
* ``detach_weights=False``: ``dE/dd_k = pi_k (1 - t (d_k - E))``,

pulled back to the embeddings by :func:`cct_loss.costs.cost_vjp` (the derivative of
``||q - n||^2`` or ``1 - q.n``, also where rounding clamped a cost to 0, as in the formula).
It is the fastest path while
``Q x K`` fits in memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .costs import cost_block, cost_vjp
from .layouts import negative_mask
from .transport import ConditionalExpectation, weight_statistics


class _DenseExpectedCost(torch.autograd.Function):
    """``E_q = sum_k softmax_k(-t d_qk) d_qk`` over the full cost matrix."""

    @staticmethod
    def forward(
        ctx: Any,
        query: Tensor,
        keys: Tensor,
        mask: Tensor | None,
        cost: str,
        sharpness: float,
        detach_weights: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        costs = cost_block(query, query.pow(2).sum(-1, keepdim=True), keys, cost)
        logits = costs * -sharpness
        if mask is not None:
            logits.masked_fill_(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        del logits
        expected = torch.linalg.vecdot(weights, costs)
        # Detached weights need only the weights for the backward pass; through the weights it
        # also needs the costs.
        ctx.save_for_backward(query, keys, weights, expected, None if detach_weights else costs)
        ctx.options = (cost, sharpness, detach_weights)
        ctx.mark_non_differentiable(weights, costs)
        return expected, weights, costs

    @staticmethod
    def backward(
        ctx: Any, grad_expected: Tensor, _grad_weights: Tensor | None, _grad_costs: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        query, keys, weights, expected, costs = ctx.saved_tensors
        cost, sharpness, detach_weights = ctx.options
        if detach_weights:
            grad_cost = weights * grad_expected[:, None]
        else:
            # pi (1 - t (d - E)) g, in place on one fresh tensor
            grad_cost = (costs - expected[:, None]).mul_(-sharpness).add_(1.0)
            grad_cost.mul_(weights).mul_(grad_expected[:, None])
        grad_query, grad_keys = cost_vjp(
            grad_cost, query, keys, cost, need_keys=ctx.needs_input_grad[1]
        )
        return (grad_query if ctx.needs_input_grad[0] else None), grad_keys, *([None] * 4)


def dense_repulsion(
    query: Tensor,
    keys: Tensor,
    query_ids: Tensor | None,
    key_ids: Tensor | None,
    *,
    cost: str,
    sharpness: float,
    detach_weights: bool,
    with_stats: bool,
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
        with_stats: also compute the weight entropy and the nearest negative's cost.

    Returns:
        :class:`ConditionalExpectation` with the ``(Q, K)`` weights.
    """
    mask = negative_mask(query_ids, key_ids)
    expected, weights, costs = _DenseExpectedCost.apply(  # type: ignore[no-untyped-call]
        query, keys, mask, cost, sharpness, detach_weights
    )
    entropy, nearest = weight_statistics(
        weights, costs, mask, farther_weighs_more=False, enabled=with_stats
    )
    return ConditionalExpectation(expected, entropy, nearest, weights)
