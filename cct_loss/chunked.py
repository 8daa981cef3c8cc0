"""``impl="chunked"``: the repulsion streamed over blocks of negatives with an online softmax.

For each query the forward pass keeps, over blocks of ``chunk_size`` keys, a running maximum
``m`` of the logits ``s_k = -t d_k``, a running normaliser ``Z = sum exp(s_k - m)`` and a running
weighted cost ``S = sum exp(s_k - m) d_k`` (as flash attention does); the expected cost is
``E = S / Z``. The backward pass recomputes each block from the inputs and two saved numbers per
query (``E`` and ``log sum_k exp(s_k)``), so no ``(Q, K)`` tensor is ever held, forward or
backward: memory is ``O(Q D + K D + Q chunk_size)``.

Gradients (``pi_k = softmax_k(-t d_k)``, ``g`` the upstream gradient of ``E``):

* ``detach_weights=True``: ``dE/dd_k = pi_k``;
* ``detach_weights=False``: ``dE/dd_k = pi_k (1 - t (d_k - E))``,

pulled back to the embeddings block by block by :func:`cct_loss.costs.cost_vjp`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .costs import cost_block, cost_vjp
from .layouts import negative_mask
from .transport import ConditionalExpectation

#: Elements per ``(Q, chunk)`` block when ``chunk_size`` is None (8 MiB in float32).
BLOCK_ELEMENTS = 1 << 21
MIN_CHUNK = 128


def default_chunk_size(num_queries: int, num_keys: int) -> int:
    """Block width that keeps one ``(Q, chunk)`` float32 block near 8 MiB."""
    return max(1, min(num_keys, max(MIN_CHUNK, BLOCK_ELEMENTS // max(num_queries, 1))))


class _StreamingExpectedCost(torch.autograd.Function):
    """``E_q = sum_k softmax_k(-t d_qk) d_qk`` streamed over key blocks (see module docs)."""

    @staticmethod
    def forward(
        ctx: Any,
        query: Tensor,
        keys: Tensor,
        query_ids: Tensor | None,
        key_ids: Tensor | None,
        cost: str,
        sharpness: float,
        detach_weights: bool,
        chunk_size: int,
        with_stats: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        num_queries = query.shape[0]
        num_keys = keys.shape[-2]
        query_sq = query.pow(2).sum(-1, keepdim=True)
        shape = (num_queries,)
        running_max = query.new_full(shape, float("-inf"))
        normaliser = query.new_zeros(shape)
        weighted = query.new_zeros(shape)
        nearest = query.new_full(shape, float("inf") if with_stats else float("nan"))
        for start in range(0, num_keys, chunk_size):
            stop = min(start + chunk_size, num_keys)
            costs = cost_block(query, query_sq, keys[..., start:stop, :], cost)
            logits = costs * -sharpness
            mask = negative_mask(query_ids, None if key_ids is None else key_ids[start:stop])
            if mask is not None:
                logits.masked_fill_(~mask, float("-inf"))
            if with_stats:
                masked = costs if mask is None else costs.masked_fill(~mask, float("inf"))
                nearest = torch.minimum(nearest, masked.amin(-1))
            new_max = torch.maximum(running_max, logits.amax(-1))
            # A row whose keys so far are all masked keeps max -inf: shift by 0 instead.
            shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            rescale = torch.exp(running_max - shift)
            exp_logits = logits.sub_(shift[:, None]).exp_()
            normaliser = normaliser * rescale + exp_logits.sum(-1)
            weighted = weighted * rescale + torch.linalg.vecdot(exp_logits, costs)
            running_max = new_max
        expected = weighted / normaliser
        log_normaliser = running_max + torch.log(normaliser)
        ctx.save_for_backward(query, keys, query_ids, key_ids, expected, log_normaliser)
        ctx.options = (cost, sharpness, detach_weights, chunk_size)
        ctx.mark_non_differentiable(log_normaliser, nearest)
        return expected, log_normaliser, nearest

    @staticmethod
    def backward(
        ctx: Any, grad_expected: Tensor, _grad_lse: Tensor | None, _grad_nearest: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        query, keys, query_ids, key_ids, expected, log_normaliser = ctx.saved_tensors
        cost, sharpness, detach_weights, chunk_size = ctx.options
        need_query, need_keys = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_query = torch.zeros_like(query)
        grad_keys = torch.zeros_like(keys) if need_keys else None
        query_sq = query.pow(2).sum(-1, keepdim=True)
        num_keys = keys.shape[-2]
        for start in range(0, num_keys, chunk_size):
            stop = min(start + chunk_size, num_keys)
            block = keys[..., start:stop, :]
            costs = cost_block(query, query_sq, block, cost)
            weights = costs * -sharpness
            mask = negative_mask(query_ids, None if key_ids is None else key_ids[start:stop])
            if mask is not None:
                weights.masked_fill_(~mask, float("-inf"))
            weights.sub_(log_normaliser[:, None]).exp_()  # pi, recomputed
            if detach_weights:
                grad_cost = weights.mul_(grad_expected[:, None])
            else:
                grad_cost = (costs - expected[:, None]).mul_(-sharpness).add_(1.0)
                grad_cost.mul_(weights).mul_(grad_expected[:, None])
            block_query, block_keys = cost_vjp(grad_cost, query, block, cost, need_keys=need_keys)
            grad_query += block_query
            if grad_keys is not None and block_keys is not None:
                grad_keys[..., start:stop, :] += block_keys
        return (grad_query if need_query else None), grad_keys, *([None] * 7)


def chunked_repulsion(
    query: Tensor,
    keys: Tensor,
    query_ids: Tensor | None,
    key_ids: Tensor | None,
    *,
    cost: str,
    sharpness: float,
    detach_weights: bool,
    chunk_size: int | None,
    with_stats: bool,
) -> ConditionalExpectation:
    """Expected cost under ``softmax_k(-t_neg d_k)``, streamed; same contract as dense.

    Args:
        query: ``(Q, D)`` prepared queries.
        keys: ``(K, D)`` shared candidate negatives or ``(Q, K, D)`` per query.
        query_ids, key_ids: ``(Q,)`` and ``(K,)`` instance ids (shared keys only), or ``None``.
        cost: ``"sqeuclidean"`` or ``"cosine"``.
        sharpness: ``t_neg``.
        detach_weights: treat the weights as constants in the backward pass.
        chunk_size: keys per block; ``None`` picks :func:`default_chunk_size`.
        with_stats: also track the nearest negative's cost (the entropy is free).

    Returns:
        :class:`ConditionalExpectation` without weights (``weights=None``); the entropy
        ``log Z + t E`` and the nearest cost come from the running statistics.
    """
    chunk = chunk_size or default_chunk_size(query.shape[0], keys.shape[-2])
    expected, log_normaliser, nearest = _StreamingExpectedCost.apply(  # type: ignore[no-untyped-call]
        query, keys, query_ids, key_ids, cost, sharpness, detach_weights, chunk, with_stats
    )
    # H = -sum pi log pi with log pi = -t d - log Z:  H = log Z + t E.
    entropy = (log_normaliser + sharpness * expected).detach()
    return ConditionalExpectation(expected, entropy, nearest, None)
