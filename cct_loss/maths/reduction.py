"""The one reduction: from each query's terms to the loss and the diagnostics. Every path uses
it: :func:`reduce` for per-query terms, and dense's one-pass loss through :func:`divisors`.

``"mean"`` is ``alpha * mean(attraction over the queries with positives) + beta *
mean(repulsion over the queries with negatives)`` (a term no query has is 0); across processes a
term's sum is divided by its global count over the world size, so DDP's averaging gives the
gradient of the global batch's mean (docs/specification.md)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import distributed
from ..options import CCTOptions
from .expectation import ConditionalExpectation, needs_shift

#: One problem's two sides (the attraction's and the repulsion's expectations).
Sides = tuple[ConditionalExpectation | None, ConditionalExpectation | None]


class QueryTerms(NamedTuple):
    """One entry per query (per row for the paper's objective): ``(Q,)`` attraction and
    repulsion (0 where a query has no such term), the weights' entropies and the contrastive
    accuracy (``None`` without diagnostics), the weights where held, and which queries have
    positives and negatives (``None``: all)."""

    attraction: Tensor
    repulsion: Tensor
    pos_entropy: Tensor | None
    neg_entropy: Tensor | None
    accuracy: Tensor | None
    pos_weights: Tensor | None = None
    neg_weights: Tensor | None = None
    has_positives: Tensor | None = None
    has_negatives: Tensor | None = None


class CCTDetails(NamedTuple):
    """Result of ``cct_loss(..., return_details=True)``.

    ``loss == alpha * attraction + beta * repulsion`` holds for every reduction.

    Attributes:
        loss: the loss, reduced as asked (scalar, or ``(Q,)`` for ``reduction="none"``).
        attraction: the attraction term, reduced like the loss (``"mean"``: over the queries
            that have positives).
        repulsion: the repulsion term, reduced like the loss (``"mean"``: over the queries
            that have negatives).
        pos_entropy: entropy (nats) of each query's positive weights; averaged over the
            queries that have positives for ``"mean"`` and ``"sum"``, per query for ``"none"``.
            Its exponential is the effective number of positives.
        neg_entropy: the same for the negative weights (effective number of negatives).
        accuracy: fraction of queries whose farthest positive is closer than their nearest
            negative, among the queries that have both (per query 0/1 for ``"none"``): the
            analogue of InfoNCE's top-1.
        pos_weights: the positive weights with ``return_details="weights"``, else ``None``.
        neg_weights: the negative weights with ``return_details="weights"``, else ``None``.
            What the tuple holds never depends on the implementation ``auto`` picked.
        queries_with_positives: how many of this call's queries have at least one positive
            (per query, bool, for ``"none"``). Without labels, every query.
        queries_with_negatives: the same for negatives.
    """

    loss: Tensor
    attraction: Tensor
    repulsion: Tensor
    pos_entropy: Tensor
    neg_entropy: Tensor
    accuracy: Tensor
    pos_weights: Tensor | None
    neg_weights: Tensor | None
    queries_with_positives: Tensor
    queries_with_negatives: Tensor


class Divisors(NamedTuple):
    """What each term's sum over the queries is divided by: the number of queries that have it
    (``"mean"``; a 0-dim tensor where labels decide it, at least 1 so that a term no query has
    is 0), or 1 (``"sum"``)."""

    attraction: float | Tensor
    repulsion: float | Tensor


def divisors(
    options: CCTOptions,
    num_queries: int,
    has_positives: Tensor | None,
    has_negatives: Tensor | None,
    row_counts: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Divisors:
    """The :class:`Divisors` of a call's ``num_queries`` queries (``has_positives``,
    ``has_negatives``: ``None`` where all have the term; ``row_counts`` when gathering), counts
    from flags in ``dtype`` (the terms': ``1 / 3`` is not rounded to float32 for float64)."""
    if options.reduction != "mean":
        return Divisors(1.0, 1.0)
    if row_counts is None:
        return Divisors(
            _count(has_positives, num_queries, dtype), _count(has_negatives, num_queries, dtype)
        )
    world = len(row_counts)
    if has_positives is None and has_negatives is None:  # the global count is known here
        rank, _ = distributed.rank_and_world_size()
        queries_per_row = num_queries // row_counts[rank]
        same = queries_per_row * sum(row_counts) / world
        return Divisors(same, same)
    # The counts depend on the labels: one small all-reduce across processes.
    flags = has_positives if has_positives is not None else has_negatives
    assert flags is not None
    every = torch.full_like(flags, True)
    local = torch.stack(
        [(x if x is not None else every).sum() for x in (has_positives, has_negatives)]
    )
    counts = distributed.all_reduce_sum(local.float()).clamp_min(1.0) / world
    return Divisors(counts[0], counts[1])


def _count(flags: Tensor | None, num_queries: int, dtype: torch.dtype) -> float | Tensor:
    """How many queries have a term (at least 1), from its flags, or all of them."""
    return float(num_queries) if flags is None else flags.sum(dtype=dtype).clamp_min(1)


def combine(
    attract: ConditionalExpectation | None, repel: ConditionalExpectation | None
) -> QueryTerms:
    """Per-query terms from the two sides' expectations (repulsion is minus the expected cost),
    with the contrastive accuracy where the diagnostics were asked for."""
    assert attract is not None and repel is not None
    accuracy = None
    if attract.extreme is not None and repel.extreme is not None:
        correct = attract.extreme < repel.extreme
        both = _both(attract.present, repel.present)
        if both is not None:
            correct = correct & both
        accuracy = correct.to(attract.value.dtype)
    return QueryTerms(
        attract.value, -repel.value, attract.entropy, repel.entropy, accuracy,
        attract.weights, repel.weights, attract.present, repel.present,
    )  # fmt: skip


def _both(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a & b


def paper_row_terms(
    attract: ConditionalExpectation,
    pairs: list[tuple[ConditionalExpectation | None, ConditionalExpectation]],
    num_views: int,
) -> QueryTerms:
    """The paper's objective per row (docs/layouts.md) from its parts: ``attract`` over the
    ``V * N`` embeddings, and for each pair of views ``x < y`` (lexicographic) its repulsion
    with, under the diagnostics, the attraction of ``z_x[i]`` to ``z_y[i]`` alone (whose extreme
    is that cost: the pair's accuracy). Attraction averages over views, repulsion over pairs;
    weights ``(V, N, V-1)`` and ``(P, N, N)``."""
    repels = [repel for _, repel in pairs]
    n = repels[0].value.shape[0]

    def per_row(x: Tensor) -> Tensor:
        return x.reshape(-1, n).mean(0)

    def over_pairs(xs: list[Tensor | None]) -> Tensor | None:
        kept = [x for x in xs if x is not None]
        return torch.stack(kept).mean(0) if kept and len(kept) == len(xs) else None

    wins: list[Tensor | None] = [
        None
        if own is None or own.extreme is None or repel.extreme is None
        else (own.extreme < repel.extreme).to(repel.value.dtype)
        for own, repel in pairs
    ]
    neg_weights = [r.weights for r in repels]
    pos_weights = attract.weights
    return QueryTerms(
        per_row(attract.value),
        -torch.stack([r.value for r in repels]).mean(0),
        None if attract.entropy is None else per_row(attract.entropy),
        over_pairs([r.entropy for r in repels]),
        over_pairs(wins),
        None if pos_weights is None else pos_weights.reshape(num_views, n, num_views - 1),
        None if any(w is None for w in neg_weights) else torch.stack(neg_weights),  # type: ignore[arg-type]
    )


def concatenated(parts: list[QueryTerms], options: CCTOptions) -> QueryTerms:
    """The terms of several problems' queries, one after the other (their weights too, where
    ``return_details="weights"`` asks for them and every part holds them with one shape: no
    copy of the weight matrices otherwise)."""

    def joined(xs: list[Tensor | None]) -> Tensor | None:
        if any(x is None for x in xs):
            return None
        kept = [x for x in xs if x is not None]
        return torch.cat(kept) if all(x.shape[1:] == kept[0].shape[1:] for x in kept) else None

    def flags(xs: list[Tensor | None], values: list[Tensor]) -> Tensor | None:
        if all(x is None for x in xs):
            return None
        return torch.cat(
            [
                torch.ones_like(v, dtype=torch.bool) if x is None else x
                for x, v in zip(xs, values, strict=True)
            ]
        )

    def column(name: str) -> list[Tensor | None]:
        return [getattr(part, name) for part in parts]

    attraction, repulsion = joined(column("attraction")), joined(column("repulsion"))
    assert attraction is not None and repulsion is not None
    values = [part.attraction for part in parts]
    return QueryTerms(
        attraction, repulsion, joined(column("pos_entropy")), joined(column("neg_entropy")),
        joined(column("accuracy")),
        joined(column("pos_weights")) if options.wants_weights else None,
        joined(column("neg_weights")) if options.wants_weights else None,
        flags(column("has_positives"), values), flags(column("has_negatives"), values),
    )  # fmt: skip


def multicrop_row_terms(sides: list[list[Sides]], options: CCTOptions) -> QueryTerms:
    """The multi-crop objective per row (docs/layouts.md) from its cross problems' sides: for
    each key view ``i`` (``sides[i]``, one pair per query view ``v``), the view weights
    ``p_v = softmax_v(t_pos * c(q_v, k_i))`` (detached; ``c(q_v, k_i)`` is the attraction of a
    one-positive problem), then ``sum_v p_v term_v``; averaged over the two key views. The
    diagnostics: the view weights' entropy, the p-weighted entropy of the negative weights, and
    the fraction of query views whose own key is nearer than every negative; the weights
    ``(2, N, L + 1)`` (the view weights) and ``(2, L + 1, N, K)``."""
    first, second = (_weighted_over_views(listed, options) for listed in sides)

    def mean(a: Tensor | None, b: Tensor | None) -> Tensor | None:
        return None if a is None or b is None else (a + b) / 2

    def both(a: Tensor | None, b: Tensor | None) -> Tensor | None:
        return None if a is None or b is None else torch.stack([a, b])

    return QueryTerms(
        (first.attraction + second.attraction) / 2, (first.repulsion + second.repulsion) / 2,
        mean(first.pos_entropy, second.pos_entropy), mean(first.neg_entropy, second.neg_entropy),
        mean(first.accuracy, second.accuracy),
        both(first.pos_weights, second.pos_weights), both(first.neg_weights, second.neg_weights),
    )  # fmt: skip


def _weighted_over_views(listed: list[Sides], options: CCTOptions) -> QueryTerms:
    """One key view's rows: each query view's cross terms weighted by the view weights."""
    attracts, repels = [], []
    for attract, repel in listed:
        assert attract is not None and repel is not None
        attracts.append(attract)
        repels.append(repel)
    costs = torch.stack([a.value for a in attracts])  # (V, N): one positive, its cost
    spread = costs.detach()
    if needs_shift(options.t_pos):  # by the farthest view's cost, a constant to the softmax
        spread = spread - spread.amax(0)
    p = torch.softmax(spread * options.t_pos, dim=0)
    attraction = (p * costs).sum(0)
    repulsion = -(p * torch.stack([r.value for r in repels])).sum(0)
    if not options.return_details:
        return QueryTerms(attraction, repulsion, None, None, None)
    wins, entropies = [], []
    for a, r in zip(attracts, repels, strict=True):
        assert a.extreme is not None and r.extreme is not None and r.entropy is not None
        wins.append((a.extreme < r.extreme).to(costs.dtype))
        entropies.append(r.entropy)
    weights = [r.weights for r in repels if r.weights is not None]
    held = options.wants_weights and len(weights) == len(repels)
    return QueryTerms(
        attraction, repulsion, -torch.special.xlogy(p, p).sum(0),
        (p * torch.stack(entropies)).sum(0), torch.stack(wins).mean(0),
        p.T if options.wants_weights else None, torch.stack(weights) if held else None,
    )  # fmt: skip


def reduce(
    terms: QueryTerms, options: CCTOptions, row_counts: list[int] | None = None
) -> Tensor | CCTDetails:
    """The loss of per-query ``terms`` and, where asked, the diagnostics, reduced as
    ``options.reduction`` says (``row_counts``: every rank's rows when gathering)."""
    divide = divisors(
        options, terms.attraction.shape[0], terms.has_positives, terms.has_negatives, row_counts,
        terms.attraction.dtype,
    )  # fmt: skip
    attraction = _reduced(terms.attraction, options.reduction, divide.attraction)
    repulsion = _reduced(terms.repulsion, options.reduction, divide.repulsion)
    loss = _times(attraction, options.alpha) + _times(repulsion, options.beta)
    if not options.return_details:
        return loss
    assert terms.pos_entropy is not None and terms.neg_entropy is not None
    assert terms.accuracy is not None
    none = options.reduction == "none"

    def stat(x: Tensor, flags: Tensor | None) -> Tensor:
        if none:
            return x if flags is None else torch.where(flags, x, 0.0)
        if flags is None:
            return x.mean()
        return torch.where(flags, x, 0.0).sum() / flags.sum().clamp_min(1)

    def present(flags: Tensor | None) -> Tensor:
        if flags is None:
            flags = torch.ones_like(terms.attraction, dtype=torch.bool)
        return flags if none else flags.sum()

    weights = options.wants_weights
    has_positives, has_negatives = terms.has_positives, terms.has_negatives
    return CCTDetails(
        loss, attraction, repulsion,
        stat(terms.pos_entropy, has_positives), stat(terms.neg_entropy, has_negatives),
        stat(terms.accuracy, _both(has_positives, has_negatives)),
        terms.pos_weights if weights else None, terms.neg_weights if weights else None,
        present(has_positives), present(has_negatives),
    )  # fmt: skip


def _reduced(x: Tensor, reduction: str, divisor: float | Tensor) -> Tensor:
    if reduction == "none":
        return x
    total = x.sum()
    return total if isinstance(divisor, float) and divisor == 1.0 else total / divisor


def _times(x: Tensor, weight: float | Tensor) -> Tensor:
    """``weight * x``, without multiplying by a Python 1."""
    return x if isinstance(weight, float) and weight == 1.0 else x * weight
