"""The Triton kernels of ``impl="triton"`` (imported only when that implementation runs).

For one query and the keys that take part, with logits ``l_k = s c_k`` (``s = +t_pos`` for
positives, ``-t_neg`` for negatives) and ``pi = softmax(l)``:

* :func:`expected_cost_forward`: one program per block of queries streams over blocks of keys
  with a running maximum, normaliser and weighted cost (as flash attention does) and writes, per
  query, ``E = sum_k pi_k c_k``, ``log sum_k exp(l_k)``, the entropy of ``pi`` and the extreme
  cost (largest for positives, smallest for negatives);
* :func:`expected_cost_grad_query` and :func:`expected_cost_grad_keys`: the backward pass, one
  program per block of queries (looping over keys) and one per block of keys (looping over
  queries), each recomputing the block's costs and weights from the saved log-normaliser, so
  neither writes a ``Q x K`` tensor and neither needs atomics. With ``G_qk = g_q dE/dc_qk``
  (``pi_k`` with detached weights, ``pi_k (1 + s (c_k - E))`` through them):
  ``dq = 2 (sum_k G_qk q - G n)`` and ``dn = 2 (sum_q G_qk n - G^T q)`` (sqeuclidean) or
  ``-G n`` and ``-G^T q`` (cosine).

Which keys take part is computed from integer ids (groups, self indices) inside the kernels;
rows and columns beyond ``Q`` and ``K`` and feature columns beyond ``D`` are masked, so any
sizes work. Products run in the embeddings' dtype with float32 accumulation (IEEE float32
unless ``PRECISION`` asks for TF32); everything else is float32. ``UPCAST`` widens half
operands before the products (Triton's CPU interpreter computes bfloat16 ``tl.dot`` wrongly).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_block(ptr, rows, rd, N, D, UPCAST: tl.constexpr):
    """Rows ``rows`` of a row-major ``(N, D)`` array of embeddings (queries or keys), zero beyond
    ``N`` and ``D``: in the products' dtype, in float32, and their squared norms (float32)."""
    x = tl.load(
        ptr + rows[:, None] * D + rd[None, :],
        mask=(rows[:, None] < N) & (rd[None, :] < D),
        other=0.0,
    )
    x_f = x.to(tl.float32)
    if UPCAST:
        x = x_f
    return x, x_f, tl.sum(x_f * x_f, axis=1)


@triton.jit
def _costs(q, q_sq, keys, k_sq, COSINE: tl.constexpr, PRECISION: tl.constexpr):
    """``(BLOCK_Q, BLOCK_K)`` clamped costs of a query block against a key block."""
    gram = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
    if COSINE:
        cost = 1.0 - gram
    else:
        cost = q_sq[:, None] + k_sq[None, :] - 2.0 * gram
    return tl.maximum(cost, 0.0)


@triton.jit
def _takes_part(
    rq,
    rk,
    Q,
    K,
    qg_ptr,
    kg_ptr,
    qs_ptr,
    ks_ptr,
    HAS_GROUPS: tl.constexpr,
    SAME_GROUP: tl.constexpr,
    HAS_SELF: tl.constexpr,
):
    """``(BLOCK_Q, BLOCK_K)`` True where key ``rk`` takes part in query ``rq``'s softmax."""
    q_in = rq < Q
    k_in = rk < K
    take = q_in[:, None] & k_in[None, :]
    if HAS_GROUPS:
        qg = tl.load(qg_ptr + rq, mask=q_in, other=0)
        kg = tl.load(kg_ptr + rk, mask=k_in, other=0)
        if SAME_GROUP:
            take = take & (qg[:, None] == kg[None, :])
            if HAS_SELF:
                qs = tl.load(qs_ptr + rq, mask=q_in, other=-1)
                ks = tl.load(ks_ptr + rk, mask=k_in, other=-2)
                take = take & (qs[:, None] != ks[None, :])
        else:
            take = take & (qg[:, None] != kg[None, :])
    return take


@triton.jit
def _load_query_stats(grad_ptr, expected_ptr, lse_ptr, rq, Q):
    """Per query: the upstream gradient, the expected cost and the saved log-normaliser."""
    q_in = rq < Q
    g = tl.load(grad_ptr + rq, mask=q_in, other=0.0)
    expected = tl.load(expected_ptr + rq, mask=q_in, other=0.0)
    lse = tl.load(lse_ptr + rq, mask=q_in, other=0.0)
    return g, expected, lse


@triton.jit
def expected_cost_forward(
    q_ptr,
    k_ptr,
    qg_ptr,
    kg_ptr,
    qs_ptr,
    ks_ptr,
    scale_ptr,
    expected_ptr,
    lse_ptr,
    entropy_ptr,
    extreme_ptr,
    Q,
    K,
    D,
    HAS_GROUPS: tl.constexpr,
    SAME_GROUP: tl.constexpr,
    HAS_SELF: tl.constexpr,
    COSINE: tl.constexpr,
    FARTHER: tl.constexpr,
    DETAILS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rq = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rd = tl.arange(0, BLOCK_D)
    q, _q_f, q_sq = _load_block(q_ptr, rq, rd, Q, D, UPCAST)
    scale = tl.load(scale_ptr)
    running_max = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    normaliser = tl.zeros((BLOCK_Q,), tl.float32)
    weighted = tl.zeros((BLOCK_Q,), tl.float32)
    offsets = tl.zeros((BLOCK_Q,), tl.float32)  # sum_k exp(l_k - m) (l_k - m), for the entropy
    if FARTHER:
        extreme = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    else:
        extreme = tl.full((BLOCK_Q,), float("inf"), tl.float32)
    for start in range(0, K, BLOCK_K):
        rk = start + tl.arange(0, BLOCK_K)
        keys, _keys_f, k_sq = _load_block(k_ptr, rk, rd, K, D, UPCAST)
        cost = _costs(q, q_sq, keys, k_sq, COSINE, PRECISION)
        take = _takes_part(
            rq, rk, Q, K, qg_ptr, kg_ptr, qs_ptr, ks_ptr, HAS_GROUPS, SAME_GROUP, HAS_SELF
        )
        logits = tl.where(take, cost * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        # A row whose keys so far all sit out keeps max -inf: shift by 0 instead.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(running_max - shift)
        shifted = tl.where(take, logits - shift[:, None], 0.0)  # no -inf: no 0 * inf below
        p = tl.where(take, tl.exp(shifted), 0.0)
        if DETAILS:
            moved = tl.where(running_max == float("-inf"), 0.0, running_max - shift)
            block = tl.sum(p * shifted, axis=1)
            offsets = rescale * (offsets + normaliser * moved) + block
            if FARTHER:
                extreme = tl.maximum(extreme, tl.max(tl.where(take, cost, float("-inf")), axis=1))
            else:
                extreme = tl.minimum(extreme, tl.min(tl.where(take, cost, float("inf")), axis=1))
        normaliser = normaliser * rescale + tl.sum(p, axis=1)
        weighted = weighted * rescale + tl.sum(p * cost, axis=1)
        running_max = new_max
    # Z >= 1 wherever a key took part (the maximum contributes exp(0)); Z = S = E = 0 elsewhere.
    safe = tl.maximum(normaliser, 1.0)
    q_in = rq < Q
    tl.store(expected_ptr + rq, weighted / safe, mask=q_in)
    tl.store(lse_ptr + rq, running_max + tl.log(normaliser), mask=q_in)
    if DETAILS:
        tl.store(entropy_ptr + rq, tl.log(safe) - offsets / safe, mask=q_in)
        tl.store(extreme_ptr + rq, extreme, mask=q_in)


@triton.jit
def _grad_of_costs(cost, take, scale, g, expected, lse, DETACH: tl.constexpr):
    """``G_qk = g_q dE_q/dc_qk`` from the recomputed costs and the saved log-normaliser."""
    shift = tl.where(lse == float("-inf"), 0.0, lse)
    pi = tl.where(take, tl.exp(cost * scale - shift[:, None]), 0.0)
    if DETACH:
        dcost = pi
    else:
        dcost = pi * (1.0 + scale * (cost - expected[:, None]))
    return tl.where(take, dcost * g[:, None], 0.0)


@triton.jit
def expected_cost_grad_query(
    q_ptr,
    k_ptr,
    qg_ptr,
    kg_ptr,
    qs_ptr,
    ks_ptr,
    scale_ptr,
    grad_ptr,
    expected_ptr,
    lse_ptr,
    dq_ptr,
    Q,
    K,
    D,
    HAS_GROUPS: tl.constexpr,
    SAME_GROUP: tl.constexpr,
    HAS_SELF: tl.constexpr,
    COSINE: tl.constexpr,
    DETACH: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rq = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rd = tl.arange(0, BLOCK_D)
    q_in = rq < Q
    q, q_f, q_sq = _load_block(q_ptr, rq, rd, Q, D, UPCAST)
    scale = tl.load(scale_ptr)
    g, expected, lse = _load_query_stats(grad_ptr, expected_ptr, lse_ptr, rq, Q)
    toward = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)  # sum_k G_qk n_k
    row_sums = tl.zeros((BLOCK_Q,), tl.float32)
    for start in range(0, K, BLOCK_K):
        rk = start + tl.arange(0, BLOCK_K)
        keys, _keys_f, k_sq = _load_block(k_ptr, rk, rd, K, D, UPCAST)
        cost = _costs(q, q_sq, keys, k_sq, COSINE, PRECISION)
        take = _takes_part(
            rq, rk, Q, K, qg_ptr, kg_ptr, qs_ptr, ks_ptr, HAS_GROUPS, SAME_GROUP, HAS_SELF
        )
        grad_cost = _grad_of_costs(cost, take, scale, g, expected, lse, DETACH)
        toward += tl.dot(grad_cost.to(keys.dtype), keys, input_precision=PRECISION)
        row_sums += tl.sum(grad_cost, axis=1)
    if COSINE:
        dq = -toward
    else:
        dq = 2.0 * (row_sums[:, None] * q_f - toward)
    tl.store(dq_ptr + rq[:, None] * D + rd[None, :], dq, mask=q_in[:, None] & (rd[None, :] < D))


@triton.jit
def expected_cost_grad_keys(
    q_ptr,
    k_ptr,
    qg_ptr,
    kg_ptr,
    qs_ptr,
    ks_ptr,
    scale_ptr,
    grad_ptr,
    expected_ptr,
    lse_ptr,
    dk_ptr,
    Q,
    K,
    D,
    HAS_GROUPS: tl.constexpr,
    SAME_GROUP: tl.constexpr,
    HAS_SELF: tl.constexpr,
    COSINE: tl.constexpr,
    DETACH: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rd = tl.arange(0, BLOCK_D)
    k_in = rk < K
    # This program's keys, loaded once for every block of queries.
    keys, keys_f, k_sq = _load_block(k_ptr, rk, rd, K, D, UPCAST)
    scale = tl.load(scale_ptr)
    toward = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)  # sum_q G_qk q_q
    column_sums = tl.zeros((BLOCK_K,), tl.float32)
    for start in range(0, Q, BLOCK_Q):
        rq = start + tl.arange(0, BLOCK_Q)
        q, _q_f, q_sq = _load_block(q_ptr, rq, rd, Q, D, UPCAST)
        g, expected, lse = _load_query_stats(grad_ptr, expected_ptr, lse_ptr, rq, Q)
        cost = _costs(q, q_sq, keys, k_sq, COSINE, PRECISION)
        take = _takes_part(
            rq, rk, Q, K, qg_ptr, kg_ptr, qs_ptr, ks_ptr, HAS_GROUPS, SAME_GROUP, HAS_SELF
        )
        grad_cost = _grad_of_costs(cost, take, scale, g, expected, lse, DETACH)
        toward += tl.dot(tl.trans(grad_cost.to(q.dtype)), q, input_precision=PRECISION)
        column_sums += tl.sum(grad_cost, axis=0)
    if COSINE:
        dk = -toward
    else:
        dk = 2.0 * (column_sums[:, None] * keys_f - toward)
    tl.store(dk_ptr + rk[:, None] * D + rd[None, :], dk, mask=k_in[:, None] & (rd[None, :] < D))
