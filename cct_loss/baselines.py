"""InfoNCE baselines as trainers write them, for side-by-side comparisons (benchmarks, examples,
the operator-count tests): the fastest usual formulation of each loss cct-loss replaces, written
from its published definition, so that a ratio against it is the ratio a user sees."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (SimCLR) as the README shows it: ``2N`` queries, each with the other view of its
    row as the target, over ``(N, D)`` views ``z1``, ``z2`` (normalised here)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n, device = z1.shape[0], z.device
    targets = torch.cat([torch.arange(n, 2 * n, device=device), torch.arange(0, n, device=device)])
    return F.cross_entropy(logits, targets)


def info_nce_multiview(views: Tensor, temperature: float = 0.2) -> Tensor:
    """Multi-positive NT-Xent over ``(V, N, D)`` views (normalised here; plain NT-Xent for V = 2):
    every embedding a query, its ``V - 1`` other views its positives, the mean over positives of
    ``-log softmax`` (the SupCon form): what CCT with ``M = V - 1`` compares with."""
    num_views, n, d = views.shape
    flat = F.normalize(views.reshape(num_views * n, d), dim=-1)
    logits = flat @ flat.T / temperature
    self_mask = torch.eye(num_views * n, dtype=torch.bool, device=views.device)
    log_prob = torch.log_softmax(logits.masked_fill(self_mask, float("-inf")), dim=-1)
    ids = torch.arange(n, device=views.device).repeat(num_views)
    positive = (ids[:, None] == ids[None, :]) & ~self_mask
    return -(log_prob.masked_fill(~positive, 0.0).sum(-1) / (num_views - 1)).mean()


def info_nce_queue(query: Tensor, key: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo's InfoNCE: the positive logit in column 0, the ``(K, D)`` queue after it. ``query``
    and ``key`` are normalised here; the queue holds normalised keys, as MoCo's does."""
    q, k = F.normalize(query, dim=1), F.normalize(key, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def clip_info_nce(query: Tensor, key: Tensor, temperature: float = 0.07) -> Tensor:
    """CLIP's loss in one direction: ``query`` ``(N, D)`` against every row of ``key``, the
    matching row the target (the layout of ``cct_loss(query, key, layout="cross")``)."""
    logits = F.normalize(query, dim=1) @ F.normalize(key, dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))


def supcon(z1: Tensor, z2: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """SupCon (Khosla et al., 2020; the mean over positives outside the log) for two ``(N, D)``
    views with ``(N,)`` labels: every embedding an anchor, its positives every other embedding
    with its label."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    log_prob = torch.log_softmax(logits, dim=1)
    both = labels.repeat(2)
    positives = both[:, None] == both[None, :]
    positives.fill_diagonal_(False)
    return -(log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1)).mean()
