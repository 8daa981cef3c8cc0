"""The conditional transport maths, and the protocol every kernel implements.

For one query with costs ``c_1..c_K`` to the keys that take part (its positives, or its
negatives) and a sharpness ``t``:

    pi_k = softmax_k(sign * t * c_k)        sign = +1 for positives, -1 for negatives
    E    = sum_k pi_k c_k                   the query-conditional expected cost

Attraction is ``E`` over the positives (``t = t_pos``), repulsion is ``-E`` over the negatives
(``t = t_neg``). A query with no key taking part has ``E = 0`` and is flagged as absent.

Which keys take part is described by a :class:`Membership`: class labels as integer ids, or the
block layout of a batch's instances as a few integers (:class:`OwnRows`), never by a mask tensor
handed to a kernel. A kernel builds what it needs from that: dense fills the own-row entries of
its matrices through a strided view, a streaming kernel builds the ``(Q, block)`` boolean of each
block from ids (:meth:`Membership.ids`).

A layout describes a whole call as a :class:`Transport`: the queries, the keys, and which keys
are each query's positives and negatives (:func:`cct_loss.dispatch.solve` computes it).
"""

from __future__ import annotations

from collections.abc import Callable
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
        entropy: ``(Q,)`` entropy of ``pi`` in nats (no gradient), or ``None`` when the
            diagnostics were not asked for.
        extreme: ``(Q,)`` largest cost (positives) or smallest cost (negatives), no gradient,
            or ``None`` when the diagnostics were not asked for.
        weights: the weights ``pi``, or ``None`` from kernels that never hold them (``(Q, K)``,
            zero where a key does not take part; ``(Q, M)`` for fixed positives).
        present: ``(Q,)`` bool, True where at least one key takes part; ``None`` when every
            query has keys by construction.
    """

    value: Tensor
    entropy: Tensor | None
    extreme: Tensor | None
    weights: Tensor | None
    present: Tensor | None = None


class OwnRows(NamedTuple):
    """Where each query's own row (instance) sits among the keys, from a few integers.

    Query ``q = v * rows + i`` (``v < query_views``) is view ``v`` of row ``offset + i`` of the
    batch. The first ``key_views * key_rows`` keys are the embeddings of the batch's
    ``key_rows`` rows: key ``w * key_rows + j`` (view-major) or, with ``row_major``,
    ``j * key_views + w`` is view ``w`` of row ``j``. Keys after those (a queue) belong to no
    row. ``includes_self``: the keys are the queries' own embeddings (in-batch), query
    ``(v, i)`` being key ``(v, offset + i)``, which is never its own positive.

    The own-row entries of a ``(Q, K)`` matrix are a strided view of it (:meth:`entries`), so
    dense kernels exclude or read them without building a mask or an index.
    """

    query_views: int
    rows: int
    key_views: int
    key_rows: int
    offset: int = 0
    row_major: bool = False
    includes_self: bool = False

    @property
    def num_queries(self) -> int:
        return self.query_views * self.rows

    @property
    def batch_keys(self) -> int:
        """How many keys belong to rows (the rest, if any, to none)."""
        return self.key_views * self.key_rows

    def covers(self, num_keys: int) -> bool:
        """The own-row keys of the queries are all ``num_keys`` keys, in view-major order (one
        process, no queue): a ``(W, N, ...)`` view of them reshapes to all the keys."""
        return (
            (not self.row_major or self.key_views == 1)
            and self.batch_keys == num_keys
            and self.rows == self.key_rows
            and self.offset == 0
        )

    def entries(self, matrix: Tensor) -> Tensor:
        """``(query_views, key_views, rows)`` view of the own-row entries of a ``(Q, K)``
        matrix: entry ``[v, w, i]`` is query ``(v, i)`` against key ``(w, offset + i)``."""
        batch = matrix if matrix.shape[-1] == self.batch_keys else matrix[:, : self.batch_keys]
        v, n, w, n_all = self.query_views, self.rows, self.key_views, self.key_rows
        if self.row_major:
            blocks = batch.view(v, n, n_all, w)
            if n != n_all:
                blocks = blocks.narrow(2, self.offset, n)
            return blocks.diagonal(dim1=1, dim2=2)
        blocks = batch.view(v, n, w, n_all)
        if n != n_all:
            blocks = blocks.narrow(3, self.offset, n)
        return blocks.diagonal(dim1=1, dim2=3)

    def own_keys(self, keys: Tensor) -> Tensor:
        """``(key_views, rows, ...)`` view of the entries of the queries' own rows in a
        ``(K, ...)`` tensor of keys (embeddings, or one number per key)."""
        batch = keys if keys.shape[0] == self.batch_keys else keys[: self.batch_keys]
        rest = keys.shape[1:]
        if self.row_major:
            own = batch.view(self.key_rows, self.key_views, *rest)
            if self.rows != self.key_rows:
                own = own.narrow(0, self.offset, self.rows)
            return own.transpose(0, 1)
        own = batch.view(self.key_views, self.key_rows, *rest)
        if self.rows != self.key_rows:
            own = own.narrow(1, self.offset, self.rows)
        return own

    def fixed_positives(self, keys: Tensor) -> Tensor:
        """``(Q, M, D)``: each query's own-row keys, itself left out when ``includes_self``
        (the other views of its row, in view order); for kernels that take positives as a
        small fixed block per query rather than from the key matrix."""
        own = self.own_keys(keys)  # (W, N, D)
        per_view = []
        for v in range(self.query_views):
            others = [own[w] for w in range(self.key_views) if not (self.includes_self and w == v)]
            # Built by stacking slices (a loop over views, not samples): unlike an advanced
            # index, whose backward accumulates repeated indices in a thread-dependent order on
            # the CPU, its backward is deterministic.
            per_view.append(torch.stack(others, dim=1))  # (N, M, D)
        return torch.cat(per_view) if len(per_view) > 1 else per_view[0]

    def group_ids(self, num_keys: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Instance ids of the queries ``(Q,)`` and of the keys ``(K,)`` (``-1`` for keys that
        belong to no row): the groups of :class:`Membership` without labels."""
        queries = torch.arange(self.offset, self.offset + self.rows, device=device)
        rows = torch.arange(self.key_rows, device=device)
        keys = (
            rows.repeat_interleave(self.key_views)
            if self.row_major
            else rows.repeat(self.key_views)
        )
        extra = num_keys - self.batch_keys
        if extra:
            keys = torch.cat([keys, keys.new_full((extra,), -1)])
        return queries.repeat(self.query_views), keys

    def self_ids(self, num_keys: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Index of each query among the keys ``(Q,)`` and of each key ``(K,)``
        (``includes_self`` only)."""
        v = torch.arange(self.query_views, device=device)[:, None]
        j = torch.arange(self.offset, self.offset + self.rows, device=device)[None, :]
        own = j * self.key_views + v if self.row_major else v * self.key_rows + j
        return own.reshape(-1), torch.arange(num_keys, device=device)


#: A :class:`Membership` as four id arrays ``(query_groups, key_groups, query_self, key_self)``,
#: ``None`` where absent: what a streaming kernel passes to autograd.
MembershipIds = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]


class Membership(NamedTuple):
    """Which keys take part in each query's softmax.

    Groups are class labels (``query_groups``, ``key_groups``) or, without labels, the
    instances of :class:`OwnRows` (``rows``). Key ``k`` takes part for query ``q`` when

    * ``same_group=False`` (negatives): their groups differ;
    * ``same_group=True`` (positives): their groups are equal and the key is not the query
      itself (``rows.includes_self``).

    ``Membership()`` (no groups, no rows) means every key takes part.

    Attributes:
        query_groups: ``(Q,)`` integer ids, or ``None`` (groups from ``rows``).
        key_groups: ``(K,)`` integer ids, or ``None``.
        same_group: positives (True) or negatives (False).
        rows: the block layout of the batch's instances (groups without labels, and which key
            is the query itself), or ``None``.
        may_be_empty: a query may have no key taking part (labels); kernels then guard
            against an empty softmax.
    """

    query_groups: Tensor | None = None
    key_groups: Tensor | None = None
    same_group: bool = False
    rows: OwnRows | None = None
    may_be_empty: bool = False

    @property
    def labelled(self) -> bool:
        return self.query_groups is not None and self.key_groups is not None

    @property
    def every_key(self) -> bool:
        """Every key takes part for every query."""
        return not self.labelled and self.rows is None

    @property
    def own_rows_only(self) -> bool:
        """Positives without labels: exactly the keys of the query's own row (a fixed small
        set per query, read as such by every kernel)."""
        return self.same_group and not self.labelled and self.rows is not None

    @property
    def excludes_self(self) -> bool:
        return self.same_group and self.rows is not None and self.rows.includes_self

    def ids(self, num_keys: int, device: torch.device) -> MembershipIds:
        """The four id arrays (all ``None`` when every key takes part)."""
        if self.every_key:
            return (None, None, None, None)
        if self.labelled:
            query_groups, key_groups = self.query_groups, self.key_groups
            if key_groups is query_groups:  # distinct tensors for the autograd functions
                assert key_groups is not None
                key_groups = key_groups.view_as(key_groups)
        else:
            assert self.rows is not None
            query_groups, key_groups = self.rows.group_ids(num_keys, device)
        query_self = key_self = None
        if self.excludes_self:
            assert self.rows is not None
            query_self, key_self = self.rows.self_ids(num_keys, device)
        return (query_groups, key_groups, query_self, key_self)

    def excluded_mask(self, num_keys: int, device: torch.device) -> Tensor | None:
        """``(Q, K)`` boolean, True where a key sits out (``None`` when every key takes part):
        one comparison of the labels, and the own-row (or self) entries filled through a
        strided view (:meth:`OwnRows.entries`) rather than compared from ids."""
        if self.every_key:
            return None
        if self.labelled:
            assert self.query_groups is not None and self.key_groups is not None
            groups, keys = self.query_groups[:, None], self.key_groups[None, :]
            excluded = groups != keys if self.same_group else groups == keys
            if self.excludes_self:
                assert self.rows is not None
                self.rows.entries(excluded).diagonal(dim1=0, dim2=1).fill_(True)
            return excluded
        rows = self.rows
        assert rows is not None
        shape = (rows.num_queries, num_keys)
        if not self.same_group:  # every key but the own row's
            excluded = torch.zeros(shape, dtype=torch.bool, device=device)
            rows.entries(excluded).fill_(True)
            return excluded
        excluded = torch.ones(shape, dtype=torch.bool, device=device)
        rows.entries(excluded).fill_(False)
        if rows.includes_self:
            rows.entries(excluded).diagonal(dim1=0, dim2=1).fill_(True)
        return excluded


#: Every key takes part (MoCo's queue, per-query negatives).
EVERY_KEY = Membership()


def membership_ids(
    members: Membership | None, num_keys: int, device: torch.device
) -> MembershipIds:
    """The id arrays of ``members`` (all ``None`` when every key takes part)."""
    if members is None:
        return (None, None, None, None)
    return members.ids(num_keys, device)


def excluded_from_ids(
    ids: MembershipIds, same_group: bool, start: int = 0, stop: int | None = None
) -> Tensor | None:
    """``(Q, stop - start)`` boolean, True where key ``start + j`` sits out, from
    :meth:`Membership.ids`; ``None`` when every key takes part. The one mask builder of the
    streaming kernels (block by block) and of the differentiable backward passes."""
    query_groups, key_groups, query_self, key_self = ids
    if query_groups is None or key_groups is None:
        return None
    keys = key_groups[start:stop]
    if not same_group:
        return query_groups[:, None] == keys[None, :]
    excluded = query_groups[:, None] != keys[None, :]
    if query_self is not None and key_self is not None:
        excluded |= query_self[:, None] == key_self[None, start:stop]
    return excluded


class Transport(NamedTuple):
    """A whole call, as a layout describes it: the queries, the keys, and which keys are each
    query's positives and negatives (:func:`cct_loss.dispatch.solve` computes it).

    Attributes:
        query: ``(Q, D)`` prepared queries.
        keys: ``(K, D)`` keys shared by all queries, ``(Q, K, D)`` keys per query (negatives
            only), or ``None``: the keys are the queries themselves (in-batch, one process).
        positives: a :class:`Membership` of the keys (``same_group=True``), a ``(Q, M, D)``
            tensor of each query's own positives (``(Q, D)`` for one: MoCo), or ``None`` (no
            attraction term).
        negatives: a :class:`Membership` of the keys, or ``None`` (no repulsion term).
    """

    query: Tensor
    keys: Tensor | None
    positives: Membership | Tensor | None
    negatives: Membership | None

    @property
    def key_rows(self) -> Tensor:
        """The shared or per-query keys (the queries when ``keys`` is ``None``)."""
        return self.query if self.keys is None else self.keys

    @property
    def num_keys(self) -> int:
        return self.key_rows.shape[-2]

    def prepared(self, prepare: Callable[[Tensor], Tensor]) -> Transport:
        """The same call on prepared embeddings (``prepare`` maps each tensor of embeddings:
        the queries, the keys, fixed positives)."""
        positives = self.positives
        if isinstance(positives, Tensor):
            positives = prepare(positives)
        keys = None if self.keys is None else prepare(self.keys)
        return Transport(prepare(self.query), keys, positives, self.negatives)


def streamed_expectation(
    expected: Tensor,
    log_normaliser: Tensor,
    extreme: Tensor | None,
    entropy: Tensor | None,
    members: Membership | None,
) -> ConditionalExpectation:
    """The result of a kernel that streams over the keys and keeps no weights (chunked,
    triton), from its per-query statistics: where some query may have no key taking part, its
    log-normaliser is ``-inf``; it is marked absent and its entropy is 0."""
    present = None
    if members is not None and members.may_be_empty:
        present = torch.isfinite(log_normaliser)
        if entropy is not None:
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
) -> tuple[Tensor | None, Tensor | None]:
    """Entropy of each row of ``weights`` and the extreme cost (max for positives, min for
    negatives) over the entries that take part (``excluded`` marks the others); ``None`` unless
    ``return_details`` (``costs`` is then not read and may be empty)."""
    if not return_details:
        return None, None
    with torch.no_grad():
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


def fixed_attraction(
    query: Tensor, positives: Tensor, options: CCTOptions
) -> ConditionalExpectation:
    """Attraction of each query to its own ``M`` positives (a small block, plain autograd):
    what the implementations other than dense do with fixed positives.

    Args:
        query: ``(Q, D)``.
        positives: ``(Q, M, D)``.
    """
    costs = cost_matrix(query, positives, options.cost)
    return conditional_expectation(costs, side="positives", options=options)


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
