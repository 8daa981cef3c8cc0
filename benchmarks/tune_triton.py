"""Choose ``impl="triton"``'s tiles on a CUDA machine and write them to
``cct_loss/implementations/triton_tiles.py``.

For each ``D`` bucket and dtype it times forward + backward of the in-batch call
(``cct_loss(z1, z2, impl="triton")``, ``--rows`` rows per view) over a small set of candidate
tiles, median of ``--repeats`` steps with CUDA events after a warm-up that compiles the kernels
(so no compilation is ever timed), and keeps the fastest. A candidate the GPU cannot run (too
much shared memory, a compile error) is recorded as skipped. The search stops at
``--max-seconds``, keeping the best found so far; what it did not try is listed.

The candidates: up to ``D = 256`` one feature tile (the bucket's width) with blocks of 64 or
128 queries and keys, 4 or 8 warps, 2 or 3 stages; above it, tiled products with 64- or
128-wide feature tiles and 128 or 256 output columns per backward program.

Usage (on the GPU machine, from the checkout)::

    python3 benchmarks/tune_triton.py [--dims 128 256 512 1024] [--dtypes bf16]
        [--rows 16384] [--repeats 5] [--max-seconds 400] [--out tune_output] [--write]
    python3 benchmarks/tune_triton.py --dry-run      # the candidates, on any machine

``--write`` rewrites ``cct_loss/implementations/triton_tiles.py`` with the winners (buckets not measured keep
their entries) and the run's date, commit and versions; commit that file with the JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from cct_loss import cct_loss  # noqa: E402
from cct_loss.implementations import triton_op, triton_tiles  # noqa: E402
from cct_loss.implementations.triton_op import Tiles  # noqa: E402

TILES_MODULE = ROOT / "cct_loss" / "implementations" / "triton_tiles.py"
DTYPES = {"bf16": torch.bfloat16, "float32": torch.float32}
#: The table's dtype kinds: half precision, or float32 with TF32.
KIND = {"bf16": "half", "float32": "float32"}
SINGLE_TILE_MAX = 256


def bucket_of(d: int) -> int:
    """The table's bucket for ``d``: the smallest of its bounds that holds it."""
    return next(b for b in sorted({b for b, _ in triton_tiles.TILES}) if d <= b)


def candidates(d: int) -> list[Tiles]:
    """The tiles tried for dimension ``d`` (see the module docs)."""
    bucket = bucket_of(d)
    if bucket <= SINGLE_TILE_MAX:
        rows = [(64, 64), (128, 64), (64, 128), (128, 128)]
        return [
            Tiles(q, k, bucket, bucket, warps, stages)
            for (q, k), warps, stages in itertools.product(rows, (4, 8), (2, 3))
        ]
    rows = [(64, 64), (128, 64), (64, 32)]
    return [
        Tiles(q, k, features, outputs, 8, stages)
        for (q, k), features, outputs, stages in itertools.product(
            rows, (64, 128), (128, 256), (2, 3)
        )
    ]


def time_candidate(tiles: Tiles, d: int, dtype: torch.dtype, rows: int, repeats: int) -> float:
    """Median seconds of a forward + backward step with ``tiles`` forced."""
    original = triton_op.tiles_for
    triton_op.tiles_for = lambda dim, dt: tiles  # type: ignore[assignment]
    try:
        g = torch.Generator(device="cuda").manual_seed(d)
        z1, z2 = (
            torch.randn(rows, d, generator=g, device="cuda", dtype=dtype).requires_grad_()
            for _ in range(2)
        )

        def step() -> None:
            z1.grad = z2.grad = None
            cct_loss(z1, z2, impl="triton", temperature=0.2).backward()

        step()  # compiles the kernels for these tiles: never timed
        torch.cuda.synchronize()
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        return float(statistics.median(samples))
    finally:
        triton_op.tiles_for = original


def tflops(rows: int, d: int, seconds: float) -> float:
    """CCT's four products of an in-batch step, ``8 Q K D`` with ``Q = K = 2 rows``."""
    return 8.0 * (2 * rows) ** 2 * d / seconds / 1e12


def render_tiles_module(
    tiles: Mapping[tuple[int, str], tuple[int, ...]], measured: dict[str, str] | None
) -> str:
    """The text of ``cct_loss/implementations/triton_tiles.py`` holding ``tiles`` and ``measured``: the current
    module's docstring, then the two values."""
    source = TILES_MODULE.read_text()
    docstring = source[: source.index('"""', 3) + 3]
    entries = "\n".join(
        f"    ({bound}, {kind!r}): {tuple(value)!r},"
        for (bound, kind), value in sorted(tiles.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    )
    return (
        f"{docstring}\n\nfrom __future__ import annotations\n\n"
        "#: The run that measured this table (benchmarks/tune_triton.py --write).\n"
        f"MEASURED: dict[str, str] | None = {measured!r}\n\n"
        "TILES: dict[tuple[int, str], tuple[int, int, int, int, int, int]] = {\n"
        f"{entries}\n}}\n"
    )


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", nargs="+", type=int, default=[128, 256, 512, 1024])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16"])
    parser.add_argument("--rows", type=int, default=16384, help="rows per view")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=400.0)
    parser.add_argument("--out", type=Path, default=Path("tune_output"))
    parser.add_argument(
        "--write", action="store_true", help="rewrite cct_loss/implementations/triton_tiles.py"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the candidates and stop")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.dry_run:
        plan = {f"D={d}": [tuple(t) for t in candidates(d)] for d in args.dims}
        print(json.dumps(plan, indent=1))
        return {"candidates": plan}
    if not torch.cuda.is_available():
        raise SystemExit("tune_triton.py times the kernels on a CUDA device; none is available")
    torch.backends.cuda.matmul.allow_tf32 = True  # the float32 rows are TF32's (see TILES)
    began = time.perf_counter()
    results: list[dict[str, Any]] = []
    best: dict[tuple[int, str], tuple[float, Tiles]] = {}
    for name, d in itertools.product(args.dtypes, args.dims):
        for tiles in candidates(d):
            row: dict[str, Any] = {"dtype": name, "d": d, "tiles": list(tiles)}
            if time.perf_counter() - began > args.max_seconds:
                row["skipped"] = "not tried: the budget is spent"
            else:
                try:
                    seconds = time_candidate(tiles, d, DTYPES[name], args.rows, args.repeats)
                except Exception as error:  # a candidate the GPU cannot run: recorded
                    row["skipped"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                else:
                    row.update(seconds=seconds, tflops=tflops(args.rows, d, seconds))
                    key = (bucket_of(d), KIND[name])
                    if key not in best or seconds < best[key][0]:
                        best[key] = (seconds, tiles)
            results.append(row)
            print(json.dumps(row), flush=True)
    measured = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "rows_per_view": str(args.rows),
    }
    table = {**triton_tiles.TILES, **{k: tuple(t) for k, (_, t) in best.items()}}
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "measured": measured,
        "results": results,
        "best": {str(k): v for k, v in table.items()},
    }
    (out / "tune.json").write_text(json.dumps(report, indent=1))
    if args.write:
        TILES_MODULE.write_text(render_tiles_module(table, measured))
        print(f"written: {TILES_MODULE}")
    print(f"written: {out / 'tune.json'}")
    return report


if __name__ == "__main__":
    main()
