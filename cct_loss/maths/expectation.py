"""The conditional expectation every implementation computes, for one query and the keys that
take part: ``E = sum_k softmax_k(s c_k) c_k`` with ``s = +t_pos`` (positives: attraction is
``E``) or ``-t_neg`` (negatives: repulsion is ``-E``); ``E = 0`` for a query with no key. Here:
the result type, the formula in plain autograd, and the diagnostics from weights."""

from __future__ import annotations

import math
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
    """One side's result per query: the expected cost (differentiable), the weights' entropy and
    the extreme cost (``None`` without diagnostics), the weights where held, who has keys."""

    value: Tensor
    entropy: Tensor | None
    extreme: Tensor | None
    weights: Tensor | None
    present: Tensor | None = None


#: From this sharpness on (and for a tensor sharpness, whose value is not read) a softmax's
#: logits are shifted by its extreme cost first: the sharpness times a cost of up to 4 (unit
#: rows) would overflow float32 (``+inf`` logits give NaN weights; ``-inf`` along a whole row
#: too), where every implementation is exact up to ``MAX_SHARPNESS``. Below it no logit can
#: overflow, and no call pays for the shift.
SHIFTED_FROM = 1e37


def needs_shift(sharpness: float | Tensor) -> bool:
    """Whether logits of ``sharpness`` times a cost must be shifted first (:data:`SHIFTED_FROM`)."""
    return isinstance(sharpness, Tensor) or abs(sharpness) >= SHIFTED_FROM


def signed_sharpness(options: CCTOptions, side: Side) -> float | Tensor:
    """``+t_pos`` for the positives, ``-t_neg`` for the negatives: the logits are this times
    the cost."""
    return options.t_pos if side == "positives" else -options.t_neg


def weighted_expectation(
    value: Tensor, weights: Tensor, costs: Tensor | None, excluded: Tensor | None, side: Side,
    *, details: bool, may_be_empty: bool = False,
) -> ConditionalExpectation:  # fmt: skip
    """The result of an implementation that holds each query's weights and, for ``details``,
    its costs (``excluded``: the keys that sit out): the diagnostics, without gradient, are the
    entropy of each row of ``weights`` (nats) and the extreme cost over the keys that take part
    (the largest for positives, the smallest for negatives); ``present``, where a query may
    have no key taking part."""
    present = ~excluded.all(-1) if may_be_empty and excluded is not None else None
    if not details:
        return ConditionalExpectation(value, None, None, weights, present)
    assert costs is not None
    with torch.no_grad():
        entropy = -torch.special.xlogy(weights, weights).sum(-1)
        farther = side == "positives"
        fill = float("-inf") if farther else float("inf")
        masked = costs if excluded is None else costs.masked_fill(excluded, fill)
        extreme = masked.amax(-1) if farther else masked.amin(-1)
    return ConditionalExpectation(value, entropy, extreme, weights, present)


def grad_of_costs(
    grad: Tensor | float, weights: Tensor, costs: Tensor | None, expected: Tensor | None,
    signed: float | Tensor, detach_weights: bool,
) -> Tensor:  # fmt: skip
    """``grad dE/dc``, a fresh tensor (``weights`` are not written): ``grad pi`` for detached
    weights, else ``grad pi (1 + s (c - E))`` (``expected`` broadcast against ``costs``), the
    weight applied before the sharpness: a key whose weight is 0 adds 0, not ``0 * inf``, at
    the largest sharpness."""
    if detach_weights:
        return weights * grad
    assert costs is not None and expected is not None
    return (costs - expected).mul_(weights).mul_(signed).add_(weights).mul_(grad)


def block_expectation(query: Tensor, keys: Tensor, options: CCTOptions) -> ConditionalExpectation:
    """The attraction of ``(Q, D)`` queries to their own ``(Q, M, D)`` positives, in plain
    autograd: how every implementation but dense does a block too small to stream."""
    value, weights, costs = block_formula(
        query, keys, cost=options.cost, signed=options.t_pos, detach_weights=options.detach_weights
    )
    return weighted_expectation(
        value,
        weights.detach(),
        costs.detach(),
        None,
        "positives",
        details=bool(options.return_details),
    )


def block_formula(
    query: Tensor, keys: Tensor, *, cost: str, signed: float | Tensor, detach_weights: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Each query's expected cost over its own ``(Q, M, D)`` keys in plain autograd (every key
    takes part; ``signed >= 0``, the positives' sharpness): ``(value (Q,), weights (Q, M),
    costs (Q, M))``."""
    costs = cost_matrix(query, keys, cost)
    source = costs.detach() if detach_weights else costs
    if needs_shift(signed):  # by each query's farthest cost, a constant to the softmax
        source = source - costs.detach().amax(-1, keepdim=True)
    logits = source * signed
    weights = torch.softmax(logits, dim=-1)
    return (weights * costs).sum(-1), weights, costs


def streamed_expectation(
    expected: Tensor,
    log_normaliser: Tensor,
    extreme: Tensor | None,
    entropy: Tensor | None,
    may_be_empty: bool,
) -> ConditionalExpectation:
    """The result of an implementation that streams over the keys and keeps no weights
    (chunked, triton), from its per-query statistics: where a query may have no key taking
    part, its log-normaliser is ``-inf``; it is marked absent and its entropy is 0. Where every
    query has keys, a log-normaliser of ``-inf`` says that each of its logits overflowed
    (``t_neg`` times costs beyond float32, without normalising): its value is NaN, as dense's
    softmax gives, rather than the 0 of a query without keys."""
    present = None
    if may_be_empty:
        present = torch.isfinite(log_normaliser)
        if entropy is not None:
            entropy = torch.where(present, entropy, 0.0)
    else:
        expected = torch.where(torch.isneginf(log_normaliser), math.nan, expected)
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
    """``(Q,)`` expected cost over the keys that take part (``excluded``: ``(Q, K)``, True where a
    key sits out), in plain autograd differentiable to any order (no in-place update, no 0/0):
    the formula every closed-form backward stands for."""
    costs = cost_matrix(query, keys, cost)
    source = costs.detach() if detach_weights else costs
    if needs_shift(signed):  # by the extreme cost taking part, a constant to the softmax
        source = source - extreme_cost(costs.detach(), excluded, signed)
    logits = source * signed
    if excluded is not None:
        present = ~excluded.all(-1, keepdim=True)
        logits = torch.where(excluded, float("-inf"), logits)
        logits = torch.where(present, logits, 0.0)  # a query without keys: no 0/0
        weights = torch.where(present, torch.softmax(logits, dim=-1), 0.0)
    else:
        weights = torch.softmax(logits, dim=-1)
    return (weights * costs).sum(-1)


def extreme_cost(costs: Tensor, excluded: Tensor | None, signed: float | Tensor) -> Tensor:
    """``(Q, 1)``: each query's farthest cost taking part for ``signed >= 0`` (positives), its
    nearest for ``signed < 0`` (negatives); 0 for a query with none."""
    farthest = costs if excluded is None else costs.masked_fill(excluded, float("-inf"))
    nearest = costs if excluded is None else costs.masked_fill(excluded, float("inf"))
    positive = torch.as_tensor(signed, device=costs.device) >= 0
    shift = torch.where(positive, farthest.amax(-1, keepdim=True), nearest.amin(-1, keepdim=True))
    return torch.where(torch.isfinite(shift), shift, 0.0)


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
