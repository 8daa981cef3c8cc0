"""``impl="dense"``: the expected cost from the full ``(Q, K)`` cost matrix.

One matrix product gives every cost; which keys take part is built on the inputs' device from
integer ids; there is no loop and no host synchronisation. A small custom autograd function
keeps the work to what InfoNCE does (one product forward, one or two backward, a softmax): it
saves the weights (and, without detaching, the costs) and writes the backward in closed form
(``s = +t_pos`` for positives, ``-t_neg`` for negatives). With detached weights over shared keys
(the SimCLR and MoCo default) and no diagnostics, the product's pass writes the logits directly
(without ``|q|^2``, a per-query constant the softmax ignores) and ``E`` comes from the weights'
moments, ``|q|^2 + pi |n|^2 - 2 q.(pi n)``, where ``pi n`` is the product the backward pass
needs anyway: no ``(Q, K)`` cost matrix is formed.

* ``detach_weights=True``: ``dE/dd_k = pi_k``;
* ``detach_weights=False``: ``dE/dd_k = pi_k (1 + s (d_k - E))``,

pulled back to the embeddings by :func:`cct_loss.costs.cost_vjp` (the derivative of
``||q - n||^2`` or ``1 - q.n``, also where rounding clamped a cost to 0, as in the formula).
It is the fastest path while ``Q x K`` fits in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .costs import (
    cost_block,
    cost_vjp,
    expected_cost_of_moments,
    shifted_logits,
    weights_vjp,
)
from .precision import as_input_grads, backward_in_own_precision, product, squared_norms
from .transport import (
    ConditionalExpectation,
    Membership,
    cache_forward_signature,
    differentiable_backward,
    logit_scale,
    weight_statistics,
)

if TYPE_CHECKING:
    from .options import CCTOptions, Side


class _DenseExpectedCost(torch.autograd.Function):
    """``E_q = sum_k softmax_k(s d_qk) d_qk`` over the full cost matrix (``s`` signed).

    ``setup_context`` and ``generate_vmap_rule`` make it work under ``torch.func`` (``grad``,
    ``vmap``). Its backward pass is the closed form above; when autograd records the backward
    itself (``create_graph=True``), it is :func:`cct_loss.transport.differentiable_backward`
    instead, so that higher-order derivatives are exact.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        query: Tensor,
        keys: Tensor,
        excluded: Tensor | None,
        cost: str,
        scale: float | Tensor,
        detach_weights: bool,
        may_be_empty: bool,
        keep_costs: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if keep_costs:
            costs = cost_block(query, squared_norms(query, keepdim=True), keys, cost)
            logits = costs * scale  # a fresh tensor: updated in place (batched under vmap alike)
        else:  # the logits in the product's pass; E from the weights' moments (no costs)
            logits = shifted_logits(query, keys, cost, float(scale))
            costs = logits.new_empty(0)
        if excluded is not None:
            logits.masked_fill_(excluded, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        del logits
        if may_be_empty:  # a row with no key taking part: all -inf gave NaN; it weighs nothing
            weights.nan_to_num_(0.0)
        if keep_costs:
            return torch.linalg.vecdot(weights, costs), weights, costs, costs.new_empty(0)
        weighted_keys = product(weights, keys, keys.dtype)  # (Q, D), also the backward's
        expected = expected_cost_of_moments(
            weights, weighted_keys, query, keys, cost, rows_sum_to_one=not may_be_empty
        )
        return expected, weights, costs, weighted_keys

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        query, keys, excluded, cost, scale, detach_weights, may_be_empty, _ = inputs
        expected, weights, costs, weighted_keys = output
        # Detached weights need only the weights (and their moments, when the forward pass has
        # them) for the closed-form backward; through the weights it also needs the costs.
        ctx.save_for_backward(
            query,
            keys,
            excluded,
            weights,
            expected,
            None if detach_weights else costs,
            weighted_keys if weighted_keys.numel() else None,
        )
        ctx.options = (cost, scale, detach_weights, may_be_empty)
        ctx.mark_non_differentiable(weights, costs, weighted_keys)
        # No zero-filled (Q, K) gradients for the non-differentiable outputs.
        ctx.set_materialize_grads(False)

    @staticmethod
    @backward_in_own_precision
    def backward(
        ctx: Any,
        grad_expected: Tensor | None,
        _grad_weights: Tensor | None,
        _grad_costs: Tensor | None,
        _grad_weighted_keys: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        query, keys, excluded, weights, expected, costs, weighted_keys = ctx.saved_tensors
        cost, scale, detach_weights, may_be_empty = ctx.options
        nones = [None] * 6
        if grad_expected is None:  # only the weights or costs were used: they have no gradient
            return None, None, *nones
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            grads = differentiable_backward(
                grad_expected,
                query,
                keys,
                excluded,
                ctx.needs_input_grad,
                cost=cost,
                scale=scale,
                detach_weights=detach_weights,
            )
            return *grads, *nones
        if detach_weights and keys.dim() == 2:  # no (Q, K) product: two matrix products
            grad_query, grad_keys = weights_vjp(
                weights,
                grad_expected,
                query,
                keys,
                cost,
                rows_sum_to_one=not may_be_empty,
                need_keys=ctx.needs_input_grad[1],
                weighted_keys=weighted_keys,
            )
            grads = as_input_grads(ctx.needs_input_grad, (query, keys), (grad_query, grad_keys))
            return *grads, *nones
        if detach_weights:
            grad_cost = weights * grad_expected[:, None]
        else:
            # pi (1 + s (d - E)) g, in place on one fresh tensor
            grad_cost = (costs - expected[:, None]).mul_(scale).add_(1.0)
            grad_cost.mul_(weights).mul_(grad_expected[:, None])
        grad_query, grad_keys = cost_vjp(
            grad_cost, query, keys, cost, need_keys=ctx.needs_input_grad[1]
        )
        grads = as_input_grads(ctx.needs_input_grad, (query, keys), (grad_query, grad_keys))
        return *grads, *nones


cache_forward_signature(_DenseExpectedCost)


def dense_expected_cost(
    query: Tensor,
    keys: Tensor,
    members: Membership | None,
    *,
    side: Side,
    options: CCTOptions,
) -> ConditionalExpectation:
    """Expected cost of each query over the keys that take part (see
    :class:`cct_loss.transport.ExpectedCostKernel`).

    Args:
        query: ``(Q, D)`` prepared queries.
        keys: ``(K, D)`` keys shared by all queries, or ``(Q, K, D)`` per query.
        members: which keys take part for each query (shared keys only), or ``None`` (all).
        side: ``"positives"`` or ``"negatives"``.
        options: cost, sharpness, ``detach_weights``, ``return_details``.

    Returns:
        :class:`ConditionalExpectation` with the ``(Q, K)`` weights.
    """
    excluded = None if members is None else members.excluded_mask()
    may_be_empty = members is not None and members.may_be_empty
    scale = logit_scale(options, side)
    # Detached weights over shared keys need no cost matrix (unless diagnostics read it): the
    # expected cost comes from the weights' moments, which the backward pass needs anyway.
    moments = (
        options.detach_weights
        and keys.dim() == 2
        and not options.return_details
        and not isinstance(scale, Tensor)
    )
    expected, weights, costs, _ = _DenseExpectedCost.apply(  # type: ignore[no-untyped-call]
        query,
        keys,
        excluded,
        options.cost,
        scale,
        options.detach_weights,
        may_be_empty,
        not moments,
    )
    entropy, extreme = weight_statistics(
        weights, costs, excluded, side=side, return_details=bool(options.return_details)
    )
    present = ~excluded.all(-1) if may_be_empty and excluded is not None else None
    return ConditionalExpectation(expected, entropy, extreme, weights, present)
