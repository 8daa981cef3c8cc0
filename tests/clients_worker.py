"""Worker processes for tests/test_clients_distributed.py (spawned; gloo on 127.0.0.1): open_clip's
gathering flags in :class:`cct_loss.CCTClipLoss`, and a :class:`cct_loss.CCTLoss` that owns a
queue shared across ranks."""

from __future__ import annotations

from pathlib import Path

import torch

from cct_loss import CCTClipLoss, CCTLoss, NegativeQueue

from .distributed_worker import init, leave

#: Rows per rank, the feature dim, open_clip's logit scale.
ROWS, DIM, SCALE = 3, 4, 12.0
FLAGS = [(local, with_grad) for local in (False, True) for with_grad in (False, True)]


def features(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of image and text features (float64), the same on every process."""
    g = torch.Generator().manual_seed(7)
    return (
        torch.randn(ROWS * world_size, DIM, generator=g, dtype=torch.float64),
        torch.randn(ROWS * world_size, DIM, generator=g, dtype=torch.float64),
    )


def queue_batches(world_size: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global ``(q, k)`` batches for the queue run, the same on every process."""
    g = torch.Generator().manual_seed(8)
    return [
        (
            torch.randn(ROWS * world_size, DIM, generator=g, dtype=torch.float64),
            torch.randn(ROWS * world_size, DIM, generator=g, dtype=torch.float64),
        )
        for _ in range(steps)
    ]


def run(rank: int, world_size: int, out_dir: str) -> None:
    init(rank, world_size, out_dir)
    try:
        results: dict[str, object] = {}
        images, texts = features(world_size)
        own = slice(rank * ROWS, (rank + 1) * ROWS)
        for local, with_grad in FLAGS:
            image = images[own].clone().requires_grad_()
            text = texts[own].clone().requires_grad_()
            loss_fn = CCTClipLoss(
                local_loss=local, gather_with_grad=with_grad, rank=rank, world_size=world_size
            )
            loss = loss_fn(image, text, torch.tensor(SCALE, dtype=torch.float64))
            assert isinstance(loss, torch.Tensor)
            loss.backward()
            results[f"clip_{local}_{with_grad}"] = (loss.detach(), image.grad, text.grad)

        criterion = CCTLoss(
            temperature=0.2,
            queue=NegativeQueue(10, DIM, gather_distributed=True, dtype=torch.float64),
        )
        losses = []
        for q, k in queue_batches(world_size, 3):
            losses.append(criterion(q[own].requires_grad_(), k[own]).detach())
        results["queue_losses"] = torch.stack(losses)
        results["queue_state"] = criterion.state_dict()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        leave(rank, world_size, out_dir)
