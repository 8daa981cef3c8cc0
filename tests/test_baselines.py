"""The InfoNCE baselines used for comparisons compute the textbook losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cct_loss.baselines import info_nce_multiview, info_nce_queue


def test_two_views_is_nt_xent() -> None:
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / 0.5
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(6, 12), torch.arange(0, 6)])
    torch.testing.assert_close(
        info_nce_multiview(torch.stack([z1, z2]), 0.5), F.cross_entropy(logits, targets)
    )


def test_multi_positive_is_mean_over_positives() -> None:
    views = torch.randn(3, 4, 5, dtype=torch.float64)
    flat = F.normalize(views.reshape(12, 5), dim=1)
    total = torch.zeros((), dtype=torch.float64)
    for r in range(12):
        others = [c for c in range(12) if c != r]
        log_z = torch.logsumexp(torch.stack([flat[r] @ flat[c] / 0.2 for c in others]), 0)
        positives = [c for c in others if c % 4 == r % 4]
        total = total - sum(flat[r] @ flat[c] / 0.2 - log_z for c in positives) / len(positives)
    torch.testing.assert_close(info_nce_multiview(views), total / 12)


def test_queue_form() -> None:
    q, k, queue = torch.randn(4, 3), torch.randn(4, 3), torch.randn(9, 3)
    qn, kn, nn_ = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    manual = -torch.log_softmax(
        torch.cat([(qn * kn).sum(1, keepdim=True), qn @ nn_.T], 1) / 0.2, 1
    )[:, 0].mean()
    torch.testing.assert_close(info_nce_queue(q, k, queue), manual)
