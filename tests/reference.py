"""A slow, obviously-correct reference for the CCT loss, transcribed from SPEC.md.

Loops over queries in float64; each cost is ``||a - b||^2`` (or ``1 - cos``) of two vectors,
each weight an explicit ``exp / sum``. It imports nothing from ``cct_loss``: every fast path is
compared against this file, never against itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

EPS = 1e-12  # torch.nn.functional.normalize's eps: zero vectors stay zero


def unit(x: Tensor) -> Tensor:
    """One vector divided by max(|x|, eps)."""
    return x / torch.clamp(torch.sqrt((x * x).sum()), min=EPS)


def cost_fn(a: Tensor, b: Tensor, cost: str) -> Tensor:
    if cost == "sqeuclidean":
        return ((a - b) ** 2).sum()
    if cost == "cosine":
        return 1.0 - (unit(a) * unit(b)).sum()
    raise AssertionError(cost)


def softmax_list(logits: list[Tensor]) -> list[Tensor]:
    m = max(float(x.detach()) for x in logits)
    e = [torch.exp(x - m) for x in logits]
    z = torch.stack(e).sum()
    return [x / z for x in e]


@dataclass
class QueryResult:
    loss: Tensor
    attraction: Tensor
    repulsion: Tensor
    pos_weights: list[Tensor]
    neg_weights: list[Tensor]
    pos_entropy: float
    neg_entropy: float
    correct: float


def one_query(
    q: Tensor,
    positives: list[Tensor],
    negatives: list[Tensor],
    *,
    t_pos: float,
    t_neg: float,
    alpha: float,
    beta: float,
    cost: str,
    detach_weights: bool,
) -> QueryResult:
    """The formula of SPEC section 2 for one query."""
    d_pos = [cost_fn(q, p, cost) for p in positives]
    d_neg = [cost_fn(q, n, cost) for n in negatives]
    src_pos = [d.detach() for d in d_pos] if detach_weights else d_pos
    src_neg = [d.detach() for d in d_neg] if detach_weights else d_neg
    w_pos = softmax_list([t_pos * d for d in src_pos])
    w_neg = softmax_list([-t_neg * d for d in src_neg])
    attraction = torch.stack([w * d for w, d in zip(w_pos, d_pos, strict=True)]).sum()
    repulsion = -torch.stack([w * d for w, d in zip(w_neg, d_neg, strict=True)]).sum()

    def entropy(ws: list[Tensor]) -> float:
        return -sum(float(w.detach() * torch.log(w.detach())) for w in ws if float(w.detach()) > 0)

    correct = float(max(float(d.detach()) for d in d_pos) < min(float(d.detach()) for d in d_neg))
    return QueryResult(
        loss=alpha * attraction + beta * repulsion,
        attraction=attraction,
        repulsion=repulsion,
        pos_weights=w_pos,
        neg_weights=w_neg,
        pos_entropy=entropy(w_pos),
        neg_entropy=entropy(w_neg),
        correct=correct,
    )


def reference_queries(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None = None,
    *,
    t_pos: float = 1.0,
    t_neg: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    cost: str = "sqeuclidean",
    normalize: bool = True,
    detach_weights: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> list[QueryResult]:
    """Per-query results in the documented order (in-batch: view-major).

    Computed in float64 unless ``compute_dtype`` says otherwise (the tests evaluate the same
    loops in float32 to measure how well-conditioned a case is).
    """
    dtype = torch.float64 if compute_dtype is None else compute_dtype
    q_rows = list(query.to(dtype))
    pos = positive.to(dtype)
    if pos.dim() == 2:
        pos = pos.unsqueeze(1)
    n, m = pos.shape[0], pos.shape[1]
    prep = unit if normalize else (lambda x: x)
    opts: dict[str, Any] = dict(
        t_pos=t_pos, t_neg=t_neg, alpha=alpha, beta=beta, cost=cost, detach_weights=detach_weights
    )
    results = []
    if negatives is None:
        # Every embedding of instance i: view 0 is the query row, views 1..M the positives.
        emb = [[prep(q_rows[i]) for i in range(n)]] + [
            [prep(pos[i, v]) for i in range(n)] for v in range(m)
        ]
        views = m + 1
        for v in range(views):
            for i in range(n):
                positives = [emb[w][i] for w in range(views) if w != v]
                negs = [emb[w][j] for w in range(views) for j in range(n) if j != i]
                results.append(one_query(emb[v][i], positives, negs, **opts))
        return results
    neg = negatives.to(dtype)
    for i in range(n):
        positives = [prep(pos[i, j]) for j in range(m)]
        rows = neg if neg.dim() == 2 else neg[i]
        negs = [prep(r) for r in rows]
        results.append(one_query(prep(q_rows[i]), positives, negs, **opts))
    return results


def reduce(values: list[Tensor], reduction: str) -> Tensor:
    stacked = torch.stack(values)
    if reduction == "mean":
        return stacked.mean()
    if reduction == "sum":
        return stacked.sum()
    return stacked


def reference_loss(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None = None,
    *,
    reduction: str = "mean",
    **options: Any,
) -> Tensor:
    """The loss of SPEC section 2, reduced."""
    results = reference_queries(query, positive, negatives, **options)
    return reduce([r.loss for r in results], reduction)


def reference_paper(
    views: list[Tensor],
    *,
    t_pos: float = 1.0,
    t_neg: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    cost: str = "sqeuclidean",
    normalize: bool = True,
    detach_weights: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Loop transcription of the official small-scale objective (SPEC section 3).

    attraction = mean over views x and rows i of the transport cost from z_x[i] to the other
    views of row i; repulsion = mean over pairs x < y and rows i of z_x[i] against the rows
    j != i of view y. loss = alpha * attraction + beta * repulsion. Per row for "none".
    """
    prep = unit if normalize else (lambda x: x)
    z = [[prep(r) for r in v.double()] for v in views]
    num_views, n = len(z), len(z[0])
    opts: dict[str, Any] = dict(
        t_pos=t_pos, t_neg=t_neg, alpha=1.0, beta=1.0, cost=cost, detach_weights=detach_weights
    )
    per_row = []
    for i in range(n):
        attraction = []
        for x in range(num_views):
            others = [z[w][i] for w in range(num_views) if w != x]
            dummy_neg = [z[x][i]]
            attraction.append(one_query(z[x][i], others, dummy_neg, **opts).attraction)
        repulsion = []
        for x in range(num_views):
            for y in range(x + 1, num_views):
                negs = [z[y][j] for j in range(n) if j != i]
                repulsion.append(one_query(z[x][i], [z[y][i]], negs, **opts).repulsion)
        a = torch.stack(attraction).mean()
        r = torch.stack(repulsion).mean()
        per_row.append(alpha * a + beta * r)
    return reduce(per_row, reduction)
