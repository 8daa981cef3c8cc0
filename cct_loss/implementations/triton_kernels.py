"""The Triton kernels of ``impl="triton"`` (imported only when it runs).

:func:`expected_cost_forward` streams over key blocks with a running maximum, normaliser and
weighted cost, writing per query ``E``, the log-normaliser, the entropy and the extreme cost;
:func:`expected_cost_grad_query` and :func:`expected_cost_grad_keys` recompute each block from
the log-normaliser, one program per query block and one per key block: no ``Q x K`` tensor, no
atomics. Above one feature tile (``SINGLE_D`` false) the products accumulate over tiles of ``D``
and each backward program writes one tile of output columns. Which keys take part comes from
integer ids; out-of-range rows and columns are masked. Products in the embeddings' dtype with
float32 accumulation (TF32 where ``PRECISION`` says); ``UPCAST`` widens half operands for the
CPU interpreter, whose bfloat16 ``tl.dot`` is wrong."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _offsets(rows, cols, D):
    """Element offsets of rows ``rows``, columns ``cols`` of a row-major ``(N, D)`` array, in
    int64: ``rows * D`` reaches 2**31 from 2**21 rows at D = 1024 (which the kernels take), and
    an int32 product would wrap there and address the wrong rows."""
    return rows.to(tl.int64)[:, None] * D + cols[None, :]


@triton.jit
def _rows(ptr, rows, rd, N, D):
    """Rows ``rows``, columns ``rd`` of a row-major ``(N, D)`` array, zero beyond ``N`` and
    ``D``, in its own dtype."""
    return tl.load(
        ptr + _offsets(rows, rd, D),
        mask=(rows[:, None] < N) & (rd[None, :] < D),
        other=0.0,
    )


@triton.jit
def _operand(x, UPCAST: tl.constexpr):
    """``x`` as a product operand: its own dtype, or float32 where ``UPCAST`` asks."""
    if UPCAST:
        return x.to(tl.float32)
    return x


@triton.jit
def _load_block(ptr, rows, rd, N, D, UPCAST: tl.constexpr):
    """Rows ``rows`` of a row-major ``(N, D)`` array of embeddings (queries or keys), zero beyond
    ``N`` and ``D``: in the products' dtype, in float32, and their squared norms (float32)."""
    x = _rows(ptr, rows, rd, N, D)
    x_f = x.to(tl.float32)
    return _operand(x, UPCAST), x_f, tl.sum(x_f * x_f, axis=1)


@triton.jit
def _costs(q, q_sq, keys, k_sq, COSINE: tl.constexpr, PRECISION: tl.constexpr):
    """``(BLOCK_Q, BLOCK_K)`` clamped costs of a query block against a key block."""
    gram = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
    return _cost_of(gram, q_sq, k_sq, COSINE)


@triton.jit
def _cost_of(gram, q_sq, k_sq, COSINE: tl.constexpr):
    """Clamped costs from the products ``q.n`` and the squared norms."""
    if COSINE:
        cost = 1.0 - gram
    else:
        cost = q_sq[:, None] + k_sq[None, :] - 2.0 * gram
    return tl.maximum(cost, 0.0)


@triton.jit
def _tiled_costs(
    q_ptr,
    rq,
    Q,
    k_ptr,
    rk,
    K,
    D,
    COSINE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The costs of a query block against a key block with ``q.n`` accumulated over feature
    tiles of ``BLOCK_D`` (float32), the squared norms from the same tiles."""
    gram = tl.zeros((BLOCK_Q, BLOCK_K), tl.float32)
    q_sq = tl.zeros((BLOCK_Q,), tl.float32)
    k_sq = tl.zeros((BLOCK_K,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        q, _q_f, q_part = _load_block(q_ptr, rq, rd, Q, D, UPCAST)
        keys, _k_f, k_part = _load_block(k_ptr, rk, rd, K, D, UPCAST)
        gram += tl.dot(q, tl.trans(keys), input_precision=PRECISION)
        q_sq += q_part
        k_sq += k_part
    return _cost_of(gram, q_sq, k_sq, COSINE)


@triton.jit
def _store_tile(ptr, rows, ro, N, D, value, ACCUMULATE: tl.constexpr):
    """Write (or, ``ACCUMULATE``, add) a ``(rows, ro)`` tile of a float32 ``(N, D)`` array."""
    mask = (rows[:, None] < N) & (ro[None, :] < D)
    where = ptr + _offsets(rows, ro, D)
    if ACCUMULATE:
        value += tl.load(where, mask=mask, other=0.0)
    tl.store(where, value, mask=mask)


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
    SINGLE_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rq = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    if SINGLE_D:  # the queries stay in registers for the whole loop
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
        if SINGLE_D:
            keys, _keys_f, k_sq = _load_block(k_ptr, rk, rd, K, D, UPCAST)
            cost = _costs(q, q_sq, keys, k_sq, COSINE, PRECISION)
        else:
            cost = _tiled_costs(
                q_ptr, rq, Q, k_ptr, rk, K, D, COSINE, UPCAST, PRECISION, BLOCK_Q, BLOCK_K, BLOCK_D
            )
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
    SINGLE_D: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
):
    """``dq`` for a block of queries and a tile of ``BLOCK_DOUT`` output columns."""
    rq = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ro = tl.program_id(1) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)  # this program's columns
    if SINGLE_D:  # one tile: the output columns are all of D (BLOCK_DOUT == BLOCK_D)
        q, q_out, q_sq = _load_block(q_ptr, rq, ro, Q, D, UPCAST)
    else:
        q_out = _rows(q_ptr, rq, ro, Q, D).to(tl.float32)
    scale = tl.load(scale_ptr)
    g, expected, lse = _load_query_stats(grad_ptr, expected_ptr, lse_ptr, rq, Q)
    toward = tl.zeros((BLOCK_Q, BLOCK_DOUT), tl.float32)  # sum_k G_qk n_k, this tile
    row_sums = tl.zeros((BLOCK_Q,), tl.float32)
    for start in range(0, K, BLOCK_K):
        rk = start + tl.arange(0, BLOCK_K)
        if SINGLE_D:
            keys_out, _keys_f, k_sq = _load_block(k_ptr, rk, ro, K, D, UPCAST)
            cost = _costs(q, q_sq, keys_out, k_sq, COSINE, PRECISION)
        else:
            cost = _tiled_costs(
                q_ptr, rq, Q, k_ptr, rk, K, D, COSINE, UPCAST, PRECISION, BLOCK_Q, BLOCK_K, BLOCK_D
            )
            keys_out = _operand(_rows(k_ptr, rk, ro, K, D), UPCAST)
        take = _takes_part(
            rq, rk, Q, K, qg_ptr, kg_ptr, qs_ptr, ks_ptr, HAS_GROUPS, SAME_GROUP, HAS_SELF
        )
        grad_cost = _grad_of_costs(cost, take, scale, g, expected, lse, DETACH)
        toward += tl.dot(grad_cost.to(keys_out.dtype), keys_out, input_precision=PRECISION)
        row_sums += tl.sum(grad_cost, axis=1)
    if COSINE:
        dq = -toward
    else:
        dq = 2.0 * (row_sums[:, None] * q_out - toward)
    _store_tile(dq_ptr, rq, ro, Q, D, dq, ACCUMULATE)


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
    SINGLE_D: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
):
    """``dn`` for a block of keys and a tile of ``BLOCK_DOUT`` output columns (``ACCUMULATE``:
    added to what ``dk_ptr`` holds, the query gradient of the same rows in-batch)."""
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    ro = tl.program_id(1) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    if SINGLE_D:  # this program's keys, loaded once for every block of queries
        keys, keys_out, k_sq = _load_block(k_ptr, rk, ro, K, D, UPCAST)
    else:
        keys_out = _rows(k_ptr, rk, ro, K, D).to(tl.float32)
    scale = tl.load(scale_ptr)
    toward = tl.zeros((BLOCK_K, BLOCK_DOUT), tl.float32)  # sum_q G_qk q_q, this tile
    column_sums = tl.zeros((BLOCK_K,), tl.float32)
    for start in range(0, Q, BLOCK_Q):
        rq = start + tl.arange(0, BLOCK_Q)
        g, expected, lse = _load_query_stats(grad_ptr, expected_ptr, lse_ptr, rq, Q)
        if SINGLE_D:
            q_tile, _q_f, q_sq = _load_block(q_ptr, rq, ro, Q, D, UPCAST)
            cost = _costs(q_tile, q_sq, keys, k_sq, COSINE, PRECISION)
        else:
            cost = _tiled_costs(
                q_ptr, rq, Q, k_ptr, rk, K, D, COSINE, UPCAST, PRECISION, BLOCK_Q, BLOCK_K, BLOCK_D
            )
            q_tile = _operand(_rows(q_ptr, rq, ro, Q, D), UPCAST)
        take = _takes_part(
            rq, rk, Q, K, qg_ptr, kg_ptr, qs_ptr, ks_ptr, HAS_GROUPS, SAME_GROUP, HAS_SELF
        )
        grad_cost = _grad_of_costs(cost, take, scale, g, expected, lse, DETACH)
        toward += tl.dot(tl.trans(grad_cost.to(q_tile.dtype)), q_tile, input_precision=PRECISION)
        column_sums += tl.sum(grad_cost, axis=0)
    if COSINE:
        dk = -toward
    else:
        dk = 2.0 * (column_sums[:, None] * keys_out - toward)
    _store_tile(dk_ptr, rk, ro, K, D, dk, ACCUMULATE)
