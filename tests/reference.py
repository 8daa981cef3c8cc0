"""A slow, obviously-correct reference for the CCT loss, transcribed from docs/specification.md.

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
    has_positives: bool = True
    has_negatives: bool = True


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
    """The formula of docs/specification.md, section 2 for one query; a missing term (no positive, or no
    negative) is 0 (docs/specification.md, section 3, labels)."""
    d_pos = [cost_fn(q, p, cost) for p in positives]
    d_neg = [cost_fn(q, n, cost) for n in negatives]
    src_pos = [d.detach() for d in d_pos] if detach_weights else d_pos
    src_neg = [d.detach() for d in d_neg] if detach_weights else d_neg
    w_pos = softmax_list([t_pos * d for d in src_pos]) if d_pos else []
    w_neg = softmax_list([-t_neg * d for d in src_neg]) if d_neg else []
    zero = (q * 0).sum()
    attraction = (
        torch.stack([w * d for w, d in zip(w_pos, d_pos, strict=True)]).sum() if d_pos else zero
    )
    repulsion = (
        -torch.stack([w * d for w, d in zip(w_neg, d_neg, strict=True)]).sum() if d_neg else zero
    )

    def entropy(ws: list[Tensor]) -> float:
        return -sum(float(w.detach() * torch.log(w.detach())) for w in ws if float(w.detach()) > 0)

    correct = 0.0
    if d_pos and d_neg:
        correct = float(
            max(float(d.detach()) for d in d_pos) < min(float(d.detach()) for d in d_neg)
        )
    return QueryResult(
        loss=alpha * attraction + beta * repulsion,
        attraction=attraction,
        repulsion=repulsion,
        pos_weights=w_pos,
        neg_weights=w_neg,
        pos_entropy=entropy(w_pos),
        neg_entropy=entropy(w_neg),
        correct=correct,
        has_positives=bool(d_pos),
        has_negatives=bool(d_neg),
    )


def reference_queries(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None = None,
    *,
    layout: str = "all",
    labels: Tensor | None = None,
    negative_labels: Tensor | None = None,
    t_pos: float = 1.0,
    t_neg: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    cost: str = "sqeuclidean",
    normalize: bool = True,
    detach_weights: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> list[QueryResult]:
    """Per-query results in the documented order (in-batch: view-major), docs/specification.md, section 3.

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
    lab = None if labels is None else [int(x) for x in labels]
    neg_lab = None if negative_labels is None else [int(x) for x in negative_labels]

    def same(i: int, j: int) -> bool:
        """Rows i and j are the same class (without labels: the same row)."""
        return i == j if lab is None else lab[i] == lab[j]

    explicit: list[list[Tensor]] = [[] for _ in range(n)]
    if negatives is not None:
        neg = negatives.to(dtype)
        for i in range(n):
            rows = neg if neg.dim() == 2 else neg[i]
            explicit[i] = [
                prep(r)
                for k, r in enumerate(rows)
                if neg_lab is None or lab is None or neg_lab[k] != lab[i]
            ]
    results = []
    if layout == "cross":
        # Queries: rows of query. Candidates: every embedding of every row of positive.
        cand = [[prep(pos[j, v]) for v in range(m)] for j in range(n)]
        for i in range(n):
            positives = [cand[j][v] for j in range(n) for v in range(m) if same(i, j)]
            negs = [cand[j][v] for j in range(n) for v in range(m) if not same(i, j)]
            results.append(one_query(prep(q_rows[i]), positives, negs + explicit[i], **opts))
        return results
    if negatives is None:
        # Every embedding of instance i: view 0 is the query row, views 1..M the positives.
        emb = [[prep(q_rows[i]) for i in range(n)]] + [
            [prep(pos[i, v]) for i in range(n)] for v in range(m)
        ]
        return reference_views(emb, labels=lab, **opts)
    for i in range(n):
        positives = [prep(pos[i, j]) for j in range(m)]
        results.append(one_query(prep(q_rows[i]), positives, explicit[i], **opts))
    return results


def reference_views(
    emb: list[list[Tensor]], *, labels: list[int] | None, **opts: Any
) -> list[QueryResult]:
    """The symmetric in-batch layout over prepared views ``emb[v][i]``, view-major."""
    views, n = len(emb), len(emb[0])
    results = []
    for v in range(views):
        for i in range(n):
            if labels is None:
                positives = [emb[w][i] for w in range(views) if w != v]
                negs = [emb[w][j] for w in range(views) for j in range(n) if j != i]
            else:
                positives = [
                    emb[w][j]
                    for w in range(views)
                    for j in range(n)
                    if labels[j] == labels[i] and (w, j) != (v, i)
                ]
                negs = [emb[w][j] for w in range(views) for j in range(n) if labels[j] != labels[i]]
            results.append(one_query(emb[v][i], positives, negs, **opts))
    return results


def reference_multiview(
    views: list[Tensor],
    *,
    labels: Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    **opts: Any,
) -> Tensor:
    """``cct_loss_multiview(views, labels=...)`` (layout "all"), reduced."""
    prep = unit if normalize else (lambda x: x)
    emb = [[prep(r) for r in v.double()] for v in views]
    lab = None if labels is None else [int(x) for x in labels]
    full: dict[str, Any] = dict(
        t_pos=1.0, t_neg=1.0, alpha=1.0, beta=1.0, cost="sqeuclidean", detach_weights=True
    )
    full.update(opts)
    return reduce_results(reference_views(emb, labels=lab, **full), reduction, full)


def reduce_results(results: list[QueryResult], reduction: str, opts: dict[str, Any]) -> Tensor:
    """docs/specification.md, section 3: "mean" is alpha * mean(attraction over queries with positives) + beta *
    mean(repulsion over queries with negatives), 0 for a term no query has."""
    if reduction != "mean":
        return reduce([r.loss for r in results], reduction)
    alpha, beta = float(opts.get("alpha", 1.0)), float(opts.get("beta", 1.0))
    att = [r.attraction for r in results if r.has_positives]
    rep = [r.repulsion for r in results if r.has_negatives]
    zero = (results[0].loss * 0).sum()
    mean_att = torch.stack(att).mean() if att else zero
    mean_rep = torch.stack(rep).mean() if rep else zero
    return alpha * mean_att + beta * mean_rep


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
    """The loss of docs/specification.md, section 2, reduced."""
    results = reference_queries(query, positive, negatives, **options)
    return reduce_results(results, reduction, options)


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
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Loop transcription of the official small-scale objective (docs/specification.md, section 3), in float64
    unless ``compute_dtype`` says otherwise (evaluated in float32 it measures how well
    conditioned a case is).

    attraction = mean over views x and rows i of the transport cost from z_x[i] to the other
    views of row i; repulsion = mean over pairs x < y and rows i of z_x[i] against the rows
    j != i of view y. loss = alpha * attraction + beta * repulsion. Per row for "none".
    """
    prep = unit if normalize else (lambda x: x)
    z = [[prep(r) for r in v.to(compute_dtype)] for v in views]
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


def reference_keyed(
    query: Tensor,
    keys: Tensor,
    is_positive: Any,
    is_negative: Any,
    *,
    reduction: str = "mean",
    normalize: bool = True,
    **opts: Any,
) -> Tensor:
    """Queries against keys where ``is_positive(i, j)`` / ``is_negative(i, j)`` say whether key
    ``j`` is a positive / negative of query ``i`` (pytorch-metric-learning's reference
    embeddings and mined pairs), reduced."""
    prep = unit if normalize else (lambda x: x)
    full: dict[str, Any] = dict(
        t_pos=1.0, t_neg=1.0, alpha=1.0, beta=1.0, cost="sqeuclidean", detach_weights=True
    )
    full.update(opts)
    rows = [prep(r) for r in query.double()]
    cands = [prep(r) for r in keys.double()]
    results = [
        one_query(
            rows[i],
            [c for j, c in enumerate(cands) if is_positive(i, j)],
            [c for j, c in enumerate(cands) if is_negative(i, j)],
            **full,
        )
        for i in range(len(rows))
    ]
    return reduce_results(results, reduction, full)


def reference_moco(
    queries: list[Tensor],
    keys: list[Tensor],
    queue: Tensor,
    *,
    t_pos: float = 1.0,
    t_neg: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    cost: str = "sqeuclidean",
    normalize: bool = True,
    detach_weights: bool = True,
    in_batch_weights: str | None = None,
    reduction: str = "mean",
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Loop transcription of the paper's MoCo-v2 objective (issue 26, A; docs/layouts.md), in
    float64 unless ``compute_dtype`` says otherwise. For view x and row i: attraction over the other views' keys k_j[i], j != x, with
    weights softmax(t_pos d) (detached with detach_weights); repulsion over the queue keys and
    the same view's other queries q_x[m], m != i, in ONE softmax(-t_neg d), whose queue entries
    follow detach_weights and whose in-batch entries follow in_batch_weights (None: as the queue).
    Each term averaged over the V * N queries; "none": per query, view-major."""
    prep = unit if normalize else (lambda x: x)
    q = [[prep(r) for r in v.to(compute_dtype)] for v in queries]
    k = [[prep(r) for r in v.to(compute_dtype)] for v in keys]
    negatives_q = [prep(r) for r in queue.to(compute_dtype)]
    num_views, n = len(q), len(q[0])
    in_batch_detached = detach_weights if in_batch_weights is None else in_batch_weights != "live"
    attraction, repulsion = [], []
    for x in range(num_views):
        for i in range(n):
            d_pos = [cost_fn(q[x][i], k[j][i], cost) for j in range(num_views) if j != x]
            src = [d.detach() for d in d_pos] if detach_weights else d_pos
            w_pos = softmax_list([t_pos * d for d in src])
            attraction.append(torch.stack([w * d for w, d in zip(w_pos, d_pos, strict=True)]).sum())
            d_queue = [cost_fn(q[x][i], key, cost) for key in negatives_q]
            d_batch = [cost_fn(q[x][i], q[x][m], cost) for m in range(n) if m != i]
            w = softmax_list([-t_neg * d for d in d_queue + d_batch])  # one softmax, live
            w_queue, w_batch = w[: len(d_queue)], w[len(d_queue) :]
            if detach_weights:
                w_queue = [x_.detach() for x_ in w_queue]
            if in_batch_detached:
                w_batch = [x_.detach() for x_ in w_batch]
            terms = [a * b for a, b in zip(w_queue + w_batch, d_queue + d_batch, strict=True)]
            repulsion.append(-torch.stack(terms).sum())
    if reduction == "mean":
        return alpha * torch.stack(attraction).mean() + beta * torch.stack(repulsion).mean()
    per_query = [alpha * a + beta * r for a, r in zip(attraction, repulsion, strict=True)]
    return reduce(per_query, reduction)


def reference_multicrop(
    queries: list[Tensor],
    keys: list[Tensor],
    local_queries: list[Tensor],
    *,
    t_pos: float = 1.0,
    t_neg: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    cost: str = "sqeuclidean",
    normalize: bool = True,
    detach_weights: bool = True,
    reduction: str = "mean",
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Loop transcription of the paper's multi-crop objective (issue 26, B; docs/layouts.md),
    in float64 unless ``compute_dtype`` says otherwise. For key view i in {0, 1} and row b: the query list is the other global view,
    then every local crop; view v's weight p_v = softmax_v(t_pos c(q_v[b], k_i[b])), detached;
    view v's term is the cross layout's (attraction to k_i[b], repulsion from k_i[m], m != b,
    weights softmax(-t_neg d), detached with detach_weights); the row's loss sum_v p_v term_v,
    averaged over the two key views, then reduced over the rows."""
    prep = unit if normalize else (lambda x: x)
    views = [[prep(r) for r in v.to(compute_dtype)] for v in [*queries, *local_queries]]
    k = [[prep(r) for r in v.to(compute_dtype)] for v in keys]
    n = len(k[0])
    per_row = []
    for b in range(n):
        per_key_view = []
        for i in range(2):
            listed = [v for v in range(len(views)) if v != i]
            own = [cost_fn(views[v][b], k[i][b], cost) for v in listed]
            p = softmax_list([t_pos * c.detach() for c in own])
            terms = []
            for v, c_own in zip(listed, own, strict=True):
                d_neg = [cost_fn(views[v][b], k[i][m], cost) for m in range(n) if m != b]
                src = [d.detach() for d in d_neg] if detach_weights else d_neg
                w = softmax_list([-t_neg * d for d in src])
                repulsion = -torch.stack([a * d for a, d in zip(w, d_neg, strict=True)]).sum()
                terms.append(alpha * c_own + beta * repulsion)
            per_key_view.append(torch.stack([pv * t for pv, t in zip(p, terms, strict=True)]).sum())
        per_row.append((per_key_view[0] + per_key_view[1]) / 2)
    return reduce(per_row, reduction)
