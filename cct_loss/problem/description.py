"""The problem description: the queries, the keys, and which keys are each query's positives
and negatives (:class:`ContrastiveProblem`). A :class:`KeySet` says which keys take part by
class labels as ids, or by the batch's block layout as a few integers (:class:`OwnRows`): each
implementation builds what it needs. Only a miner's pairs come as a mask (``KeySet.pairs``),
which the dense implementation alone reads."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..maths.costs import Preparation, prepare


class OwnRows(NamedTuple):
    """Where each query's own row sits among the keys, from a few integers: query
    ``v * rows + i`` is view ``v`` of row ``offset + i``; key ``w * key_rows + j`` (``row_major``:
    ``j * key_views + w``) is view ``w`` of row ``j``, later keys (a queue) none. Own-row entries
    of a ``(Q, K)`` matrix are a strided view (:meth:`entries`), no mask."""

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
        belong to no row): the groups of :class:`KeySet` without labels."""
        queries = torch.arange(self.offset, self.offset + self.rows, device=device)
        rows = torch.arange(self.key_rows, device=device)
        repeat = rows.repeat_interleave if self.row_major else rows.repeat
        keys = repeat(self.key_views)
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


class Leading(NamedTuple):
    """The first ``size`` keys of a softmax whose weights are constants to autograd
    (``detach=True``) or differentiated (``False``) whatever ``detach_weights`` says of the
    others: one softmax over every key, two treatments (the MoCo objective's in-batch
    negatives before its queue, docs/layouts.md)."""

    size: int
    detach: bool


#: A :class:`KeySet` as four id arrays ``(query_groups, key_groups, query_self, key_self)``,
#: ``None`` where absent: what a streaming implementation passes to autograd.
KeyIds = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]


class KeySet(NamedTuple):
    """Which keys take part in each query's softmax: those whose group differs from the
    query's (``same_group=False``, negatives) or equals it and is not the query itself
    (``same_group=True``, positives). Groups are labels (``query_groups``, ``key_groups``) or,
    without, the instances of ``rows``; ``KeySet()`` is every key. ``pairs``: a ``(Q, K)``
    boolean mask, True where a miner kept the pair, which alone decides (no groups, no rows).
    ``may_be_empty``: a query may have none (labels, mined pairs). ``leading``: the first keys'
    weights treated apart (:class:`Leading`; dense alone reads it)."""

    query_groups: Tensor | None = None
    key_groups: Tensor | None = None
    same_group: bool = False
    rows: OwnRows | None = None
    may_be_empty: bool = False
    pairs: Tensor | None = None
    leading: Leading | None = None

    @property
    def labelled(self) -> bool:
        return self.query_groups is not None and self.key_groups is not None

    @property
    def per_pair(self) -> bool:
        """Drawn pair by pair (labels or mined pairs): a mask decides, not the block layout."""
        return self.labelled or self.pairs is not None

    @property
    def every_key(self) -> bool:
        """Every key takes part for every query."""
        return not self.per_pair and self.rows is None

    @property
    def own_rows_only(self) -> bool:
        """Positives without labels: exactly the keys of the query's own row (a fixed small
        set per query, read as such by every kernel)."""
        return self.same_group and not self.labelled and self.rows is not None

    @property
    def excludes_self(self) -> bool:
        return self.same_group and self.rows is not None and self.rows.includes_self

    def ids(self, num_keys: int, device: torch.device) -> KeyIds:
        """The four id arrays (all ``None`` when every key takes part); mined pairs have none
        (:func:`cct_loss.implementations.table.choose` sends them to the dense implementation)."""
        assert self.pairs is None, "mined pairs have no ids: only impl='dense' reads them"
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
        if self.pairs is not None:
            return ~self.pairs
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


def label_masks(
    positives: KeySet | Tensor | None, negatives: KeySet | None, num_keys: int, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """The ``(Q, K)`` masks of the keys that sit out of the positives' and of the negatives'
    softmax, for the sides drawn by label (``None`` for a side that is not): one comparison of
    the labels when both sides compare the same ones."""
    pos = positives if isinstance(positives, KeySet) and positives.per_pair else None
    neg = negatives if negatives is not None and negatives.per_pair else None
    if (
        pos is None
        or neg is None
        or not (pos.labelled and neg.labelled)
        or pos.query_groups is not neg.query_groups
        or pos.key_groups is not neg.key_groups
    ):
        return (
            None if pos is None else pos.excluded_mask(num_keys, device),
            None if neg is None else neg.excluded_mask(num_keys, device),
        )
    same = neg.excluded_mask(num_keys, device)  # a negative sits out where the labels agree
    assert same is not None
    others = ~same
    if pos.excludes_self:
        assert pos.rows is not None
        pos.rows.entries(others).diagonal(dim1=0, dim2=1).fill_(True)
    return others, same


def excluded_from_ids(
    ids: KeyIds, same_group: bool, start: int = 0, stop: int | None = None
) -> Tensor | None:
    """``(Q, stop - start)`` boolean, True where key ``start + j`` sits out, from
    :meth:`KeySet.ids`; ``None`` when every key takes part. The one mask builder of the
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


class ContrastiveProblem(NamedTuple):
    """A whole call as a layout describes it: ``query`` ``(Q, D)``; ``keys`` ``(K, D)``,
    ``(Q, K, D)`` or ``None`` (the queries); ``positives`` (a :class:`KeySet` or each query's own
    ``(Q, M, D)``/``(Q, D)``); ``negatives``; ``preparation`` (``None``: already prepared)."""

    query: Tensor
    keys: Tensor | None
    positives: KeySet | Tensor | None
    negatives: KeySet | None
    preparation: Preparation | None = None

    @property
    def key_rows(self) -> Tensor:
        """The shared or per-query keys (the queries when ``keys`` is ``None``)."""
        return self.query if self.keys is None else self.keys

    @property
    def num_keys(self) -> int:
        return self.key_rows.shape[-2]

    @property
    def fixed_positives(self) -> Tensor | None:
        """``(Q, M, D)``: the positives given as a tensor, or ``None``."""
        positives = self.positives
        if not isinstance(positives, Tensor):
            return None
        return positives if positives.dim() == 3 else positives.unsqueeze(1)

    def prepared(self) -> ContrastiveProblem:
        """The same problem on prepared embeddings (each tensor of embeddings through
        :func:`cct_loss.maths.costs.prepare`, differentiable by autograd)."""
        preparation = self.preparation
        if preparation is None:
            return self

        def each(x: Tensor) -> Tensor:
            return prepare(x, preparation)

        positives = self.positives
        if isinstance(positives, Tensor):
            positives = each(positives)
        keys = None if self.keys is None else each(self.keys)
        return ContrastiveProblem(each(self.query), keys, positives, self.negatives)
