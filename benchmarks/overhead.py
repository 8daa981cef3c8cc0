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

Usage: ``python benchmarks/overhead.py [--device cuda] [--max-seconds 45] [--json PATH]``
"""

from __future__ import annotations

import argparse
import functools
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


def measure(
    device: torch.device,
    max_seconds: float,
    repeats: int = 20,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per shape: eager (and on CUDA launches and compiled) ratios to InfoNCE.

    The cheap measurements of every shape come first (eager times, and on CUDA the launch
    counts), then the ``reduce-overhead`` compiles, shape by shape, while ``max_seconds``
    lasts: a cold compile takes tens of seconds, and must not cost the cheap rows of the
    shapes after it. Each shape's measurement is its own unit: one that raises records its
    error in its row and the others go on. ``on_row`` is called with the rows after every unit
    (the command line writes them to its JSON file then, so a run stopped from outside keeps
    what it measured).
    """
    cuda = device.type == "cuda"
    started = time.perf_counter()
    shapes = SHAPES if cuda else SMOKE_SHAPES
    rows: list[dict[str, Any]] = [{"problem": problem.label} for problem in shapes]

    def time_left() -> bool:
        return time.perf_counter() - started < max_seconds

    def unit(row: dict[str, Any], key: str, action: Callable[[], dict[str, Any]]) -> None:
        if not time_left():
            row.setdefault("skipped", {})[key] = f"over {max_seconds:.0f} s"
        else:
            try:
                row.update(action())
            except Exception as error:  # one shape's failure is its row's, not the table's
                row.setdefault("errors", {})[key] = f"{type(error).__name__}: {error}"[:300]
        if on_row is not None:
            on_row(rows)

    pairs = [losses(problem, device) for problem in shapes]
    for row, pair in zip(rows, pairs, strict=True):
        unit(row, "eager", functools.partial(_eager, pair, cuda, repeats))
        if cuda:
            unit(row, "launches", functools.partial(_launches, pair))
    if cuda:
        for row, pair in zip(rows, pairs, strict=True):
            unit(row, "reduce_overhead", functools.partial(_compiled, pair, repeats))
    return rows


def _eager(pair: dict[str, Loss], cuda: bool, repeats: int) -> dict[str, Any]:
    steps = {name: as_step(loss) for name, loss in pair.items()}
    if cuda:
        eager = cuda_times(steps, repeats)
    else:
        eager = {name: cpu_median(step, repeats) for name, step in steps.items()}
    return {
        "eager_cct_ms": 1e3 * eager["cct"],
        "eager_infonce_ms": 1e3 * eager["infonce"],
        "eager": eager["cct"] / eager["infonce"],
    }


def _launches(pair: dict[str, Loss]) -> dict[str, Any]:
    counts = {name: launches(loss) for name, loss in pair.items()}
    return {
        "launches_cct": counts["cct"],
        "launches_infonce": counts["infonce"],
        "launches": counts["cct"] / counts["infonce"],
    }


def _compiled(pair: dict[str, Loss], repeats: int) -> dict[str, Any]:
    torch._dynamo.reset()
    compiled = {name: torch.compile(loss, mode="reduce-overhead") for name, loss in pair.items()}
    graphs = cuda_times({name: as_step(loss) for name, loss in compiled.items()}, repeats)
    return {
        "compiled_cct_ms": 1e3 * graphs["cct"],
        "compiled_infonce_ms": 1e3 * graphs["infonce"],
        "reduce_overhead": graphs["cct"] / graphs["infonce"],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, with the targets (a cell not measured says why)."""
    lines = [
        "| shape | eager cct / InfoNCE ms | ratio | reduce-overhead ms | ratio | launches | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def why(key: str, r: dict[str, Any] = r) -> str:
            for kind in ("errors", "skipped"):
                if key in r.get(kind, {}):
                    return f"{kind[:-1] if kind == 'errors' else 'skipped'}: {r[kind][key]}"
            return "n/a"

        def pair(a: str, b: str, key: str, fmt: str = ".2f", r: dict[str, Any] = r) -> str:
            return f"{r[a]:{fmt}} / {r[b]:{fmt}}" if a in r else why(key)

        def ratio(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key]:.2f}x" if key in r else ""

        lines.append(
            f"| {r['problem']} | {pair('eager_cct_ms', 'eager_infonce_ms', 'eager')} "
            f"| {ratio('eager')} "
            f"| {pair('compiled_cct_ms', 'compiled_infonce_ms', 'reduce_overhead')} "
            f"| {ratio('reduce_overhead')} "
            f"| {pair('launches_cct', 'launches_infonce', 'launches', 'd')} | {ratio('launches')} |"
        )
    targets = ", ".join(f"{k} at most {v}x" for k, v in TARGETS.items())
    return "\n".join(lines) + f"\n\nTargets (H200, bf16 autocast): {targets}.\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-seconds", type=float, default=45.0)
    parser.add_argument("--json", type=Path, help="the rows, rewritten after every unit")
    args = parser.parse_args(argv)
    path: Path | None = args.json

    def write(rows: list[dict[str, Any]]) -> None:
        if path is not None:
            path.write_text(json.dumps(rows, indent=1))

    rows = measure(torch.device(args.device), args.max_seconds, on_row=write)
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
