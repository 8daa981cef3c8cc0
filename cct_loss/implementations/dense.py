"""``impl="dense"``: both terms of every query from full matrices, in one autograd function.

Dense computes a :class:`ContrastiveProblem` in one autograd function with closed-form
gradients, so that no operator of autograd's own graph runs between the embeddings and the loss:
every operator costs a kernel launch on a GPU, and microseconds on a CPU, whatever its size,
which is what a small batch's step is made of. Two functions share the maths:

* :func:`one_pass` (:class:`_DenseLoss`): the reduced loss of a call on one process (``"mean"``
  or ``"sum"``, no diagnostics). It prepares the raw embeddings itself and computes the loss's
  gradient in the forward pass, as Liger-Kernel's fused losses do: a scalar loss's gradient is
  the upstream gradient times a fixed vector, so the forward pass computes that vector and the
  backward pass only scales it. Between the passes it keeps ``(Q + K) x D`` gradients rather
  than ``Q x K`` weights.
* :func:`expectations` (:class:`_DenseTerms`): each query's two terms, for the diagnostics,
  ``reduction="none"`` and training across processes, with a backward pass from the upstream
  gradient of every query.

Each side is one of two kinds:

* **pairs**: each query against its own few keys, ``(V, N, D)`` queries against ``(W, N, D)``
  keys (the other views of its row, or ``M`` given positives). With one positive per query its
  weight is exactly 1 and no softmax is formed; in a two-view batch the two queries of a row
  share one cost, computed once;
* **shared**: a softmax over shared ``(K, D)`` keys (the negatives of every call shape, and
  the positives drawn by label) or over each query's own ``(Q, K, D)`` keys. The logits come
  from one matrix product without ``|q|^2`` (a per-query constant the softmax ignores); keys
  that sit out are filled with ``-inf`` in place, through a strided view of the own-row entries
  or a mask from the labels. With detached weights the expected cost comes from the weights'
  moments ``|q|^2 + pi |n|^2 - 2 q.(pi n)``, where ``pi n`` is what the gradient needs anyway,
  and no ``(Q, K)`` cost matrix is formed.

Gradients, with ``s = +t_pos`` for the positives and ``-t_neg`` for the negatives:
``dE/dd_k = pi_k`` (detached weights) or ``pi_k (1 + s (d_k - E))``, pulled back to the
embeddings in closed form. A backward pass that must itself be differentiable
(``create_graph=True``) differentiates the formula (:func:`_formula`) in plain autograd instead.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..maths.costs import (
    Preparation,
    WeightTerm,
    cost_block,
    cost_matrix,
    cost_vjp,
    differentiable_vjp,
    expected_cost_of_moments,
    per_row,
    prepare,
    prepare_rows,
    prepare_rows_vjp,
    shifted_logits,
    weights_vjp,
)
from ..maths.expectation import (
    ConditionalExpectation,
    expected_cost_formula,
    weight_statistics,
)
from ..maths.precision import backward_in_own_precision, cast, product, squared_norms, wide
from ..maths.reduction import divisors
from ..options import CCTOptions
from ..problem.description import ContrastiveProblem, OwnRows
from ..shortcuts import apply, eager_twin

NONE, PAIRS, SHARED = "none", "pairs", "shared"

#: An upstream gradient of a side's per-query values: ``(Q,)``, or one value for every query (the
#: reduced loss's share of each query).
Grad = Tensor | float


class Plan(NamedTuple):
    """The static description of a call (the same for every call of its signature).

    Attributes:
        cost, detach: ``cost`` and ``detach_weights``.
        positives: :data:`NONE`, :data:`PAIRS` (each query's own keys) or :data:`SHARED` (drawn
            from the keys by label, through ``pos_excluded``).
        negatives: :data:`NONE` or :data:`SHARED` (every key but those ``neg_excluded`` marks
            or, with ``exclude_own``, the own-row keys of ``rows``).
        rows: the batch's block layout (own-row positives, and the keys the negatives skip).
        exclude_own: the negatives skip the own-row keys of ``rows``.
        labelled: a side is drawn from the keys by label (the call has label masks).
        pos_may_be_empty, neg_may_be_empty: a query may have no such key (labels).
        keep_pos_costs, keep_neg_costs: a shared side keeps its cost matrix (diagnostics,
            gradients through the weights, a tensor sharpness, per-query keys); otherwise it
            works from the weights' moments.
    """

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


class _Inputs(NamedTuple):
    """The embeddings of a call, its label masks, its sharpness and its plan."""

    query: Tensor
    keys: Tensor | None  # None: the keys are the queries
    fixed: Tensor | None  # (Q, M, D) given positives
    pos_excluded: Tensor | None
    neg_excluded: Tensor | None
    t_pos: float | Tensor
    t_neg: float | Tensor
    plan: Plan

    @property
    def shared(self) -> Tensor:
        return self.query if self.keys is None else self.keys


class _SideResult(NamedTuple):
    """A side's forward result, and what its gradient needs (``None`` where it has none).

    Attributes:
        value: ``(Q,)`` expected cost, or ``(N,)`` when each value serves ``copies`` queries
            (a 0-dim sum where only the total was asked for).
        weights: ``(Q, K)`` shared or per query; ``(V, W, N)`` pairs.
        costs: the weights' costs, when kept.
        moments: ``(Q, D)`` ``weights @ keys`` of a shared side computed from moments.
        difference: ``a - b`` of one positive per query (sqeuclidean), the gradient's own term.
        operands: ``(a, b)`` of one positive per query, for a gradient in the same pass.
        copies: how many queries each value serves (2: a two-view batch's rows).
    """

    value: Tensor | None = None
    weights: Tensor | None = None
    costs: Tensor | None = None
    moments: Tensor | None = None
    difference: Tensor | None = None
    operands: tuple[Tensor, Tensor] | None = None
    copies: int = 1


def _pairs(inputs: _Inputs) -> tuple[Tensor, Tensor, bool]:
    """``(V, N, D)`` queries and ``(W, N, D)`` keys of the pairs side (key ``[w, i]`` belongs
    to every query ``[v, i]``), and whether key ``[v, i]`` is query ``[v, i]`` itself."""
    query, fixed, rows = inputs.query, inputs.fixed, inputs.plan.rows
    if fixed is not None:
        return query.unsqueeze(0), fixed.transpose(0, 1), False
    assert rows is not None
    queries = query.view(rows.query_views, rows.rows, -1)
    return queries, rows.own_keys(inputs.shared), rows.includes_self


def _one_positive(inputs: _Inputs) -> tuple[Tensor, Tensor, int] | None:
    """``(a, b, copies)`` when every query has exactly one positive: ``c(a_i, b_i)`` is the
    attraction of ``copies`` queries (2: the two views of row ``i`` of a two-view batch on one
    process, which share it; 1: a query and its positive); ``None`` when there are several."""
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


def _one_forward(a: Tensor, b: Tensor, copies: int, cost: str, total: bool) -> _SideResult:
    """``c(a_i, b_i)`` for each row: ``|a - b|^2`` from the difference itself (exact, and the
    gradient's own term) or ``1 - a.b`` (unit vectors), in the accumulation dtype; ``total``:
    their sum alone."""
    acc = wide(a.dtype)
    wide_a, wide_b = cast(a, acc), cast(b, acc)
    if cost == "cosine":
        if total:
            value = (wide_a * wide_b).sum().neg_().add_(float(a.shape[0]))
        else:
            value = torch.linalg.vecdot(wide_a, wide_b).neg_().add_(1.0)
        return _SideResult(value, operands=(a, b), copies=copies)
    difference = wide_a - wide_b
    if total:
        value = (difference * difference).sum()
    else:
        value = torch.linalg.vecdot(difference, difference)
    return _SideResult(value, difference=difference, operands=(a, b), copies=copies)


def _pairs_forward(inputs: _Inputs, *, total: bool) -> _SideResult:
    """Each query against its own few keys (the weights over ``w``, ``(V, W, N)``)."""
    plan = inputs.plan
    one = _one_positive(inputs)
    if one is not None:
        return _one_forward(*one, plan.cost, total)
    queries, keys, exclude_self = _pairs(inputs)
    acc = wide(queries.dtype)
    q, k = cast(queries, acc).unsqueeze(1), cast(keys, acc).unsqueeze(0)
    if plan.cost == "cosine":
        costs = torch.linalg.vecdot(q, k).neg_().add_(1.0)  # (V, W, N)
    else:
        difference = q - k
        costs = torch.linalg.vecdot(difference, difference)
    logits = costs * inputs.t_pos
    if exclude_self:
        logits.diagonal(dim1=0, dim2=1).fill_(float("-inf"))
    weights = torch.softmax(logits, dim=1)
    value = (weights * costs).sum(1).reshape(-1)  # (V * N,): the queries' order
    return _SideResult(value, weights, costs)


def _pairs_backward(
    inputs: _Inputs, side: _SideResult, grad: Grad, need_keys: bool
) -> tuple[Tensor, Tensor | None]:
    """The pairs side's gradient for the queries ``(Q, D)`` and, where ``need_keys``, their
    keys (shaped like the given positives, or ``(K, D)`` own-row keys; ``None`` where a
    two-view batch's keys are the queries and their gradient is in the first)."""
    plan = inputs.plan
    acc = wide(inputs.query.dtype)
    one = _one_positive(inputs) if side.operands is None else (*side.operands, side.copies)
    if one is not None:
        a, b, copies = one
        g = grad
        if isinstance(g, Tensor) and g.dim() == 1:  # per query: a row's two queries add up
            g = (g.view(2, -1).sum(0) if copies == 2 else g)[:, None]
        elif copies == 2:
            g = g * 2.0
        if plan.cost == "cosine":
            grad_a = cast(b, acc) * -g
            grad_b = cast(a, acc) * -g if need_keys or copies == 2 else None
        else:
            difference = side.difference
            if difference is None:
                difference = cast(a, acc) - cast(b, acc)
            grad_a = difference * (g * 2.0)
            grad_b = grad_a.neg() if need_keys or copies == 2 else None
        if copies == 2:
            assert grad_b is not None
            return torch.cat([grad_a, grad_b]), None
        if grad_b is None:
            return grad_a, None
        fixed = inputs.fixed
        if fixed is not None:
            return grad_a, grad_b if fixed.dim() == 2 else grad_b.unsqueeze(1)
        return grad_a, _keys_grad(inputs, grad_b.unsqueeze(0))
    queries, keys, _ = _pairs(inputs)
    num_views, rows = queries.shape[:2]
    if isinstance(grad, Tensor) and grad.dim() == 1:
        grad = grad.view(num_views, 1, rows)
    expected = None if side.value is None else side.value.view(num_views, 1, rows)
    g = _grad_of_costs(side, grad, expected, inputs.t_pos, plan.detach).unsqueeze(-1)
    q, k = cast(queries, acc).unsqueeze(1), cast(keys, acc).unsqueeze(0)
    if plan.cost == "cosine":
        grad_q, grad_k = (g * k).sum(1).neg_(), (g * q).sum(0).neg_() if need_keys else None
    else:
        toward = (q - k).mul_(g * 2.0)  # d/dq of g |q - k|^2, for each pair
        grad_q, grad_k = toward.sum(1), toward.sum(0).neg_() if need_keys else None
    grad_q = grad_q.reshape(inputs.query.shape)
    return grad_q, None if grad_k is None else _keys_grad(inputs, grad_k)


def _keys_grad(inputs: _Inputs, grad_own: Tensor) -> Tensor:
    """The gradient of the pairs' keys from that of their ``(W, N, D)`` view: ``(Q, M, D)``
    given positives, or ``(K, D)`` own-row keys."""
    if inputs.fixed is not None:
        return grad_own.transpose(0, 1)
    rows = inputs.plan.rows
    assert rows is not None
    if rows.covers(inputs.shared.shape[0]):
        return grad_own.reshape(inputs.shared.shape)  # the own rows are all the keys, in order
    full = grad_own.new_zeros(inputs.shared.shape)
    rows.own_keys(full).copy_(grad_own)
    return full


def _shared_forward(
    inputs: _Inputs,
    positives: bool,
    query_sq: Tensor | None,
    keys_sq: Tensor | None,
    costs: Tensor | None,
) -> _SideResult:
    """A softmax over the shared (or per-query) keys: the weights and the expected cost.
    ``costs``: the cost matrix when both sides share one (labels)."""
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
        return _SideResult(torch.linalg.vecdot(weights, costs), weights, costs if keep else None)
    moments = product(weights, keys, keys.dtype)  # (Q, D), also the gradient's
    value = expected_cost_of_moments(
        weights,
        moments,
        query,
        plan.cost,
        query_sq=query_sq,
        keys_sq=keys_sq,
        rows_sum_to_one=not may_be_empty,
    )
    return _SideResult(value, weights, None, moments)


def _grad_of_costs(
    side: _SideResult, grad: Grad, expected: Tensor | None, signed: float | Tensor, detach: bool
) -> Tensor:
    """``g dE/dd``: ``g pi`` (detached weights) or ``g pi (1 + s (d - E))``, a fresh tensor;
    ``grad`` and ``expected`` broadcast against the weights."""
    assert side.weights is not None
    if detach:
        return side.weights * grad
    assert side.costs is not None and expected is not None
    return (side.costs - expected).mul_(signed).add_(1.0).mul_(side.weights).mul_(grad)


def _forward(inputs: _Inputs, *, totals: bool = False) -> tuple[_SideResult, _SideResult]:
    """Both sides' forward results; ``totals``: one positive per query gives the sum of its
    costs alone (all a reduced loss needs)."""
    query, keys, plan = inputs.query, inputs.keys, inputs.plan
    shared = inputs.shared
    keys_sq = query_sq = None
    if plan.cost != "cosine" and SHARED in (plan.negatives, plan.positives):
        query_sq = squared_norms(query)
        if shared.dim() == 2:
            keys_sq = query_sq if keys is None else squared_norms(shared)
    pos = neg = _SideResult()
    if plan.positives == PAIRS:
        pos = _pairs_forward(inputs, total=totals)
    # Both sides over the same keys (labels): one cost matrix serves both softmaxes.
    both = None
    if plan.positives == SHARED and plan.negatives == SHARED:
        both = cost_block(query, query_sq, shared, plan.cost, keys_sq=keys_sq)
    if plan.positives == SHARED:
        pos = _shared_forward(inputs, True, query_sq, keys_sq, both)
    if plan.negatives == SHARED:
        neg = _shared_forward(inputs, False, query_sq, keys_sq, both)
    return pos, neg


def _input_grads(
    inputs: _Inputs,
    pos: _SideResult,
    neg: _SideResult,
    grads: tuple[Grad | None, Grad | None],
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of ``sum_q grad_pos_q A_q + grad_neg_q E_q`` for the query, the keys and
    the given positives (``needs`` says which), in the accumulation dtype. A ``grad`` is per
    query, one value for every query, or ``None`` (that side does not count)."""
    query, keys, fixed, plan = inputs.query, inputs.keys, inputs.fixed, inputs.plan
    shared = inputs.shared
    need_keys = keys is None or needs[1]  # in-batch the keys' gradient is the queries'
    grad_query = grad_keys = grad_fixed = None
    grad_pos, grad_neg = grads
    if grad_pos is not None and plan.positives == PAIRS:
        need_own = needs[2] if fixed is not None else need_keys
        grad_query, grad_own = _pairs_backward(inputs, pos, grad_pos, need_own)
        if fixed is not None:
            grad_fixed = grad_own
        else:
            grad_keys = grad_own
    # The shared softmaxes: detached ones over (K, D) keys together (one pass over the keys for
    # both sides with labels, from the forward pass's moments where it has them); the others
    # each from its costs.
    detached: list[WeightTerm] = []
    for side, grad, signed, kind, may_be_empty in (
        (pos, grad_pos, inputs.t_pos, plan.positives, plan.pos_may_be_empty),
        (neg, grad_neg, -inputs.t_neg, plan.negatives, plan.neg_may_be_empty),
    ):
        if grad is None or kind != SHARED:
            continue
        if plan.detach and shared.dim() == 2:
            assert side.weights is not None
            detached.append(WeightTerm(side.weights, grad, side.moments, not may_be_empty))
            continue
        expected = None if side.value is None else side.value[:, None]
        grad_costs = _grad_of_costs(side, per_row(grad), expected, signed, plan.detach)
        grad_q, grad_k = cost_vjp(grad_costs, query, shared, plan.cost, need_keys=need_keys)
        grad_query, grad_keys = _add(grad_query, grad_q), _add(grad_keys, grad_k)
    if detached:
        grad_q, grad_k = weights_vjp(
            detached, query, shared, plan.cost, need_keys=need_keys, keys_are_queries=keys is None
        )
        grad_query, grad_keys = _add(grad_query, grad_q), _add(grad_keys, grad_k)
    if keys is None:
        grad_query, grad_keys = _add(grad_query, grad_keys), None
    return (
        grad_query if needs[0] else None,
        grad_keys if needs[1] else None,
        grad_fixed if needs[2] else None,
    )


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _formula(inputs: _Inputs) -> tuple[Tensor | None, Tensor | None]:
    """``(A, E)`` per query in plain, twice-differentiable autograd: the formula the closed-form
    gradients stand for."""
    query, plan = inputs.query, inputs.plan
    shared = inputs.shared
    attraction = expected = None
    if plan.positives == PAIRS:
        fixed = inputs.fixed
        if fixed is None:
            assert plan.rows is not None
            fixed = plan.rows.fixed_positives(shared)
        elif fixed.dim() == 2:
            fixed = fixed.unsqueeze(1)
        costs = cost_matrix(query, fixed, plan.cost)
        logits = (costs.detach() if plan.detach else costs) * inputs.t_pos
        attraction = (torch.softmax(logits, dim=-1) * costs).sum(-1)
    elif plan.positives == SHARED:
        attraction = expected_cost_formula(
            query,
            shared,
            inputs.pos_excluded,
            cost=plan.cost,
            signed=inputs.t_pos,
            detach_weights=plan.detach,
        )
    if plan.negatives == SHARED:
        excluded = inputs.neg_excluded
        if plan.exclude_own:
            assert plan.rows is not None
            excluded = query.new_zeros((query.shape[0], shared.shape[0]), dtype=torch.bool)
            plan.rows.entries(excluded).fill_(True)
        expected = expected_cost_formula(
            query,
            shared,
            excluded,
            cost=plan.cost,
            signed=-inputs.t_neg,
            detach_weights=plan.detach,
        )
    return attraction, expected


def _flags(inputs: _Inputs) -> tuple[Tensor | None, Tensor | None]:
    """Which queries have positives and negatives (``None``: every query)."""
    plan = inputs.plan
    pos, neg = inputs.pos_excluded, inputs.neg_excluded
    return (
        None if pos is None or not plan.pos_may_be_empty else ~pos.all(-1),
        None if neg is None or not plan.neg_may_be_empty else ~neg.all(-1),
    )


def _shares(
    plan: Plan,
    options: CCTOptions,
    num_queries: int,
    flags: tuple[Tensor | None, Tensor | None] = (None, None),
) -> tuple[Grad | None, Grad | None]:
    """Each query's share of the reduced loss in ``A`` and in ``E`` (repulsion is ``-E``), from
    the one reduction's divisors (:func:`cct_loss.maths.reduction.divisors`); ``flags``: which
    queries have each term, where labels decide it."""
    divide = divisors(options, num_queries, *flags)
    grad_pos = None if plan.positives == NONE else options.alpha / divide.attraction
    grad_neg = None if plan.negatives == NONE else -options.beta / divide.repulsion
    return grad_pos, grad_neg


def _reduced(pos: _SideResult, neg: _SideResult, grads: tuple[Grad | None, Grad | None]) -> Tensor:
    """``sum_q A_q grad_pos + sum_q E_q grad_neg``, the reduced loss (a value that serves a
    row's two queries counts for both, as in the pairs side's gradient)."""
    loss: Tensor | None = None
    for side, grad in ((pos, grads[0]), (neg, grads[1])):
        if grad is None:
            continue
        assert side.value is not None
        weight = grad * side.copies if side.copies > 1 else grad
        total = side.value if side.value.dim() == 0 else side.value.sum()  # a fresh tensor
        if loss is None:
            loss = total.mul_(weight)
        elif isinstance(weight, Tensor):  # a count: out of place (vmap batches it)
            loss = loss + total * weight
        else:
            loss.add_(total, alpha=weight)
    assert loss is not None
    return loss


def plan_of(problem: ContrastiveProblem, options: CCTOptions) -> Plan:
    """The :class:`Plan` of ``problem``."""
    positives, negatives = problem.positives, problem.negatives
    details = bool(options.return_details)
    keep = details or not options.detach_weights
    rows, pos_kind = None, NONE
    if isinstance(positives, Tensor):
        pos_kind = PAIRS
    elif positives is not None:
        pos_kind = PAIRS if positives.own_rows_only else SHARED
        rows = positives.rows if positives.own_rows_only else None
    exclude_own = negatives is not None and not negatives.labelled and negatives.rows is not None
    if exclude_own:
        assert negatives is not None
        rows = negatives.rows
    per_query = problem.key_rows.dim() == 3
    return Plan(
        cost=options.cost,
        detach=options.detach_weights,
        positives=pos_kind,
        negatives=NONE if negatives is None else SHARED,
        rows=rows,
        exclude_own=exclude_own,
        labelled=(pos_kind == SHARED) or (negatives is not None and negatives.labelled),
        pos_may_be_empty=not isinstance(positives, Tensor)
        and positives is not None
        and positives.may_be_empty,
        neg_may_be_empty=negatives is not None and negatives.may_be_empty,
        keep_pos_costs=keep or isinstance(options.t_pos, Tensor),
        keep_neg_costs=keep or per_query or isinstance(options.t_neg, Tensor),
    )


def _inputs(problem: ContrastiveProblem, options: CCTOptions, plan: Plan) -> _Inputs:
    """Either autograd function's inputs: the problem's tensors, its label masks (one
    comparison of the labels when both sides compare the same ones), the sharpness, the plan."""
    pos, neg = problem.positives, problem.negatives
    fixed = pos if isinstance(pos, Tensor) else None
    if not plan.labelled:
        return _Inputs(
            problem.query, problem.keys, fixed, None, None, options.t_pos, options.t_neg, plan
        )
    pos_set = None if isinstance(pos, Tensor) or pos is None or not pos.labelled else pos
    neg_set = neg if neg is not None and neg.labelled else None
    num_keys, device = problem.num_keys, problem.query.device
    if (
        pos_set is not None
        and neg_set is not None
        and pos_set.query_groups is neg_set.query_groups
        and pos_set.key_groups is neg_set.key_groups
    ):
        same = neg_set.excluded_mask(num_keys, device)  # a negative sits out where labels agree
        assert same is not None
        pos_excluded: Tensor | None = ~same
        neg_excluded: Tensor | None = same
        assert pos_excluded is not None
        if pos_set.excludes_self:
            assert pos_set.rows is not None
            pos_set.rows.entries(pos_excluded).diagonal(dim1=0, dim2=1).fill_(True)
    else:
        pos_excluded = None if pos_set is None else pos_set.excluded_mask(num_keys, device)
        neg_excluded = None if neg_set is None else neg_set.excluded_mask(num_keys, device)
    return _Inputs(
        problem.query,
        problem.keys,
        fixed,
        pos_excluded,
        neg_excluded,
        options.t_pos,
        options.t_neg,
        plan,
    )


@eager_twin
class _DenseTerms(torch.autograd.Function):
    """Each query's attraction ``A`` and expected negative cost ``E`` on prepared embeddings,
    and, not differentiable, each side's weights, costs and moments (``None`` where absent).
    ``setup_context`` and ``generate_vmap_rule`` make it work under ``torch.func``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        query: Tensor,
        keys: Tensor | None,
        fixed: Tensor | None,
        pos_excluded: Tensor | None,
        neg_excluded: Tensor | None,
        t_pos: float | Tensor,
        t_neg: float | Tensor,
        plan: Plan,
    ) -> tuple[Tensor | None, ...]:
        inputs = _Inputs(query, keys, fixed, pos_excluded, neg_excluded, t_pos, t_neg, plan)
        pos, neg = _forward(inputs)
        pos_value = pos.value
        if pos.copies > 1 and pos_value is not None:
            pos_value = pos_value.repeat(pos.copies)  # each row's cost, for its queries
        # One tensor is one output: with both sides over one cost matrix, it is the positives'.
        neg_costs = None if neg.costs is pos.costs else neg.costs
        rest = (pos.weights, neg.weights, pos.costs, neg_costs, pos.moments, neg.moments)
        return pos_value, neg.value, pos.difference, *rest

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor | None, ...]) -> None:
        plan: Plan = inputs[7]
        pos_value, neg_value, *rest = output
        # The values are needed back only through the weights; saving an output costs
        # operators even when it is not used.
        values = (None, None) if plan.detach else (pos_value, neg_value)
        ctx.save_for_backward(*inputs[:5], *values, *rest)
        ctx.settings = inputs[5:]
        ctx.mark_non_differentiable(*(x for x in rest if x is not None))
        ctx.set_materialize_grads(False)  # no zero-filled gradients for unused outputs

    @staticmethod
    @backward_in_own_precision
    def backward(ctx: Any, grad_pos: Tensor | None, grad_neg: Tensor | None, *_: Any) -> Any:
        saved = ctx.saved_tensors
        inputs = _Inputs(*saved[:5], *ctx.settings)
        pos_value, neg_value, difference, pos_w, neg_w, pos_c, neg_c, pos_m, neg_m = saved[5:]
        needs = ctx.needs_input_grad[:3]
        nones = (None,) * 5
        if grad_pos is None and grad_neg is None:
            return None, None, None, *nones
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            return (*_differentiable(inputs, (grad_pos, grad_neg), needs), *nones)
        plan = inputs.plan
        if neg_c is None and plan.positives == SHARED and plan.negatives == SHARED:
            neg_c = pos_c  # both sides over one cost matrix
        pos = _SideResult(pos_value, pos_w, pos_c, pos_m, difference)
        neg = _SideResult(neg_value, neg_w, neg_c, neg_m)
        grads = _input_grads(inputs, pos, neg, (grad_pos, grad_neg), needs)
        raw = (inputs.query, inputs.keys, inputs.fixed)
        return (
            *(
                None if g is None or x is None else cast(g, x.dtype)
                for g, x in zip(grads, raw, strict=True)
            ),
            *nones,
        )


def _differentiable(
    inputs: _Inputs, cotangents: tuple[Tensor | None, ...], needs: tuple[bool, ...]
) -> list[Tensor | None]:
    """:class:`_DenseTerms`'s vector-Jacobian product, recorded by autograd."""

    def formula(q: Tensor, k: Tensor | None, f: Tensor | None) -> tuple[Tensor | None, ...]:
        return _formula(inputs._replace(query=q, keys=k, fixed=f))

    return differentiable_vjp(formula, [inputs.query, inputs.keys, inputs.fixed], cotangents, needs)


@eager_twin
class _DenseLoss(torch.autograd.Function):
    """The reduced loss of a call on raw embeddings, its gradient computed in the forward pass
    (see the module docs): the forward pass prepares the embeddings, computes both terms, their
    reduction and, where an input needs one (``needs``), its gradient; the backward pass scales
    that by the upstream gradient. ``setup_context`` and ``generate_vmap_rule`` make it work
    under ``torch.func``."""

    generate_vmap_rule = True
    saved_outputs = True  # the outputs after the loss are its gradients, saved (shortcuts)

    @staticmethod
    def forward(
        query: Tensor,
        keys: Tensor | None,
        fixed: Tensor | None,
        pos_excluded: Tensor | None,
        neg_excluded: Tensor | None,
        t_pos: float | Tensor,
        t_neg: float | Tensor,
        plan: Plan,
        grads: tuple[Grad | None, Grad | None],
        preparation: Preparation,
        needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, ...]:
        raw = (query, keys, fixed)
        prepared = [None if x is None else prepare_rows(x, preparation) for x in raw]
        ready = [None if p is None else p[0] for p in prepared]
        assert ready[0] is not None
        inputs = _Inputs(
            ready[0], ready[1], ready[2], pos_excluded, neg_excluded, t_pos, t_neg, plan
        )
        pos, neg = _forward(inputs, totals=True)
        loss = _reduced(pos, neg, grads)
        if not any(needs):
            return loss, None, None, None
        found = _input_grads(inputs, pos, neg, grads, needs)
        return loss, *(
            None if g is None or p is None or x is None else prepare_rows_vjp(g, p[1], p[2], x)
            for g, p, x in zip(found, prepared, raw, strict=True)
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor | None, ...]) -> None:
        grads = output[1:]
        # The inputs come back only for a backward that is itself differentiable.
        ctx.save_for_backward(*grads, *inputs[:5])
        ctx.settings = inputs[5:10]
        ctx.mark_non_differentiable(*(g for g in grads if g is not None))
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Any) -> Any:
        nones = (None,) * 8
        if grad_loss is None:
            return None, None, None, *nones
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            t_pos, t_neg, plan, grads, preparation = ctx.settings
            query, keys, fixed, pos_excluded, neg_excluded = saved[3:]
            inputs = _Inputs(query, keys, fixed, pos_excluded, neg_excluded, t_pos, t_neg, plan)

            def formula(q: Tensor, k: Tensor | None, f: Tensor | None) -> tuple[Tensor]:
                def each(x: Tensor | None) -> Tensor | None:
                    return None if x is None else prepare(x, preparation)

                ready = inputs._replace(query=prepare(q, preparation), keys=each(k), fixed=each(f))
                attraction, expected = _formula(ready)
                pos, neg = _SideResult(attraction), _SideResult(expected)
                return (_reduced(pos, neg, grads),)

            raw = [inputs.query, inputs.keys, inputs.fixed]
            grads = differentiable_vjp(formula, raw, [grad_loss], ctx.needs_input_grad[:3])
            return (*grads, *nones)
        # (A scaling: autocast would leave it alone.)
        return (*(None if g is None else g * grad_loss for g in saved[:3]), *nones)


class OnePass:
    """The static half of a call's one-pass loss: everything but its tensors (and, where no
    label decides them, each query's share of the loss). Every call with the same signature
    (options, shapes, dtypes, devices) has the same one, so it can be kept and replayed
    (:mod:`cct_loss.shortcuts`)."""

    __slots__ = ("options", "plan", "shares")

    def __init__(self, options: CCTOptions, plan: Plan, num_queries: int) -> None:
        self.options, self.plan = options, plan
        self.shares: tuple[Grad | None, Grad | None] | None = None
        if options.constant and not (plan.pos_may_be_empty or plan.neg_may_be_empty):
            self.shares = _shares(plan, options, num_queries)

    def __call__(self, problem: ContrastiveProblem) -> Tensor:
        """The reduced loss of ``problem`` (on raw embeddings), its gradient computed in the
        forward pass where an input needs one."""
        inputs = _inputs(problem, self.options, self.plan)
        needs = (False, False, False)
        if torch.is_grad_enabled():
            query, keys, fixed = inputs.query, inputs.keys, inputs.fixed
            needs = (
                query.requires_grad,
                keys is not None and keys.requires_grad,
                fixed is not None and fixed.requires_grad,
            )
        shares = self.shares
        if shares is None:  # counts of the queries that have each term, or a schedule
            shares = _shares(self.plan, self.options, inputs.query.shape[0], _flags(inputs))
        loss: Tensor = apply(_DenseLoss, *inputs, shares, problem.preparation, needs)[0]
        return loss


def one_pass(problem: ContrastiveProblem, options: CCTOptions) -> OnePass:
    """The reduced loss of a call on one process (``"mean"`` or ``"sum"``, no diagnostics) in
    one autograd function, from raw embeddings: ``one_pass(problem, options)(problem)``."""
    return OnePass(options, plan_of(problem, options), problem.query.shape[0])


def expectations(
    problem: ContrastiveProblem, options: CCTOptions
) -> tuple[ConditionalExpectation | None, ConditionalExpectation | None]:
    """Each side's :class:`ConditionalExpectation` (``None`` for a side the problem does not
    have), with the diagnostics and the weights where asked for: ``(Q, K)`` over shared keys
    (zero where a key sits out), ``(Q, M)`` over a query's own positives (in view order)."""
    problem = problem.prepared()
    plan = plan_of(problem, options)
    inputs = _inputs(problem, options, plan)
    pos_value, neg_value, _, pos_w, neg_w, pos_c, neg_c, *_ = apply(_DenseTerms, *inputs)
    if neg_c is None and plan.positives == SHARED and plan.negatives == SHARED:
        neg_c = pos_c
    details, wants = bool(options.return_details), options.wants_weights
    attract = repel = None
    if plan.positives == PAIRS:
        attract = _pairs_expectation(inputs, pos_value, pos_w, pos_c, details, wants)
    elif plan.positives == SHARED:
        attract = _shared_expectation(pos_value, pos_w, pos_c, inputs.pos_excluded, plan, details)
    if plan.negatives == SHARED:
        excluded = inputs.neg_excluded
        if details and plan.exclude_own:  # the own rows sit out of the extreme cost
            assert plan.rows is not None
            excluded = torch.zeros_like(neg_w, dtype=torch.bool)
            plan.rows.entries(excluded).fill_(True)
        repel = _shared_expectation(neg_value, neg_w, neg_c, excluded, plan, details, False)
    return attract, repel


def _shared_expectation(
    value: Tensor,
    weights: Tensor,
    costs: Tensor | None,
    excluded: Tensor | None,
    plan: Plan,
    details: bool,
    positives: bool = True,
) -> ConditionalExpectation:
    """A shared side's result, with its diagnostics when asked for."""
    may_be_empty = plan.pos_may_be_empty if positives else plan.neg_may_be_empty
    present = ~excluded.all(-1) if may_be_empty and excluded is not None else None
    entropy = extreme = None
    if details:
        assert costs is not None
        entropy, extreme = weight_statistics(
            weights, costs, excluded, "positives" if positives else "negatives"
        )
    return ConditionalExpectation(value, entropy, extreme, weights, present)


def _pairs_expectation(
    inputs: _Inputs,
    value: Tensor,
    weights: Tensor | None,
    costs: Tensor | None,
    details: bool,
    wants: bool,
) -> ConditionalExpectation:
    """The pairs side's result per query: weights ``(Q, M)`` without the query itself (one
    positive: weight 1, entropy 0, its cost the extreme)."""
    if weights is None or costs is None:  # one positive per query
        entropy = extreme = None
        if details:
            extreme, entropy = value.detach().clone(), torch.zeros_like(value).detach()
        ones = value.new_ones((value.shape[0], 1)) if wants else None
        return ConditionalExpectation(value, entropy, extreme, ones)
    _, _, exclude_self = _pairs(inputs)
    num_views = weights.shape[0]

    def per_query(x: Tensor) -> Tensor:
        """``(V, W, N)`` -> ``(V * N, M)``, dropping ``w == v`` when that is the query."""
        rows = x.permute(0, 2, 1)  # (V, N, W)
        if not exclude_self:
            return rows.reshape(-1, x.shape[1])
        kept = [torch.cat([rows[v, :, :v], rows[v, :, v + 1 :]], dim=-1) for v in range(num_views)]
        return torch.cat(kept)

    entropy = extreme = None
    if details:
        entropy, extreme = weight_statistics(
            per_query(weights), per_query(costs), None, "positives"
        )
    return ConditionalExpectation(value, entropy, extreme, per_query(weights) if wants else None)
