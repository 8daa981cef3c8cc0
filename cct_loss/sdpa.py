"""``impl="sdpa"``: the repulsion through ``torch.nn.functional.scaled_dot_product_attention``.

The negative weights are an attention pattern. For the squared Euclidean cost,
``-t d_k = -t (|q|^2 + |n_k|^2 - 2 q.n_k)``, and ``|q|^2`` does not depend on ``k``, so

    softmax_k(-t d_k) = softmax_k(2t * q'.n'_k)   with q' = [q, 1], n'_k = [n_k, -|n_k|^2 / 2].

With values ``v_k = [n_k, |n_k|^2]`` the attention output ``O = sum_k pi_k v_k`` gives the expected
cost ``E = |q|^2 + O[D] - 2 q.O[:D]``. On the unit sphere the extra column is constant and this is
the familiar ``softmax_k(2t q.n_k)``; the augmentation makes it exact for any norms (zero vectors
and ``normalize=False`` included). For the cosine cost (unit vectors), ``softmax_k(t q.n_k)`` and
``E = 1 - q.O``. The in-batch exclusion is a boolean attention mask.

That hands forward and backward to PyTorch's fused attention kernels (FlashAttention-style on
CUDA, a memory-lean flash kernel on the CPU). ``detach_weights=True`` detaches the query and
key arguments (not the values), which is exactly "weights are constants": the gradient then
flows only through the costs. Weight entropies and nearest-negative costs are not produced by
the kernel; when diagnostics are asked for they come from one extra no-grad streaming pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunked import chunked_repulsion
from .layouts import negative_mask
from .transport import ConditionalExpectation

#: Head dims are padded to a multiple of this so the fused CUDA kernels accept them.
HEAD_DIM_MULTIPLE = 8


def _pad_last(x: Tensor, multiple: int) -> Tensor:
    extra = (-x.shape[-1]) % multiple
    return F.pad(x, (0, extra)) if extra else x


def sdpa_repulsion(
    query: Tensor,
    keys: Tensor,
    query_ids: Tensor | None,
    key_ids: Tensor | None,
    *,
    cost: str,
    sharpness: float,
    detach_weights: bool,
    with_stats: bool,
) -> ConditionalExpectation:
    """Expected cost under ``softmax_k(-t_neg d_k)`` from one attention call.

    Args:
        query: ``(Q, D)`` prepared queries.
        keys: ``(K, D)`` shared candidate negatives or ``(Q, K, D)`` per query.
        query_ids, key_ids: ``(Q,)`` and ``(K,)`` instance ids (shared keys only), or ``None``;
            they become a ``(Q, K)`` boolean attention mask.
        cost: ``"sqeuclidean"`` or ``"cosine"``.
        sharpness: ``t_neg``.
        detach_weights: treat the weights as constants in the backward pass.
        with_stats: also compute the weight entropy and the nearest cost (an extra no-grad
            streaming pass); otherwise they are NaN.

    Returns:
        :class:`ConditionalExpectation` without weights.
    """
    if cost == "cosine":
        q_att, k_att, values = query, keys, keys
        scale = sharpness
    else:
        keys_sq = keys.pow(2).sum(-1, keepdim=True)
        q_att = torch.cat([query, torch.ones_like(query[..., :1])], dim=-1)
        k_att = torch.cat([keys, -0.5 * keys_sq], dim=-1)
        values = torch.cat([keys, keys_sq], dim=-1)
        scale = 2.0 * sharpness
    if detach_weights:
        q_att, k_att = q_att.detach(), k_att.detach()
    d_values = values.shape[-1]
    q_att = _pad_last(q_att, HEAD_DIM_MULTIPLE)
    k_att = _pad_last(k_att, HEAD_DIM_MULTIPLE)
    values = _pad_last(values, HEAD_DIM_MULTIPLE)

    mask = negative_mask(query_ids, key_ids)
    if mask is not None:
        mask = mask.view(1, 1, *mask.shape)
    if keys.dim() == 2:  # one "head" whose Q queries attend to the K shared keys
        out = F.scaled_dot_product_attention(
            q_att[None, None], k_att[None, None], values[None, None], attn_mask=mask, scale=scale
        )[0, 0]
    else:  # a batch of Q heads, each with one query and its own K keys
        out = F.scaled_dot_product_attention(
            q_att[:, None, None], k_att[:, None], values[:, None], scale=scale
        )[:, 0, 0]
    out = out[..., :d_values]
    if cost == "cosine":
        expected = 1.0 - (query * out).sum(-1)
    else:
        d = query.shape[-1]
        expected = query.pow(2).sum(-1) + out[..., d] - 2.0 * (query * out[..., :d]).sum(-1)

    if with_stats:
        with torch.no_grad():
            stats = chunked_repulsion(
                query.detach(),
                keys.detach(),
                query_ids,
                key_ids,
                cost=cost,
                sharpness=sharpness,
                detach_weights=True,
                chunk_size=None,
                with_stats=True,
            )
        entropy, nearest = stats.entropy, stats.extreme
    else:
        entropy = nearest = torch.full_like(expected, float("nan")).detach()
    return ConditionalExpectation(expected, entropy, nearest, None)
