"""The swaps against the losses they replace, in the client packages themselves: lightly's
``NTXentLoss`` (in-batch, and with a memory bank of 4,096), open_clip's ``ClipLoss`` and
pytorch-metric-learning's ``SupConLoss``, each beside the one-line swap of docs/clients.md at
N=256, D=128 on one thread, forward + backward, interleaved (``cpu_times`` of run.py), on
``torch.randn`` embeddings (and, for ClipLoss, also on unit-norm ones). The ratios are the
swap's time over the replaced loss's.

Runs where the client packages are installed (``make bench-clients``, in the virtual environment
of ``make test-clients``); ``make bench`` prints the table when they import, a line saying how
to get it when they do not.

Usage: ``python benchmarks/clients.py [--repeats 7]``
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable

import torch

from cct_loss import CCTClipLoss, CCTLoss, CCTMetricLoss, NegativeQueue

N, D, BANK, CLASSES = 256, 128, 4096, 16
CLIENTS = ("lightly", "open_clip", "pytorch_metric_learning")

Step = Callable[[], None]


def installed() -> bool:
    """Whether the three client packages can be imported here."""
    return all(importlib.util.find_spec(name) is not None for name in CLIENTS)


def _step(loss: Callable[[], torch.Tensor]) -> Step:
    def step() -> None:
        loss().backward()

    return step


def pairs() -> dict[str, tuple[Step, Step]]:
    """Each swap: (the replaced loss's step, the swap's step)."""
    from lightly.loss import NTXentLoss
    from open_clip.loss import ClipLoss
    from pytorch_metric_learning.losses import SupConLoss

    g = torch.Generator().manual_seed(0)

    def leaf() -> torch.Tensor:
        return torch.randn(N, D, generator=g).requires_grad_()

    z0, z1 = leaf(), leaf()
    # open_clip's models hand ClipLoss unit-norm features; on raw ones its softmax underflows to
    # subnormal numbers, which are slow on the CPU: both rows are shown.
    u0, u1 = (torch.nn.functional.normalize(z.detach(), dim=1).requires_grad_() for z in (z0, z1))
    labels = torch.randint(0, CLASSES, (N,), generator=g)
    scale = torch.tensor(1 / 0.07)
    lightly_bank = NTXentLoss(memory_bank_size=(BANK, D))
    ours_bank = CCTLoss(temperature=0.5, queue=NegativeQueue(BANK, D))
    for _ in range(BANK // N):  # both banks full: the steady state of training
        lightly_bank(z0, z1.detach())
        ours_bank(z0, z1.detach())
    ntxent, ours = NTXentLoss(temperature=0.5), CCTLoss(temperature=0.5)
    clip, ours_clip = ClipLoss(), CCTClipLoss()
    supcon, ours_metric = SupConLoss(temperature=0.1), CCTMetricLoss(temperature=0.1)
    return {
        "lightly NTXentLoss (SimCLR)": (
            _step(lambda: ntxent(z0, z1)),
            _step(lambda: ours(z0, z1)),
        ),
        f"lightly NTXentLoss, memory bank {BANK}": (
            _step(lambda: lightly_bank(z0, z1.detach())),
            _step(lambda: ours_bank(z0, z1.detach())),
        ),
        "open_clip ClipLoss": (
            _step(lambda: clip(z0, z1, scale)),
            _step(lambda: ours_clip(z0, z1, scale)),
        ),
        "open_clip ClipLoss, unit-norm features": (
            _step(lambda: clip(u0, u1, scale)),
            _step(lambda: ours_clip(u0, u1, scale)),
        ),
        "PML SupConLoss": (
            _step(lambda: supcon(z0, labels)),
            _step(lambda: ours_metric(z0, labels)),
        ),
    }


def table(repeats: int) -> str:
    """The swaps' ratios (one thread), as text."""
    from run import cpu_times

    torch.set_num_threads(1)
    lines = [f"client swaps, N={N}, D={D}, 1 thread: swap time / replaced loss time"]
    for name, (before, after) in pairs().items():
        times = cpu_times({"before": before, "after": after}, repeats)
        ratio = times["after"] / times["before"]
        lines.append(
            f"  {name:<40} {ratio:5.2f}x   ({times['before'] * 1e3:.2f} ms -> "
            f"{times['after'] * 1e3:.2f} ms)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if not installed():
        raise SystemExit(
            "benchmarks/clients.py needs lightly, open_clip and pytorch-metric-learning: run "
            "make bench-clients"
        )
    print(table(args.repeats))


if __name__ == "__main__":
    main()
