"""``impl="dense"`` for the cross layout both ways at once (CLIP): ``(cct_loss(a, b,
layout="cross") + cct_loss(b, a, layout="cross")) / 2`` from one ``(N, N)`` cost matrix, whose
rows are the first direction's queries and whose columns are the second's (the second
direction's matrix is the first's transpose). One matrix product instead of two, in plain
autograd, so every derivative is exact.

With one positive per query, each query's attraction is the cost to its own row (weight 1, in
either direction), and its repulsion the softmax-weighted cost over the other rows: along a row
for the first direction, along a column for the second."""

from __future__ import annotations

import torch
from torch import Tensor

from ..maths.costs import cost_matrix
from ..maths.precision import accumulation_dtype, cast
from ..options import CCTOptions
from ..problem.description import ContrastiveProblem


def loss(problem: ContrastiveProblem, options: CCTOptions) -> Tensor:
    """The reduced loss (``"mean"`` or ``"sum"``) of ``problem``, the first direction of a
    one-process cross call with one positive per query (:func:`cct_loss.problem.layouts.cross`
    of ``(N, D)`` queries and ``(N, 1, D)`` positives), both ways: the mean of the two
    directions' losses."""
    prepared = problem.prepared()
    costs = cost_matrix(prepared.query, prepared.key_rows, options.cost)  # (N, N)
    costs = cast(costs, accumulation_dtype(costs.dtype))  # float32 for half inputs
    n = costs.shape[0]
    logits = (costs.detach() if options.detach_weights else costs) * -options.t_neg
    logits.fill_diagonal_(float("-inf"))  # a fresh tensor: its own row sits out
    # Both directions' weights at once: the repulsion of query i (rows) and of key j (columns)
    # over the other rows, averaged as the two directions' losses are.
    weights = torch.add(torch.softmax(logits, dim=1), torch.softmax(logits, dim=0)).mul_(0.5)
    attraction = costs.diagonal().sum()
    repulsion = -(weights * costs).sum()
    total = attraction * options.alpha + repulsion * options.beta
    return total / n if options.reduction == "mean" else total
