"""The InfoNCE baselines compute the losses they are named after, each against a loop written
from the loss's published definition."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cct_loss.baselines import (
    clip_info_nce,
    info_nce_multiview,
    info_nce_queue,
    nt_xent,
    supcon,
)

from .helpers import random_embeddings


def unit(x: Tensor) -> Tensor:
    norm: Tensor = x.norm()
    return x / norm


def loop_info_nce(query: Tensor, target: Tensor, others: list[Tensor], tau: float) -> Tensor:
    """``-log(exp(q.t / tau) / sum_c exp(q.c / tau))`` with ``target`` among ``others``."""
    logits = torch.stack([unit(query) @ unit(c) / tau for c in others])
    return -(unit(query) @ unit(target) / tau - torch.logsumexp(logits, 0))


def test_nt_xent() -> None:
    z1, z2 = random_embeddings((5, 4), 0), random_embeddings((5, 4), 1)
    rows = list(z1) + list(z2)
    total = sum(
        loop_info_nce(rows[i], rows[(i + 5) % 10], [r for j, r in enumerate(rows) if j != i], 0.5)
        for i in range(10)
    )
    assert isinstance(total, Tensor)
    torch.testing.assert_close(nt_xent(z1, z2, 0.5), total / 10)


def test_multi_positive_is_mean_over_positives() -> None:
    views = random_embeddings((3, 4, 5), 2)
    flat = F.normalize(views.reshape(12, 5), dim=1)
    total = torch.zeros((), dtype=torch.float64)
    for r in range(12):
        others = [c for c in range(12) if c != r]
        log_z = torch.logsumexp(torch.stack([flat[r] @ flat[c] / 0.2 for c in others]), 0)
        positives = [c for c in others if c % 4 == r % 4]
        total = total - sum(flat[r] @ flat[c] / 0.2 - log_z for c in positives) / len(positives)
    torch.testing.assert_close(info_nce_multiview(views), total / 12)
    two = random_embeddings((2, 5, 4), 3)  # two views: NT-Xent itself
    torch.testing.assert_close(info_nce_multiview(two, 0.5), nt_xent(two[0], two[1], 0.5))


def test_moco_queue_form() -> None:
    """The positive in column 0, the queue (normalised keys, as MoCo keeps it) after it."""
    q, k = random_embeddings((4, 3), 4), random_embeddings((4, 3), 5)
    queue = F.normalize(random_embeddings((9, 3), 6), dim=1)
    total = sum(loop_info_nce(q[i], k[i], [k[i], *queue], 0.2) for i in range(4))
    assert isinstance(total, Tensor)
    torch.testing.assert_close(info_nce_queue(q, k, queue), total / 4)


def test_clip_one_direction() -> None:
    q, k = random_embeddings((6, 3), 7), random_embeddings((6, 3), 8)
    total = sum(loop_info_nce(q[i], k[i], list(k), 0.07) for i in range(6))
    assert isinstance(total, Tensor)
    torch.testing.assert_close(clip_info_nce(q, k), total / 6)


def test_supcon_mean_outside_the_log() -> None:
    z1, z2 = random_embeddings((6, 4), 9), random_embeddings((6, 4), 10)
    labels = torch.tensor([0, 1, 0, 2, 1, 1])
    rows, both = list(z1) + list(z2), labels.repeat(2).tolist()
    total = torch.zeros((), dtype=torch.float64)
    for i in range(12):
        others = [r for j, r in enumerate(rows) if j != i]
        positives = [j for j in range(12) if j != i and both[j] == both[i]]
        per_positive = [loop_info_nce(rows[i], rows[p], others, 0.1) for p in positives]
        total = total + torch.stack(per_positive).mean()
    torch.testing.assert_close(supcon(z1, z2, labels), total / 12)
