"""InfoNCE baselines for side-by-side comparisons (benchmarks, examples, the demo).

They are what cct-loss replaces, written in the usual way with ``F.cross_entropy``-style
log-softmax, so that a comparison uses the same shapes, positives and negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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

    Args:
        query: ``(N, D)``; key: ``(N, D)`` positives; queue: ``(K, D)`` negatives.
        temperature: softmax temperature (MoCo v2: 0.2).

    Returns:
        Scalar loss.
    """
    q, k, neg = F.normalize(query, dim=-1), F.normalize(key, dim=-1), F.normalize(queue, dim=-1)
    logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ neg.T], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)
