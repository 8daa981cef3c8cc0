"""``impl="chunked"``: the expected cost streamed over blocks of keys with an online softmax.

The forward pass keeps per query a running maximum of the logits ``s d_k``, a normaliser and a
weighted cost (as flash attention does); the backward pass recomputes each block from the inputs
and two saved numbers per query (``E`` and the log-normaliser). No ``(Q, K)`` tensor is ever
held: memory is ``O(Q D + K D + Q chunk_size)`` (docs/implementations.md)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..maths.costs import WeightTerm, cost_block, cost_vjp, shifted_logits, weights_vjp
from ..maths.expectation import (
    ConditionalExpectation,
    Side,
    differentiable_backward,
    grad_of_costs,
    signed_sharpness,
    streamed_expectation,
)
from ..maths.precision import as_input_grads, backward_in_own_precision, squared_norms
from ..options import CCTOptions
from ..problem.description import KeySet, excluded_from_ids
from ..shortcuts import apply, eager_twin

#: Elements per ``(Q, chunk)`` block when ``chunk_size`` is None, per device type. The CPU:
#: 8 MiB in float32, a block that stays in a large cache. CUDA: 256 MiB, because there each
#: block costs a few dozen kernel launches whatever its size, which small blocks let dominate
#: (BENCHMARKS.md, "Where the constants come from"). Memory stays ``O(Q D + K D + Q chunk)``:
#: never a ``Q x K`` tensor.
BLOCK_ELEMENTS: dict[str, int] = {"cpu": 1 << 21, "cuda": 1 << 26}
#: The largest sharpness at which the backward pass of detached weights computes its logits
#: shifted by the per-query constant (see :meth:`_StreamingExpectedCost.backward`): there the
#: shift's rounding, up to ``s * 1e-7`` in each logit, stays near float32's own error in them.
SHIFTED_MAX_SHARPNESS = 1e3
#: The fewest keys per block when ``chunk_size`` is None, however many queries: below this a
#: block's product is too thin to use the matrix units, and the per-block work (launches, a
#: running maximum update) outweighs its arithmetic.
MIN_CHUNK = 128


def default_chunk_size(num_queries: int, num_keys: int, device_type: str = "cpu") -> int:
    """Keys per block that keep one ``(Q, chunk)`` block near :data:`BLOCK_ELEMENTS` of
    ``device_type`` (the CPU's size for device types not listed), at least :data:`MIN_CHUNK`
    and at most ``num_keys``."""
    budget = BLOCK_ELEMENTS.get(device_type, BLOCK_ELEMENTS["cpu"])
    return max(1, min(num_keys, max(MIN_CHUNK, budget // max(num_queries, 1))))


def _blocks(num_keys: int, chunk_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each block. Under ``torch.compile`` with dynamic shapes the loop
    depends on the number of blocks only (not on ``num_keys`` itself)."""
    num_blocks = (num_keys + chunk_size - 1) // chunk_size
    return [(b * chunk_size, min((b + 1) * chunk_size, num_keys)) for b in range(num_blocks)]


@eager_twin
class _StreamingExpectedCost(torch.autograd.Function):
    """``E_q = sum_k softmax_k(s d_qk) d_qk`` streamed over key blocks (see the module docs);
    works under ``torch.func``. A backward with ``create_graph=True`` differentiates the formula,
    which holds the ``(Q, K)`` graph: streaming and higher derivatives do not mix."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        query: Tensor,
        keys: Tensor,
        query_groups: Tensor | None,
        key_groups: Tensor | None,
        query_self: Tensor | None,
        key_self: Tensor | None,
        same_group: bool,
        cost: str,
        signed: float | Tensor,
        detach_weights: bool,
        chunk_size: int,
        return_details: bool,
        farther: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ids = (query_groups, key_groups, query_self, key_self)
        num_keys = keys.shape[-2]
        query_sq = squared_norms(query)
        # The running statistics: (Q,) in the accumulation dtype (float32 for half embeddings)
        running_max = torch.full_like(query_sq, float("-inf"))
        normaliser = torch.zeros_like(running_max)
        weighted = torch.zeros_like(running_max)
        fill = float("-inf") if farther else float("inf")
        extreme = torch.full_like(running_max, fill if return_details else float("nan"))
        # sum_k exp(l_k - m) (l_k - m): the entropy log Z - T / Z without the cancellation of
        # log Z - s E when the weights are nearly one-hot
        offsets = torch.zeros_like(running_max)
        for start, stop in _blocks(num_keys, chunk_size):
            costs = cost_block(query, query_sq, keys[..., start:stop, :], cost)
            logits = costs * signed  # a fresh tensor: updated in place
            excluded = excluded_from_ids(ids, same_group, start, stop)
            if excluded is not None:
                logits.masked_fill_(excluded, float("-inf"))
            if return_details:
                masked = costs if excluded is None else costs.masked_fill(excluded, fill)
                if farther:
                    extreme = torch.maximum(extreme, masked.amax(-1))
                else:
                    extreme = torch.minimum(extreme, masked.amin(-1))
            new_max = torch.maximum(running_max, logits.amax(-1))
            # A row whose keys so far all sit out keeps max -inf: shift by 0 instead.
            shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            rescale = torch.exp(running_max - shift)
            shifted = logits.sub_(shift[..., None])
            exp_logits = shifted.exp() if return_details else shifted.exp_()
            if return_details:
                moved = torch.where(torch.isinf(running_max), 0.0, running_max - shift)
                block = torch.where(exp_logits > 0, exp_logits * shifted, 0.0).sum(-1)
                offsets = rescale * (offsets + normaliser * moved) + block
            normaliser = normaliser * rescale + exp_logits.sum(-1)
            weighted = weighted * rescale + torch.linalg.vecdot(exp_logits, costs)
            running_max = new_max
        # Z >= 1 wherever a key took part (the maximum contributes exp(0)); Z = 0, S = 0 and
        # E = 0 where none did.
        expected = weighted / normaliser.clamp_min(1.0)
        log_normaliser = running_max + torch.log(normaliser)
        entropy = torch.log(normaliser.clamp_min(1.0)) - offsets / normaliser.clamp_min(1.0)
        if not return_details:
            entropy = torch.full_like(entropy, float("nan"))
        return expected, log_normaliser, extreme, entropy

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        query, keys, *ids = inputs[:6]
        same_group, cost, signed, detach_weights, chunk_size = inputs[6:11]
        expected, log_normaliser, extreme, entropy = output
        ctx.save_for_backward(query, keys, *ids, expected, log_normaliser)
        ctx.options = (cost, signed, detach_weights, chunk_size, same_group)
        ctx.mark_non_differentiable(log_normaliser, extreme, entropy)

    @staticmethod
    @backward_in_own_precision
    def backward(
        ctx: Any,
        grad_expected: Tensor,
        _grad_lse: Tensor | None,
        _grad_extreme: Tensor | None,
        _grad_entropy: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        query, keys, *saved_ids, expected, log_normaliser = ctx.saved_tensors
        ids = (saved_ids[0], saved_ids[1], saved_ids[2], saved_ids[3])
        cost, signed, detach_weights, chunk_size, same_group = ctx.options
        need_query, need_keys = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        nones = [None] * 11
        num_keys = keys.shape[-2]
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            excluded = excluded_from_ids(ids, same_group, 0, num_keys)
            grads = differentiable_backward(
                grad_expected, query, keys, excluded, ctx.needs_input_grad,
                cost=cost, signed=signed, detach_weights=detach_weights,
            )  # fmt: skip
            return *grads, *nones
        query_sq = squared_norms(query)
        grad_query = torch.zeros_like(query, dtype=query_sq.dtype)
        key_blocks: list[Tensor] = []
        # A query without keys has log Z = -inf; shifting its (all -inf) logits by 0 gives 0.
        lse = torch.where(torch.isinf(log_normaliser), 0.0, log_normaliser)
        # Detached weights over shared keys need only the weights: from the logits without the
        # per-query constant s |q|^2 (or s for cosine), one product per block, with the
        # log-normaliser shifted alike (as dense's forward pass). Not for a large sharpness:
        # shifting by s |q|^2 in float32 moves each logit by up to s * 1e-7 against the forward
        # pass's log-normaliser, so the weights would no longer sum to 1.
        shifted = (
            detach_weights
            and keys.dim() == 2
            and not isinstance(signed, Tensor)
            and abs(signed) <= SHIFTED_MAX_SHARPNESS
        )
        if shifted:
            lse = lse - signed * (1.0 if cost == "cosine" else query_sq)
        for start, stop in _blocks(num_keys, chunk_size):
            block = keys[..., start:stop, :]
            if shifted:
                costs = None
                logits = shifted_logits(query, block, cost, float(signed))
            else:
                costs = cost_block(query, query_sq, block, cost)
                logits = costs * signed
            excluded = excluded_from_ids(ids, same_group, start, stop)
            if excluded is not None:
                logits.masked_fill_(excluded, float("-inf"))
            weights = logits.sub_(lse[..., None]).exp_()  # pi, recomputed in place
            if detach_weights and block.dim() == 2:  # two products on the weights, as dense
                term = WeightTerm(weights, grad_expected, None, rows_sum_to_one=False)  # a block's
                block_query, block_keys = weights_vjp(
                    [term], query, block, cost, need_keys=need_keys
                )
            else:
                grad_cost = grad_of_costs(
                    grad_expected[..., None], weights, costs, expected[..., None], signed,
                    detach_weights,
                )  # fmt: skip
                block_query, block_keys = cost_vjp(
                    grad_cost, query, block, cost, need_keys=need_keys
                )
            grad_query = grad_query + block_query  # out of place: vmap may batch either side
            if block_keys is not None:
                key_blocks.append(block_keys)
        grad_keys = torch.cat(key_blocks, dim=-2) if need_keys else None
        grads = as_input_grads((need_query, need_keys), (query, keys), (grad_query, grad_keys))
        return *grads, *nones


def expected_cost(
    query: Tensor, keys: Tensor, key_set: KeySet, *, side: Side, options: CCTOptions
) -> ConditionalExpectation:
    """Each query's expected cost over the keys that take part, streamed in blocks of
    ``chunk_size`` keys; the diagnostics from the running statistics, no weights."""
    chunk = options.chunk_size or default_chunk_size(
        query.shape[0], keys.shape[-2], query.device.type
    )
    ids = key_set.ids(keys.shape[-2], query.device)
    expected, log_normaliser, extreme, entropy = apply(
        _StreamingExpectedCost, query, keys, *ids, key_set.same_group, options.cost,
        signed_sharpness(options, side), options.detach_weights, chunk,
        bool(options.return_details), side == "positives",
    )  # fmt: skip
    if not options.return_details:  # the kernel wrote placeholders
        entropy = extreme = None
    return streamed_expectation(expected, log_normaliser, extreme, entropy, key_set.may_be_empty)
