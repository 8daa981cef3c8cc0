"""``make gpu-check``: everything a CUDA machine should prove, in one command, in minutes.

Runs with the interpreter it is given and the checkout on ``PYTHONPATH``: no virtual
environment, no network, no pip (the GPU machine this project borrows has torch, triton,
pytest, hypothesis and pytest-benchmark and nothing else of ours). Steps:

1. the machine: GPU, torch, CUDA and triton versions;
2. the correctness suite on the device (``CCT_TEST_DEVICE``, the ``gpu-check`` hypothesis
   profile; processes, examples, the README and inductor compiles are CPU-only), including
   ``impl="triton"``'s kernels, natively;
3. which fused attention kernels serve ``impl="sdpa"`` (benchmarks/fused_kernels.py);
4. the benchmark table in float32 and in bf16 (benchmarks/run.py).

Everything is printed and written to ``GPU_CHECK_OUT`` (default ``gpu_output/``) as
``gpu_check.md`` and ``gpu_check.json``. Without CUDA the same steps run on the CPU in a smoke
mode (a few test files, tiny benchmark shapes) that ``make test`` runs, within 2 minutes.
The exit status is that of the test step.

Usage: ``python benchmarks/gpu_check.py [--out DIR] [--smoke]``
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from fused_kernels import markdown as fused_markdown  # noqa: E402
from fused_kernels import survey  # noqa: E402

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
    "tests/test_triton.py",
]
#: The smoke run's subset: the device plumbing and the precision policy.
SMOKE_TEST_FILES = [
    "tests/test_device.py",
    "tests/test_fused_kernels.py",
    "tests/test_precision.py::test_products_follow_autocast_the_rest_is_float32",
]
#: Seconds for each step (the GPU run must end within 6 minutes, start-up included).
#: A benchmark step stops starting problems after ``bench`` seconds and is cut at twice that.
BUDGET = {"tests": 165, "bench": 45}
SMOKE_BUDGET = {"tests": 60, "bench": 20}


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
    args.out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "CCT_TEST_DEVICE": device.type,
        "HYPOTHESIS_PROFILE": "gpu-check",
    }
    report: dict[str, Any] = {"mode": "cuda" if cuda else "cpu smoke", "versions": versions(device)}
    print("gpu-check:", json.dumps(report), flush=True)

    print("\n== tests ==", flush=True)
    files = TEST_FILES if cuda else SMOKE_TEST_FILES
    pytest_command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    report["tests"] = run_step(pytest_command, env, budget["tests"])
    summary = report["tests"]["output"].strip().splitlines()
    report["tests"]["summary"] = summary[-1] if summary else ""

    print("\n== fused attention kernels (impl='sdpa') ==", flush=True)
    rows = survey(device)
    report["fused_kernels"] = rows
    fused_table = fused_markdown(rows)
    print(fused_table, flush=True)

    report["benchmarks"] = {}
    for dtype in ("float32", "bf16"):
        print(f"\n== benchmarks, {dtype} ==", flush=True)
        json_path = args.out / f"bench_{dtype}.json"
        command = [sys.executable, str(HERE / "run.py"), "--device", device.type, "--dtype", dtype]
        command += ["--json", str(json_path), "--max-seconds", str(budget["bench"])]
        command += ["--repeats", "5"] if cuda else ["--quick", "--no-memory"]
        step = run_step(command, env, budget["bench"] * 2)
        if json_path.exists():
            step["rows"] = json.loads(json_path.read_text())["rows"]
        report["benchmarks"][dtype] = step

    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu_check.md").write_text(to_markdown(report, fused_table))
    print(f"\nwritten: {args.out / 'gpu_check.md'} and {args.out / 'gpu_check.json'}")
    status = int(report["tests"]["status"])
    return 0 if status == 0 else 1


def to_markdown(report: dict[str, Any], fused_table: str) -> str:
    """The report as Markdown (pasted into BENCHMARKS.md under the card's name)."""
    v = report["versions"]
    lines = [
        f"# gpu-check ({report['mode']})",
        "",
        ", ".join(f"{k} {value}" for k, value in v.items()),
        "",
        "## Tests",
        "",
        f"`{report['tests']['command']}`: exit {report['tests']['status']}, "
        f"{report['tests']['seconds']:.0f} s: {report['tests']['summary']}",
        "",
        "## Fused attention kernels serving `impl='sdpa'` (largest difference from dense)",
        "",
        fused_table,
    ]
    for dtype, step in report["benchmarks"].items():
        table = [line for line in step["output"].splitlines() if line.strip()]
        lines += ["", f"## Benchmarks, {dtype} ({step['seconds']:.0f} s)", "", "```", *table, "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
