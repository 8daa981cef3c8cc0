"""``impl="dense"`` for a softmax whose first keys' weights are treated apart from the rest
(:class:`cct_loss.problem.description.Leading`: the MoCo objective's in-batch negatives, whose
weights are differentiated while the queue's are constants, or the other way round). One softmax
over every key, then the weights of each part detached or kept, in plain autograd over the full
cost matrix: differentiable to any order, and no existing kernel changes (the streaming kernels
take one treatment per softmax, so :func:`cct_loss.implementations.table.choose` refuses them
this problem, naming dense)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..maths.costs import cost_matrix
from ..maths.expectation import (
    ConditionalExpectation,
    block_expectation,
    extreme_cost,
    needs_shift,
    weighted_expectation,
)
from ..options import CCTOptions
from ..problem.description import ContrastiveProblem, KeySet, Leading

Sides = tuple[ConditionalExpectation | None, ConditionalExpectation | None]


def expectations(problem: ContrastiveProblem, options: CCTOptions) -> Sides:
    """Both sides of ``problem``: its given positives ``(Q, M, D)`` as a block, its negatives
    (a :class:`KeySet` with ``leading``) from the full ``(Q, K)`` matrices."""
    problem = problem.prepared()
    fixed = problem.fixed_positives
    assert fixed is not None, "only given positives pair with leading negatives"
    attract = block_expectation(problem.query, fixed, options)
    negatives = problem.negatives
    assert isinstance(negatives, KeySet) and negatives.leading is not None
    repel = _split_expectation(
        problem.query, problem.key_rows, negatives, negatives.leading, options
    )
    return attract, repel


def _split_expectation(
    query: Tensor, keys: Tensor, key_set: KeySet, leading: Leading, options: CCTOptions
) -> ConditionalExpectation:
    """``E = sum_k pi_k c_k`` with ``pi = softmax(-t_neg c)`` over the keys that take part, the
    first ``leading.size`` weights detached as ``leading`` says and the others as
    ``options.detach_weights`` says."""
    costs = cost_matrix(query, keys, options.cost)  # (Q, K)
    excluded = key_set.excluded_mask(keys.shape[0], query.device)
    signed = -options.t_neg
    shifted = costs
    if needs_shift(signed):  # by each row's nearest cost taking part, a constant to the softmax
        shifted = costs - extreme_cost(costs.detach(), excluded, signed)
    logits = shifted * signed
    if excluded is not None:
        logits = logits.masked_fill(excluded, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    first, rest = weights[:, : leading.size], weights[:, leading.size :]
    treated = torch.cat(
        [
            first.detach() if leading.detach else first,
            rest.detach() if options.detach_weights else rest,
        ],
        dim=1,
    )
    value = (treated * costs).sum(-1)
    return weighted_expectation(
        value,
        weights.detach(),
        costs.detach(),
        excluded,
        "negatives",
        details=bool(options.return_details),
        may_be_empty=key_set.may_be_empty,
    )
