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
    """Per-query result of :func:`conditional_expectation` and of the repulsion backends.

    Attributes:
        value: ``(Q,)`` expected cost ``sum_k pi_k c_k`` (differentiable).
        entropy: ``(Q,)`` entropy of ``pi`` in nats (no gradient; NaN when not computed).
        extreme: ``(Q,)`` largest cost (positives) or smallest cost (negatives), no gradient;
            NaN when not computed.
        weights: ``(Q, K)`` the weights ``pi`` (zero where masked out), or ``None`` from
            implementations that never hold them.
    """

    value: Tensor
    entropy: Tensor
    extreme: Tensor
    weights: Tensor | None


def weight_statistics(
    weights: Tensor,
    costs: Tensor,
    mask: Tensor | None,
    *,
    farther_weighs_more: bool,
    enabled: bool,
) -> tuple[Tensor, Tensor]:
    """Entropy of each row of ``weights`` and the extreme cost (max for positives, min for
    negatives) over the entries that take part; NaN placeholders when not ``enabled``."""
    with torch.no_grad():
        if not enabled:
            nan = torch.full_like(costs[..., 0], float("nan"))
            return nan, nan
        entropy = -torch.special.xlogy(weights, weights).sum(-1)
        fill = float("-inf") if farther_weighs_more else float("inf")
        c = costs if mask is None else costs.masked_fill(~mask, fill)
        extreme = c.amax(-1) if farther_weighs_more else c.amin(-1)
        return entropy, extreme


def conditional_expectation(
    cost: Tensor,
    sharpness: float,
    *,
    farther_weighs_more: bool,
    detach_weights: bool,
    with_stats: bool = True,
) -> ConditionalExpectation:
    """Softmax-weighted mean of each row of ``cost`` (plain autograd; for small blocks such as
    the ``M`` positives of each query; the negatives go through the repulsion backends).

    Args:
        cost: ``(Q, K)`` costs, floating point.
        sharpness: inverse temperature ``t >= 0``; 0 gives uniform weights.
        farther_weighs_more: ``True`` for positives (``softmax(+t c)``), ``False`` for
            negatives (``softmax(-t c)``).
        detach_weights: treat the weights as constants in the backward pass.
        with_stats: compute the entropy and the extreme cost (else NaN placeholders).

    Returns:
        A :class:`ConditionalExpectation`.
    """
    sign = 1.0 if farther_weighs_more else -1.0
    logits = (cost.detach() if detach_weights else cost) * (sign * sharpness)
    weights = torch.softmax(logits, dim=-1)
    value = (weights * cost).sum(-1)
    entropy, extreme = weight_statistics(
        weights.detach(),
        cost.detach(),
        None,
        farther_weighs_more=farther_weighs_more,
        enabled=with_stats,
    )
    return ConditionalExpectation(value, entropy, extreme, weights)
