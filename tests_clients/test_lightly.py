"""lightly 1.6's SimCLR and MoCo training patterns with the loss swapped in one line each:
``NTXentLoss(temperature=0.5)`` -> ``CCTLoss(temperature=0.5)``, and
``NTXentLoss(memory_bank_size=(K, D))`` -> ``CCTLoss(temperature=0.5, queue=NegativeQueue(K, D))``."""

from __future__ import annotations

import copy
from functools import partial

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead, SimCLRProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import nn

from cct_loss import CCTLoss, NegativeQueue, cct_loss
from cct_loss.baselines import nt_xent
from tests.reference import reference_loss

from .common import STEPS, assert_gradient_matches, assert_went_down

BATCH, IMAGE, FEATURES, OUT = 16, 3 * 8 * 8, 32, 16


def backbone() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(IMAGE, FEATURES), nn.ReLU())


def two_views(images: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmentations of each image: noise and a random brightness."""

    def view() -> torch.Tensor:
        scale = 1 + 0.2 * torch.rand(images.shape[0], 1, 1, 1, generator=g)
        return images * scale + 0.3 * torch.randn(images.shape, generator=g)

    return view(), view()


class SimCLR(nn.Module):  # lightly's SimCLR example, a small backbone
    def __init__(self) -> None:
        super().__init__()
        self.backbone = backbone()
        self.projection_head = SimCLRProjectionHead(FEATURES, FEATURES, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.projection_head(self.backbone(x).flatten(start_dim=1))
        return out


def test_simclr_pattern_trains_with_the_swapped_loss() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, 8, 8, generator=g)
    model = SimCLR()
    criterion = CCTLoss(temperature=0.5)  # was: criterion = NTXentLoss(temperature=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(STEPS):
        x0, x1 = two_views(images, g)
        z0, z1 = model(x0), model(x1)
        loss = criterion(z0, z1)
        if step == 0:
            assert_gradient_matches(loss, [z0, z1], lambda a, b: reference_loss(a, b, t_neg=1.0))
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_went_down(losses)


def test_lightly_ntxent_is_the_baseline_and_its_weights_are_cct_repulsion_weights() -> None:
    """The baseline of the benchmarks is lightly's NTXentLoss to machine precision, and at
    ``temperature=tau`` the repulsion weights are its softmax over the negatives."""
    g = torch.Generator().manual_seed(1)
    z0, z1 = (
        torch.randn(12, 8, generator=g, dtype=torch.float64),
        torch.randn(12, 8, generator=g, dtype=torch.float64),
    )
    for tau in (0.1, 0.5):
        torch.testing.assert_close(nt_xent(z0, z1, tau), NTXentLoss(temperature=tau)(z0, z1))
        details = cct_loss(z0, z1, temperature=tau, return_details="weights")
        z = torch.nn.functional.normalize(torch.cat([z0, z1]), dim=1)
        logits = z @ z.T / tau
        n = z0.shape[0]
        own = torch.arange(2 * n)
        mask = torch.ones(2 * n, 2 * n, dtype=torch.bool)
        mask[own, own] = False
        mask[own, (own + n) % (2 * n)] = False  # the positive: DCL's denominator
        expected = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
        assert details.neg_weights is not None
        torch.testing.assert_close(details.neg_weights, expected)


class MoCo(nn.Module):  # lightly's MoCo example, a small backbone
    def __init__(self) -> None:
        super().__init__()
        self.backbone = backbone()
        self.projection_head = MoCoProjectionHead(FEATURES, FEATURES, OUT)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.projection_head(self.backbone(x).flatten(start_dim=1))
        return out

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        key: torch.Tensor = self.projection_head_momentum(
            self.backbone_momentum(x).flatten(start_dim=1)
        )
        return key.detach()


def test_moco_pattern_trains_with_the_loss_owning_the_queue() -> None:
    """lightly's MoCo loop, unchanged but for the criterion: no first-step case (step 0 takes
    the batch's other keys), the queue read then filled by the loss, as lightly's bank is."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(BATCH, 3, 8, 8, generator=g) for _ in range(4)]
    model = MoCo()
    # was: criterion = NTXentLoss(memory_bank_size=(4 * BATCH, OUT))
    criterion = CCTLoss(temperature=0.5, queue=NegativeQueue(4 * BATCH, OUT))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(STEPS + 4):
        images = batches[step % len(batches)]
        x_query, x_key = two_views(images, g)
        update_momentum(model.backbone, model.backbone_momentum, m=0.99)
        update_momentum(model.projection_head, model.projection_head_momentum, m=0.99)
        query = model(x_query)
        key = model.forward_momentum(x_key)
        assert criterion.queue is not None
        bank = criterion.queue.negatives()
        loss = criterion(query, key)
        if step in (0, 2):  # against the batch's other keys, then against the queue
            keys = key.double()
            if step == 0:
                reference = partial(reference_loss, positive=keys, layout="cross", t_neg=1.0)
            else:
                reference = partial(
                    reference_loss, positive=keys, negatives=bank.double(), t_neg=1.0
                )
            assert_gradient_matches(loss, [query], reference)
        if step >= 4:  # once the queue is full
            losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert criterion.queue is not None and len(criterion.queue) == 4 * BATCH
    assert_went_down(losses)
