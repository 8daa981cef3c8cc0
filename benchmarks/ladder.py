"""The scale ladder: one in-batch SimCLR step (``cct_loss(z1, z2)``, forward + backward) at
growing batch sizes, for each implementation and embedding dimension it is given.

Each rung is ``rows`` rows per view, so ``Q = K = 2 rows`` (every row a query against every
other row's two views). The ladder climbs in the order given and stops before a rung that would
overrun its budget, estimating the rung's time from the previous one (in-batch work grows with
``rows**2``); what it did not run is a row with a ``skipped`` reason. On CUDA the inputs are
bfloat16 and the time is wall clock around a synchronised step, after a warm-up on a small
batch (which compiles the Triton kernels); the peak is ``torch.cuda.max_memory_allocated`` over
what the inputs hold, input gradients included. On the CPU (a smoke run) the inputs are
float32 and the peak is the rise of the resident set. ``tflops`` counts CCT's four products of
a step, ``8 Q K D`` FLOPs.

``--impl flash-attention`` times torch's fused attention on the same rows instead, as the
yardstick the issue sets: ``F.scaled_dot_product_attention`` restricted to the FlashAttention
backend, one head, queries = keys = values = the ``2 rows`` embeddings, forward + backward (its
``tflops`` uses the same four-product count, so the column compares times). ``ladder.md`` then
gives each implementation's time as a fraction of flash attention's on the same rung (target
for triton at D = 128: at most 4/7, equal efficiency per product, as attention does 7).

Usage::

    python3 benchmarks/ladder.py [--device cuda] [--impl triton] [--dims 128 512]
        [--rows 65536 262144 1048576] [--max-seconds 600] [--out ladder_output]

It writes ``ladder.json`` (the machine, and one row per rung: ``impl``, ``d``,
``rows_per_view``, ``seconds``, ``peak_bytes``, ``tflops`` or ``skipped``) and ``ladder.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the benchmarks and the library, from the checkout

from run import cpu_peak_mib  # noqa: E402

from cct_loss import cct_loss  # noqa: E402

DEFAULT_ROWS = (65536, 262144, 1048576)
#: Rows per view of the warm-up step (compiles the kernels; not timed).
WARM_UP_ROWS = 256
Row = dict[str, Any]


def flops(rows: int, d: int) -> float:
    """CCT's four products of an in-batch step: ``8 Q K D`` with ``Q = K = 2 rows``."""
    queries = 2 * rows
    return 8.0 * queries * queries * d


def inputs(rows: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of ``rows`` rows, leaves that require grad (bfloat16 on CUDA)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(rows + d)
    return tuple(  # type: ignore[return-value]
        torch.randn(rows, d, generator=g, device=device, dtype=dtype).requires_grad_()
        for _ in range(2)
    )


#: The yardstick: torch's FlashAttention forward + backward on the same rows.
FLASH = "flash-attention"


def step(z1: torch.Tensor, z2: torch.Tensor, impl: str) -> None:
    """One forward + backward of the in-batch call (or, for :data:`FLASH`, of attention)."""
    if impl != FLASH:
        cct_loss(z1, z2, impl=impl, temperature=0.2).backward()
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = torch.cat([z1, z2])[None, None]  # (1, 1, 2 rows, D): one head
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        torch.nn.functional.scaled_dot_product_attention(x, x, x).sum().backward()


def rung(impl: str, d: int, rows: int, device: torch.device) -> Row:
    """One timed step at ``rows`` rows per view: seconds, peak bytes over the inputs, TFLOP/s."""
    z1, z2 = inputs(rows, d, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step(z1, z2, impl)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak: float | None = float(torch.cuda.max_memory_allocated() - before)
    else:
        start = time.perf_counter()
        mib = cpu_peak_mib(lambda: step(z1, z2, impl))
        seconds = time.perf_counter() - start
        peak = None if mib is None else mib * 2**20
    return {
        "impl": impl,
        "d": d,
        "rows_per_view": rows,
        "seconds": seconds,
        "peak_bytes": peak,
        "tflops": flops(rows, d) / seconds / 1e12,
    }


def estimate(previous: Row | None, rows: int) -> float:
    """A rung's seconds from the previous rung's (work grows with ``rows**2``); 0 unknown."""
    if previous is None or "seconds" not in previous:
        return 0.0
    return float(previous["seconds"]) * float(rows / previous["rows_per_view"]) ** 2


def climb(
    impls: list[str],
    dims: list[int],
    rows: list[int],
    device: torch.device,
    max_seconds: float,
    report: Any = print,
) -> list[Row]:
    """Every (impl, d) ladder, rung by rung, within ``max_seconds`` for the whole climb."""
    began = time.perf_counter()
    results: list[Row] = []
    for impl in impls:
        for d in dims:
            previous: Row | None = None
            try:
                step(*inputs(WARM_UP_ROWS, d, device), impl)  # compiles; not timed
            except (RuntimeError, ValueError, TypeError) as error:
                for r in rows:
                    results.append(_skipped(impl, d, r, f"refused: {_first_line(error)}"))
                    report(_line(results[-1]))
                continue
            for r in rows:
                left = max_seconds - (time.perf_counter() - began)
                expected = estimate(previous, r)
                if left <= 0:
                    results.append(_skipped(impl, d, r, "the budget is spent"))
                elif expected > left:
                    why = f"estimated {expected:.0f} s from the previous rung; {left:.0f} s left"
                    results.append(_skipped(impl, d, r, why))
                else:
                    try:
                        results.append(rung(impl, d, r, device))
                        previous = results[-1]
                    except torch.OutOfMemoryError as error:
                        results.append(_skipped(impl, d, r, f"out of memory: {_first_line(error)}"))
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                report(_line(results[-1]))
    return results


def _skipped(impl: str, d: int, rows: int, why: str) -> Row:
    return {"impl": impl, "d": d, "rows_per_view": rows, "skipped": why}


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__


def _line(row: Row) -> str:
    where = f"{row['impl']:8} D={row['d']:<5} rows per view {row['rows_per_view']:>9,}"
    if "skipped" in row:
        return f"{where}  skipped: {row['skipped']}"
    peak = "" if row["peak_bytes"] is None else f"  peak {row['peak_bytes'] / 2**30:.2f} GiB"
    return f"{where}  {row['seconds']:.3f} s  {row['tflops']:.3g} TFLOP/s{peak}"


def markdown(rows: list[Row], environment: dict[str, str]) -> str:
    """The ladder as a Markdown table, under the machine it ran on."""
    lines = [
        "# Scale ladder: in-batch SimCLR, one forward + backward",
        "",
        ", ".join(f"{k} {v}" for k, v in environment.items()),
        "",
        "| impl | D | rows per view | seconds | peak over inputs | TFLOP/s (4 products) "
        "| time / flash attention's |",
        "|---|---|---|---|---|---|---|",
    ]
    flash = {
        (r["d"], r["rows_per_view"]): r["seconds"]
        for r in rows
        if r["impl"] == FLASH and "seconds" in r
    }
    for r in rows:
        head = f"| {r['impl']} | {r['d']} | {r['rows_per_view']:,} |"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']} | | | |")
            continue
        peak = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f} GiB"
        yardstick = flash.get((r["d"], r["rows_per_view"]))
        ratio = "" if yardstick is None else f"{r['seconds'] / yardstick:.2f}"
        lines.append(f"{head} {r['seconds']:.3f} | {peak} | {r['tflops']:.3g} | {ratio} |")
    return "\n".join(lines) + "\n"


def environment(device: torch.device) -> dict[str, str]:
    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = "not installed"
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda or cpu")
    parser.add_argument(
        "--impl", nargs="+", default=None, help="implementations (default: triton on CUDA)"
    )
    parser.add_argument("--dims", nargs="+", type=int, default=[128])
    parser.add_argument("--rows", nargs="+", type=int, default=list(DEFAULT_ROWS))
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("ladder_output"))
    args = parser.parse_args(argv)
    if args.impl is None:
        args.impl = ["triton"] if args.device == "cuda" else ["chunked"]
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    info = environment(device)
    print("scale ladder  " + "  ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    rows = climb(args.impl, args.dims, args.rows, device, args.max_seconds)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "ladder.json").write_text(json.dumps({"environment": info, "rows": rows}, indent=1))
    (out / "ladder.md").write_text(markdown(rows, info))
    print(f"written: {out / 'ladder.md'} and {out / 'ladder.json'}")
    return rows


if __name__ == "__main__":
    main()
