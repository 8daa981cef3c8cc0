"""A real trainer's step, end to end: the time of one optimizer step of a SimCLR trainer with
InfoNCE (the README's NT-Xent) and with ``cct_loss`` at its defaults, the rest identical.

On CUDA: a timm ResNet-18 encoder with a projection head, batches of 512 images of 32x32
(two views each), bf16 autocast, channels_last, SGD (issue 17's target: at most 1.03x). On the
CPU (``make gpu-check``'s smoke mode): a small plain-torch CNN on a few images, float32.

Usage: ``python benchmarks/trainer.py [--device cuda] [--steps 20]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cct_loss import cct_loss
from cct_loss.baselines import nt_xent

#: InfoNCE's temperature matching cct_loss's default t_neg = 1.
TEMPERATURE = 0.5
TARGET = 1.03


def encoder(device: torch.device) -> tuple[nn.Module, int, int]:
    """The encoder with its projection head, the batch size and the image side."""
    if device.type == "cuda":
        import timm  # the GPU machine has it; the CPU smoke mode does not need it

        backbone = timm.create_model("resnet18", num_classes=0)
        head = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
        model = nn.Sequential(backbone, head).to(device)
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return model, 512, 32
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 16),
    )
    return model.to(device), 16, 16


def measure(
    device: torch.device, steps: int = 20, *, max_seconds: float | None = None
) -> dict[str, Any]:
    """Milliseconds per optimizer step with each loss (medians; the two interleaved step by
    step), and their ratio. ``max_seconds``: no new round starts after that long (one timed
    round at least, after the warm-up)."""
    started = time.perf_counter()
    model, batch, side = encoder(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    images = [
        torch.randn(batch, 3, side, side, generator=g)
        .to(device)
        .contiguous(memory_format=torch.channels_last)
        for _ in range(2)
    ]
    cuda = device.type == "cuda"

    def step(loss_of: Callable[[Tensor, Tensor], Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            z1, z2 = model(images[0]), model(images[1])
            loss = loss_of(z1, z2)
        loss.backward()
        optimizer.step()

    def cct(z1: Tensor, z2: Tensor) -> Tensor:
        loss: Tensor = cct_loss(z1, z2)
        return loss

    def infonce(z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent(z1, z2, TEMPERATURE)

    losses = {"infonce": infonce, "cct": cct}
    times: dict[str, list[float]] = {name: [] for name in losses}
    for i in range(steps + 3):  # three warm-up rounds
        late = max_seconds is not None and time.perf_counter() - started > max_seconds
        if late and i > 3:
            break
        for name, loss_of in losses.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(loss_of)
            if cuda:
                torch.cuda.synchronize()
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    return {
        "model": "timm resnet18, batch 512 x 32x32, bf16, channels_last" if cuda else "small CNN",
        "cct_ms": ms["cct"],
        "infonce_ms": ms["infonce"],
        "ratio": ms["cct"] / ms["infonce"],
        "target": TARGET,
        "steps": len(times["cct"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(measure(torch.device(args.device), args.steps), indent=1))


if __name__ == "__main__":
    main()
