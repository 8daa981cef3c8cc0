"""pytorch-metric-learning 2.9: ``losses.SupConLoss(temperature=0.1)`` swapped for
``CCTMetricLoss(temperature=0.1)`` in PML's training pattern, with a miner, and with a memory of
earlier batches (``CCTMetricLoss(queue=...)``; beside PML's ``CrossBatchMemory``, whose
references and pairs it takes as PML's loss does)."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import nn

from cct_loss import CCTMetricLoss, NegativeQueue
from cct_loss.baselines import supcon
from tests.reference import reference_keyed

from .common import STEPS, assert_gradient_matches, assert_went_down

BATCH, DIM_IN, DIM = 24, 10, 8


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes around four centres."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(BATCH) % 4
    centres = torch.randn(4, DIM_IN, generator=g)
    return centres[labels] + 0.8 * torch.randn(BATCH, DIM_IN, generator=g), labels


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM_IN, 16), nn.ReLU(), nn.Linear(16, DIM))


def pairs_of(
    indices: tuple[torch.Tensor, ...],
) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    a1, p, a2, n = lmu.convert_to_pairs(indices, None)
    return (
        set(zip(a1.tolist(), p.tolist(), strict=True)),
        set(zip(a2.tolist(), n.tolist(), strict=True)),
    )


def reference(
    labels: torch.Tensor, indices: tuple[torch.Tensor, ...] | None, embeddings: torch.Tensor
) -> torch.Tensor:
    """The float64 loss of a batch against itself, by label or restricted to mined pairs."""
    if indices is None:
        return reference_keyed(
            embeddings, embeddings,
            lambda i, j: i != j and bool(labels[i] == labels[j]),
            lambda i, j: bool(labels[i] != labels[j]),
            t_neg=5.0,
        )  # fmt: skip
    pos, neg = pairs_of(indices)
    return reference_keyed(
        embeddings, embeddings, lambda i, j: (i, j) in pos, lambda i, j: (i, j) in neg, t_neg=5.0
    )


def train(use_miner: bool, memory: bool) -> None:
    x, labels = data()
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    miner = miners.MultiSimilarityMiner(epsilon=0.1) if use_miner else None
    # was: loss_func = losses.SupConLoss(temperature=0.1), or for a memory
    # loss_func = losses.CrossBatchMemory(losses.SupConLoss(temperature=0.1), DIM, 2 * BATCH)
    loss_func = CCTMetricLoss(
        temperature=0.1, queue=NegativeQueue(2 * BATCH, DIM, with_labels=True) if memory else None
    )
    values = []
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        embeddings = net(x + 0.1 * torch.randn(x.shape, generator=g))
        indices = miner(embeddings, labels) if miner is not None else None
        loss = loss_func(embeddings, labels, indices)
        if step == 0:  # (an empty memory: the batch alone)
            assert_gradient_matches(loss, [embeddings], partial(reference, labels, indices))
        values.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_went_down(values)


def test_pml_pattern_trains_with_the_swapped_loss() -> None:
    train(use_miner=False, memory=False)


def test_pml_pattern_with_a_miner_restricts_to_its_pairs() -> None:
    train(use_miner=True, memory=False)


def test_pml_memory_pattern_trains_with_the_loss_owning_the_memory() -> None:
    train(use_miner=False, memory=True)


def test_cross_batch_memory_refuses_other_losses_by_name() -> None:
    """Why the memory is CCTMetricLoss(queue=...): PML's wrapper takes its own losses only."""
    with pytest.raises(Exception, match="CrossBatchMemory not supported for CCTMetricLoss"):
        losses.CrossBatchMemory(CCTMetricLoss(), DIM, memory_size=2 * BATCH)


def test_what_cross_batch_memory_hands_supcon_gives_the_reference() -> None:
    """PML's CrossBatchMemory(SupConLoss) beside ours: the memory (ref_emb) and the pairs it
    keeps (indices_tuple, its own batch's self-comparisons removed), handed to
    CCTMetricLoss, give the reference's loss over exactly those keys and pairs."""
    x, labels = data()
    seen: dict[str, Any] = {}

    class Spy(losses.SupConLoss):  # type: ignore[misc]
        def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            seen["args"] = args
            return super().forward(*args, **kwargs)  # type: ignore[no-any-return]

    Spy.__name__ = "SupConLoss"  # CrossBatchMemory checks the class name
    memory = losses.CrossBatchMemory(Spy(temperature=0.1), DIM, memory_size=2 * BATCH)
    net = model()
    memory(net(x), labels)  # fills half the memory
    embeddings = net(x + 0.05)
    pml = memory(embeddings, labels)
    _, _, indices, ref_emb, ref_labels = seen["args"]
    ours = CCTMetricLoss(temperature=0.1)(embeddings, labels, indices, ref_emb, ref_labels)
    pos, neg = pairs_of(indices)
    expected = reference_keyed(
        embeddings.detach().double(), ref_emb.double(),
        lambda i, j: (i, j) in pos, lambda i, j: (i, j) in neg, t_neg=5.0,
    )  # fmt: skip
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(pml)


def test_supcon_baseline_is_pmls_supcon_on_two_views() -> None:
    """The benchmarks' baseline is PML's SupConLoss over the two views' embeddings."""
    g = torch.Generator().manual_seed(3)
    z1, z2 = (torch.randn(12, 8, generator=g, dtype=torch.float64) for _ in range(2))
    labels = torch.randint(0, 3, (12,), generator=g)
    pml = losses.SupConLoss(temperature=0.1)(torch.cat([z1, z2]), labels.repeat(2))
    torch.testing.assert_close(supcon(z1, z2, labels, 0.1), pml)
