"""Transport costs between embeddings: ``|a - b|^2`` ("sqeuclidean") or ``1 - cos(a, b)``
("cosine"), from inner products (``|a|^2 + |b|^2 - 2 a.b``, clamped at 0), so no ``(N, K, D)``
difference is formed; their gradients; and the embeddings' preparation (casts, normalisation).
Products run in the embeddings' dtype with float32 accumulation (:mod:`.precision`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..shortcuts import apply, eager_twin
from .precision import (
    Precision,
    accumulation_dtype,
    backward_in_own_precision,
    cast,
    product,
    squared_norms,
)

#: ``eps`` of :func:`torch.nn.functional.normalize`: a zero vector stays zero instead of NaN.
NORMALIZE_EPS = 1e-12


class Preparation(NamedTuple):
    """How raw embeddings become what the costs are computed on (:mod:`cct_loss.maths.precision`):
    cast to the compute dtype, projected onto the unit sphere (``unit``: ``normalize=True``,
    or the cosine cost, which is scale invariant), cast to the products' dtype."""

    compute: torch.dtype
    products: torch.dtype
    unit: bool

    @classmethod
    def of(cls, precision: Precision, *, cost: str, normalize: bool) -> Preparation:
        return cls(precision.compute, precision.products, normalize or cost == "cosine")


def prepare(x: Tensor, preparation: Preparation) -> Tensor:
    """``(..., D)`` raw embeddings prepared (:class:`Preparation`), differentiably: in the
    products' dtype."""
    x = cast(x, preparation.compute)
    if preparation.unit:
        x = unit_rows(x)
    return cast(x, preparation.products)


def prepare_rows(
    x: Tensor, preparation: Preparation | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`prepare` without autograd, for a function that computes its own gradients:
    ``(prepared, unit, norm)``, where ``unit`` (compute dtype) and ``norm`` (``max(|x|, eps)``,
    ``None`` without normalising) are what :func:`prepare_rows_vjp` needs (``preparation``
    ``None``: ``x`` is prepared already)."""
    if preparation is None:
        return x, x, None
    x = cast(x, preparation.compute)
    if not preparation.unit:
        return cast(x, preparation.products), x, None
    unit, norm = _unit_forward(x)
    return cast(unit, preparation.products), unit, norm


def prepare_rows_vjp(grad: Tensor, unit: Tensor, norm: Tensor | None, like: Tensor) -> Tensor:
    """The gradient of :func:`prepare_rows`'s input from that of its output, in ``like``'s
    dtype (the raw embeddings')."""
    if norm is not None:
        grad = _unit_vjp(cast(grad, unit.dtype), unit, norm)
    return cast(grad, like.dtype)


def centred(tensors: Sequence[Tensor | None], preparation: Preparation) -> list[Any]:
    """Embeddings that are not normalised, prepared and moved by one common vector, the mean of
    the first tensor's rows (the gathered rows across processes: the same on every rank),
    without gradient: squared distances do not change, while ``|a|^2 + |b|^2 - 2 a.b`` no
    longer cancels to nothing where every row sits far from the origin (rows near
    ``1000 + noise``: the float32 products kept no digit of the noise)."""
    ready = [None if x is None else cast(x, preparation.compute) for x in tensors]
    rows = ready[0]
    assert rows is not None
    centre = rows.detach().reshape(-1, rows.shape[-1]).mean(0)
    return [None if x is None else cast(x - centre, preparation.products) for x in ready]


def unit_rows(x: Tensor) -> Tensor:
    """``torch.nn.functional.normalize(x, dim=-1)``: the same values and gradients (zero
    vectors stay zero), with a closed-form backward of a few operators instead of autograd's
    graph through the norm, the clamp and the division."""
    unit: Tensor = apply(_UnitRows, x)[0]
    return unit


def _unit_forward(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x / max(|x|, eps), max(|x|, eps))`` over the last dim."""
    norm = clamped_norms(x)
    return x / norm, norm


def clamped_norms(x: Tensor) -> Tensor:
    """``max(|x|, eps)`` over the last dim, ``(..., 1)``; NaN where ``|x|`` overflows.

    In float32 the squares of a row above about 1.8e19 overflow: its norm would be inf and
    the row would pass for a zero vector, the loss of a diverged encoder a plausible number.
    NaN makes it show, as a NaN input does; float64 embeddings are exact. (Exact float32 norms
    would cost every call: BENCHMARKS.md, "Edges and ranks".)"""
    norm: Tensor = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(NORMALIZE_EPS)
    return norm.nan_to_num_(nan=math.nan, posinf=math.nan)


def _unit_vjp(grad: Tensor, unit: Tensor, norm: Tensor) -> Tensor:
    """``(g - y (y . g)) / |x|`` where ``|x| > eps``, ``g / eps`` where the clamp holds (as for
    :func:`F.normalize`): the radial part of ``g`` goes where the norm, not eps, divides."""
    radial = (unit * grad).sum(-1, keepdim=True).masked_fill_(norm <= NORMALIZE_EPS, 0.0)
    result: Tensor = grad.sub(unit * radial).div_(norm)
    return result


@eager_twin
class _UnitRows(torch.autograd.Function):
    """``y = x / max(|x|, eps)`` over the last dim, with the closed-form backward of
    :func:`_unit_vjp`. A backward recorded by autograd (``create_graph=True``) differentiates
    ``F.normalize`` itself."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        return _unit_forward(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        unit, norm = output
        ctx.save_for_backward(inputs[0], unit, norm)
        ctx.mark_non_differentiable(norm)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for ``norm``

    @staticmethod
    @backward_in_own_precision
    def backward(ctx: Any, grad: Tensor | None, _grad_norm: Tensor | None) -> Tensor | None:
        if grad is None:  # the unit vectors were not used (only their norms)
            return None
        x, unit, norm = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            return differentiable_vjp(_normalized, [x], [grad], [True])[0]
        return _unit_vjp(grad, unit, norm)


def _normalized(x: Tensor) -> tuple[Tensor]:
    """``F.normalize(x, dim=-1)``, differentiably, NaN where the norm overflows (as
    :func:`clamped_norms`)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(NORMALIZE_EPS)
    return (x / norm.nan_to_num(nan=math.nan, posinf=math.nan),)


def differentiable_vjp(
    formula: Callable[..., Sequence[Tensor | None]],
    inputs: Sequence[Tensor | None],
    cotangents: Sequence[Tensor | None],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """The vector-Jacobian product of ``formula(*inputs)`` at ``cotangents``, recorded by
    autograd: a custom backward pass with ``create_graph=True``, exact to any order. One
    gradient per input (``None`` where ``needs`` says so)."""
    with torch.enable_grad():
        # Fresh nodes: one input may be computed from another (the in-batch keys are a view of
        # the queries), and the partial derivatives must not follow that path.
        leaves = [None if x is None else x.clone() for x in inputs]
        outputs = formula(*leaves)
        pairs = [
            (o, c)
            for o, c in zip(outputs, cotangents, strict=True)
            if o is not None and c is not None
        ]
        wanted = [x for x, need in zip(leaves, needs, strict=True) if need and x is not None]
        found: Iterator[Tensor | None] = iter(())
        if wanted and pairs:
            values, grads = [o for o, _ in pairs], [c for _, c in pairs]
            found = iter(
                torch.autograd.grad(values, wanted, grads, create_graph=True, allow_unused=True)
            )
    return [
        next(found) if need and x is not None else None
        for x, need in zip(leaves, needs, strict=True)
    ]


def cost_matrix(query: Tensor, keys: Tensor, cost: str) -> Tensor:
    """``(Q, K)`` costs against ``(K, D)`` or ``(Q, K, D)`` keys in plain, twice-differentiable
    autograd; clamped at 0 with the formula's gradient everywhere, as :func:`cost_vjp`."""
    gram = _rowwise_gram(query, keys) if keys.dim() == 3 else _gram(query, keys)
    if cost == "cosine":  # inputs are unit vectors (or zero): 1 - cos(a, b)
        raw = 1.0 - gram
    else:
        raw = squared_norms(query, keepdim=True) + squared_norms(keys) - 2.0 * gram
    # Value clamped at 0 (rounding), gradient of the formula, as in cost_block + cost_vjp.
    return raw + (raw.clamp_min(0.0) - raw).detach()


def _gram(query: Tensor, keys: Tensor) -> Tensor:
    """``(Q, K)`` inner products with shared ``(K, D)`` or per-query ``(Q, K, D)`` keys (a
    batched matrix-vector product: no ``(Q, K, D)`` temporary)."""
    if keys.dim() == 3:
        return product(keys, query.unsqueeze(-1), keys.dtype).squeeze(-1)
    return product(query, keys.T, keys.dtype)


def _rowwise_gram(query: Tensor, keys: Tensor) -> Tensor:
    """``(Q, M)`` products of each query with its own ``(Q, M, D)`` keys, by multiply-and-sum in
    the accumulation dtype (a batch of tiny matrix products is slower on the CPU)."""
    acc = accumulation_dtype(keys.dtype)
    gram: Tensor = torch.linalg.vecdot(cast(query, acc).unsqueeze(-2), cast(keys, acc))
    return gram


def cost_block(
    query: Tensor, query_sq: Tensor | None, keys: Tensor, cost: str, *,
    keys_sq: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``(Q, C)`` clamped costs of ``(Q, D)`` queries (``query_sq``: their squared norms,
    sqeuclidean only) against ``(C, D)`` shared or ``(Q, C, D)`` per-query keys (``keys_sq``
    when the caller has them), without autograd: a fresh tensor in the accumulation dtype."""
    if cost != "cosine" and keys_sq is None:
        keys_sq = squared_norms(keys)
    if keys.dim() == 2 and keys.dtype == accumulation_dtype(keys.dtype):  # one BLAS call
        if keys_sq is None:  # 1 - q.n
            costs = torch.addmm(keys.new_ones(keys.shape[0]), query, keys.T, alpha=-1.0)
        else:  # |q|^2 + |n|^2 - 2 q.n, in place after the product
            assert query_sq is not None
            costs = torch.addmm(keys_sq, query, keys.T, alpha=-2.0).add_(query_sq[:, None])
    else:
        costs = _gram(query, keys)  # a fresh tensor, updated in place
        if keys_sq is None:
            costs.neg_().add_(1.0)
        else:
            assert query_sq is not None
            costs.mul_(-2.0).add_(keys_sq).add_(query_sq[:, None])
    return costs.clamp_min_(0.0)


def shifted_logits(
    query: Tensor, keys: Tensor, cost: str, signed: float, *, keys_sq: Tensor | None = None
) -> Tensor:
    """``(Q, K)`` logits ``signed * c(q, n_k)`` up to a per-query constant (which a softmax
    ignores) from one matrix product: a fresh tensor in the accumulation dtype."""
    if cost != "cosine" and keys_sq is None:
        keys_sq = squared_norms(keys)
    if keys.dtype != accumulation_dtype(keys.dtype):  # half-precision product, then scaled
        logits = _gram(query, keys).mul_(-signed if cost == "cosine" else -2.0 * signed)
        return logits if keys_sq is None else logits.add_(keys_sq, alpha=signed)
    if keys_sq is None:
        return torch.mm(query * -signed, keys.T)
    return torch.addmm(keys_sq, query, keys.T, beta=signed, alpha=-2.0 * signed)


def expected_cost_of_moments(
    weights: Tensor, weighted_keys: Tensor, query: Tensor, cost: str, *,
    query_sq: Tensor | None, keys_sq: Tensor | None, rows_sum_to_one: bool,
) -> Tensor:  # fmt: skip
    """``(Q,)`` expected costs from the weights' moments (``weighted_keys = weights @ keys``) and
    the squared norms, without a cost matrix: ``|q|^2 sum pi + pi.|n|^2 - 2 q.(pi n)``, clamped."""
    toward = torch.linalg.vecdot(cast(query, weighted_keys.dtype), weighted_keys)
    row_sums = None if rows_sum_to_one else weights.sum(-1)
    if cost == "cosine":
        return (toward.neg_().add_(1.0) if row_sums is None else row_sums.sub_(toward)).clamp_min_(
            0.0
        )
    assert query_sq is not None and keys_sq is not None
    if row_sums is None:  # |q|^2 + pi.|n|^2 in one operator
        expected = torch.addmv(query_sq, weights, keys_sq).sub_(toward, alpha=2.0)
    else:
        expected = torch.mv(weights, keys_sq).sub_(toward, alpha=2.0).add_(query_sq * row_sums)
    return expected.clamp_min_(0.0)


def cost_vjp(
    grad_cost: Tensor, query: Tensor, keys: Tensor, cost: str, *, need_keys: bool
) -> tuple[Tensor, Tensor | None]:
    """Pull a ``(Q, C)`` gradient on the costs back to the queries and (``need_keys``) the keys:
    ``2 (q - n)`` and ``2 (n - q)``, or ``-n`` and ``-q`` (cosine), also where a cost was clamped."""
    shared = keys.dim() == 2
    dtype = keys.dtype  # the products' dtype; everything else in the accumulation dtype
    q, n = cast(query, grad_cost.dtype), cast(keys, grad_cost.dtype)
    # sum_k G_qk n_k for every query
    if shared:
        toward_keys = product(grad_cost, keys, dtype)
    else:
        toward_keys = product(grad_cost.unsqueeze(1), keys, dtype).squeeze(1)
    if cost == "cosine":
        grad_query = toward_keys.neg_()
    else:
        grad_query = torch.addcmul(toward_keys, grad_cost.sum(-1, keepdim=True), q, value=-1.0)
        grad_query.mul_(-2.0)
    if not need_keys:
        return grad_query, None
    if shared:
        toward_query = product(grad_cost.T, query, dtype)
        if cost == "cosine":
            return grad_query, toward_query.neg_()
        grad_keys = torch.addcmul(toward_query, grad_cost.sum(0).unsqueeze(-1), n, value=-1.0)
        return grad_query, grad_keys.mul_(-2.0)
    g = grad_cost.unsqueeze(-1)
    if cost == "cosine":
        return grad_query, -g * q.unsqueeze(1)
    return grad_query, 2.0 * g * (n - q.unsqueeze(1))


def pair_costs(
    a: Tensor, b: Tensor, cost: str, *, total: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``c(a, b)`` over the last dim of broadcastable embeddings (each query against its own
    few keys) in the accumulation dtype, or their sum (``total``); and ``a - b`` (sqeuclidean),
    which :func:`pair_costs_vjp` reuses."""
    acc = accumulation_dtype(a.dtype)
    a, b = cast(a, acc), cast(b, acc)
    if cost == "cosine":
        if total:
            return (a * b).sum().neg_().add_(float(a.numel() // a.shape[-1])), None
        gram: Tensor = torch.linalg.vecdot(a, b)
        return gram.neg_().add_(1.0), None
    difference = a - b
    squared: Tensor
    if total:
        squared = (difference * difference).sum()
    else:
        squared = torch.linalg.vecdot(difference, difference)
    return squared, difference


def pair_costs_vjp(
    grad: Tensor | float, a: Tensor, b: Tensor, cost: str, difference: Tensor | None,
    need_b: bool, sums: tuple[int | None, int | None] = (None, None),
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """The gradients of ``sum grad * c(a, b)`` (:func:`pair_costs`; ``grad`` broadcasts against
    the embeddings) for ``a`` and, where ``need_b``, ``b``: ``2 g (a - b)`` and its negative,
    or ``-g b`` and ``-g a`` (cosine), in the accumulation dtype; each summed over its dim of
    ``sums`` where one is given (broadcast pairs: ``b``'s negated after the sum, the smaller)."""

    def summed(x: Tensor, dim: int | None) -> Tensor:
        return x if dim is None else x.sum(dim)

    acc = accumulation_dtype(a.dtype)
    if cost == "cosine":
        grad_b = summed(cast(a, acc) * -grad, sums[1]) if need_b else None
        return summed(cast(b, acc) * -grad, sums[0]), grad_b
    if difference is None:  # a fresh difference: scaled in place
        toward = (cast(a, acc) - cast(b, acc)).mul_(grad * 2.0)
    else:
        toward = difference * (grad * 2.0)
    if not need_b:
        return summed(toward, sums[0]), None
    grad_b = toward.neg() if sums[1] is None else toward.sum(sums[1]).neg_()
    return summed(toward, sums[0]), grad_b


class WeightTerm(NamedTuple):
    """One softmax's share of a detached-weights backward pass, ``G += grad * weights``: its
    ``(Q, K)`` weights, the upstream gradient of its expected costs (``(Q,)`` or one value),
    ``weights @ keys`` when the forward pass has it, and whether every row sums to 1."""

    weights: Tensor
    grad: Tensor | float
    weighted_keys: Tensor | None
    rows_sum_to_one: bool


def weights_vjp(
    terms: Sequence[WeightTerm], query: Tensor, keys: Tensor, cost: str, *,
    need_keys: bool, keys_are_queries: bool = False,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """:func:`cost_vjp` of ``G = sum_t grad_t * weights_t`` (detached weights over ``(K, D)``
    keys) without a ``(Q, K)`` product: ``G n`` from the forward pass's moments. With
    ``keys_are_queries`` the first gradient is the total."""
    dtype = keys.dtype  # the products' dtype; everything else in the accumulation dtype
    acc = terms[0].weights.dtype
    q = cast(query, acc)
    if len(terms) == 1 and not (isinstance(terms[0].grad, Tensor) and terms[0].grad.dim()):
        return _uniform_vjp(terms[0], q, keys, cost, need_keys, keys_are_queries)
    grads = [per_row(term.grad) for term in terms]
    # sum_k G_qk n_k, and the row sums of G
    toward_keys: Tensor | None = None
    row_sums: Tensor | float | None = None
    for term, g in zip(terms, grads, strict=True):
        weighted = term.weighted_keys
        if weighted is None:
            weighted = product(term.weights, keys, dtype)
        toward_keys = weighted * g if toward_keys is None else _add_times(toward_keys, weighted, g)
        if cost != "cosine":
            rows = g if term.rows_sum_to_one else term.weights.sum(-1, keepdim=True).mul_(g)
            row_sums = rows if row_sums is None else row_sums + rows
    assert toward_keys is not None
    if not (need_keys or keys_are_queries):
        if cost == "cosine":
            return toward_keys.neg_(), None
        assert row_sums is not None
        return (q * row_sums).sub_(toward_keys).mul_(2.0), None
    # sum_q G_qk q_q, and the column sums of G
    if len(terms) == 1:  # G^T q = W^T (g q): no (Q, K) product
        (term,) = terms
        toward_query = product(term.weights.T, q * grads[0], dtype)
        column_sums = None
        if cost != "cosine":
            column_sums = (
                term.weights.T @ term.grad
                if isinstance(term.grad, Tensor) and term.grad.dim() == 1
                else term.weights.sum(0).mul_(term.grad)
            )
    else:
        combined = terms[0].weights * grads[0]
        for term, g in zip(terms[1:], grads[1:], strict=True):
            _add_times(combined, term.weights, g)
        toward_query = product(combined.T, q, dtype)
        column_sums = combined.sum(0) if cost != "cosine" else None
    if keys_are_queries:  # d/dq through both places the embeddings appear
        toward = toward_keys.add_(toward_query)
        if cost == "cosine":
            return toward.neg_(), None
        assert row_sums is not None and column_sums is not None
        times_q = column_sums.unsqueeze(-1).add_(row_sums)
        return (q * times_q).sub_(toward).mul_(2.0), None
    if cost == "cosine":
        return toward_keys.neg_(), toward_query.neg_()
    assert row_sums is not None and column_sums is not None
    grad_query = (q * row_sums).sub_(toward_keys).mul_(2.0)
    grad_keys = (cast(keys, acc) * column_sums.unsqueeze(-1)).sub_(toward_query).mul_(2.0)
    return grad_query, grad_keys


def _uniform_vjp(
    term: WeightTerm, q: Tensor, keys: Tensor, cost: str, need_keys: bool, keys_are_queries: bool
) -> tuple[Tensor, Tensor | None]:
    """:func:`weights_vjp` of one softmax whose upstream gradient is one value ``g`` for every
    query (a reduced loss's): ``g`` factors out, ``G = g W``."""
    g = term.grad
    weighted = term.weighted_keys
    if weighted is None:
        weighted = product(term.weights, keys, keys.dtype)
    if cost == "cosine":
        factor: Tensor | float = -g
    else:
        factor = g * 2.0
    rows = None if term.rows_sum_to_one else term.weights.sum(-1, keepdim=True)
    if not (need_keys or keys_are_queries):
        if cost == "cosine":
            return weighted * factor, None
        grad_query = q - weighted if rows is None else (q * rows).sub_(weighted)
        return grad_query.mul_(factor), None
    toward_query = product(term.weights.T, q, keys.dtype)  # W^T q
    if cost == "cosine":
        if keys_are_queries:  # (weighted may be a saved tensor: not in place)
            return (weighted + toward_query).mul_(factor), None
        return weighted * factor, toward_query.mul_(factor)
    column_sums = term.weights.sum(0).unsqueeze_(-1)
    if keys_are_queries:  # d/dq through both places the embeddings appear
        times_q = column_sums.add_(1.0) if rows is None else column_sums.add_(rows)
        return (q * times_q).sub_(weighted).sub_(toward_query).mul_(factor), None
    grad_query = q - weighted if rows is None else (q * rows).sub_(weighted)
    grad_keys = (cast(keys, q.dtype) * column_sums).sub_(toward_query)
    return grad_query.mul_(factor), grad_keys.mul_(factor)


def per_row(grad: Tensor | float) -> Tensor | float:
    """``grad`` broadcast against ``(Q, ...)`` rows: ``(Q, 1)``, or the one value itself."""
    return grad[:, None] if isinstance(grad, Tensor) and grad.dim() == 1 else grad


def _add_times(total: Tensor, x: Tensor, factor: Tensor | float) -> Tensor:
    """``total += x * factor`` in place (``factor`` broadcasts against ``x``)."""
    if isinstance(factor, Tensor):
        return total.addcmul_(x, factor)
    return total.add_(x, alpha=factor)
