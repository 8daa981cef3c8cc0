"""Print the benchmark table of ``make bench``: every method side by side, in one run.

Times are medians of forward + backward steps, the methods interleaved round-robin so that
machine noise hits all of them alike; what matters are the ratios. Peak memory is the rise of
the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over the memory
held before the step, inputs included, so it counts every temporary the step allocates.

Usage: ``python benchmarks/run.py [--quick] [--threads 2] [--repeats 5] [--no-dense-memory]``
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from problems import MEMORY, MOCO, PAPER, SIMCLR, Problem, Step, methods

MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"{field}:\s+(\d+) kB", text)
    return int(match.group(1)) if match else 0


def _trim() -> None:
    """Hand freed heap memory back to the OS so the next peak starts from a clean floor."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_mib(step: Step) -> float | None:
    """Peak resident memory added by one call of ``step``, in MiB (None where unsupported)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    _trim()
    before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    step()
    return (_status_kib("VmHWM") - before) / 1024


def time_methods(steps: dict[str, Step], repeats: int) -> dict[str, float]:
    """Median seconds per step, methods interleaved."""
    for step in steps.values():
        step()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def run_problem(problem: Problem, repeats: int) -> list[dict[str, object]]:
    steps = methods(problem)
    times = time_methods(steps, repeats)
    rows = []
    for name, step in steps.items():
        rows.append(
            {
                "problem": problem.label,
                "method": name,
                "ms": 1e3 * times[name],
                "vs_dense": times[name] / times["dense"],
                "vs_infonce": times[name] / times["infonce"] if "infonce" in times else None,
                "vs_official": times[name] / times["official"] if "official" in times else None,
                "peak_mib": peak_mib(step),
            }
        )
    return rows


def print_table(rows: list[dict[str, object]]) -> None:
    header = f"{'problem':<30} {'method':<9} {'ms':>9} {'/dense':>7} {'/infonce':>9} {'/official':>10} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    last = None
    for r in rows:
        problem = str(r["problem"])
        peak = r["peak_mib"]
        print(
            f"{problem if problem != last else '':<30} {r['method']!s:<9} {r['ms']:>9.1f} "
            f"{fmt_ratio(r['vs_dense']):>7} {fmt_ratio(r['vs_infonce']):>9} "  # type: ignore[arg-type]
            f"{fmt_ratio(r['vs_official']):>10} "  # type: ignore[arg-type]
            f"{'' if peak is None else f'{peak:.0f}':>9}"
        )
        last = problem


def memory_check(include_dense: bool) -> None:
    """The issue's memory figure: N=4096, K=65536, D=128 float32 on the CPU."""
    p = MEMORY
    steps = methods(p)
    print(
        f"\nPeak memory of one forward+backward, {p.label}, float32 (inputs: "
        f"{(p.n * 2 + p.k) * p.d * 4 / MIB:.0f} MiB)"
    )
    names = ["chunked", "sdpa", "infonce"] + (["dense"] if include_dense else [])
    for name in names:
        start = time.perf_counter()
        peak = peak_mib(steps[name])
        took = time.perf_counter() - start
        print(
            f"  {name:<8} peak over inputs {'n/a' if peak is None else f'{peak:8.0f} MiB'}   ({took:.1f} s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smallest shapes only (smoke test)")
    parser.add_argument(
        "--no-dense-memory",
        action="store_true",
        help="skip dense at the memory shape (needs several GiB)",
    )
    args = parser.parse_args()

    # Fixed mmap threshold: freed large blocks go back to the OS, so peak RSS measures each step.
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])

    torch.set_num_threads(args.threads)
    print(
        f"cct-loss benchmarks  {datetime.date.today()}  torch {torch.__version__}  "
        f"{platform.processor() or platform.machine()}  threads={torch.get_num_threads()}  "
        f"python {platform.python_version()}"
    )
    problems = [SIMCLR[0], MOCO[0], PAPER[0]] if args.quick else [*SIMCLR, *MOCO, *PAPER]
    if args.quick:
        problems = [
            Problem(p.kind, 64, d=32, m=p.m, k=min(p.k, 512), views=p.views) for p in problems
        ]
    rows: list[dict[str, object]] = []
    for problem in problems:
        rows.extend(run_problem(problem, 1 if args.quick else args.repeats))
    print_table(rows)
    if not args.quick:
        memory_check(include_dense=not args.no_dense_memory)


if __name__ == "__main__":
    main()
