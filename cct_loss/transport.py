"""The conditional transport maths on a block of costs (pure functions).

For one query with costs ``c_1..c_K`` to its positives (or negatives) and a sharpness ``t``:

    pi_k = softmax_k(sign * t * c_k)        sign = +1 for positives, -1 for negatives
    E    = sum_k pi_k c_k                   the query-conditional expected cost

Attraction is ``E`` over the positives, repulsion is ``-E`` over the negatives.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class ConditionalExpectation(NamedTuple):
    """Per-query result of :func:`conditional_expectation`.

    Attributes:
        value: ``(Q,)`` expected cost ``sum_k pi_k c_k`` (differentiable).
        entropy: ``(Q,)`` entropy of ``pi`` in nats (no gradient).
        extreme: ``(Q,)`` largest cost (positives) or smallest cost (negatives), no gradient.
        weights: ``(Q, K)`` the weights ``pi`` (zero where masked out), or ``None`` from
            implementations that never hold them.
    """

    value: Tensor
    entropy: Tensor
    extreme: Tensor
    weights: Tensor | None


def conditional_expectation(
    cost: Tensor,
    sharpness: float,
    *,
    farther_weighs_more: bool,
    detach_weights: bool,
    mask: Tensor | None = None,
) -> ConditionalExpectation:
    """Softmax-weighted mean of each row of ``cost``.

    Args:
        cost: ``(Q, K)`` costs, floating point.
        sharpness: inverse temperature ``t >= 0``; 0 gives uniform weights.
        farther_weighs_more: ``True`` for positives (``softmax(+t c)``), ``False`` for
            negatives (``softmax(-t c)``).
        detach_weights: treat the weights as constants in the backward pass.
        mask: optional ``(Q, K)`` boolean tensor, ``True`` where an entry takes part.
            Every row must keep at least one entry.

    Returns:
        A :class:`ConditionalExpectation`.
    """
    sign = 1.0 if farther_weighs_more else -1.0
    logits = (cost.detach() if detach_weights else cost) * (sign * sharpness)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    value = (weights * cost).sum(-1)
    with torch.no_grad():
        w = weights.detach()
        entropy = -torch.special.xlogy(w, w).sum(-1)
        c = cost.detach()
        if farther_weighs_more:
            extreme = (c if mask is None else c.masked_fill(~mask, float("-inf"))).amax(-1)
        else:
            extreme = (c if mask is None else c.masked_fill(~mask, float("inf"))).amin(-1)
    return ConditionalExpectation(value, entropy, extreme, weights)
