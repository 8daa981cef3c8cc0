"""The maths of ``impl="dense"``'s two kinds of side, forward and closed-form backward, on one
call's :class:`Inputs` (:mod:`.dense` wraps them in its autograd functions).

A side is **pairs** (each query against its own few keys, ``(V, N, D)`` queries against
``(W, N, D)`` keys: its row's other views, or its given positives; one positive needs no
softmax, and a two-view batch's row shares one cost) or **shared** (a softmax over shared
``(K, D)`` or per-query ``(Q, K, D)`` keys, from one matrix product; keys that sit out filled
with ``-inf`` in place; with detached weights ``E`` comes from the weights' moments
``|q|^2 + pi |n|^2 - 2 q.(pi n)``, and no cost matrix is formed). Gradients, with ``s = +t_pos``
or ``-t_neg``: ``dE/dd_k = pi_k``, or ``pi_k (1 + s (d_k - E))`` through the weights."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..maths.costs import (
    WeightTerm,
    cost_block,
    cost_vjp,
    expected_cost_of_moments,
    pair_costs,
    pair_costs_vjp,
    per_row,
    shifted_logits,
    weights_vjp,
)
from ..maths.expectation import block_formula, expected_cost_formula, grad_of_costs, needs_shift
from ..maths.precision import product, squared_norms
from ..problem.description import KeySet, OwnRows

NONE, PAIRS, SHARED = "none", "pairs", "shared"

#: An upstream gradient of a side's values: per query ``(Q,)``, or one value for every query.
Grad = Tensor | float


class Plan(NamedTuple):
    """The static description of a call (the same for every call of its signature): cost,
    ``detach_weights``, each side's kind, the batch's own rows, label masks, and which shared
    side keeps its cost matrix (diagnostics, gradients through the weights, tensor sharpness)."""

    cost: str
    detach: bool
    positives: str
    negatives: str
    rows: OwnRows | None = None
    exclude_own: bool = False
    labelled: bool = False
    pos_may_be_empty: bool = False
    neg_may_be_empty: bool = False
    keep_pos_costs: bool = False
    keep_neg_costs: bool = False


class Inputs(NamedTuple):
    """The tensors of a call (``keys=None``: the queries; ``fixed``: given positives
    ``(Q, D)`` or ``(Q, M, D)``), its label masks, its sharpness and its plan."""

    query: Tensor
    keys: Tensor | None
    fixed: Tensor | None
    pos_excluded: Tensor | None
    neg_excluded: Tensor | None
    t_pos: float | Tensor
    t_neg: float | Tensor
    plan: Plan

    @property
    def shared(self) -> Tensor:
        return self.query if self.keys is None else self.keys


class SideResult(NamedTuple):
    """A side's forward result and what its gradient needs: ``value`` (``(N,)`` when each serves
    ``copies`` queries; 0-dim for a total), weights, kept costs, moments (``weights @ keys``), and
    for one positive its difference and operands."""

    value: Tensor | None = None
    weights: Tensor | None = None
    costs: Tensor | None = None
    moments: Tensor | None = None
    difference: Tensor | None = None
    operands: tuple[Tensor, Tensor] | None = None
    copies: int = 1


def pairs(inputs: Inputs) -> tuple[Tensor, Tensor, bool]:
    """``(V, N, D)`` queries, ``(W, N, D)`` keys (key ``[w, i]`` belongs to every query
    ``[v, i]``) and whether key ``[v, i]`` is query ``[v, i]`` itself."""
    query, fixed, rows = inputs.query, inputs.fixed, inputs.plan.rows
    if fixed is not None:  # (Q, M, D): M > 1 (one positive takes the short way)
        return query.unsqueeze(0), fixed.transpose(0, 1), False
    assert rows is not None
    queries = query.view(rows.query_views, rows.rows, -1)
    return queries, rows.own_keys(inputs.shared), rows.includes_self


def per_query(x: Tensor, exclude_self: bool) -> Tensor:
    """``(V, W, N)`` entries of the pairs -> ``(V * N, M)``: each query's own keys in view
    order, itself left out where ``exclude_self`` (column ``m`` of view ``v`` is key view ``m``,
    ``m + 1`` from ``v`` on)."""
    num_views, num_keys, rows = x.shape
    x = x.transpose(1, 2)
    if exclude_self:
        m = torch.arange(num_keys - 1, device=x.device)
        columns = m + (m >= torch.arange(num_views, device=x.device)[:, None])
        x = x.gather(2, columns[:, None, :].expand(-1, rows, -1))
    return x.reshape(num_views * rows, -1)


def _one_positive(inputs: Inputs) -> tuple[Tensor, Tensor, int] | None:
    """``(a, b, copies)`` when each query has one positive: ``c(a_i, b_i)`` is the attraction
    of ``copies`` queries (2: a two-view batch's row on one process); else ``None``."""
    query, fixed, rows = inputs.query, inputs.fixed, inputs.plan.rows
    if fixed is not None:
        if fixed.dim() == 2:
            return query, fixed, 1
        return (query, fixed[:, 0], 1) if fixed.shape[1] == 1 else None
    assert rows is not None
    if rows.includes_self and rows.query_views == rows.key_views == 2 and inputs.keys is None:
        first, second = query.view(2, -1, query.shape[-1]).unbind(0)
        return first, second, 2
    if not rows.includes_self and rows.key_views == 1:
        return query, rows.own_keys(inputs.shared)[0], 1
    return None


def _pairs_forward(inputs: Inputs, *, total: bool) -> SideResult:
    """Each query against its own few keys, the weights over ``w`` (``(V, W, N)``)."""
    plan, one = inputs.plan, _one_positive(inputs)
    if one is not None:
        a, b, copies = one
        value, difference = pair_costs(a, b, plan.cost, total=total)
        return SideResult(value, difference=difference, operands=(a, b), copies=copies)
    queries, keys, exclude_self = pairs(inputs)
    costs, _ = pair_costs(queries.unsqueeze(1), keys.unsqueeze(0), plan.cost)  # (V, W, N)
    if needs_shift(inputs.t_pos):  # by each query's farthest cost, a constant to the softmax
        logits = (costs - costs.amax(1, keepdim=True)).mul_(inputs.t_pos)
    else:
        logits = costs * inputs.t_pos
    if exclude_self:
        logits.diagonal(dim1=0, dim2=1).fill_(float("-inf"))
    weights = torch.softmax(logits, dim=1)
    return SideResult((weights * costs).sum(1).reshape(-1), weights, costs)


def _pairs_backward(
    inputs: Inputs, side: SideResult, grad: Grad, need_keys: bool
) -> tuple[Tensor, Tensor | None]:
    """The pairs side's gradients: the queries' ``(Q, D)``, and where ``need_keys`` their keys'
    (shaped like the given positives, or ``(K, D)``; ``None`` for a two-view batch, whose keys
    are the queries)."""
    plan = inputs.plan
    one = _one_positive(inputs) if side.operands is None else (*side.operands, side.copies)
    if one is not None:
        a, b, copies = one
        g = grad
        if isinstance(g, Tensor) and g.dim() == 1:  # per query: a row's two queries add up
            g = (g.view(2, -1).sum(0) if copies == 2 else g)[:, None]
        elif copies == 2:
            g = g * 2.0
        grad_a, grad_b = pair_costs_vjp(
            g, a, b, plan.cost, side.difference, need_keys or copies == 2
        )
        if copies == 2:
            assert grad_b is not None
            return torch.cat([grad_a, grad_b]), None
        fixed = inputs.fixed
        if grad_b is None or fixed is None:
            return grad_a, None if grad_b is None else _keys_grad(inputs, grad_b.unsqueeze(0))
        return grad_a, grad_b if fixed.dim() == 2 else grad_b.unsqueeze(1)
    queries, keys, _ = pairs(inputs)
    num_views, rows = queries.shape[:2]
    if isinstance(grad, Tensor) and grad.dim() == 1:
        grad = grad.view(num_views, 1, rows)
    expected = None if side.value is None else side.value.view(num_views, 1, rows)
    assert side.weights is not None
    g = grad_of_costs(grad, side.weights, side.costs, expected, inputs.t_pos, plan.detach)
    g = g.unsqueeze(-1)
    grad_q, own_k = pair_costs_vjp(
        g, queries.unsqueeze(1), keys.unsqueeze(0), plan.cost, None, need_keys, sums=(1, 0)
    )
    grad_k = None if own_k is None else _keys_grad(inputs, own_k)
    return grad_q.reshape(inputs.query.shape), grad_k


def _keys_grad(inputs: Inputs, grad_own: Tensor) -> Tensor:
    """The pairs' keys' gradient from that of their ``(W, N, D)`` view."""
    fixed, rows, shared = inputs.fixed, inputs.plan.rows, inputs.shared
    if fixed is not None:
        return grad_own.transpose(0, 1)
    assert rows is not None
    if rows.covers(shared.shape[0]):
        return grad_own.reshape(shared.shape)  # the own rows are all the keys, in order
    full = grad_own.new_zeros(shared.shape)
    rows.own_keys(full).copy_(grad_own)
    return full


def _shared_forward(
    inputs: Inputs,
    positives: bool,
    query_sq: Tensor | None,
    keys_sq: Tensor | None,
    costs: Tensor | None,
) -> SideResult:
    """A softmax over the shared (or per-query) keys; ``costs``: the cost matrix when both sides
    share one (labels)."""
    query, keys, plan = inputs.query, inputs.shared, inputs.plan
    signed = inputs.t_pos if positives else -inputs.t_neg
    keep = plan.keep_pos_costs if positives else plan.keep_neg_costs
    if costs is None and keep:
        costs = cost_block(query, query_sq, keys, plan.cost, keys_sq=keys_sq)
    if costs is not None:
        logits = costs * signed
    else:
        assert not isinstance(signed, Tensor)
        logits = shifted_logits(query, keys, plan.cost, signed, keys_sq=keys_sq)
    if not positives and plan.exclude_own:
        assert plan.rows is not None
        plan.rows.entries(logits).fill_(float("-inf"))
    excluded = inputs.pos_excluded if positives else inputs.neg_excluded
    if excluded is not None:
        logits.masked_fill_(excluded, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    del logits
    may_be_empty = plan.pos_may_be_empty if positives else plan.neg_may_be_empty
    if may_be_empty:  # a row with no key taking part: all -inf gave NaN; it weighs nothing
        weights.nan_to_num_(0.0)
    if costs is not None:
        return SideResult(torch.linalg.vecdot(weights, costs), weights, costs if keep else None)
    moments = product(weights, keys, keys.dtype)  # (Q, D), also the gradient's
    value = expected_cost_of_moments(
        weights, moments, query, plan.cost, query_sq=query_sq, keys_sq=keys_sq,
        rows_sum_to_one=not may_be_empty,
    )  # fmt: skip
    return SideResult(value, weights, None, moments)


def forward(inputs: Inputs, *, totals: bool = False) -> tuple[SideResult, SideResult]:
    """Both sides' forward results; ``totals``: one positive per query gives its costs' sum."""
    query, keys, plan = inputs.query, inputs.keys, inputs.plan
    shared = inputs.shared
    keys_sq = query_sq = None
    if plan.cost != "cosine" and SHARED in (plan.negatives, plan.positives):
        query_sq = squared_norms(query)
        if shared.dim() == 2:
            keys_sq = query_sq if keys is None else squared_norms(shared)
    pos = neg = SideResult()
    if plan.positives == PAIRS:
        pos = _pairs_forward(inputs, total=totals)
    both = None  # both sides over the same keys (labels): one cost matrix serves both
    if plan.positives == SHARED and plan.negatives == SHARED:
        both = cost_block(query, query_sq, shared, plan.cost, keys_sq=keys_sq)
    if plan.positives == SHARED:
        pos = _shared_forward(inputs, True, query_sq, keys_sq, both)
    if plan.negatives == SHARED:
        neg = _shared_forward(inputs, False, query_sq, keys_sq, both)
    return pos, neg


def input_grads(
    inputs: Inputs,
    pos: SideResult,
    neg: SideResult,
    grads: tuple[Grad | None, Grad | None],
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of ``sum_q grad_pos_q A_q + grad_neg_q E_q`` for the query, the keys and
    the given positives (``needs`` says which; a ``grad`` of ``None``: that side does not
    count), in the accumulation dtype."""
    query, keys, fixed, plan = inputs.query, inputs.keys, inputs.fixed, inputs.plan
    shared = inputs.shared
    need_keys = keys is None or needs[1]  # in-batch the keys' gradient is the queries'
    grad_query = grad_keys = grad_fixed = None
    if grads[0] is not None and plan.positives == PAIRS:
        need_own = needs[2] if fixed is not None else need_keys
        grad_query, grad_own = _pairs_backward(inputs, pos, grads[0], need_own)
        grad_fixed, grad_keys = (grad_own, None) if fixed is not None else (None, grad_own)
    # Detached softmaxes over (K, D) keys together (one pass over the keys for both sides with
    # labels, from the forward pass's moments where it has them); the others from their costs.
    detached: list[WeightTerm] = []
    for side, grad, signed, kind, may_be_empty in (
        (pos, grads[0], inputs.t_pos, plan.positives, plan.pos_may_be_empty),
        (neg, grads[1], -inputs.t_neg, plan.negatives, plan.neg_may_be_empty),
    ):
        if grad is None or kind != SHARED:
            continue
        if plan.detach and shared.dim() == 2:
            assert side.weights is not None
            detached.append(WeightTerm(side.weights, grad, side.moments, not may_be_empty))
            continue
        expected = None if side.value is None else side.value[:, None]
        assert side.weights is not None
        grad_costs = grad_of_costs(
            per_row(grad), side.weights, side.costs, expected, signed, plan.detach
        )
        grad_q, grad_k = cost_vjp(grad_costs, query, shared, plan.cost, need_keys=need_keys)
        grad_query, grad_keys = _add(grad_query, grad_q), _add(grad_keys, grad_k)
    if detached:
        grad_q, grad_k = weights_vjp(
            detached, query, shared, plan.cost, need_keys=need_keys, keys_are_queries=keys is None
        )
        grad_query, grad_keys = _add(grad_query, grad_q), _add(grad_keys, grad_k)
    if keys is None:
        grad_query, grad_keys = _add(grad_query, grad_keys), None
    wanted = (grad_query, grad_keys, grad_fixed)
    return tuple(g if need else None for g, need in zip(wanted, needs, strict=True))  # type: ignore[return-value]


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def formula(inputs: Inputs) -> tuple[Tensor | None, Tensor | None]:
    """``(A, E)`` per query in plain, twice-differentiable autograd: the formula the closed-form
    gradients stand for."""
    query, plan, shared = inputs.query, inputs.plan, inputs.shared
    attraction = expected = None
    if plan.positives == PAIRS:
        fixed = inputs.fixed
        if fixed is None:
            assert plan.rows is not None
            fixed = plan.rows.fixed_positives(shared)
        keys = fixed.unsqueeze(1) if fixed.dim() == 2 else fixed
        attraction, _, _ = block_formula(
            query, keys, cost=plan.cost, signed=inputs.t_pos, detach_weights=plan.detach
        )
    for positives, kind in ((True, plan.positives), (False, plan.negatives)):
        if kind != SHARED:
            continue
        excluded = inputs.pos_excluded if positives else inputs.neg_excluded
        if not positives and plan.exclude_own:
            excluded = KeySet(rows=plan.rows).excluded_mask(shared.shape[0], query.device)
        signed = inputs.t_pos if positives else -inputs.t_neg
        value = expected_cost_formula(
            query, shared, excluded, cost=plan.cost, signed=signed, detach_weights=plan.detach
        )
        attraction, expected = (value, expected) if positives else (attraction, value)
    return attraction, expected
