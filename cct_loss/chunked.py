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

then ``dd/dq = 2 (q - n)``, ``dd/dn = 2 (n - q)`` (sqeuclidean) or ``-n``, ``-q`` (cosine), with
no gradient where the cost was clamped at 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .costs import unclamped_cost
from .transport import ConditionalExpectation

#: Elements per ``(Q, chunk)`` block when ``chunk_size`` is None (8 MiB in float32).
BLOCK_ELEMENTS = 1 << 21
MIN_CHUNK = 128


def default_chunk_size(num_queries: int, num_keys: int) -> int:
    """Block width that keeps one ``(Q, chunk)`` float32 block near 8 MiB."""
    return max(1, min(num_keys, max(MIN_CHUNK, BLOCK_ELEMENTS // max(num_queries, 1))))


def _block_cost(query: Tensor, query_sq: Tensor, keys: Tensor, cost: str) -> tuple[Tensor, Tensor]:
    """Clamped and unclamped costs of every query against one block of keys.

    Args:
        query: ``(Q, D)``; query_sq: ``(Q, 1)`` squared norms.
        keys: ``(C, D)`` shared block or ``(Q, C, D)`` per-query block.

    Returns:
        ``(Q, C)`` cost and ``(Q, C)`` cost before clamping.
    """
    if keys.dim() == 2:
        gram = query @ keys.T
        keys_sq = keys.pow(2).sum(-1).unsqueeze(0)
    else:
        gram = torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1)
        keys_sq = keys.pow(2).sum(-1)
    raw = unclamped_cost(gram, query_sq, keys_sq, cost)
    return raw.clamp_min(0.0), raw


def _block_mask(
    query_ids: Tensor | None, key_ids: Tensor | None, start: int, stop: int
) -> Tensor | None:
    if query_ids is None or key_ids is None:
        return None
    return query_ids[:, None] != key_ids[None, start:stop]


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
    ) -> tuple[Tensor, Tensor, Tensor]:
        num_queries = query.shape[0]
        num_keys = keys.shape[-2]
        query_sq = query.pow(2).sum(-1, keepdim=True)
        shape = (num_queries,)
        running_max = query.new_full(shape, float("-inf"))
        normaliser = query.new_zeros(shape)
        weighted = query.new_zeros(shape)
        nearest = query.new_full(shape, float("inf"))
        for start in range(0, num_keys, chunk_size):
            stop = min(start + chunk_size, num_keys)
            costs, _ = _block_cost(query, query_sq, keys[..., start:stop, :], cost)
            logits = costs * -sharpness
            mask = _block_mask(query_ids, key_ids, start, stop)
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
                costs_for_min = costs.masked_fill(~mask, float("inf"))
            else:
                costs_for_min = costs
            nearest = torch.minimum(nearest, costs_for_min.amin(-1))
            new_max = torch.maximum(running_max, logits.amax(-1))
            # A row whose keys so far are all masked keeps max -inf: shift by 0 instead.
            shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            rescale = torch.exp(running_max - shift)
            exp_logits = torch.exp(logits - shift[:, None])
            normaliser = normaliser * rescale + exp_logits.sum(-1)
            weighted = weighted * rescale + (exp_logits * costs).sum(-1)
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
        grad_query = torch.zeros_like(query) if need_query else None
        grad_keys = torch.zeros_like(keys) if need_keys else None
        query_sq = query.pow(2).sum(-1, keepdim=True)
        shared = keys.dim() == 2
        num_keys = keys.shape[-2]
        for start in range(0, num_keys, chunk_size):
            stop = min(start + chunk_size, num_keys)
            block = keys[..., start:stop, :]
            costs, raw = _block_cost(query, query_sq, block, cost)
            logits = costs * -sharpness
            mask = _block_mask(query_ids, key_ids, start, stop)
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            weights = torch.exp(logits - log_normaliser[:, None])
            if detach_weights:
                grad_cost = weights
            else:
                grad_cost = weights * (1.0 - sharpness * (costs - expected[:, None]))
            grad_cost = grad_cost * grad_expected[:, None] * (raw >= 0)
            # d cost / d q and d cost / d n, with gram = q.n:
            #   sqeuclidean: 2 q - 2 n and 2 n - 2 q;  cosine: -n and -q.
            row_sum = grad_cost.sum(-1, keepdim=True)
            if shared:
                if grad_query is not None:
                    toward = grad_cost @ block
                    grad_query += -toward if cost == "cosine" else 2.0 * (row_sum * query - toward)
                if grad_keys is not None:
                    toward_q = grad_cost.T @ query
                    col_sum = grad_cost.sum(0).unsqueeze(-1)
                    grad_keys[start:stop] += (
                        -toward_q if cost == "cosine" else 2.0 * (col_sum * block - toward_q)
                    )
            else:
                if grad_query is not None:
                    toward = torch.bmm(grad_cost.unsqueeze(1), block).squeeze(1)
                    grad_query += -toward if cost == "cosine" else 2.0 * (row_sum * query - toward)
                if grad_keys is not None:
                    g = grad_cost.unsqueeze(-1)
                    grad_keys[:, start:stop] += (
                        -g * query.unsqueeze(1)
                        if cost == "cosine"
                        else 2.0 * g * (block - query.unsqueeze(1))
                    )
        return grad_query, grad_keys, None, None, None, None, None, None


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

    Returns:
        :class:`ConditionalExpectation` without weights (``weights=None``); the entropy
        ``log Z + t E`` and the nearest cost come from the running statistics.
    """
    chunk = chunk_size or default_chunk_size(query.shape[0], keys.shape[-2])
    expected, log_normaliser, nearest = _StreamingExpectedCost.apply(  # type: ignore[no-untyped-call]
        query, keys, query_ids, key_ids, cost, sharpness, detach_weights, chunk
    )
    # H = -sum pi log pi with log pi = -t d - log Z:  H = log Z + t E.
    entropy = (log_normaliser + sharpness * expected).detach()
    return ConditionalExpectation(expected, entropy, nearest, None)
