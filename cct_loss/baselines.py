"""InfoNCE baselines, written the way trainers write them, for side-by-side comparisons
(benchmarks, examples, the demo, the operator-count tests).

Each is the fastest usual formulation of the loss cct-loss replaces in that layout, so that a
ratio against it is the ratio a user sees when swapping: the README's NT-Xent (SimCLR), MoCo's
InfoNCE with the positive logit in column 0, CLIP's cross-entropy in one direction, and
SupCon (Khosla et al., 2020, the loss outside the log). The multi-positive NT-Xent is kept
for batches of more than two views. Each is written from the loss's published definition and documented behaviour, not copied
from any implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (SimCLR) as trainers write it, and as the README and the docs show it: ``2N``
    queries, each with the other view of its row as the target and the other ``2N - 2``
    embeddings as the rest of the softmax.

    Args:
        z1: ``(N, D)`` the first view of each row (normalised here).
        z2: ``(N, D)`` the second view of the same rows.
        temperature: softmax temperature.

    Returns:
        Scalar loss, the mean over the ``2N`` queries.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n, device = z1.shape[0], z.device
    targets = torch.cat([torch.arange(n, 2 * n, device=device), torch.arange(0, n, device=device)])
    return F.cross_entropy(logits, targets)


def info_nce_multiview(views: Tensor, temperature: float = 0.2) -> Tensor:
    """Symmetric multi-positive NT-Xent over ``(V, N, D)`` views (plain NT-Xent for V = 2).

    Every embedding is a query; its ``V - 1`` positives are the other views of its row, the
    candidates are all other embeddings. With ``V > 2`` the loss is the mean over positives of
    ``-log softmax`` (the SupCon form), the multi-positive InfoNCE that CCT with ``M = V - 1``
    positives should be compared with.

    Args:
        views: ``(V, N, D)`` embeddings (normalised here).
        temperature: softmax temperature.

    Returns:
        Scalar loss, the mean over the ``V N`` queries.
    """
    num_views, n, d = views.shape
    flat = F.normalize(views.reshape(num_views * n, d), dim=-1)
    logits = flat @ flat.T / temperature
    self_mask = torch.eye(num_views * n, dtype=torch.bool, device=views.device)
    log_prob = torch.log_softmax(logits.masked_fill(self_mask, float("-inf")), dim=-1)
    ids = torch.arange(n, device=views.device).repeat(num_views)
    positive = (ids[:, None] == ids[None, :]) & ~self_mask
    return -(log_prob.masked_fill(~positive, 0.0).sum(-1) / (num_views - 1)).mean()


def info_nce_queue(query: Tensor, key: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo's InfoNCE: the positive logit in column 0, the ``(K, D)`` queue after it.

    The queue holds normalised keys, as MoCo's does (it enqueues normalised keys), so it is
    not normalised again at every step.

    Args:
        query: ``(N, D)`` queries (normalised here).
        key: ``(N, D)`` their positives (normalised here).
        queue: ``(K, D)`` normalised negatives.
        temperature: softmax temperature (MoCo v2: 0.2).

    Returns:
        Scalar loss.
    """
    q, k = F.normalize(query, dim=1), F.normalize(key, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def clip_info_nce(query: Tensor, key: Tensor, temperature: float = 0.07) -> Tensor:
    """CLIP's loss in one direction (``query`` against every ``key``, the matching row the
    target), the layout of ``cct_loss(query, key, layout="cross")``.

    Args:
        query: ``(N, D)`` queries, e.g. images (normalised here).
        key: ``(N, D)`` the other tower's embeddings, e.g. texts; row ``i`` is query ``i``'s
            positive, the other rows its negatives (normalised here).
        temperature: softmax temperature (CLIP learns ``1 / temperature``; a constant here).

    Returns:
        Scalar loss.
    """
    logits = F.normalize(query, dim=1) @ F.normalize(key, dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))


def supcon(z1: Tensor, z2: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """SupCon (Khosla et al., 2020, the loss with the mean over positives outside the log) for
    two views: every embedding is an anchor; its positives are every other embedding with its
    label, the denominator every other embedding.

    Args:
        z1: ``(N, D)`` the first view of each row (normalised here).
        z2: ``(N, D)`` the second view.
        labels: ``(N,)`` integer class labels of the rows.
        temperature: softmax temperature.

    Returns:
        Scalar loss, the mean over the ``2N`` anchors (each has a positive: its other view).
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    log_prob = torch.log_softmax(logits, dim=1)
    both = labels.repeat(2)
    positives = both[:, None] == both[None, :]
    positives.fill_diagonal_(False)
    return -(log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1)).mean()
