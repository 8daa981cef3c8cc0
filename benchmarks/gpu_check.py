"""``make gpu-check``: everything a CUDA machine should prove, in one command, in four minutes.

Runs with the interpreter it is given, from the checkout (``python3 benchmarks/gpu_check.py``
works without ``PYTHONPATH``): no virtual environment, no network, no pip (the GPU machine this
project borrows has torch, triton, pytest with pytest-xdist and pytest-timeout, hypothesis,
pytest-benchmark and timm). Steps, each with its own time budget, each written to the report
as soon as it ends:

1. the machine: GPU, torch, CUDA and triton versions;
2. the correctness suite on the device (``CCT_TEST_DEVICE``, the ``gpu-check`` hypothesis
   profile), in parallel processes where pytest-xdist is installed and with a per-test
   timeout where pytest-timeout is. Each failure's reason is appended to
   ``test_failures.md`` as it happens, so a run cut short still says why each test failed;
3. which fused attention kernels serve ``impl="sdpa"`` (benchmarks/fused_kernels.py);
4. the default call of every call shape under ``torch.cuda.set_sync_debug_mode("error")``
   (a host synchronisation fails it);
5. the fixed cost of a step against InfoNCE: eager, under ``reduce-overhead``, and kernel
   launches (benchmarks/overhead.py);
6. a trainer's optimizer step with each loss (benchmarks/trainer.py);
7. the first two rungs of the scale ladder, 65,536 and 262,144 rows per view at D = 128, with
   torch's flash attention on the same rows (benchmarks/ladder.py, in its own process);
8. the benchmark tables in bf16 and float32 (benchmarks/run.py): the rows that decide
   ``auto`` first, a slow method skipped on its row rather than the table cut.

Everything is printed and written to ``GPU_CHECK_OUT`` (default ``gpu_output/``) as
``gpu_check.md`` and ``gpu_check.json``. Without CUDA the same steps run on the CPU in a smoke
mode (a few test files, tiny shapes, no sync-debug mode) that ``make test`` runs. The exit
status is that of the test step, or of the sync check.

Usage: ``python benchmarks/gpu_check.py [--out DIR] [--smoke]``
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # the benchmarks and the library, from the checkout

import overhead  # noqa: E402
import trainer  # noqa: E402
from fused_kernels import markdown as fused_markdown  # noqa: E402
from fused_kernels import survey  # noqa: E402

from cct_loss import cct_loss, cct_loss_multiview  # noqa: E402

#: The correctness suite (the CPU-only files are left out rather than collected and skipped:
#: their imports, e.g. the examples' data sets, need packages the GPU machine lacks).
TEST_FILES = [
    "tests/test_reference_agreement.py",
    "tests/test_precision.py",
    "tests/test_fused_kernels.py",
    "tests/test_device.py",
    "tests/test_autograd.py",
    "tests/test_properties.py",
    "tests/test_layouts.py",
    "tests/test_multiview.py",
    "tests/test_streaming.py",
    "tests/test_numerics.py",
    "tests/test_queue.py",
    "tests/test_validation.py",
    "tests/test_compile.py",
    "tests/test_overhead.py",
    "tests/test_dispatch.py",
    "tests/test_baselines.py",
    "tests/test_triton.py",
]
#: The smoke run's subset: the device plumbing and the precision policy.
SMOKE_TEST_FILES = [
    "tests/test_device.py",
    "tests/test_fused_kernels.py",
    "tests/test_precision.py::test_products_follow_autocast_the_rest_is_float32",
]
#: Seconds for each step: four minutes in all on the GPU (a 15-minute device budget leaves
#: room for a rerun and for an issue's own script).
BUDGET = {
    "tests": 100,
    "sync": 15,
    "overhead": 35,
    "trainer": 25,
    "ladder": 20,
    "bench_bf16": 30,
    "bench_float32": 15,
}
SMOKE_BUDGET = {
    "tests": 60,
    "sync": 20,
    "overhead": 10,
    "trainer": 20,
    "ladder": 20,
    "bench_bf16": 20,
    "bench_float32": 20,
}
#: The ladder's rungs: on CUDA the first two of the issue's ladder at D = 128 with triton, and
#: torch's flash attention on the same rows as the yardstick; in the smoke mode the command the
#: CPU smoke test runs.
LADDER_ARGS = {
    "cuda": [
        *("--device", "cuda", "--impl", "triton", "flash-attention"),
        *("--dims", "128", "--rows", "65536", "262144"),
    ],
    "cpu": ["--device", "cpu", "--impl", "chunked", "--dims", "16", "--rows", "64", "128"],
}
#: A test that runs longer than this on the GPU is stopped and reported (pytest-timeout).
TEST_TIMEOUT = 60


def versions(device: torch.device) -> dict[str, str]:
    """The machine and the library versions the numbers belong to."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    try:
        info["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        info["triton"] = "not installed"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = f"{props.total_memory / 2**30:.0f}"
    else:
        info["cpu"] = platform.processor() or platform.machine()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    info["commit"] = commit.stdout.strip() or "unknown"
    return info


def _text(x: str | bytes | None) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def run_step(command: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run one step as a child process: its exit status, seconds and output (tail)."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status = -1
        parts = [_text(expired.stdout), _text(expired.stderr), f"(timed out after {timeout:.0f} s)"]
        output = "\n".join(parts)
    seconds = time.perf_counter() - start
    print(output[-4000:], flush=True)
    return {"command": " ".join(command), "status": status, "seconds": seconds, "output": output}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_command(files: list[str], cuda: bool) -> list[str]:
    """pytest, in parallel and with a per-test timeout where those plugins are installed."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    if cuda and installed("xdist"):
        command += ["-n", "auto"]
    if cuda and installed("pytest_timeout"):
        command += [f"--timeout={TEST_TIMEOUT}"]
    return command + files


def default_calls(device: torch.device, n: int) -> dict[str, Callable[[], Any]]:
    """The default call of every call shape, on ``n`` rows of 32 dims (inputs made here,
    before any sync check)."""
    g = torch.Generator().manual_seed(n)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    q, p, p3 = leaf(n, 32), leaf(n, 32), leaf(n, 3, 32)
    queue, per_query = leaf(4 * n, 32).detach(), leaf(n, 5, 32).detach()
    labels = (torch.arange(n) % 3).to(device)
    queue_labels = (torch.arange(4 * n) % 3).to(device)
    return {
        "SimCLR": lambda: cct_loss(q, p),
        "several positives": lambda: cct_loss(q, p3),
        "MoCo queue": lambda: cct_loss(q, p, queue),
        "per-query negatives": lambda: cct_loss(q, p, per_query),
        "cross (CLIP, MoCo v3)": lambda: cct_loss(q, p, layout="cross"),
        "cross with a queue": lambda: cct_loss(q, p, queue, layout="cross"),
        "labels (SupCon)": lambda: cct_loss(q, p, labels=labels),
        "cross with labels": lambda: cct_loss(q, p, layout="cross", labels=labels),
        "negative labels": lambda: cct_loss(
            q, p, queue, labels=labels, negative_labels=queue_labels
        ),
        "multiview": lambda: cct_loss_multiview([q, p, p * 2]),
        "paper layout": lambda: cct_loss_multiview([q, p, p * 2], layout="paper"),
    }


def sync_check(device: torch.device) -> list[dict[str, Any]]:
    """Each call shape's default call, forward and backward, under
    ``torch.cuda.set_sync_debug_mode("error")``: a first call (which checks its inputs and
    plans) and a replay. On the CPU the calls run without the mode (tests/test_overhead.py
    counts synchronising operators there)."""
    rows = []
    for name, call in default_calls(device, 48).items():
        warm = default_calls(device, 40)[name]  # CUDA's own first-use set-up, outside
        warm().backward()
        row: dict[str, Any] = {"shape": name}
        try:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            for _ in range(2):
                call().backward()
            row["ok"] = True
        except RuntimeError as error:
            row.update(ok=False, why=str(error).strip().splitlines()[0][:200])
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        rows.append(row)
    return rows


def guarded(name: str, action: Callable[[], Any]) -> Any:
    """Run one in-process step; an exception becomes the step's result (the report goes on)."""
    print(f"\n== {name} ==", flush=True)
    start = time.perf_counter()
    try:
        result = action()
    except Exception as error:  # a step that fails says why, and the others still run
        result = {"error": "".join(traceback.format_exception(error))[-3000:]}
    print(json.dumps(result, indent=1, default=str)[-3000:], flush=True)
    return {"seconds": time.perf_counter() - start, "result": result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT", "gpu_output"))
    )
    parser.add_argument("--smoke", action="store_true", help="the CPU smoke mode even on CUDA")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    budget = BUDGET if cuda else SMOKE_BUDGET
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    failures = out / "test_failures.md"
    failures.write_text("# Test failures, as they happened\n\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "CCT_TEST_DEVICE": device.type,
        "HYPOTHESIS_PROFILE": "gpu-check",
        "CCT_FAILURE_LOG": str(failures.resolve()),
    }
    report: dict[str, Any] = {"mode": "cuda" if cuda else "cpu smoke", "versions": versions(device)}
    print("gpu-check:", json.dumps(report), flush=True)

    def save() -> None:
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "gpu_check.md").write_text(to_markdown(report))

    print("\n== tests ==", flush=True)
    files = TEST_FILES if cuda else SMOKE_TEST_FILES
    report["tests"] = run_step(test_command(files, cuda), env, budget["tests"])
    summary = report["tests"]["output"].strip().splitlines()
    report["tests"]["summary"] = summary[-1] if summary else ""
    save()

    report["fused_kernels"] = guarded(
        "fused attention kernels (impl='sdpa')", lambda: survey(device)
    )
    save()
    report["sync"] = guarded("host synchronisation (default calls)", lambda: sync_check(device))
    save()
    report["overhead"] = guarded(
        "fixed cost against InfoNCE", lambda: overhead.measure(device, budget["overhead"])
    )
    save()
    report["trainer"] = guarded("a trainer's step", lambda: trainer.measure(device))
    save()

    print("\n== scale ladder ==", flush=True)
    ladder_out = out / "ladder"
    command = [sys.executable, str(HERE / "ladder.py"), *LADDER_ARGS[device.type]]
    command += ["--max-seconds", str(budget["ladder"]), "--out", str(ladder_out)]
    report["ladder"] = run_step(command, env, budget["ladder"] * 2 + 30)
    if (ladder_out / "ladder.json").exists():
        report["ladder"]["rows"] = json.loads((ladder_out / "ladder.json").read_text())["rows"]
    save()

    report["benchmarks"] = {}
    for dtype in ("bf16", "float32"):
        print(f"\n== benchmarks, {dtype} ==", flush=True)
        json_path = out / f"bench_{dtype}.json"
        seconds = budget[f"bench_{dtype}"]
        command = [sys.executable, str(HERE / "run.py"), "--device", device.type, "--dtype", dtype]
        command += ["--json", str(json_path), "--max-seconds", str(seconds), "--no-per-call"]
        command += ["--repeats", "5"] if cuda else ["--quick", "--no-memory"]
        step = run_step(command, env, seconds * 3 + 30)
        if json_path.exists():
            step["rows"] = json.loads(json_path.read_text())["rows"]
        report["benchmarks"][dtype] = step
        save()

    print(f"\nwritten: {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")
    tests_ok = int(report["tests"]["status"]) == 0
    sync_rows = report["sync"]["result"]
    sync_ok = isinstance(sync_rows, list) and all(r["ok"] for r in sync_rows)
    return 0 if tests_ok and sync_ok else 1


def to_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (pasted into BENCHMARKS.md under a CUDA heading)."""
    v = report["versions"]
    lines = [
        f"# gpu-check ({report['mode']})",
        "",
        ", ".join(f"{k} {value}" for k, value in v.items()),
    ]
    if "tests" in report:
        t = report["tests"]
        lines += [
            "",
            "## Tests",
            "",
            f"`{t['command']}`: exit {t['status']}, {t['seconds']:.0f} s: {t['summary']}",
            "",
            "Failure reasons, as they happened: `test_failures.md`.",
        ]
    sections: list[tuple[str, str, Callable[[Any], str]]] = [
        ("fused_kernels", "Fused attention kernels serving `impl='sdpa'`", fused_markdown),
        ("sync", "Host synchronisation: default calls under sync debug mode", _sync_markdown),
        ("overhead", "Fixed cost of a step against InfoNCE", overhead.markdown),
        ("trainer", "A trainer's optimizer step", _trainer_markdown),
    ]
    for key, title, render in sections:
        if key not in report:
            continue
        step = report[key]
        result = step["result"]
        body = (
            f"```\n{result['error']}\n```"
            if isinstance(result, dict) and "error" in result
            else render(result)
        )
        lines += ["", f"## {title} ({step['seconds']:.0f} s)", "", body]
    if "ladder" in report:
        step = report["ladder"]
        rungs = [line for line in step["output"].splitlines() if "rows per view" in line]
        lines += ["", f"## Scale ladder ({step['seconds']:.0f} s)", "", "```", *rungs, "```"]
    for dtype, step in report.get("benchmarks", {}).items():
        table = [line for line in step["output"].splitlines() if line.strip()]
        lines += ["", f"## Benchmarks, {dtype} ({step['seconds']:.0f} s)", "", "```", *table, "```"]
    return "\n".join(lines) + "\n"


def _sync_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| call shape | no synchronisation |", "|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {'yes' if r['ok'] else 'no: ' + r['why']} |")
    return "\n".join(lines)


def _trainer_markdown(result: dict[str, Any]) -> str:
    return (
        f"{result['model']}: cct_loss {result['cct_ms']:.2f} ms, InfoNCE "
        f"{result['infonce_ms']:.2f} ms a step: {result['ratio']:.3f}x "
        f"(target at most {result['target']}x)"
    )


if __name__ == "__main__":
    sys.exit(main())
