"""``impl="sdpa"``: the expected cost through ``F.scaled_dot_product_attention``.

The weights are an attention pattern: with ``q' = [q, 1]``, ``n'_k = [n_k, -|n_k|^2 / 2]`` and
values ``[n_k, |n_k|^2]``, ``softmax(-t |q - n_k|^2)`` is ``softmax(2t q'.n'_k)`` and the
output gives ``E`` exactly, for any norms (docs/implementations.md). The attention runs in the
products' dtype; with detached weights the query and key arguments are detached. Through the
weights above :data:`SDPA_MAX_SHARPNESS` the fused kernels lose accuracy (:func:`serves`; the
table hands such calls, and the diagnostics, to ``chunked``); higher derivatives raise."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import is_functorch_wrapped
from ..maths.expectation import ConditionalExpectation, Side
from ..maths.precision import accumulation_dtype, squared_norms
from ..options import CCTOptions
from ..problem.description import KeySet
from ..shortcuts import apply, eager_twin

#: Head dims are padded to a multiple of this so the fused CUDA kernels accept them.
HEAD_DIM_MULTIPLE = 8

#: With gradients through the weights (``detach_weights=False``), the fused kernels' gradient
#: error grows with the sharpness (roughly linearly). The largest sharpness, per device type,
#: at which their gradients keep the library's 1e-4 agreement with the reference (measurements:
#: BENCHMARKS.md, "Where the constants come from"). Above it, on a device type not listed, or
#: for a 0-dim tensor sharpness (whose value is not read: that would synchronise), such calls
#: are served by ``chunked``. Detached weights are exact at any sharpness.
SDPA_MAX_SHARPNESS: dict[str, float] = {"cpu": 500.0, "cuda": 100.0}


@eager_twin
class _NoHigherOrder(torch.autograd.Function):
    """Identity whose backward refuses to be differentiated (``create_graph=True``): the fused
    attention kernels have no exact second derivative."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        if torch.is_grad_enabled() and not is_functorch_wrapped(grad):
            raise RuntimeError(
                "impl='sdpa' has no higher-order derivatives (a backward pass with "
                "create_graph=True): PyTorch's fused attention kernels are not twice "
                "differentiable. Use impl='dense' or impl='chunked', which are exact to any order"
            )
        return grad


def _pad_last(x: Tensor, multiple: int) -> Tensor:
    extra = (-x.shape[-1]) % multiple
    return F.pad(x, (0, extra)) if extra else x


def serves(device_type: str, side: Side, options: CCTOptions) -> bool:
    """Whether the fused kernels keep the library's agreement for this side on ``device_type``:
    always with detached weights, through the weights up to its :data:`SDPA_MAX_SHARPNESS` (a
    device type not listed: never; a tensor sharpness, whose value is not read, is not served)."""
    t = options.t_pos if side == "positives" else options.t_neg
    limit = SDPA_MAX_SHARPNESS.get(device_type, 0.0)
    return options.detach_weights or (not isinstance(t, Tensor) and t <= limit)


def expected_cost(
    query: Tensor, keys: Tensor, key_set: KeySet, *, side: Side, options: CCTOptions
) -> ConditionalExpectation:
    """Each query's expected cost over the keys that take part, from one attention call (the key
    set a boolean mask); no diagnostics or weights (the fused kernels return neither). For a
    side it :func:`serves`."""
    t = options.t_pos if side == "positives" else options.t_neg
    direction = -1.0 if side == "positives" else 1.0  # +t d = -t (-d): flip the keys' sign
    # The attention runs in the embeddings' dtype (half under the precision policy, which the
    # fused CUDA kernels need); the norms and the expected cost in the accumulation dtype.
    if options.cost == "cosine":
        q_att, k_att, values = query, direction * keys, keys
        scale = t
    else:
        keys_sq = squared_norms(keys, keepdim=True).to(keys.dtype)
        q_att = torch.cat([query, torch.ones_like(query[..., :1])], dim=-1)
        k_att = torch.cat([keys, -0.5 * keys_sq], dim=-1) * direction
        values = torch.cat([keys, keys_sq], dim=-1)
        scale = 2.0 * t
    if options.detach_weights:
        q_att, k_att = q_att.detach(), k_att.detach()
    if isinstance(scale, Tensor):  # a tensor sharpness multiplies q' (its value is not read)
        q_att, scale = q_att * scale.to(q_att.dtype), 1.0
    d_values = values.shape[-1]
    q_att, k_att, values = (_pad_last(x, HEAD_DIM_MULTIPLE) for x in (q_att, k_att, values))

    # The attention mask is True where a key takes part.
    excluded = key_set.excluded_mask(keys.shape[-2], query.device)
    mask = None if excluded is None else ~excluded
    present = None
    if mask is not None and key_set.may_be_empty:
        # A row with no key taking part would make the kernel's softmax 0/0: let it attend to
        # every key, then drop its output (E = 0).
        present = mask.any(-1)
        mask = mask | ~present[:, None]
    if keys.dim() == 2:  # one "head" whose Q queries attend to the K shared keys
        attn_mask = None if mask is None else mask.view(1, 1, *mask.shape)
        heads = (q_att[None, None], k_att[None, None], values[None, None])
        out = F.scaled_dot_product_attention(*heads, attn_mask=attn_mask, scale=scale)[0, 0]
    else:  # a batch of Q heads, each with one query and its own K keys
        out = F.scaled_dot_product_attention(
            q_att[:, None, None], k_att[:, None], values[:, None], scale=scale
        )[:, 0, 0]
    acc = accumulation_dtype(query.dtype)
    out = out[..., :d_values].to(acc)
    q = query.to(acc)
    if options.cost == "cosine":
        expected = 1.0 - (q * out).sum(-1)
    else:
        d = query.shape[-1]
        expected = squared_norms(q) + out[..., d] - 2.0 * (q * out[..., :d]).sum(-1)
    if present is not None:
        expected = torch.where(present, expected, 0.0)
    expected = apply(_NoHigherOrder, expected)
    return ConditionalExpectation(expected, None, None, None, present)
