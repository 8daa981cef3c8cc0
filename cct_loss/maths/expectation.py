"""The conditional expectation at the heart of CCT, as the implementations share it.

For one query with costs ``c_1..c_K`` to the keys that take part (its positives, or its
negatives) and a sharpness ``t``:

    pi_k = softmax_k(s c_k)          s = +t_pos for positives, -t_neg for negatives
    E    = sum_k pi_k c_k            the query-conditional expected cost

Attraction is ``E`` over the positives, repulsion is ``-E`` over the negatives (the
specification: docs/specification.md). A query with no key taking part has ``E = 0`` and is
flagged absent. Here: the result type every implementation returns per side, the formula in plain
autograd (what every closed-form backward stands for, and what a backward differentiates when it
must itself be differentiable), and the diagnostics computed from weights.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ..options import CCTOptions
from .costs import cost_matrix, differentiable_vjp

#: Which term a softmax belongs to: the attraction over a query's positives
#: (``softmax(+t_pos d)``, farther positives weigh more) or the repulsion over its negatives
#: (``softmax(-t_neg d)``, closer negatives weigh more).
Side = Literal["positives", "negatives"]


class ConditionalExpectation(NamedTuple):
    """One side's result per query, from any implementation.

    Attributes:
        value: ``(Q,)`` expected cost ``sum_k pi_k c_k`` (differentiable); 0 for a query with no
            key taking part.
        entropy: ``(Q,)`` entropy of ``pi`` in nats (no gradient), or ``None`` when the
            diagnostics were not asked for.
        extreme: ``(Q,)`` largest cost (positives) or smallest cost (negatives), no gradient,
            or ``None`` when the diagnostics were not asked for.
        weights: the weights ``pi``, or ``None`` from implementations that never hold them
            (``(Q, K)``, zero where a key does not take part; ``(Q, M)`` for own positives).
        present: ``(Q,)`` bool, True where at least one key takes part; ``None`` when every
            query has keys by construction.
    """

    value: Tensor
    entropy: Tensor | None
    extreme: Tensor | None
    weights: Tensor | None
    present: Tensor | None = None


def signed_sharpness(options: CCTOptions, side: Side) -> float | Tensor:
    """``+t_pos`` for the positives, ``-t_neg`` for the negatives: the logits are this times
    the cost."""
    return options.t_pos if side == "positives" else -options.t_neg


def weight_statistics(
    weights: Tensor, costs: Tensor, excluded: Tensor | None, side: Side
) -> tuple[Tensor, Tensor]:
    """The entropy of each row of ``weights`` (nats) and the extreme cost over the entries that
    take part (``excluded`` marks the others): the largest for positives, the smallest for
    negatives. No gradient."""
    with torch.no_grad():
        entropy = -torch.special.xlogy(weights, weights).sum(-1)
        farther = side == "positives"
        fill = float("-inf") if farther else float("inf")
        masked = costs if excluded is None else costs.masked_fill(excluded, fill)
        extreme = masked.amax(-1) if farther else masked.amin(-1)
        return entropy, extreme


def block_expectation(query: Tensor, keys: Tensor, options: CCTOptions) -> ConditionalExpectation:
    """Attraction of each query to its own few positives, in plain autograd: the ``M`` fixed
    positives of the MoCo and cross layouts, or the other views of its row. Every
    implementation but dense computes a query's own positives this way (a ``(Q, M)`` block is
    too small to stream).

    Args:
        query: ``(Q, D)`` prepared queries; keys: ``(Q, M, D)`` each query's positives.
    """
    costs = cost_matrix(query, keys, options.cost)
    logits = (costs.detach() if options.detach_weights else costs) * options.t_pos
    weights = torch.softmax(logits, dim=-1)
    value = (weights * costs).sum(-1)
    entropy = extreme = None
    if options.return_details:
        entropy, extreme = weight_statistics(weights.detach(), costs.detach(), None, "positives")
    return ConditionalExpectation(value, entropy, extreme, weights)


def streamed_expectation(
    expected: Tensor,
    log_normaliser: Tensor,
    extreme: Tensor | None,
    entropy: Tensor | None,
    may_be_empty: bool,
) -> ConditionalExpectation:
    """The result of an implementation that streams over the keys and keeps no weights
    (chunked, triton), from its per-query statistics: where a query may have no key taking
    part, its log-normaliser is ``-inf``; it is marked absent and its entropy is 0."""
    present = None
    if may_be_empty:
        present = torch.isfinite(log_normaliser)
        if entropy is not None:
            entropy = torch.where(present, entropy, 0.0)
    return ConditionalExpectation(expected, entropy, extreme, None, present)


def expected_cost_formula(
    query: Tensor,
    keys: Tensor,
    excluded: Tensor | None,
    *,
    cost: str,
    signed: float | Tensor,
    detach_weights: bool,
) -> Tensor:
    """``(Q,)`` expected cost over the keys that take part, in plain autograd.

    Every operation is differentiable to any order (no in-place update, no clamp mask in the
    gradient, no 0/0 for a query without keys): this is the formula the implementations'
    closed-form backward passes stand for.

    Args:
        query: ``(Q, D)``; keys: ``(K, D)`` shared or ``(Q, K, D)`` per query.
        excluded: ``(Q, K)`` bool, True where a key sits out, or ``None`` (all take part).
        cost: ``"sqeuclidean"`` or ``"cosine"``.
        signed: ``+t_pos`` or ``-t_neg`` (:func:`signed_sharpness`).
        detach_weights: treat the weights as constants.
    """
    costs = cost_matrix(query, keys, cost)
    logits = (costs.detach() if detach_weights else costs) * signed
    if excluded is not None:
        present = ~excluded.all(-1, keepdim=True)
        logits = torch.where(excluded, float("-inf"), logits)
        logits = torch.where(present, logits, 0.0)  # a query without keys: no 0/0
        weights = torch.where(present, torch.softmax(logits, dim=-1), 0.0)
    else:
        weights = torch.softmax(logits, dim=-1)
    return (weights * costs).sum(-1)


def differentiable_backward(
    grad_expected: Tensor,
    query: Tensor,
    keys: Tensor,
    excluded: Tensor | None,
    needs: tuple[bool, ...],
    *,
    cost: str,
    signed: float | Tensor,
    detach_weights: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """A streaming implementation's backward pass when it runs with ``create_graph=True``: the
    vector-Jacobian product of :func:`expected_cost_formula`, recorded by autograd so that
    higher derivatives are exact. It holds the ``(Q, K)`` graph of the formula."""

    def formula(q: Tensor, k: Tensor) -> tuple[Tensor]:
        expected = expected_cost_formula(
            q, k, excluded, cost=cost, signed=signed, detach_weights=detach_weights
        )
        return (expected,)

    grad_query, grad_keys = differentiable_vjp(formula, [query, keys], [grad_expected], needs[:2])
    return grad_query, grad_keys
