"""``layout="paper"``: the objective of the official small-scale (CIFAR/STL) CACR code.

Written from SPEC section 3. With ``V`` views of ``N`` rows:

* attraction of row ``i``: for each view ``x``, the query ``z_x[i]`` attracts the other views
  ``z_w[i]`` (``w != x``) with weights ``softmax(+t_pos d)``; averaged over the ``V`` views.
* repulsion of row ``i``: for each ordered pair of views ``x < y``, the query ``z_x[i]`` repels
  the other rows ``z_y[j]`` (``j != i``) of view ``y`` with weights ``softmax(-t_neg d)``; one
  direction only, averaged over the ``V (V - 1) / 2`` pairs.

The per-row loss is ``alpha * attraction_i + beta * repulsion_i``. The official code lets
gradients flow through the weights (``detach_weights=False``).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from .costs import pairwise_cost
from .dense import other_views_index
from .details import QueryTerms
from .transport import conditional_expectation


def paper_terms(
    views: Tensor, *, cost: str, t_pos: float, t_neg: float, detach_weights: bool
) -> QueryTerms:
    """Per-row terms of the paper layout.

    Args:
        views: ``(V, N, D)`` prepared embeddings, ``V >= 2``, ``N >= 2``.

    Returns:
        :class:`QueryTerms` with one entry per row ``i`` (``(N,)`` each): attraction averaged
        over views, repulsion and accuracy averaged over view pairs. ``pos_weights`` is
        ``(V, N, V-1)``; ``neg_weights`` is ``(P, N, N)`` for the pairs ``x < y`` in
        lexicographic order, with zeros on the diagonal.
    """
    num_views, n, d = views.shape
    device = views.device
    flat = views.reshape(num_views * n, d)
    costs = pairwise_cost(flat, flat, cost).view(num_views, n, num_views, n)

    same_instance = costs.diagonal(dim1=1, dim2=3).permute(0, 2, 1)  # (V, N, V): [x, i, w]
    others = other_views_index(num_views, device)
    pos_cost = same_instance.gather(2, others[:, None, :].expand(num_views, n, num_views - 1))
    attract = conditional_expectation(
        pos_cost.reshape(num_views * n, num_views - 1),
        t_pos,
        farther_weighs_more=True,
        detach_weights=detach_weights,
    )

    pairs = list(itertools.combinations(range(num_views), 2))
    xs = torch.tensor([x for x, _ in pairs], device=device)
    ys = torch.tensor([y for _, y in pairs], device=device)
    cross = costs[xs, :, ys, :]  # (P, N, N): [pair, i, j] = c(z_x[i], z_y[j])
    not_self = ~torch.eye(n, dtype=torch.bool, device=device)
    num_pairs = len(pairs)
    repel = conditional_expectation(
        cross.reshape(num_pairs * n, n),
        t_neg,
        farther_weighs_more=False,
        detach_weights=detach_weights,
        mask=not_self.repeat(num_pairs, 1),
    )
    with torch.no_grad():
        own = cross.detach().diagonal(dim1=1, dim2=2).reshape(num_pairs * n)
        correct = (own < repel.extreme).to(views.dtype)

    def per_row(x: Tensor, groups: int) -> Tensor:
        return x.reshape(groups, n).mean(0)

    return QueryTerms(
        attraction=per_row(attract.value, num_views),
        repulsion=per_row(-repel.value, num_pairs),
        pos_entropy=per_row(attract.entropy, num_views),
        neg_entropy=per_row(repel.entropy, num_pairs),
        correct=per_row(correct, num_pairs),
        pos_weights=attract.weights.reshape(num_views, n, num_views - 1),
        neg_weights=repel.weights.reshape(num_pairs, n, n),
    )
