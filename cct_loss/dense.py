"""``impl="dense"``: both terms of every query from full matrices, each call in one autograd
function.

A layout describes a call as a :class:`cct_loss.transport.Transport`. Dense computes it in one
autograd function with closed-form gradients, so that no operator of autograd's own graph runs
between the embeddings and the loss: every operator costs a kernel launch on a GPU, and
microseconds on a CPU, whatever its size, which is what a small batch's step is made of.

* :func:`one_pass` (:class:`_DenseLoss`): the reduced loss of a call on one process
  (``"mean"`` or ``"sum"``, no diagnostics). It prepares the raw embeddings itself (precision
  casts and normalisation), and computes the loss's gradient in the forward pass, as
  Liger-Kernel's fused losses do: a scalar loss's gradient is the upstream gradient times a
  fixed vector, so the forward pass computes that vector and the backward pass only scales it.
  Between the passes it keeps the gradients, ``(Q + K) x D`` numbers, rather than the
  ``Q x K`` weights.
* :func:`dense_transport` (:class:`_DenseTransport`): each query's two terms, for the
  diagnostics, ``reduction="none"`` and training across processes, with its backward pass from
  the upstream gradient of every query.

Each side (the positives, the negatives) is one of these kinds:

* **shared keys** ``(K, D)``: the negatives of every call shape and the positives drawn by
  label. The logits come from one matrix product, without ``|q|^2`` (a per-query constant the
  softmax ignores); the keys that sit out are filled with ``-inf`` in place, through a strided
  view of the own-row entries (:meth:`cct_loss.transport.OwnRows.entries`) or a mask built from
  the labels. With detached weights ``E`` comes from the weights' moments
  ``|q|^2 + pi |n|^2 - 2 q.(pi n)``, where ``pi n`` is what the gradient needs anyway: no
  ``(Q, K)`` cost matrix is formed. With labels both sides share one cost matrix;
* **one positive** per query (MoCo's key, CLIP's other side, a two-view batch's other view):
  its cost alone, ``|a - b|^2`` from the difference itself (exact, and the gradient's own
  term), with no softmax over a single key (whose weight is exactly 1);
* **pairs**: each query against its own few keys (the other views of its row, or several fixed
  positives), as ``(V, N, D)`` queries against ``(W, N, D)`` keys;
* **per-query keys** ``(Q, K, D)`` (``negatives`` of shape ``(N, K, D)``).

Gradients, with ``s = +t_pos`` for the positives and ``-t_neg`` for the negatives:

* ``detach_weights=True``: ``dE/dd_k = pi_k``;
* ``detach_weights=False``: ``dE/dd_k = pi_k (1 + s (d_k - E))``,

pulled back to the embeddings in closed form (:func:`cct_loss.costs.cost_vjp`,
:func:`cct_loss.costs.weights_vjp`, and the pairs' own few lines). When autograd records the
backward pass itself (``create_graph=True``), both functions differentiate the formula in plain
autograd instead (:func:`_terms_by_autograd`), so higher-order derivatives are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from ._autograd import apply, eager_twin
from .costs import (
    Preparation,
    WeightTerm,
    cost_block,
    cost_matrix,
    cost_vjp,
    expected_cost_of_moments,
    per_row,
    prepare,
    prepare_rows,
    prepare_rows_vjp,
    shifted_logits,
    weights_vjp,
)
from .precision import backward_in_own_precision, cast, own_precision, product, squared_norms, wide
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
ONE = "one"  # one positive per query: fixed (Q, 1, D), or its row's one key
TWO_VIEWS = "two views"  # in-batch, two views, one process: the row's other view
PAIRS = "pairs"  # each query against its own few keys
PER_QUERY = "per query"  # softmax over each query's own (Q, K, D) keys

#: An upstream gradient of a side's per-query values: ``(Q,)``, or one value for every query (a
#: number or a 0-dim tensor: the reduced loss's share of each query).
Grad = Tensor | float


class DensePlan(NamedTuple):
    """The static description of one call.

    Attributes:
        cost: ``"sqeuclidean"`` or ``"cosine"``.
        detach: ``detach_weights``.
        positives: the positives' kind (:data:`NONE`, :data:`SHARED` by label through
            ``pos_excluded``, :data:`ONE`, :data:`TWO_VIEWS`, :data:`PAIRS`).
        negatives: the negatives' kind (:data:`NONE`, :data:`SHARED`: every key but those
            ``neg_excluded`` or, with ``exclude_own``, the own-row keys of ``rows`` marks;
            :data:`PER_QUERY`).
        rows: the batch's block layout (own-row positives, and the keys the negatives skip).
        exclude_own: the negatives skip the own-row keys of ``rows``.
        labels: a side is drawn from the keys by label (the call has label masks).
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
    labels: bool = False
    pos_may_be_empty: bool = False
    neg_may_be_empty: bool = False
    keep_pos_costs: bool = False
    keep_neg_costs: bool = False


class _Inputs(NamedTuple):
    """The prepared embeddings of a call, its label masks and its static description."""

    query: Tensor
    keys: Tensor | None  # None: the keys are the queries
    fixed: Tensor | None
    pos_excluded: Tensor | None
    neg_excluded: Tensor | None
    t_pos: float | Tensor
    t_neg: float | Tensor
    plan: DensePlan

    @property
    def shared(self) -> Tensor:
        return self.query if self.keys is None else self.keys


class _Side(NamedTuple):
    """One side's forward result: the value and what its gradient needs (``None`` where a
    kind does not have it).

    Attributes:
        value: ``(Q,)`` expected cost (``(N,)`` for a two-view batch: one per row).
        weights: ``(Q, K)`` shared or per query; ``(V, W, N)`` pairs.
        costs: the weights' costs, when kept.
        moments: ``(Q, D)`` ``weights @ keys`` of a shared side computed from moments.
        difference: ``(N, D)`` ``a - b`` of one positive (sqeuclidean), or ``None``.
        operands: ``(a, b)`` of one positive, for a gradient in the same pass, or ``None``.
    """

    value: Tensor | None = None
    weights: Tensor | None = None
    costs: Tensor | None = None
    moments: Tensor | None = None
    difference: Tensor | None = None
    operands: tuple[Tensor, Tensor] | None = None


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
    costs: Tensor | None = None,
) -> _Side:
    """Softmax over shared keys ``(K, D)``: the weights and the expected cost. ``costs``: the
    cost matrix when the caller has it (both sides over the same keys); it is kept for the
    gradient and the diagnostics only when ``keep_costs`` says so."""
    if costs is None and keep_costs:
        costs = cost_block(query, query_sq, keys, cost, keys_sq=keys_sq)
    if costs is not None:
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
        kept = costs if keep_costs else None
        return _Side(torch.linalg.vecdot(weights, costs), weights, kept)
    moments = product(weights, keys, keys.dtype)  # (Q, D), also the gradient's
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


def _grad_of_costs(
    side: _Side, grad: Grad, expected: Tensor | None, scale: float | Tensor, detach: bool
) -> Tensor:
    """``g dE/dd``: ``g pi`` (detached weights) or ``g pi (1 + s (d - E))``, a fresh tensor;
    ``grad`` and ``expected`` (the values, needed through the weights) broadcast against the
    weights."""
    assert side.weights is not None
    if detach:
        return side.weights * grad
    assert side.costs is not None and expected is not None
    return (side.costs - expected).mul_(scale).add_(1.0).mul_(side.weights).mul_(grad)


def _one_forward(a: Tensor, b: Tensor, cost: str, *, total: bool = False) -> _Side:
    """``(N,)`` costs of ``a[i]`` against ``b[i]``, each query's single positive: ``|a - b|^2``
    from the difference (kept for the gradient) or ``1 - a.b`` (unit vectors), in float32;
    ``total``: their sum alone (0-dim), all a reduced loss needs."""
    acc = wide(a.dtype)
    wide_a, wide_b = cast(a, acc), cast(b, acc)
    if cost == "cosine":
        if total:
            value = (wide_a * wide_b).sum().neg_().add_(float(a.shape[0]))
        else:
            value = torch.linalg.vecdot(wide_a, wide_b).neg_().add_(1.0)
        return _Side(value, operands=(a, b))
    difference = wide_a - wide_b
    if total:
        value = (difference * difference).sum()
    else:
        value = torch.linalg.vecdot(difference, difference)
    return _Side(value, difference=difference, operands=(a, b))


def _one_backward(
    grad: Grad, a: Tensor, b: Tensor, difference: Tensor | None, cost: str, *, need_b: bool
) -> tuple[Tensor, Tensor | None]:
    """Gradients of ``sum_i grad_i c(a_i, b_i)``: ``2 g (a - b)`` and ``2 g (b - a)``
    (sqeuclidean) or ``-g b`` and ``-g a`` (cosine)."""
    acc = wide(a.dtype)
    g = per_row(grad)
    if cost == "cosine":
        grad_b = cast(a, acc) * -g if need_b else None
        return cast(b, acc) * -g, grad_b
    if difference is None:
        difference = cast(a, acc) - cast(b, acc)
    grad_a = difference * (g * 2.0)
    return grad_a, (grad_a.neg() if need_b else None)


def _pairs_forward(
    queries: Tensor, keys: Tensor, scale: float | Tensor, *, cost: str, exclude_self: bool
) -> _Side:
    """Each query against its own few keys: ``(V, N, D)`` queries, ``(W, N, D)`` keys (key
    ``[w, i]`` belongs to every query ``[v, i]``), ``(V, W, N)`` weights over ``w``;
    ``exclude_self``: ``[v, v, i]`` is the query itself and takes no part."""
    costs = _paired_costs(queries, keys, cost)
    logits = costs * scale
    if exclude_self:
        logits.diagonal(dim1=0, dim2=1).fill_(float("-inf"))
    weights = torch.softmax(logits, dim=1)
    value = (weights * costs).sum(1).reshape(-1)  # (V * N,): the queries' order
    return _Side(value, weights, costs)


def _paired_costs(queries: Tensor, keys: Tensor, cost: str) -> Tensor:
    """``(V, W, N)`` costs of ``(V, N, D)`` queries against ``(W, N, D)`` keys, from the
    differences (sqeuclidean) or ``1 - q.k`` (cosine), in float32."""
    acc = wide(queries.dtype)
    q, k = cast(queries, acc).unsqueeze(1), cast(keys, acc).unsqueeze(0)
    if cost == "cosine":
        gram: Tensor = torch.linalg.vecdot(q, k)
        return gram.neg_().add_(1.0)
    difference = q - k
    squared: Tensor = torch.linalg.vecdot(difference, difference)
    return squared


def _pairs_backward(
    side: _Side,
    grad: Grad,
    queries: Tensor,
    keys: Tensor,
    scale: float | Tensor,
    *,
    cost: str,
    detach: bool,
    need_keys: bool,
) -> tuple[Tensor, Tensor | None]:
    """The pairs' vector-Jacobian product: ``(V, N, D)`` for the queries, ``(W, N, D)`` for
    the keys (``grad`` is ``(V * N,)`` or one value)."""
    acc = wide(queries.dtype)
    q, k = cast(queries, acc).unsqueeze(1), cast(keys, acc).unsqueeze(0)
    num_views, rows = queries.shape[:2]
    if isinstance(grad, Tensor) and grad.dim() == 1:
        grad = grad.view(num_views, 1, rows)
    expected = None if side.value is None else side.value.view(num_views, 1, rows)
    g = _grad_of_costs(side, grad, expected, scale, detach).unsqueeze(-1)  # (V, W, N, 1)
    if cost == "cosine":
        grad_keys = (g * q).sum(0).neg_() if need_keys else None
        return (g * k).sum(1).neg_(), grad_keys
    toward = (q - k).mul_(g * 2.0)  # d/dq of g |q - k|^2, for each pair
    return toward.sum(1), (toward.sum(0).neg_() if need_keys else None)


def _per_query_forward(
    query: Tensor, keys: Tensor, query_sq: Tensor | None, scale: float | Tensor, *, cost: str
) -> _Side:
    """Softmax over each query's own ``(Q, K, D)`` keys (every key takes part)."""
    costs = cost_block(query, query_sq, keys, cost)
    weights = torch.softmax(costs * scale, dim=-1)
    return _Side(torch.linalg.vecdot(weights, costs), weights, costs)


def _one_operands(inputs: _Inputs) -> tuple[Tensor, Tensor]:
    """``(N, D)`` and ``(N, D)``: each one-positive cost's two sides (the query and its fixed
    positive, or its row's one key; a two-view batch's view 0 and view 1 of each row)."""
    query, fixed, plan = inputs.query, inputs.fixed, inputs.plan
    if fixed is not None:
        return query, (fixed if fixed.dim() == 2 else fixed[:, 0])
    if plan.positives == TWO_VIEWS:
        first, second = query.view(2, -1, query.shape[-1]).unbind(0)
        return first, second
    assert plan.rows is not None
    return query, plan.rows.own_keys(inputs.shared)[0]


def _pairs_operands(inputs: _Inputs) -> tuple[Tensor, Tensor]:
    """``(V, N, D)`` queries and ``(W, N, D)`` keys of the pairs side: ``(1, Q, D)`` and
    ``(M, Q, D)`` for fixed positives ``(Q, M, D)``; the own-row keys otherwise."""
    query, fixed, rows = inputs.query, inputs.fixed, inputs.plan.rows
    if fixed is not None:
        return query.unsqueeze(0), fixed.transpose(0, 1)
    assert rows is not None
    return query.view(rows.query_views, rows.rows, -1), rows.own_keys(inputs.shared)


def _sides_forward(inputs: _Inputs, *, totals: bool = False) -> tuple[_Side, _Side]:
    """Both sides' forward results (see the module docs); ``totals``: one positive per query
    gives the sum of its costs alone (a reduced loss needs no more)."""
    query, keys, _, pos_excluded, neg_excluded, t_pos, t_neg, plan = inputs
    shared = inputs.shared
    sqeuclidean = plan.cost != "cosine"
    keys_sq = query_sq = None
    if sqeuclidean and (plan.negatives != NONE or plan.positives == SHARED):
        query_sq = squared_norms(query)
        if shared.dim() == 2:
            keys_sq = query_sq if keys is None else squared_norms(shared)
    pos = neg = _Side()
    if plan.positives in (ONE, TWO_VIEWS):
        pos = _one_forward(*_one_operands(inputs), plan.cost, total=totals)
    elif plan.positives == PAIRS:
        queries, own = _pairs_operands(inputs)
        exclude_self = inputs.fixed is None and plan.rows is not None and plan.rows.includes_self
        pos = _pairs_forward(queries, own, t_pos, cost=plan.cost, exclude_self=exclude_self)
    # Both sides over the same keys (labels): one cost matrix serves both softmaxes.
    shared_costs = None
    if plan.positives == SHARED and plan.negatives == SHARED:
        shared_costs = cost_block(query, query_sq, shared, plan.cost, keys_sq=keys_sq)
    if plan.positives == SHARED:
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
            costs=shared_costs,
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
            costs=shared_costs,
        )
    elif plan.negatives == PER_QUERY:
        neg = _per_query_forward(query, shared, query_sq, -t_neg, cost=plan.cost)
    return pos, neg


def _input_grads(
    inputs: _Inputs,
    pos: _Side,
    neg: _Side,
    grad_pos: Grad | None,
    grad_neg: Grad | None,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of ``sum_q grad_pos_q A_q + grad_neg_q E_q`` for the query, the keys and
    the fixed positives (``needs`` says which), in the accumulation dtype, in closed form.

    ``grad_pos`` and ``grad_neg`` are per query, or one value for every query (the reduced
    loss's), or ``None`` (that side does not count)."""
    query, keys, fixed, _, _, t_pos, t_neg, plan = inputs
    shared = inputs.shared
    # In-batch, the keys are the queries: their gradient is part of the queries'.
    need_keys = keys is None or needs[1]
    grad_query = grad_keys = grad_fixed = None
    if grad_pos is not None and plan.positives in (ONE, TWO_VIEWS):
        a, b = _one_operands(inputs) if pos.operands is None else pos.operands
        if plan.positives == TWO_VIEWS:  # both views' queries share the row's one cost
            row_grad = (
                grad_pos.view(2, -1).sum(0)
                if isinstance(grad_pos, Tensor) and grad_pos.dim() == 1
                else grad_pos * 2.0
            )
            grad_a, grad_b = _one_backward(row_grad, a, b, pos.difference, plan.cost, need_b=True)
            assert grad_b is not None
            grad_query = torch.cat([grad_a, grad_b])
        else:
            need_b = needs[2] if fixed is not None else need_keys
            grad_query, grad_b = _one_backward(
                grad_pos, a, b, pos.difference, plan.cost, need_b=need_b
            )
            if grad_b is not None and fixed is not None:
                grad_fixed = grad_b if fixed.dim() == 2 else grad_b.unsqueeze(1)
            elif grad_b is not None:
                assert plan.rows is not None
                grad_keys = _scatter_own(grad_b.unsqueeze(0), plan.rows, shared)
    elif grad_pos is not None and plan.positives == PAIRS:
        queries, own = _pairs_operands(inputs)
        need_own = needs[2] if fixed is not None else need_keys
        grad_queries, grad_own = _pairs_backward(
            pos,
            grad_pos,
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
    # The shared softmaxes: detached ones together (one pass over the keys for both sides with
    # labels, from the forward pass's moments where it has them); through the weights, each
    # from its costs.
    detached: list[WeightTerm] = []
    for side, grad, scale, kind, may_be_empty in (
        (pos, grad_pos, t_pos, plan.positives, plan.pos_may_be_empty),
        (neg, grad_neg, -t_neg, plan.negatives, plan.neg_may_be_empty),
    ):
        if grad is None or kind not in (SHARED, PER_QUERY):
            continue
        if plan.detach and kind == SHARED:
            assert side.weights is not None
            detached.append(WeightTerm(side.weights, grad, side.moments, not may_be_empty))
            continue
        expected = None if side.value is None else side.value[:, None]
        grad_costs = _grad_of_costs(side, per_row(grad), expected, scale, plan.detach)
        grad_q, grad_k = cost_vjp(grad_costs, query, shared, plan.cost, need_keys=need_keys)
        grad_query, grad_keys = _add(grad_query, grad_q), _add(grad_keys, grad_k)
    if detached:
        grad_q, grad_k = weights_vjp(
            detached,
            query,
            shared,
            plan.cost,
            need_keys=need_keys,
            keys_are_queries=keys is None,
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


def _scatter_own(grad_own: Tensor, rows: OwnRows, keys: Tensor) -> Tensor:
    """The ``(K, D)`` gradient of the keys from that of their own-row view ``(W, N, D)``."""
    if rows.covers(keys.shape[0]):
        return grad_own.reshape(keys.shape)  # the own rows are all the keys, in their order
    full = grad_own.new_zeros(keys.shape)
    rows.own_keys(full).copy_(grad_own)
    return full


def _negatives_costs(
    plan: DensePlan, pos_costs: Tensor | None, neg_costs: Tensor | None
) -> Tensor | None:
    """The negatives' kept costs: the positives' when both sides share one cost matrix."""
    if neg_costs is None and plan.positives == SHARED and plan.negatives == SHARED:
        return pos_costs
    return neg_costs


@eager_twin
class _DenseTransport(torch.autograd.Function):
    """The attraction ``A`` and the expected negative cost ``E`` of every query (see the module
    docs), on prepared embeddings; ``keys=None`` means the keys are the queries themselves.

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
        inputs = _Inputs(query, keys, fixed, pos_excluded, neg_excluded, t_pos, t_neg, plan)
        pos, neg = _sides_forward(inputs)
        pos_value = pos.value
        if plan.positives == TWO_VIEWS and pos_value is not None:
            pos_value = pos_value.repeat(2)  # each row's cost, for its two queries
        return (
            pos_value,
            neg.value,
            pos.weights,
            neg.weights,
            pos.costs,
            # One tensor is one output: with both sides over one cost matrix, it is the
            # positives' (see _negatives_costs).
            None if neg.costs is pos.costs else neg.costs,
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
        query, keys, fixed, pos_excluded, neg_excluded, pos_value, neg_value, *rest = (
            ctx.saved_tensors
        )
        pos_weights, neg_weights, pos_costs, neg_costs, pos_moments, neg_moments = rest
        t_pos, t_neg, plan = ctx.settings
        inputs = _Inputs(query, keys, fixed, pos_excluded, neg_excluded, t_pos, t_neg, plan)
        needs = ctx.needs_input_grad[:3]
        nones = (None,) * 5
        if grad_pos is None and grad_neg is None:
            return None, None, None, *nones
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            return (*_differentiable_vjp(inputs, (grad_pos, grad_neg), needs, _terms), *nones)
        if plan.positives in (ONE, TWO_VIEWS):
            pos_value = None  # one positive needs no value back
        pos = _Side(pos_value, pos_weights, pos_costs, pos_moments)
        neg_costs = _negatives_costs(plan, pos_costs, neg_costs)
        neg = _Side(neg_value, neg_weights, neg_costs, neg_moments)
        grads = _input_grads(inputs, pos, neg, grad_pos, grad_neg, needs)
        inputs_of = (query, keys, fixed)
        return (
            *(
                None if g is None or x is None else cast(g, x.dtype)
                for g, x in zip(grads, inputs_of, strict=True)
            ),
            *nones,
        )


class Reduction(NamedTuple):
    """How :class:`_DenseLoss` reduces the two terms to the loss:
    ``alpha * sum_q A_q / divisor_pos + beta * sum_q (-E_q) / divisor_neg``, the divisors being
    the number of queries that have the term (``"mean"``) or 1 (``"sum"``)."""

    reduction: str
    alpha: float | Tensor
    beta: float | Tensor


def _divisor(
    reduction: str, excluded: Tensor | None, may_be_empty: bool, num_queries: int
) -> float | Tensor:
    """What a term's sum is divided by: the number of queries that have it (``"mean"``;
    at least 1, so that a term no query has is 0), or 1 (``"sum"``)."""
    if reduction != "mean":
        return 1.0
    if may_be_empty and excluded is not None:
        return excluded.all(-1).logical_not_().sum().clamp_min_(1)
    return float(num_queries)


def _reduced(
    pos: _Side, neg: _Side, inputs: _Inputs, reduction: Reduction
) -> tuple[Tensor, Grad | None, Grad | None]:
    """The loss, and each query's share of it in each term (the upstream gradients of ``A``
    and ``E``): ``sum_q A_q * grad_pos + sum_q E_q * grad_neg``."""
    plan = inputs.plan
    num_queries = inputs.query.shape[0]
    grad_pos = grad_neg = None
    loss: Tensor | None = None
    if pos.value is not None:
        divisor = (
            float(num_queries)
            if reduction.reduction == "mean" and not plan.pos_may_be_empty
            else _divisor(
                reduction.reduction, inputs.pos_excluded, plan.pos_may_be_empty, num_queries
            )
        )
        grad_pos = reduction.alpha / divisor
        # a two-view batch holds one cost per row, for its two queries
        weight = grad_pos * 2.0 if plan.positives == TWO_VIEWS else grad_pos
        total = pos.value if pos.value.dim() == 0 else pos.value.sum()
        loss = total.mul_(weight)
    if neg.value is not None:
        divisor = (
            float(num_queries)
            if reduction.reduction == "mean" and not plan.neg_may_be_empty
            else _divisor(
                reduction.reduction, inputs.neg_excluded, plan.neg_may_be_empty, num_queries
            )
        )
        grad_neg = -reduction.beta / divisor  # repulsion = -E
        total = neg.value.sum()
        if loss is None:
            loss = total.mul_(grad_neg)
        elif isinstance(grad_neg, Tensor):  # a count: out of place (vmap batches it)
            loss = loss + total * grad_neg
        else:
            loss.add_(total, alpha=grad_neg)
    assert loss is not None
    return loss, grad_pos, grad_neg


@eager_twin
class _DenseLoss(torch.autograd.Function):
    """The reduced loss of a call on raw embeddings, with its gradient computed in the forward
    pass (see the module docs): the forward pass prepares the embeddings (``preparation``),
    computes both terms and their reduction, and, where an input needs a gradient
    (``needs``), the gradient itself; the backward pass scales it by the upstream gradient.
    ``setup_context`` and ``generate_vmap_rule`` make it work under ``torch.func``.
    """

    generate_vmap_rule = True
    saved_outputs = True  # the outputs after the loss are its gradients, saved (_autograd)

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
        preparation: Preparation,
        reduction: Reduction,
        needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, ...]:
        raw = (query, keys, fixed)
        prepared = [None if x is None else prepare_rows(x, preparation) for x in raw]
        embeddings = [None if p is None else p[0] for p in prepared]
        assert embeddings[0] is not None
        inputs = _Inputs(
            embeddings[0],
            embeddings[1],
            embeddings[2],
            pos_excluded,
            neg_excluded,
            t_pos,
            t_neg,
            plan,
        )
        pos, neg = _sides_forward(inputs, totals=True)
        loss, grad_pos, grad_neg = _reduced(pos, neg, inputs, reduction)
        if not any(needs):
            return loss, None, None, None
        grads = _input_grads(inputs, pos, neg, grad_pos, grad_neg, needs)
        return loss, *(
            None if g is None or p is None or x is None else prepare_rows_vjp(g, p[1], p[2], x)
            for g, p, x in zip(grads, prepared, raw, strict=True)
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor | None, ...]) -> None:
        query, keys, fixed, pos_excluded, neg_excluded, t_pos, t_neg, plan, preparation = inputs[:9]
        grads = output[1:]
        # The inputs come back only for a backward that is itself differentiable.
        ctx.save_for_backward(*grads, query, keys, fixed, pos_excluded, neg_excluded)
        ctx.settings = (t_pos, t_neg, plan, preparation, inputs[9])
        ctx.mark_non_differentiable(*(g for g in grads if g is not None))
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Any) -> Any:
        # (A scaling: autocast would leave it alone; only the differentiable backward, which
        # recomputes the loss, runs in the library's own precision.)
        nones = (None,) * 8
        if grad_loss is None:
            return None, None, None, *nones
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            with own_precision(grad_loss.device):
                return (*_differentiable_loss_vjp(ctx, saved[3:], grad_loss), *nones)
        return (*(None if g is None else g * grad_loss for g in saved[:3]), *nones)


def _differentiable_loss_vjp(
    ctx: Any, saved_inputs: tuple[Tensor | None, ...], grad_loss: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:class:`_DenseLoss`'s vector-Jacobian product, recorded by autograd: the raw embeddings
    prepared in plain autograd, then the reduced loss of :func:`_terms_by_autograd`."""
    query, keys, fixed, pos_excluded, neg_excluded = saved_inputs
    t_pos, t_neg, plan, preparation, reduction = ctx.settings
    needs = ctx.needs_input_grad[:3]
    with torch.enable_grad():
        leaves = [None if x is None else x.clone() for x in (query, keys, fixed)]
        prepared = [None if x is None else prepare(x, preparation) for x in leaves]
        assert prepared[0] is not None
        inputs = _Inputs(
            prepared[0], prepared[1], prepared[2], pos_excluded, neg_excluded, t_pos, t_neg, plan
        )
        loss = _reduced_by_autograd(inputs, _terms_by_autograd(inputs), reduction)
        wanted = [x for x, need in zip(leaves, needs, strict=True) if need and x is not None]
        found = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True))
    grads = [
        next(found) if need and x is not None else None
        for x, need in zip(leaves, needs, strict=True)
    ]
    return grads[0], grads[1], grads[2]


def _differentiable_vjp(
    inputs: _Inputs,
    cotangents: tuple[Tensor | None, ...],
    needs: tuple[bool, ...],
    outputs_of: Callable[..., tuple[Tensor | None, ...]],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The vector-Jacobian product of ``outputs_of(*_terms_by_autograd(...))``, itself recorded
    by autograd, so that second (and higher) derivatives are exact. It holds the ``(Q, K)``
    graph of the formula."""
    query, keys, fixed = inputs.query, inputs.keys, inputs.fixed
    with torch.enable_grad():
        # Fresh nodes: the keys may be computed from the queries (gathered across processes),
        # and the partial derivatives must not follow that path. keys=None stays the queries.
        fresh = inputs._replace(
            query=query.clone(),
            keys=None if keys is None else keys.clone(),
            fixed=None if fixed is None else fixed.clone(),
        )
        leaves = [fresh.query, fresh.keys, fresh.fixed]
        values = outputs_of(*_terms_by_autograd(fresh))
        outputs, grads_out = [], []
        for value, cotangent in zip(values, cotangents, strict=True):
            if value is not None and cotangent is not None:
                outputs.append(value)
                grads_out.append(cotangent)
        wanted = [x for x, need in zip(leaves, needs, strict=True) if need and x is not None]
        if not wanted or not outputs:
            return None, None, None
        found = iter(
            torch.autograd.grad(outputs, wanted, grads_out, create_graph=True, allow_unused=True)
        )
    grads = [
        next(found) if need and x is not None else None
        for x, need in zip(leaves, needs, strict=True)
    ]
    return grads[0], grads[1], grads[2]


def _terms(*terms: Tensor | None) -> tuple[Tensor | None, ...]:
    """The per-query terms themselves (what :class:`_DenseTransport` returns)."""
    return terms


def _terms_by_autograd(inputs: _Inputs) -> tuple[Tensor | None, Tensor | None]:
    """``(A, E)`` per query in plain, twice-differentiable autograd: the formula the closed-form
    gradients stand for."""
    query, _, fixed, pos_excluded, neg_excluded, t_pos, t_neg, plan = inputs
    shared = inputs.shared
    attraction = expected = None
    if plan.positives in (PAIRS, ONE, TWO_VIEWS):
        if fixed is None:
            assert plan.rows is not None
            fixed = plan.rows.fixed_positives(shared)
        elif fixed.dim() == 2:
            fixed = fixed.unsqueeze(1)
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


def _reduced_by_autograd(
    inputs: _Inputs, terms: tuple[Tensor | None, Tensor | None], reduction: Reduction
) -> Tensor:
    """:func:`_reduced` of per-query terms, in plain autograd."""
    attraction, expected = terms
    plan, num_queries = inputs.plan, inputs.query.shape[0]
    loss = None
    if attraction is not None:
        divisor = _divisor(
            reduction.reduction, inputs.pos_excluded, plan.pos_may_be_empty, num_queries
        )
        loss = attraction.sum() * (reduction.alpha / divisor)
    if expected is not None:
        divisor = _divisor(
            reduction.reduction, inputs.neg_excluded, plan.neg_may_be_empty, num_queries
        )
        term = expected.sum() * (-reduction.beta / divisor)
        loss = term if loss is None else loss + term
    assert loss is not None
    return loss


def _plan_positives(problem: Transport) -> tuple[str, Tensor | None, OwnRows | None]:
    """The positives' kind, fixed positives and own-row layout."""
    positives = problem.positives
    if positives is None:
        return NONE, None, None
    if isinstance(positives, Tensor):
        one = positives.dim() == 2 or positives.shape[1] == 1
        return (ONE if one else PAIRS), positives, None
    if positives.own_rows_only:
        rows = positives.rows
        assert rows is not None
        if rows.includes_self:
            two_views = rows.query_views == 2 and problem.keys is None
            return (TWO_VIEWS if two_views else PAIRS), None, rows
        return (ONE if rows.key_views == 1 else PAIRS), None, rows
    return SHARED, None, None


def _label_masks(problem: Transport, num_keys: int) -> tuple[Tensor | None, Tensor | None]:
    """The positives' and the negatives' exclusion masks drawn from labels (``None`` for a
    side that is not): one comparison of the labels when both sides compare the same ones."""
    pos, neg = problem.positives, problem.negatives
    device = problem.query.device
    pos_members = pos if isinstance(pos, Membership) and pos.labelled else None
    neg_members = neg if neg is not None and neg.labelled else None
    if (
        pos_members is not None
        and neg_members is not None
        and pos_members.query_groups is neg_members.query_groups
        and pos_members.key_groups is neg_members.key_groups
    ):
        same = neg_members.excluded_mask(num_keys, device)  # a negative sits out where labels agree
        assert same is not None
        others = ~same
        if pos_members.excludes_self:
            assert pos_members.rows is not None
            pos_members.rows.entries(others).diagonal(dim1=0, dim2=1).fill_(True)
        return others, same
    pos_excluded = None if pos_members is None else pos_members.excluded_mask(num_keys, device)
    neg_excluded = None if neg_members is None else neg_members.excluded_mask(num_keys, device)
    return pos_excluded, neg_excluded


def _plan(problem: Transport, options: CCTOptions) -> DensePlan:
    """The static description of ``problem`` (the same for every call with its signature)."""
    shared = problem.key_rows
    details = bool(options.return_details)
    through = not options.detach_weights
    positives, _, rows = _plan_positives(problem)
    negatives, exclude_own = NONE, False
    neg_members = problem.negatives
    if neg_members is not None:
        negatives = PER_QUERY if shared.dim() == 3 else SHARED
        if negatives == SHARED and not neg_members.labelled and neg_members.rows is not None:
            rows, exclude_own = neg_members.rows, True
    return DensePlan(
        cost=options.cost,
        detach=options.detach_weights,
        positives=positives,
        negatives=negatives,
        rows=rows,
        exclude_own=exclude_own,
        labels=(isinstance(problem.positives, Membership) and problem.positives.labelled)
        or (neg_members is not None and neg_members.labelled),
        pos_may_be_empty=isinstance(problem.positives, Membership)
        and problem.positives.may_be_empty,
        neg_may_be_empty=neg_members is not None and neg_members.may_be_empty,
        keep_pos_costs=details or through or isinstance(options.t_pos, Tensor),
        keep_neg_costs=details or through or isinstance(options.t_neg, Tensor),
    )


def _call_inputs(problem: Transport, options: CCTOptions, plan: DensePlan) -> _Inputs:
    """The inputs of either autograd function for ``problem``: its tensors and label masks,
    the sharpness and the plan."""
    positives = problem.positives
    pos_excluded = neg_excluded = None
    if plan.labels:
        pos_excluded, neg_excluded = _label_masks(problem, problem.key_rows.shape[-2])
    return _Inputs(
        problem.query,
        problem.keys,
        positives if isinstance(positives, Tensor) else None,
        pos_excluded,
        neg_excluded,
        options.t_pos,
        options.t_neg,
        plan,
    )


class OnePass(NamedTuple):
    """The static half of a call's one-pass loss (:class:`_DenseLoss`): everything but its
    tensors and label masks. A call with the same signature (options, shapes, dtypes, devices)
    has the same one, so it can be kept and replayed (see :mod:`cct_loss.core`)."""

    options: CCTOptions
    plan: DensePlan
    preparation: Preparation
    reduction: Reduction

    def loss(self, problem: Transport) -> Tensor:
        """The reduced loss of ``problem`` (on raw embeddings), its gradient computed in the
        forward pass where an input needs one."""
        inputs = _call_inputs(problem, self.options, self.plan)
        needs = (False, False, False)
        if torch.is_grad_enabled():
            query, keys, fixed = inputs.query, inputs.keys, inputs.fixed
            needs = (
                query.requires_grad,
                keys is not None and keys.requires_grad,
                fixed is not None and fixed.requires_grad,
            )
        loss: Tensor = apply(_DenseLoss, *inputs, self.preparation, self.reduction, needs)[0]
        return loss


def one_pass(problem: Transport, options: CCTOptions, preparation: Preparation) -> OnePass:
    """The one-pass loss of a whole call on one process (``reduction`` ``"mean"`` or
    ``"sum"``, no diagnostics), from raw embeddings: ``one_pass(...).loss(problem)`` is
    ``alpha * (mean attraction) + beta * (mean repulsion)``, each mean over the queries that
    have the term (``"sum"``: the sums), with its gradient computed in the forward pass.

    Args:
        problem: the call on raw embeddings; both terms.
        options: cost, sharpness, ``alpha``, ``beta``, ``detach_weights``, ``reduction``.
        preparation: how the raw embeddings are cast and normalised.
    """
    reduction = Reduction(options.reduction, options.alpha, options.beta)
    return OnePass(options, _plan(problem, options), preparation, reduction)


def dense_transport(
    problem: Transport, options: CCTOptions
) -> tuple[ConditionalExpectation | None, ConditionalExpectation | None]:
    """The attraction and repulsion expectations of a whole call on prepared embeddings
    (either may be absent).

    Args:
        problem: the queries, keys, positives and negatives (see
            :class:`cct_loss.transport.Transport`).
        options: cost, sharpness, ``detach_weights``, ``return_details``.

    Returns:
        The positives' and the negatives' :class:`ConditionalExpectation` (``None`` for a side
        the problem does not have). The weights, when asked for: ``(Q, K)`` over shared keys,
        ``(Q, M)`` for a query's own positives (the other views of its row, in view order).
    """
    inputs = _call_inputs(problem, options, _plan(problem, options))
    plan, details = inputs.plan, bool(options.return_details)
    pos_value, neg_value, pos_weights, neg_weights, pos_costs, neg_costs, *_ = apply(
        _DenseTransport, *inputs
    )
    attract = repel = None
    if plan.positives in (ONE, TWO_VIEWS):
        attract = _one_expectation(pos_value, details, options.wants_weights)
    elif plan.positives == PAIRS:
        exclude_self = inputs.fixed is None and plan.rows is not None and plan.rows.includes_self
        pos = _Side(pos_value, pos_weights, pos_costs)
        attract = _pairs_expectation(pos, exclude_self, details, options.wants_weights)
    elif plan.positives == SHARED:
        pos = _Side(pos_value, pos_weights, pos_costs)
        attract = _shared_expectation(pos, inputs.pos_excluded, None, "positives", plan, details)
    if plan.negatives != NONE:
        neg = _Side(neg_value, neg_weights, _negatives_costs(plan, pos_costs, neg_costs))
        exclude = plan.rows if plan.exclude_own else None
        repel = _shared_expectation(neg, inputs.neg_excluded, exclude, "negatives", plan, details)
    return attract, repel


def _one_expectation(value: Tensor, details: bool, want_weights: bool) -> ConditionalExpectation:
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
