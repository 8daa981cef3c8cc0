"""``impl="dense"``: both terms of every query from full matrices, in one autograd function.

A layout describes a call as a :class:`cct_loss.transport.Transport`; :func:`dense_transport`
computes its attraction and repulsion in one :class:`_DenseTransport` with a closed-form
backward pass, so no operator of autograd's own graph runs between the prepared embeddings and
the two terms. That is what keeps a small batch's step near InfoNCE's: every operator costs a
kernel launch on a GPU, and microseconds on a CPU, whatever its size.

Each side (the positives, the negatives) is one of these kinds:

* **shared keys** ``(K, D)``: the negatives of every call shape and the positives drawn by
  label. The logits come from one matrix product, without ``|q|^2`` (a per-query constant the
  softmax ignores); the keys that sit out are filled with ``-inf`` in place, through a strided
  view of the own-row entries (:meth:`cct_loss.transport.OwnRows.entries`) or a mask built from
  the labels. With detached weights ``E`` comes from the weights' moments
  ``|q|^2 + pi |n|^2 - 2 q.(pi n)``, where ``pi n`` is what the backward pass needs anyway: no
  ``(Q, K)`` cost matrix is formed;
* **pairs**: each query against its own few keys (the other views of its row, or fixed
  positives ``(Q, M, D)``), as ``(V, N, D)`` queries against ``(W, N, D)`` keys, by
  multiply-and-sum in float32;
* **one positive** per query (MoCo's key, a two-view batch's other view): its cost alone, with
  no softmax over a single key (whose weight is exactly 1, and gets no gradient);
* **per-query keys** ``(Q, K, D)`` (``negatives`` of shape ``(N, K, D)``).

Gradients, with ``s = +t_pos`` for the positives and ``-t_neg`` for the negatives:

* ``detach_weights=True``: ``dE/dd_k = pi_k``;
* ``detach_weights=False``: ``dE/dd_k = pi_k (1 + s (d_k - E))``,

pulled back to the embeddings in closed form (:func:`cct_loss.costs.cost_vjp`,
:func:`cct_loss.costs.weights_vjp`, and the pairs' own few lines). When autograd records the
backward itself (``create_graph=True``), it differentiates the formula in plain autograd
(:func:`_terms_by_autograd`), so higher-order derivatives are exact. The fastest path while
``Q x K`` fits in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from .costs import (
    cost_block,
    cost_matrix,
    cost_vjp,
    expected_cost_of_moments,
    shifted_logits,
    weights_vjp,
)
from .precision import (
    backward_in_own_precision,
    cache_forward_signature,
    product,
    squared_norms,
    wide,
)
from .transport import (
    ConditionalExpectation,
    Membership,
    OwnRows,
    Transport,
    expected_cost_autograd,
)

if TYPE_CHECKING:
    from .options import CCTOptions, Side

# What a side is (DensePlan.positives, DensePlan.negatives).
NONE = "none"
SHARED = "shared"  # softmax over shared (K, D) keys
PAIRS = "pairs"  # each query against its own few keys
ONE_FIXED = "one fixed"  # a (Q, 1, D) fixed positive per query
TWO_VIEWS = "two views"  # in-batch, two views, one process: the row's other view
PER_QUERY = "per query"  # softmax over each query's own (Q, K, D) keys


class DensePlan(NamedTuple):
    """The static description of one :class:`_DenseTransport` call.

    Attributes:
        cost: ``"sqeuclidean"`` or ``"cosine"``.
        detach: ``detach_weights``.
        positives: the positives' kind (:data:`NONE`, :data:`SHARED` by label through
            ``pos_excluded``, :data:`PAIRS`, :data:`ONE_FIXED`, :data:`TWO_VIEWS`).
        negatives: the negatives' kind (:data:`NONE`, :data:`SHARED`: every key but those
            ``neg_excluded`` or, with ``exclude_own``, the own-row keys of ``rows`` marks;
            :data:`PER_QUERY`).
        rows: the batch's block layout (own-row positives, and the keys the negatives skip).
        exclude_own: the negatives skip the own-row keys of ``rows``.
        pos_may_be_empty, neg_may_be_empty: a query may have no such key (labels).
        keep_pos_costs, keep_neg_costs: a shared side keeps its cost matrix (diagnostics,
            gradients through the weights, a tensor sharpness); else it works from moments.
    """

    cost: str
    detach: bool
    positives: str
    negatives: str
    rows: OwnRows | None = None
    exclude_own: bool = False
    pos_may_be_empty: bool = False
    neg_may_be_empty: bool = False
    keep_pos_costs: bool = False
    keep_neg_costs: bool = False


class _Side(NamedTuple):
    """One side's forward result: the value and what its backward pass needs (``None`` where
    a kind does not have it).

    Attributes:
        value: ``(Q,)`` expected cost.
        weights: ``(Q, K)`` shared or per query; ``(V, W, N)`` pairs.
        costs: the weights' costs (``(N,)`` for one positive), when kept.
        moments: ``(Q, D)`` ``weights @ keys`` of a shared side computed from moments.
    """

    value: Tensor | None = None
    weights: Tensor | None = None
    costs: Tensor | None = None
    moments: Tensor | None = None


def _shared_forward(
    query: Tensor,
    keys: Tensor,
    query_sq: Tensor | None,
    keys_sq: Tensor | None,
    scale: float | Tensor,
    *,
    cost: str,
    excluded: Tensor | None,
    exclude_own: OwnRows | None,
    may_be_empty: bool,
    keep_costs: bool,
) -> _Side:
    """Softmax over shared keys ``(K, D)``: the weights and the expected cost."""
    costs = None
    if keep_costs:
        costs = cost_block(query, query_sq, keys, cost, keys_sq=keys_sq)
        logits = costs * scale
    else:
        assert not isinstance(scale, Tensor)
        logits = shifted_logits(query, keys, cost, scale, keys_sq=keys_sq)
    if exclude_own is not None:
        exclude_own.entries(logits).fill_(float("-inf"))
    if excluded is not None:
        logits.masked_fill_(excluded, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    del logits
    if may_be_empty:  # a row with no key taking part: all -inf gave NaN; it weighs nothing
        weights.nan_to_num_(0.0)
    if costs is not None:
        return _Side(torch.linalg.vecdot(weights, costs), weights, costs)
    moments = product(weights, keys, keys.dtype)  # (Q, D), also the backward's
    value = expected_cost_of_moments(
        weights,
        moments,
        query,
        cost,
        query_sq=query_sq,
        keys_sq=keys_sq,
        rows_sum_to_one=not may_be_empty,
    )
    return _Side(value, weights, None, moments)


def _shared_backward(
    side: _Side,
    grad: Tensor,
    query: Tensor,
    keys: Tensor,
    scale: float | Tensor,
    *,
    cost: str,
    detach: bool,
    may_be_empty: bool,
    need_keys: bool,
) -> tuple[Tensor, Tensor | None]:
    """A shared (or per-query) side's vector-Jacobian product for the queries and the keys."""
    assert side.weights is not None
    if detach and side.moments is not None:  # two products on the weights, no (Q, K) product
        return weights_vjp(
            side.weights,
            grad,
            query,
            keys,
            cost,
            rows_sum_to_one=not may_be_empty,
            need_keys=need_keys,
            weighted_keys=side.moments,
        )
    grad_costs = _grad_of_costs(side, grad[..., None], scale, detach)
    return cost_vjp(grad_costs, query, keys, cost, need_keys=need_keys)


def _grad_of_costs(side: _Side, grad: Tensor, scale: float | Tensor, detach: bool) -> Tensor:
    """``g dE/dd``: ``g pi`` (detached weights) or ``g pi (1 + s (d - E))``, a fresh tensor;
    ``grad`` broadcasts against the weights."""
    assert side.weights is not None
    if detach:
        return side.weights * grad
    assert side.costs is not None and side.value is not None
    expected = side.value.view(grad.shape)
    return (side.costs - expected).mul_(scale).add_(1.0).mul_(side.weights).mul_(grad)


def _pairs_forward(
    queries: Tensor,
    keys: Tensor,
    queries_sq: Tensor | None,
    keys_sq: Tensor | None,
    scale: float | Tensor,
    *,
    cost: str,
    exclude_self: bool,
) -> _Side:
    """Each query against its own few keys: ``(V, N, D)`` queries, ``(W, N, D)`` keys (key
    ``[w, i]`` belongs to every query ``[v, i]``), ``(V, W, N)`` weights over ``w``;
    ``exclude_self``: ``[v, v, i]`` is the query itself and takes no part."""
    costs = _paired_costs(queries.unsqueeze(1), keys.unsqueeze(0), cost)
    if queries_sq is not None and keys_sq is not None:
        costs.add_(queries_sq.unsqueeze(1)).add_(keys_sq.unsqueeze(0))
    costs.clamp_min_(0.0)
    logits = costs * scale
    if exclude_self:
        logits.diagonal(dim1=0, dim2=1).fill_(float("-inf"))
    weights = torch.softmax(logits, dim=1)
    value = (weights * costs).sum(1).reshape(-1)  # (V * N,): the queries' order
    return _Side(value, weights, costs)


def _paired_costs(a: Tensor, b: Tensor, cost: str) -> Tensor:
    """``-2 a.b`` (sqeuclidean, without the squared norms) or ``1 - a.b`` (cosine) along the
    last dim, broadcast, in float32: a fresh tensor."""
    acc = wide(a.dtype)
    gram: Tensor = torch.linalg.vecdot(a.to(acc), b.to(acc))
    return gram.neg_().add_(1.0) if cost == "cosine" else gram.mul_(-2.0)


def _one_positive(
    a: Tensor, b: Tensor, a_sq: Tensor | None, b_sq: Tensor | None, cost: str
) -> Tensor:
    """``(N,)`` costs of ``a[i]`` against ``b[i]`` (each query's single positive)."""
    costs = _paired_costs(a, b, cost)
    if a_sq is not None and b_sq is not None:
        costs.add_(a_sq).add_(b_sq)
    return costs.clamp_min_(0.0)


def _one_positive_backward(
    grad: Tensor, a: Tensor, b: Tensor, cost: str, *, need_b: bool
) -> tuple[Tensor, Tensor | None]:
    """Gradients of ``sum_i grad_i c(a_i, b_i)``: ``2 g (a - b)`` and ``2 g (b - a)``
    (sqeuclidean) or ``-g b`` and ``-g a`` (cosine)."""
    acc = wide(a.dtype)
    g = grad.unsqueeze(-1)
    if cost == "cosine":
        grad_b = None if not need_b else a.to(acc) * g.neg()
        return b.to(acc) * g.neg(), grad_b
    grad_a = (a.to(acc) - b.to(acc)).mul_(g * 2.0)
    return grad_a, (grad_a.neg() if need_b else None)


def _pairs_backward(
    side: _Side,
    grad: Tensor,
    queries: Tensor,
    keys: Tensor,
    scale: float | Tensor,
    *,
    cost: str,
    detach: bool,
    need_keys: bool,
) -> tuple[Tensor, Tensor | None]:
    """The pairs' vector-Jacobian product: ``(V, N, D)`` for the queries, ``(W, N, D)`` for
    the keys (``grad`` is ``(V, N)``)."""
    acc = wide(queries.dtype)
    q, k = queries.to(acc), keys.to(acc)
    g = _grad_of_costs(side, grad.unsqueeze(1), scale, detach).unsqueeze(-1)  # (V, W, N, 1)
    toward_keys = (g * k.unsqueeze(0)).sum(1)
    grad_keys = None
    if cost == "cosine":
        grad_queries = toward_keys.neg_()
        if need_keys:
            grad_keys = (g * q.unsqueeze(1)).sum(0).neg_()
        return grad_queries, grad_keys
    grad_queries = torch.addcmul(toward_keys, g.sum(1), q, value=-1.0).mul_(-2.0)
    if need_keys:
        toward_queries = (g * q.unsqueeze(1)).sum(0)
        grad_keys = torch.addcmul(toward_queries, g.sum(0), k, value=-1.0).mul_(-2.0)
    return grad_queries, grad_keys


def _per_query_forward(
    query: Tensor, keys: Tensor, query_sq: Tensor | None, scale: float | Tensor, *, cost: str
) -> _Side:
    """Softmax over each query's own ``(Q, K, D)`` keys (every key takes part)."""
    costs = cost_block(query, query_sq, keys, cost)
    weights = torch.softmax(costs * scale, dim=-1)
    return _Side(torch.linalg.vecdot(weights, costs), weights, costs)


def _pairs_operands(
    query: Tensor, keys: Tensor, fixed: Tensor | None, rows: OwnRows | None
) -> tuple[Tensor, Tensor]:
    """``(V, N, D)`` queries and ``(W, N, D)`` keys of the pairs side: ``(1, Q, D)`` and
    ``(M, Q, D)`` for fixed positives ``(Q, M, D)``; the own-row keys otherwise."""
    if fixed is not None:
        return query.unsqueeze(0), fixed.transpose(0, 1)
    assert rows is not None
    return query.view(rows.query_views, rows.rows, -1), rows.own_keys(keys)


def _one_positive_operands(
    query: Tensor, fixed: Tensor | None, plan: DensePlan
) -> tuple[Tensor, Tensor]:
    """``(N, D)`` and ``(N, D)``: each cost's two sides (the query and its fixed positive; or,
    in a two-view batch, view 0 and view 1 of each row)."""
    if fixed is not None:
        return query, fixed[:, 0]
    first, second = query.view(2, -1, query.shape[-1]).unbind(0)
    return first, second


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


class _DenseTransport(torch.autograd.Function):
    """The attraction ``A`` and the expected negative cost ``E`` of every query (see the module
    docs); ``keys=None`` means the keys are the queries themselves.

    Returns ``(A, E)`` and, not differentiable, each side's weights, costs and moments
    (``None`` where absent). ``setup_context`` and ``generate_vmap_rule`` make it work under
    ``torch.func`` (``grad``, ``vmap``).
    """

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
        plan: DensePlan,
    ) -> tuple[Tensor | None, ...]:
        shared = query if keys is None else keys
        sqeuclidean = plan.cost != "cosine"
        query_sq = squared_norms(query) if sqeuclidean else None
        keys_sq = None
        if sqeuclidean and shared.dim() == 2:
            keys_sq = query_sq if keys is None else squared_norms(shared)
        pos = neg = _Side()
        if plan.positives in (ONE_FIXED, TWO_VIEWS):
            a, b = _one_positive_operands(query, fixed, plan)
            a_sq = b_sq = None
            if query_sq is not None:
                if fixed is not None:
                    a_sq, b_sq = query_sq, squared_norms(b)
                else:
                    a_sq, b_sq = query_sq.view(2, -1).unbind(0)
            costs = _one_positive(a, b, a_sq, b_sq, plan.cost)
            pos = _Side(costs if fixed is not None else costs.repeat(2))
        elif plan.positives == PAIRS:
            queries, own = _pairs_operands(query, shared, fixed, plan.rows)
            queries_sq = own_sq = None
            if query_sq is not None:
                if fixed is not None:
                    queries_sq, own_sq = query_sq.unsqueeze(0), squared_norms(own)
                else:
                    assert plan.rows is not None and keys_sq is not None
                    queries_sq = query_sq.view(plan.rows.query_views, -1)
                    own_sq = plan.rows.own_keys(keys_sq)
            pos = _pairs_forward(
                queries,
                own,
                queries_sq,
                own_sq,
                t_pos,
                cost=plan.cost,
                exclude_self=fixed is None and plan.rows is not None and plan.rows.includes_self,
            )
        elif plan.positives == SHARED:
            pos = _shared_forward(
                query,
                shared,
                query_sq,
                keys_sq,
                t_pos,
                cost=plan.cost,
                excluded=pos_excluded,
                exclude_own=None,
                may_be_empty=plan.pos_may_be_empty,
                keep_costs=plan.keep_pos_costs,
            )
        if plan.negatives == SHARED:
            neg = _shared_forward(
                query,
                shared,
                query_sq,
                keys_sq,
                -t_neg,
                cost=plan.cost,
                excluded=neg_excluded,
                exclude_own=plan.rows if plan.exclude_own else None,
                may_be_empty=plan.neg_may_be_empty,
                keep_costs=plan.keep_neg_costs,
            )
        elif plan.negatives == PER_QUERY:
            neg = _per_query_forward(query, shared, query_sq, -t_neg, cost=plan.cost)
        return (
            pos.value,
            neg.value,
            pos.weights,
            neg.weights,
            pos.costs,
            neg.costs,
            pos.moments,
            neg.moments,
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor | None, ...]) -> None:
        query, keys, fixed, pos_excluded, neg_excluded, t_pos, t_neg, plan = inputs
        pos_value, neg_value, *rest = output
        # The values are needed back only for gradients through the weights; saving an output
        # of the function costs operators even when it is not used.
        values = (None, None) if plan.detach else (pos_value, neg_value)
        ctx.save_for_backward(query, keys, fixed, pos_excluded, neg_excluded, *values, *rest)
        ctx.settings = (t_pos, t_neg, plan)
        ctx.mark_non_differentiable(*(x for x in rest if x is not None))
        # No zero-filled gradients for an unused value (or the non-differentiable outputs).
        ctx.set_materialize_grads(False)

    @staticmethod
    @backward_in_own_precision
    def backward(ctx: Any, grad_pos: Tensor | None, grad_neg: Tensor | None, *_: Any) -> Any:
        query, keys, fixed, _pos_excluded, _neg_excluded, pos_value, neg_value, *rest = (
            ctx.saved_tensors
        )
        pos_weights, neg_weights, pos_costs, neg_costs, pos_moments, neg_moments = rest
        t_pos, t_neg, plan = ctx.settings
        nones = (None,) * 5
        if grad_pos is None and grad_neg is None:
            return None, None, None, *nones
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            return (*_differentiable_backward(ctx, grad_pos, grad_neg), *nones)
        pos = _Side(pos_value, pos_weights, pos_costs, pos_moments)
        neg = _Side(neg_value, neg_weights, neg_costs, neg_moments)
        shared = query if keys is None else keys
        # In-batch, the keys are the queries: their gradient is part of the queries'.
        need_keys = keys is None or ctx.needs_input_grad[1]
        grad_query = grad_keys = grad_fixed = None
        if grad_pos is not None and plan.positives in (ONE_FIXED, TWO_VIEWS):
            a, b = _one_positive_operands(query, fixed, plan)
            if fixed is not None:
                grad_query, grad_b = _one_positive_backward(
                    grad_pos, a, b, plan.cost, need_b=ctx.needs_input_grad[2]
                )
                grad_fixed = None if grad_b is None else grad_b.unsqueeze(1)
            else:  # both views' queries share the row's one cost
                grad_a, grad_b = _one_positive_backward(
                    grad_pos.view(2, -1).sum(0), a, b, plan.cost, need_b=True
                )
                assert grad_b is not None
                grad_query = torch.cat([grad_a, grad_b])
        elif grad_pos is not None and plan.positives == PAIRS:
            queries, own = _pairs_operands(query, shared, fixed, plan.rows)
            need_own = ctx.needs_input_grad[2] if fixed is not None else need_keys
            grad_queries, grad_own = _pairs_backward(
                pos,
                grad_pos.view(queries.shape[:2]),
                queries,
                own,
                t_pos,
                cost=plan.cost,
                detach=plan.detach,
                need_keys=need_own,
            )
            grad_query = grad_queries.reshape(query.shape)
            if fixed is not None:
                grad_fixed = None if grad_own is None else grad_own.transpose(0, 1)
            elif grad_own is not None:
                assert plan.rows is not None
                grad_keys = _scatter_own(grad_own, plan.rows, shared)
        elif grad_pos is not None and plan.positives == SHARED:
            grad_query, grad_keys = _shared_backward(
                pos,
                grad_pos,
                query,
                shared,
                t_pos,
                cost=plan.cost,
                detach=plan.detach,
                may_be_empty=plan.pos_may_be_empty,
                need_keys=need_keys,
            )
        if grad_neg is not None and plan.negatives != NONE:
            grad_q, grad_k = _shared_backward(
                neg,
                grad_neg,
                query,
                shared,
                -t_neg,
                cost=plan.cost,
                detach=plan.detach,
                may_be_empty=plan.neg_may_be_empty,
                need_keys=need_keys,
            )
            grad_query, grad_keys = _add(grad_query, grad_q), _add(grad_keys, grad_k)
        if keys is None:
            grad_query, grad_keys = _add(grad_query, grad_keys), None
        return (
            _as_grad(grad_query, query, ctx.needs_input_grad[0]),
            _as_grad(grad_keys, keys, ctx.needs_input_grad[1]),
            _as_grad(grad_fixed, fixed, ctx.needs_input_grad[2]),
            *nones,
        )


cache_forward_signature(_DenseTransport)


def _as_grad(grad: Tensor | None, like: Tensor | None, needed: bool) -> Tensor | None:
    """A gradient in its input's dtype (the products' dtype), or ``None`` where not needed."""
    if grad is None or like is None or not needed:
        return None
    return grad.to(like.dtype)


def _scatter_own(grad_own: Tensor, rows: OwnRows, keys: Tensor) -> Tensor:
    """The ``(K, D)`` gradient of the keys from that of their own-row view ``(W, N, D)``."""
    if rows.covers(keys.shape[0]):
        return grad_own.reshape(keys.shape)  # the own rows are all the keys, in their order
    full = grad_own.new_zeros(keys.shape)
    rows.own_keys(full).copy_(grad_own)
    return full


def _differentiable_backward(
    ctx: Any, grad_pos: Tensor | None, grad_neg: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The vector-Jacobian product of :func:`_terms_by_autograd`, itself recorded by autograd,
    so that second (and higher) derivatives are exact. It holds the ``(Q, K)`` graph."""
    query, keys, fixed, pos_excluded, neg_excluded = ctx.saved_tensors[:5]
    t_pos, t_neg, plan = ctx.settings
    needs = ctx.needs_input_grad[:3]
    with torch.enable_grad():
        # Fresh nodes: the keys may be computed from the queries (gathered across processes),
        # and the partial derivatives must not follow that path. keys=None stays the queries.
        fresh_query = query.clone()
        fresh_keys = None if keys is None else keys.clone()
        fresh_fixed = None if fixed is None else fixed.clone()
        leaves = [fresh_query, fresh_keys, fresh_fixed]
        values = _terms_by_autograd(
            fresh_query, fresh_keys, fresh_fixed, pos_excluded, neg_excluded, t_pos, t_neg, plan
        )
        outputs, cotangents = [], []
        for value, grad in zip(values, (grad_pos, grad_neg), strict=True):
            if value is not None and grad is not None:
                outputs.append(value)
                cotangents.append(grad)
        wanted = [x for x, need in zip(leaves, needs, strict=True) if need and x is not None]
        if not wanted or not outputs:
            return None, None, None
        found = iter(
            torch.autograd.grad(outputs, wanted, cotangents, create_graph=True, allow_unused=True)
        )
    grads = [
        next(found) if need and x is not None else None
        for x, need in zip(leaves, needs, strict=True)
    ]
    return grads[0], grads[1], grads[2]


def _terms_by_autograd(
    query: Tensor,
    keys: Tensor | None,
    fixed: Tensor | None,
    pos_excluded: Tensor | None,
    neg_excluded: Tensor | None,
    t_pos: float | Tensor,
    t_neg: float | Tensor,
    plan: DensePlan,
) -> tuple[Tensor | None, Tensor | None]:
    """``(A, E)`` of :class:`_DenseTransport` in plain, twice-differentiable autograd: the
    formula its closed-form backward stands for."""
    shared = query if keys is None else keys
    attraction = expected = None
    if plan.positives in (PAIRS, ONE_FIXED, TWO_VIEWS):
        if fixed is None:
            assert plan.rows is not None
            fixed = plan.rows.fixed_positives(shared)
        costs = cost_matrix(query, fixed, plan.cost)
        logits = (costs.detach() if plan.detach else costs) * t_pos
        attraction = (torch.softmax(logits, dim=-1) * costs).sum(-1)
    elif plan.positives == SHARED:
        attraction = expected_cost_autograd(
            query, shared, pos_excluded, cost=plan.cost, scale=t_pos, detach_weights=plan.detach
        )
    if plan.negatives != NONE:
        excluded = neg_excluded
        if plan.exclude_own:
            assert plan.rows is not None
            excluded = query.new_zeros((query.shape[0], shared.shape[0]), dtype=torch.bool)
            plan.rows.entries(excluded).fill_(True)
        expected = expected_cost_autograd(
            query, shared, excluded, cost=plan.cost, scale=-t_neg, detach_weights=plan.detach
        )
    return attraction, expected


def _plan_positives(
    problem: Transport, num_keys: int
) -> tuple[str, Tensor | None, OwnRows | None, Tensor | None]:
    """The positives' kind, fixed positives, own-row layout and exclusion mask."""
    positives = problem.positives
    if positives is None:
        return NONE, None, None, None
    if isinstance(positives, Tensor):
        return (ONE_FIXED if positives.shape[1] == 1 else PAIRS), positives, None, None
    if positives.own_rows_only:
        rows = positives.rows
        assert rows is not None
        two_views = rows.query_views == 2 and rows.includes_self and problem.keys is None
        return (TWO_VIEWS if two_views else PAIRS), None, rows, None
    return SHARED, None, None, positives.excluded_mask(num_keys, problem.query.device)


def dense_transport(
    problem: Transport, options: CCTOptions
) -> tuple[ConditionalExpectation | None, ConditionalExpectation | None]:
    """The attraction and repulsion expectations of a whole call (either may be absent).

    Args:
        problem: the queries, keys, positives and negatives (see
            :class:`cct_loss.transport.Transport`).
        options: cost, sharpness, ``detach_weights``, ``return_details``.

    Returns:
        The positives' and the negatives' :class:`ConditionalExpectation` (``None`` for a side
        the problem does not have). The weights, when asked for: ``(Q, K)`` over shared keys,
        ``(Q, M)`` for a query's own positives (the other views of its row, in view order).
    """
    query = problem.query
    shared = problem.key_rows
    num_keys = shared.shape[-2]
    details = bool(options.return_details)
    through = not options.detach_weights
    positives, fixed, rows, pos_excluded = _plan_positives(problem, num_keys)
    negatives, neg_excluded, exclude_own = NONE, None, False
    neg_members = problem.negatives
    if neg_members is not None:
        if shared.dim() == 3:
            negatives = PER_QUERY
        else:
            negatives = SHARED
            if neg_members.labelled:
                neg_excluded = neg_members.excluded_mask(num_keys, query.device)
            elif neg_members.rows is not None:
                rows, exclude_own = neg_members.rows, True
    plan = DensePlan(
        cost=options.cost,
        detach=options.detach_weights,
        positives=positives,
        negatives=negatives,
        rows=rows,
        exclude_own=exclude_own,
        pos_may_be_empty=isinstance(problem.positives, Membership)
        and problem.positives.may_be_empty,
        neg_may_be_empty=neg_members is not None and neg_members.may_be_empty,
        keep_pos_costs=details or through or isinstance(options.t_pos, Tensor),
        keep_neg_costs=details or through or isinstance(options.t_neg, Tensor),
    )
    pos_value, neg_value, pos_weights, neg_weights, pos_costs, neg_costs, *_ = (
        _DenseTransport.apply(  # type: ignore[no-untyped-call]
            query,
            problem.keys,
            fixed,
            pos_excluded,
            neg_excluded,
            options.t_pos,
            options.t_neg,
            plan,
        )
    )
    attract = repel = None
    if positives in (ONE_FIXED, TWO_VIEWS):
        attract = _one_positive_expectation(pos_value, details, options.wants_weights)
    elif positives == PAIRS:
        exclude_self = fixed is None and rows is not None and rows.includes_self
        pos = _Side(pos_value, pos_weights, pos_costs)
        attract = _pairs_expectation(pos, exclude_self, details, options.wants_weights)
    elif positives == SHARED:
        pos = _Side(pos_value, pos_weights, pos_costs)
        attract = _shared_expectation(pos, pos_excluded, None, "positives", plan, details)
    if negatives != NONE:
        neg = _Side(neg_value, neg_weights, neg_costs)
        exclude = rows if exclude_own else None
        repel = _shared_expectation(neg, neg_excluded, exclude, "negatives", plan, details)
    return attract, repel


def _one_positive_expectation(
    value: Tensor, details: bool, want_weights: bool
) -> ConditionalExpectation:
    """One positive per query: its weight is 1, its weights' entropy 0, its cost the extreme."""
    entropy = extreme = weights = None
    if details:
        with torch.no_grad():
            extreme = value.detach().clone()
            entropy = torch.zeros_like(extreme)
    if want_weights:
        weights = value.new_ones((value.shape[0], 1))
    return ConditionalExpectation(value, entropy, extreme, weights, None)


def _shared_expectation(
    side: _Side,
    excluded: Tensor | None,
    exclude_own: OwnRows | None,
    which: Side,
    plan: DensePlan,
    details: bool,
) -> ConditionalExpectation:
    """A shared (or per-query) side's result, with its diagnostics when asked for."""
    assert side.value is not None and side.weights is not None
    may_be_empty = plan.pos_may_be_empty if which == "positives" else plan.neg_may_be_empty
    present = ~excluded.all(-1) if may_be_empty and excluded is not None else None
    entropy = extreme = None
    if details:
        assert side.costs is not None
        with torch.no_grad():
            entropy = -torch.special.xlogy(side.weights, side.weights).sum(-1)
            farther = which == "positives"
            fill = float("-inf") if farther else float("inf")
            costs = side.costs.clone()
            if excluded is not None:
                costs.masked_fill_(excluded, fill)
            if exclude_own is not None:
                exclude_own.entries(costs).fill_(fill)
            extreme = costs.amax(-1) if farther else costs.amin(-1)
    return ConditionalExpectation(side.value, entropy, extreme, side.weights, present)


def _pairs_expectation(
    side: _Side, exclude_self: bool, details: bool, want_weights: bool
) -> ConditionalExpectation:
    """The pairs side's result per query: weights ``(Q, M)`` (without the query itself), when
    asked for."""
    assert side.value is not None and side.weights is not None and side.costs is not None
    num_views = side.weights.shape[0]

    def per_query(x: Tensor) -> Tensor:
        """``(V, W, N)`` -> ``(V * N, M)``, dropping ``w == v`` when that is the query."""
        rows = x.permute(0, 2, 1)  # (V, N, W)
        if not exclude_self:
            return rows.reshape(-1, x.shape[1])
        kept = [torch.cat([rows[v, :, :v], rows[v, :, v + 1 :]], dim=-1) for v in range(num_views)]
        return torch.cat(kept)

    entropy = extreme = None
    if details:
        with torch.no_grad():
            kept_weights = per_query(side.weights)
            entropy = -torch.special.xlogy(kept_weights, kept_weights).sum(-1)
            extreme = per_query(side.costs).amax(-1)
    weights = per_query(side.weights) if want_weights else None
    return ConditionalExpectation(side.value, entropy, extreme, weights, None)


def dense_expected_cost(
    query: Tensor,
    keys: Tensor,
    members: Membership | None,
    *,
    side: Side,
    options: CCTOptions,
) -> ConditionalExpectation:
    """One side's expected cost (see :class:`cct_loss.transport.ExpectedCostKernel`): the
    :func:`dense_transport` of a problem with that side alone.

    Args:
        query: ``(Q, D)`` prepared queries.
        keys: ``(K, D)`` keys shared by all queries, or ``(Q, K, D)`` per query.
        members: which keys take part for each query (shared keys only), or ``None`` (all).
        side: ``"positives"`` or ``"negatives"``.
        options: cost, sharpness, ``detach_weights``, ``return_details``.

    Returns:
        :class:`ConditionalExpectation` with the weights.
    """
    members = Membership() if members is None else members
    if side == "positives":
        positives: Membership | Tensor = keys if keys.dim() == 3 else members
        attract, _ = dense_transport(Transport(query, keys, positives, None), options)
        assert attract is not None
        return attract
    _, repel = dense_transport(Transport(query, keys, None, members), options)
    assert repel is not None
    return repel
