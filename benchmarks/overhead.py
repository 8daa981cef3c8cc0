"""What a step costs beyond its arithmetic: ``cct_loss`` at its defaults against the InfoNCE it
replaces, at the per-GPU batches people train with (issue 17's targets, bf16 autocast):

* eager forward + backward: at most 1.25x InfoNCE at SimCLR N=256, 1024, 4096 and MoCo N=256,
  K=16384 (D=128);
* both compiled with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs): at most 1.1x;
* CUDA kernel launches per step (``torch.profiler``): at most 1.5x InfoNCE's.

The baselines are the README's NT-Xent and MoCo's InfoNCE (:mod:`cct_loss.baselines`) at
``temperature=0.5``, the one whose softmax weights ``cct_loss``'s default ``t_neg=1``
matches. On the CPU (``make gpu-check``'s smoke mode) the eager ratio alone runs, on tiny
shapes.

Usage: ``python benchmarks/overhead.py [--device cuda] [--max-seconds 45]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from problems import Problem  # noqa: E402
from run import cuda_times  # noqa: E402

from cct_loss import cct_loss  # noqa: E402
from cct_loss.baselines import info_nce_queue, nt_xent  # noqa: E402

SHAPES = [
    Problem("simclr", 256),
    Problem("simclr", 1024),
    Problem("simclr", 4096),
    Problem("moco", 256, k=16384),
]
SMOKE_SHAPES = [Problem("simclr", 16, d=8), Problem("moco", 16, d=8, k=64)]
#: The targets, as ratios to InfoNCE.
TARGETS = {"eager": 1.25, "reduce_overhead": 1.1, "launches": 1.5}
#: InfoNCE's temperature matching cct_loss's default t_neg = 1 (t = 1 / (2 tau)).
TEMPERATURE = 0.5

Loss = Callable[[], Tensor]


def losses(problem: Problem, device: torch.device) -> dict[str, Loss]:
    """``cct`` (``cct_loss`` at its defaults) and ``infonce`` on the same inputs, under bf16
    autocast on CUDA (float32 on the CPU)."""
    g = torch.Generator().manual_seed(0)
    n, d = problem.n, problem.d

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device)

    low = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if problem.kind == "moco":
        q = randn(n, d).requires_grad_()
        k = randn(n, d)
        queue = F.normalize(randn(problem.k, d), dim=1)

        def cct() -> Tensor:
            with low:
                loss: Tensor = cct_loss(q, k, queue)
            return loss

        def infonce() -> Tensor:
            with low:
                return info_nce_queue(q, k, queue, TEMPERATURE)

        return {"cct": cct, "infonce": infonce}
    z1, z2 = randn(n, d).requires_grad_(), randn(n, d).requires_grad_()

    def cct_simclr() -> Tensor:
        with low:
            loss: Tensor = cct_loss(z1, z2)
        return loss

    def nt_xent_simclr() -> Tensor:
        with low:
            return nt_xent(z1, z2, TEMPERATURE)

    return {"cct": cct_simclr, "infonce": nt_xent_simclr}


def as_step(loss: Loss) -> Callable[[], None]:
    return lambda: loss().backward()


def launches(loss: Loss) -> int:
    """CUDA kernel launches of one forward + backward (the runtime calls the host makes)."""
    step = as_step(loss)
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
        torch.cuda.synchronize()
    names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
    return sum(e.count for e in profile.key_averages() if e.key in names)


def cpu_median(step: Callable[[], None], repeats: int) -> float:
    """Median seconds of a step on the CPU (each sample ~10 ms of repeated steps)."""
    step()
    start = time.perf_counter()
    step()
    inner = max(1, round(0.01 / max(time.perf_counter() - start, 1e-6)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            step()
        samples.append((time.perf_counter() - start) / inner)
    return sorted(samples)[len(samples) // 2]


def measure(device: torch.device, max_seconds: float, repeats: int = 20) -> list[dict[str, Any]]:
    """One row per shape: eager (and on CUDA compiled, and launches) ratios to InfoNCE; a shape
    that would start after ``max_seconds`` gets a row that says it was skipped."""
    cuda = device.type == "cuda"
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for problem in SHAPES if cuda else SMOKE_SHAPES:
        if time.perf_counter() - started > max_seconds:
            rows.append({"problem": problem.label, "skipped": f"over {max_seconds:.0f} s"})
            continue
        pair = losses(problem, device)
        row: dict[str, Any] = {"problem": problem.label}
        if cuda:
            eager = cuda_times({name: as_step(loss) for name, loss in pair.items()}, repeats)
        else:
            eager = {name: cpu_median(as_step(loss), repeats) for name, loss in pair.items()}
        row.update(
            eager_cct_ms=1e3 * eager["cct"],
            eager_infonce_ms=1e3 * eager["infonce"],
            eager=eager["cct"] / eager["infonce"],
        )
        if cuda:
            counts = {name: launches(loss) for name, loss in pair.items()}
            row.update(
                launches_cct=counts["cct"],
                launches_infonce=counts["infonce"],
                launches=counts["cct"] / counts["infonce"],
            )
            torch._dynamo.reset()
            compiled = {
                name: torch.compile(loss, mode="reduce-overhead") for name, loss in pair.items()
            }
            graphs = cuda_times({name: as_step(loss) for name, loss in compiled.items()}, repeats)
            row.update(
                compiled_cct_ms=1e3 * graphs["cct"],
                compiled_infonce_ms=1e3 * graphs["infonce"],
                reduce_overhead=graphs["cct"] / graphs["infonce"],
            )
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, with the targets."""
    lines = [
        "| shape | eager cct / InfoNCE ms | ratio | reduce-overhead ms | ratio | launches | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['problem']} | skipped ({r['skipped']}) | | | | | |")
            continue

        def pair(a: str, b: str, fmt: str = ".2f", r: dict[str, Any] = r) -> str:
            return f"{r[a]:{fmt}} / {r[b]:{fmt}}" if a in r else "n/a"

        def ratio(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key]:.2f}x" if key in r else "n/a"

        lines.append(
            f"| {r['problem']} | {pair('eager_cct_ms', 'eager_infonce_ms')} | {ratio('eager')} "
            f"| {pair('compiled_cct_ms', 'compiled_infonce_ms')} | {ratio('reduce_overhead')} "
            f"| {pair('launches_cct', 'launches_infonce', 'd')} | {ratio('launches')} |"
        )
    targets = ", ".join(f"{k} at most {v}x" for k, v in TARGETS.items())
    return "\n".join(lines) + f"\n\nTargets (H200, bf16 autocast): {targets}.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-seconds", type=float, default=45.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = measure(torch.device(args.device), args.max_seconds)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
