"""The conditional transport maths, and the protocol every kernel implements.

For one query with costs ``c_1..c_K`` to the keys that take part (its positives, or its
negatives) and a sharpness ``t``:

    pi_k = softmax_k(sign * t * c_k)        sign = +1 for positives, -1 for negatives
    E    = sum_k pi_k c_k                   the query-conditional expected cost

Attraction is ``E`` over the positives (``t = t_pos``), repulsion is ``-E`` over the negatives
(``t = t_neg``). A query with no key taking part has ``E = 0`` and is flagged as absent.

Which keys take part is described by integer ids (:class:`Membership`), never by a mask tensor
handed to a kernel: a kernel builds the ``(Q, block)`` boolean it needs from the ids, block by
block if it streams.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import Tensor

from .costs import cost_matrix

if TYPE_CHECKING:
    from .options import CCTOptions, Side


class ConditionalExpectation(NamedTuple):
    """Per-query result of a kernel (and of :func:`conditional_expectation`).

    Attributes:
        value: ``(Q,)`` expected cost ``sum_k pi_k c_k`` (differentiable); 0 for a query with no
            key taking part.
        entropy: ``(Q,)`` entropy of ``pi`` in nats (no gradient; NaN when not computed).
        extreme: ``(Q,)`` largest cost (positives) or smallest cost (negatives), no gradient;
            NaN when not computed.
        weights: ``(Q, K)`` the weights ``pi`` (zero where a key does not take part), or
            ``None`` from kernels that never hold them.
        present: ``(Q,)`` bool, True where at least one key takes part; ``None`` when every
            query has keys by construction.
    """

    value: Tensor
    entropy: Tensor
    extreme: Tensor
    weights: Tensor | None
    present: Tensor | None = None


class Membership(NamedTuple):
    """Which keys take part in each query's softmax, from integer ids.

    Key ``k`` takes part for query ``q`` when

    * ``same_group=False`` (negatives): ``query_groups[q] != key_groups[k]``;
    * ``same_group=True`` (positives): ``query_groups[q] == key_groups[k]`` and, when self ids
      are given, ``query_self[q] != key_self[k]`` (a query is never its own positive).

    Groups are instance ids without labels (so the other views of a row are positives) and
    class labels with them.

    Attributes:
        query_groups: ``(Q,)`` integer ids.
        key_groups: ``(K,)`` integer ids.
        same_group: positives (True) or negatives (False).
        query_self: ``(Q,)`` index of each query among the keys, or ``None``.
        key_self: ``(K,)`` index of each key (``arange(K)``), or ``None``.
        may_be_empty: a query may have no key taking part (labels); kernels then guard
            against an empty softmax (which costs one extra pass on the dense path).
    """

    query_groups: Tensor
    key_groups: Tensor
    same_group: bool = False
    query_self: Tensor | None = None
    key_self: Tensor | None = None
    may_be_empty: bool = False

    def excluded_mask(self, start: int = 0, stop: int | None = None) -> Tensor:
        """``(Q, stop - start)`` boolean, True where key ``start + j`` sits out for query q.

        The one mask every kernel builds (dense whole, chunked per block): it is what
        ``masked_fill`` takes, so no kernel negates it on its hot path."""
        keys = self.key_groups[start:stop]
        if not self.same_group:
            return self.query_groups[:, None] == keys[None, :]
        excluded = self.query_groups[:, None] != keys[None, :]
        if self.query_self is not None and self.key_self is not None:
            excluded |= self.query_self[:, None] == self.key_self[None, start:stop]
        return excluded


#: A :class:`Membership` as the four id arrays a streaming kernel passes to autograd:
#: ``(query_groups, key_groups, query_self, key_self)``, ``None`` where absent.
MembershipIds = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]


def membership_ids(members: Membership | None) -> MembershipIds:
    """The id arrays of ``members`` (all ``None`` when every key takes part)."""
    if members is None:
        return (None, None, None, None)
    return (members.query_groups, members.key_groups, members.query_self, members.key_self)


def excluded_from_ids(
    ids: MembershipIds, same_group: bool, start: int = 0, stop: int | None = None
) -> Tensor | None:
    """:meth:`Membership.excluded_mask` for keys ``start:stop`` rebuilt from
    :func:`membership_ids`; ``None`` when every key takes part."""
    query_groups, key_groups, query_self, key_self = ids
    if query_groups is None or key_groups is None:
        return None
    members = Membership(query_groups, key_groups, same_group, query_self, key_self)
    return members.excluded_mask(start, stop)


def streamed_expectation(
    expected: Tensor,
    log_normaliser: Tensor,
    extreme: Tensor,
    entropy: Tensor,
    members: Membership | None,
) -> ConditionalExpectation:
    """The result of a kernel that streams over the keys and keeps no weights (chunked,
    triton), from its per-query statistics: where some query may have no key taking part, its
    log-normaliser is ``-inf``; it is marked absent and its entropy is 0."""
    present = None
    if members is not None and members.may_be_empty:
        present = torch.isfinite(log_normaliser)
        entropy = torch.where(present, entropy, 0.0)
    return ConditionalExpectation(expected, entropy, extreme, None, present)


class ExpectedCostKernel(Protocol):
    """An implementation (``impl``): the expected cost of each query over a set of keys.

    ``(query (Q, D), keys (K, D) shared or (Q, K, D) per query, members, side, options)``;
    ``members=None`` means every key takes part (per-query keys always). ``side`` picks the
    sign and the sharpness (``t_pos`` or ``t_neg``) of the softmax; ``options`` gives the cost,
    ``detach_weights``, ``chunk_size`` and whether diagnostics are wanted (``return_details``).
    """

    def __call__(
        self,
        query: Tensor,
        keys: Tensor,
        members: Membership | None,
        *,
        side: Side,
        options: CCTOptions,
    ) -> ConditionalExpectation: ...


def cache_forward_signature(function: type[torch.autograd.Function]) -> None:
    """Attach ``forward``'s signature to it: ``Function.apply`` binds the arguments of a
    ``setup_context``-style function through ``inspect.signature`` on every call, which then
    returns the cached one instead of rebuilding it (about 0.1 ms a call on a CPU)."""
    forward = function.forward
    forward.__signature__ = inspect.signature(forward)  # type: ignore[attr-defined]


def logit_scale(options: CCTOptions, side: Side) -> float | Tensor:
    """``+t_pos`` for the positives, ``-t_neg`` for the negatives: the logits are this times
    the cost."""
    t = options.t_for(side)
    return t if side == "positives" else -t


def weight_statistics(
    weights: Tensor,
    costs: Tensor,
    excluded: Tensor | None,
    *,
    side: Side,
    return_details: bool,
) -> tuple[Tensor, Tensor]:
    """Entropy of each row of ``weights`` and the extreme cost (max for positives, min for
    negatives) over the entries that take part (``excluded`` marks the others); NaN
    placeholders unless ``return_details`` (``costs`` is then not read and may be empty)."""
    with torch.no_grad():
        if not return_details:
            nan = torch.full_like(weights[..., 0], float("nan"))
            return nan, nan
        entropy = -torch.special.xlogy(weights, weights).sum(-1)
        farther = side == "positives"
        fill = float("-inf") if farther else float("inf")
        c = costs if excluded is None else costs.masked_fill(excluded, fill)
        extreme = c.amax(-1) if farther else c.amin(-1)
        return entropy, extreme


def conditional_expectation(
    cost: Tensor, *, side: Side, options: CCTOptions
) -> ConditionalExpectation:
    """Softmax-weighted mean of each row of ``cost`` (plain autograd; for small blocks such as
    the ``M`` positives of each query that are not drawn from a batch by label).

    Args:
        cost: ``(Q, M)`` costs, floating point; every entry takes part.
        side: ``"positives"`` (``softmax(+t_pos c)``) or ``"negatives"`` (``softmax(-t_neg c)``).
        options: ``detach_weights`` and ``return_details`` are read.

    Returns:
        A :class:`ConditionalExpectation` with the ``(Q, M)`` weights.
    """
    source = cost.detach() if options.detach_weights else cost
    weights = torch.softmax(source * logit_scale(options, side), dim=-1)
    value = (weights * cost).sum(-1)
    entropy, extreme = weight_statistics(
        weights.detach(),
        cost.detach(),
        None,
        side=side,
        return_details=bool(options.return_details),
    )
    return ConditionalExpectation(value, entropy, extreme, weights)


def expected_cost_autograd(
    query: Tensor,
    keys: Tensor,
    excluded: Tensor | None,
    *,
    cost: str,
    scale: float | Tensor,
    detach_weights: bool,
) -> Tensor:
    """``(Q,)`` expected cost over the keys that take part, in plain autograd.

    Every operation is differentiable to any order (no in-place update, no clamp mask in the
    gradient, no 0/0 for a query without keys), so this is the formula the kernels' closed-form
    backward passes stand for, and what they differentiate when a backward pass must itself be
    differentiable.

    Args:
        query: ``(Q, D)``; keys: ``(K, D)`` shared or ``(Q, K, D)`` per query.
        excluded: ``(Q, K)`` bool, True where a key sits out, or ``None`` (all take part).
        cost: ``"sqeuclidean"`` or ``"cosine"``.
        scale: ``+t_pos`` or ``-t_neg`` (see :func:`logit_scale`).
        detach_weights: treat the weights as constants.
    """
    costs = cost_matrix(query, keys, cost)
    logits = (costs.detach() if detach_weights else costs) * scale
    if excluded is not None:
        present = ~excluded.all(-1, keepdim=True)
        logits = torch.where(excluded, float("-inf"), logits)
        logits = torch.where(present, logits, 0.0)  # a query without keys: no 0/0
        weights = torch.where(present, torch.softmax(logits, dim=-1), 0.0)
    else:
        weights = torch.softmax(logits, dim=-1)
    return (weights * costs).sum(-1)


def differentiable_backward(
    grad_expected: Tensor,
    query: Tensor,
    keys: Tensor,
    excluded: Tensor | None,
    needs_input_grad: tuple[bool, ...],
    *,
    cost: str,
    scale: float | Tensor,
    detach_weights: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """The kernels' backward pass when it runs with ``create_graph=True``: the vector-Jacobian
    product of :func:`expected_cost_autograd`, itself recorded by autograd so that
    second (and higher) derivatives are exact. It holds the ``(Q, K)`` graph of the formula.
    """
    if not (needs_input_grad[0] or needs_input_grad[1]):
        return None, None
    with torch.enable_grad():
        # Fresh nodes: the keys may be computed from the queries (in-batch, a view of them), and
        # the partial derivatives must not follow that path.
        query, keys = query.clone(), keys.clone()
        wanted = [x for x, need in zip((query, keys), needs_input_grad[:2], strict=True) if need]
        expected = expected_cost_autograd(
            query, keys, excluded, cost=cost, scale=scale, detach_weights=detach_weights
        )
        grads = iter(torch.autograd.grad(expected, wanted, grad_expected, create_graph=True))
    grad_query = next(grads) if needs_input_grad[0] else None
    grad_keys = next(grads) if needs_input_grad[1] else None
    return grad_query, grad_keys
