"""``impl="dense"`` for the cross layout both ways at once (CLIP): ``(cct_loss(a, b,
layout="cross") + cct_loss(b, a, layout="cross")) / 2`` from one ``(N, N)`` cost matrix, whose
rows are the first direction's queries and whose columns are the second's (the second
direction's matrix is the first's transpose). In plain autograd, so every derivative is exact.

With one positive per query, each query's attraction is the cost to its own row (weight 1, in
either direction), and its repulsion the softmax-weighted cost over the other rows: along a row
for the first direction, along a column for the second. The loss is then ``sum_ij G_ij c_ij``
with ``G = alpha I - beta (W_rows + W_columns) / 2``. With detached weights ``G`` is a constant,
and ``c_ij = |a_i|^2 + |b_j|^2 - 2 a_i.b_j`` (``1 - a_i.b_j`` for ``cost="cosine"``) makes that
``G``'s row sums against ``|a|^2``, its column sums against ``|b|^2`` and ``a . (G b)``: one
matrix product more instead of autograd's graph through the ``(N, N)`` matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from ..maths.costs import cost_matrix
from ..maths.expectation import needs_shift
from ..maths.precision import accumulation_dtype, cast, product, squared_norms
from ..options import CCTOptions
from ..problem.description import ContrastiveProblem


def loss(problem: ContrastiveProblem, options: CCTOptions) -> Tensor:
    """The reduced loss (``"mean"`` or ``"sum"``) of ``problem``, the first direction of a
    one-process cross call with one positive per query (:func:`cct_loss.problem.layouts.cross`
    of ``(N, D)`` queries and ``(N, 1, D)`` positives), both ways: the mean of the two
    directions' losses."""
    prepared = problem.prepared()
    query, keys = prepared.query, prepared.key_rows
    n = query.shape[0]
    if options.detach_weights:
        with torch.no_grad():
            shares = _constant_shares(query, keys, options)
        total = _weighted_costs(shares, query, keys, options.cost)
    else:
        costs = _costs(query, keys, options)
        total = (_shares(costs, options) * costs).sum()
    return total / n if options.reduction == "mean" else total


def _costs(query: Tensor, keys: Tensor, options: CCTOptions) -> Tensor:
    """``(N, N)`` costs in the accumulation dtype (float32 for half inputs)."""
    costs = cost_matrix(query, keys, options.cost)
    return cast(costs, accumulation_dtype(costs.dtype))


def _shares(costs: Tensor, options: CCTOptions) -> Tensor:
    """``G``: each cost's share of the summed loss, ``alpha`` on the own rows (the attraction)
    and ``-beta`` times the two directions' mean repulsion weight elsewhere."""
    own = torch.eye(costs.shape[0], dtype=costs.dtype, device=costs.device)
    return own * options.alpha - _both_weights(costs, options.t_neg) * (options.beta * 0.5)


def _constant_shares(query: Tensor, keys: Tensor, options: CCTOptions) -> Tensor:
    """``G`` of detached weights, without gradient: the same numbers as :func:`_shares`, the
    ``(N, N)`` steps in place where they can be (at CLIP's batch sizes on the CPU a step over
    the matrix costs about as much as the matrix product)."""
    gram = product(query, keys.T, query.dtype)  # (N, N) in the accumulation dtype
    if options.cost == "cosine":  # 1 - a.b on unit rows
        costs = gram.neg_().add_(1.0)
    else:
        costs = gram.mul_(-2.0).add_(squared_norms(query)[:, None]).add_(squared_norms(keys))
    shares = _both_weights(costs.clamp_min_(0.0), options.t_neg, fresh=True)
    shares.mul_(options.beta * -0.5).diagonal().add_(options.alpha)
    return shares


def _both_weights(costs: Tensor, t_neg: float | Tensor, *, fresh: bool = False) -> Tensor:
    """``softmax_rows(-t_neg c) + softmax_columns(-t_neg c)`` over the other rows, zero on the
    own rows (``fresh``: ``costs`` is a buffer of its own, scaled in place)."""
    if needs_shift(t_neg):  # (maths.expectation.SHIFTED_FROM)
        # each softmax's nearest cost, its own row left out (a copy only where costs are in
        # the graph: in place, the diagonal is overwritten below anyway)
        masked = costs.fill_diagonal_(float("inf")) if fresh else costs.detach().clone()
        if not fresh:
            masked.fill_diagonal_(float("inf"))
        nearest_row, nearest_column = masked.amin(1, keepdim=True), masked.amin(0, keepdim=True)
        rows = (costs - nearest_row).mul_(-t_neg)
        columns = costs.sub_(nearest_column) if fresh else costs - nearest_column
        columns = columns.mul_(-t_neg)
        rows.fill_diagonal_(float("-inf"))  # each its own row sits out
        columns.fill_diagonal_(float("-inf"))
        weights = torch.softmax(rows, dim=1)
        return (
            weights.add_(torch.softmax(columns, dim=0))
            if fresh
            else weights + torch.softmax(columns, dim=0)
        )
    logits = costs.mul_(-t_neg) if fresh else costs * -t_neg
    logits.fill_diagonal_(float("-inf"))  # its own row sits out
    weights = torch.softmax(logits, dim=1)
    return (
        weights.add_(torch.softmax(logits, dim=0))
        if fresh
        else weights + torch.softmax(logits, dim=0)
    )


def _weighted_costs(shares: Tensor, query: Tensor, keys: Tensor, cost: str) -> Tensor:
    """``sum_ij G_ij c_ij`` for constant ``G`` without the ``(N, N)`` costs in the graph."""
    acc = shares.dtype
    a, b = cast(query, acc), cast(keys, acc)
    cross = (a * (shares @ b)).sum()
    if cost == "cosine":  # c = 1 - a.b on unit rows
        return shares.sum() - cross
    rows = torch.dot(shares.sum(1), squared_norms(query))
    columns = torch.dot(shares.sum(0), squared_norms(keys))
    return rows + columns - 2.0 * cross
