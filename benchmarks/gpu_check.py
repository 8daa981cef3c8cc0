"""``make gpu-check``: everything a CUDA machine should prove, in one command, in 200 seconds.

Runs with the interpreter it is given, from the checkout (``python3 benchmarks/gpu_check.py``
works without ``PYTHONPATH``): no virtual environment, no network, no pip, no git needed (the
GPU machine this project borrows has torch, triton, pytest with pytest-xdist and pytest-timeout,
hypothesis, pytest-benchmark and timm). Give the command a timeout of at least 300 s: the steps
end within :data:`DEADLINE` seconds of the interpreter's start, and the rest is margin.

Steps, in this order, each written to the report as soon as it ends:

1. the machine: GPU, torch, CUDA and triton versions (``"unknown"`` for what cannot be read);
2. the correctness suite on the device (``CCT_TEST_DEVICE``, the ``gpu-check`` hypothesis
   profile), the Triton and fused-kernel files first, in parallel processes where pytest-xdist
   is installed (the fused-kernel survey on one worker, computed once) and with per-test and
   session timeouts where pytest-timeout is. Each failure's reason is appended to
   ``test_failures.md`` as it happens, so a run cut short still says why each test failed;
3. which fused attention kernels serve ``impl="sdpa"`` (benchmarks/fused_kernels.py);
4. the default call of every call shape under ``torch.cuda.set_sync_debug_mode("error")``
   (a host synchronisation fails it);
5. the fixed cost of a step against InfoNCE: eager and kernel launches for every shape, then
   ``reduce-overhead`` compiles while time remains (benchmarks/overhead.py, in its own process
   on CUDA, because a cold compile cannot be stopped from inside);
6. a trainer's optimizer step with each loss (benchmarks/trainer.py);
7. the first two rungs of the scale ladder, 65,536 and 262,144 rows per view at D = 128, with
   torch's flash attention on the same rows (benchmarks/ladder.py, in its own process);
8. the benchmark tables in bf16 and float32 (benchmarks/run.py): the rows that decide
   ``auto`` first, a slow method skipped on its row rather than the table cut.

**One deadline.** The run ends :data:`DEADLINE` seconds after this interpreter started (torch's
import and :data:`SETUP` included). Each step gets ``min(its budget, time to the deadline)``
and keeps to it while it runs: a child process is told to stop starting work
:data:`CHILD_START` + :data:`WRAP_UP` seconds before its share ends and is stopped at the end
of it; a step run here checks its share between its units (shapes, rows, rounds), each of
which takes a second or less. A step with no time left is recorded as skipped.

Everything is printed and written to ``GPU_CHECK_OUT`` (default ``gpu_output/``) as
``gpu_check.md`` and ``gpu_check.json`` (rewritten after every step, and at the start, so a run
stopped from outside keeps its report). Without CUDA the same steps run on the CPU in a smoke
mode (a few test files, tiny shapes, no sync-debug mode) that ``make test`` runs. The exit
status is that of the test step, or of the sync check.

Usage: ``python benchmarks/gpu_check.py [--out DIR] [--smoke]``
"""

from __future__ import annotations

import time

#: When this interpreter started running the script: the deadline counts from here, before
#: torch's import (seconds on a fresh GPU machine).
STARTED = time.monotonic()

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # the benchmarks and the library, from the checkout

import overhead  # noqa: E402
import trainer  # noqa: E402
from fused_kernels import markdown as fused_markdown  # noqa: E402
from fused_kernels import survey  # noqa: E402

from cct_loss import cct_loss, cct_loss_multiview  # noqa: E402

#: The correctness suite, the most CUDA-specific files first (a cut keeps them): the Triton
#: kernels and the fused attention kernels. The CPU-only files are left out rather than
#: collected and skipped: their imports (e.g. the examples' data sets) need packages the GPU
#: machine lacks.
TEST_FILES = [
    "tests/test_triton.py",
    "tests/test_fused_kernels.py",
    "tests/test_reference_agreement.py",
    "tests/test_precision.py",
    "tests/test_device.py",
    "tests/test_autograd.py",
    "tests/test_properties.py",
    "tests/test_layouts.py",
    "tests/test_multiview.py",
    "tests/test_objectives.py",
    "tests/test_streaming.py",
    "tests/test_numerics.py",
    "tests/test_queue.py",
    "tests/test_validation.py",
    "tests/test_compile.py",
    "tests/test_overhead.py",
    "tests/test_dispatch.py",
    "tests/test_baselines.py",
    "tests/test_shortcuts.py",
]
#: The smoke run's subset: the device plumbing and the precision policy.
SMOKE_TEST_FILES = [
    "tests/test_device.py",
    "tests/test_fused_kernels.py",
    "tests/test_precision.py::test_products_follow_autocast_the_rest_is_float32",
]

#: Seconds from the interpreter's start to the end of the last step, per mode: on the GPU the
#: target of issue 27 (the command itself gets at least 300 s).
DEADLINE = {"cuda": 200.0, "smoke": 120.0}
#: Seconds before the first step: the imports above (torch, the benchmarks, the library) and
#: the CUDA context the versions read.
SETUP = {"cuda": 10.0, "smoke": 5.0}
#: Seconds a child process takes before its first unit of work: an interpreter, torch, the
#: library and, on CUDA, a context of its own.
CHILD_START = {"cuda": 6.0, "smoke": 2.0}
#: Seconds a child may run past the point where it stops starting work: its last unit, and
#: writing its files.
WRAP_UP = {"cuda": 3.0, "smoke": 2.0}
#: Each step's budget in seconds, per mode (a child's budget includes its start-up). On the
#: GPU they add up, with SETUP, to the deadline (tests/test_gpu_check.py checks it).
BUDGET: dict[str, dict[str, float]] = {
    "cuda": {
        "tests": 88,
        "fused_kernels": 6,
        "sync": 6,
        "overhead": 24,
        "trainer": 10,
        "ladder": 20,
        "bench_bf16": 22,
        "bench_float32": 14,
    },
    "smoke": {
        "tests": 40,
        "fused_kernels": 5,
        "sync": 5,
        "overhead": 10,
        "trainer": 10,
        "ladder": 15,
        "bench_bf16": 15,
        "bench_float32": 15,
    },
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

#: What stands in for a version that cannot be read (no git, no GPU name, ...).
UNKNOWN = "unknown"


def _read(read: Callable[[], object]) -> str:
    """``str(read())``, or :data:`UNKNOWN` when reading fails in any way."""
    try:
        value = read()
    except Exception:  # a version that cannot be read must not stop the run
        return UNKNOWN
    return UNKNOWN if value is None else str(value).strip() or UNKNOWN


def _git_commit() -> str:
    git = shutil.which("git")
    if git is None:
        return UNKNOWN
    done = subprocess.run(
        [git, "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
    )
    return done.stdout


def versions(device: torch.device) -> dict[str, str]:
    """The machine and the library versions the numbers belong to; never raises: what cannot
    be read (no git, no NVIDIA driver tools, an odd image) is :data:`UNKNOWN`."""
    info = {
        "python": _read(platform.python_version),
        "torch": _read(lambda: torch.__version__),
        "device": str(device),
        "triton": _read(lambda: importlib.metadata.version("triton")),
    }
    if device.type == "cuda":
        info["gpu"] = _read(lambda: torch.cuda.get_device_name(device))
        info["cuda"] = _read(lambda: torch.version.cuda)

        def memory_gib() -> str:
            return f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f}"

        info["gpu_memory_gib"] = _read(memory_gib)
    else:
        info["cpu"] = _read(lambda: platform.processor() or platform.machine())
    info["commit"] = _read(_git_commit)
    return info


def _text(x: str | bytes | None) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def run_step(command: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run one step as a child process, stopped after ``timeout`` seconds: its exit status
    (``-1`` when stopped), seconds and output."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status = -1
        parts = [_text(expired.stdout), _text(expired.stderr), f"(stopped after {timeout:.0f} s)"]
        output = "\n".join(parts)
    seconds = time.perf_counter() - start
    print(output[-4000:], flush=True)
    return {"command": " ".join(command), "status": status, "seconds": seconds, "output": output}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_command(files: list[str], cuda: bool, seconds: float) -> list[str]:
    """pytest, in parallel and with per-test and session timeouts where those plugins are
    installed. ``--dist loadgroup`` keeps the fused-kernel tests on one worker (their survey is
    computed once) and hands out the rest in file order; the session timeout ends pytest
    itself ``seconds`` after it starts, with its summary."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    if cuda and installed("xdist"):
        command += ["-n", "auto", "--dist", "loadgroup"]
    if cuda and installed("pytest_timeout"):
        command += [f"--timeout={TEST_TIMEOUT}", f"--session-timeout={max(1, int(seconds))}"]
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


def sync_check(device: torch.device, max_seconds: float | None = None) -> list[dict[str, Any]]:
    """Each call shape's default call, forward and backward, under
    ``torch.cuda.set_sync_debug_mode("error")``: a first call (which checks its inputs and
    plans) and a replay. On the CPU the calls run without the mode (tests/test_overhead.py
    counts synchronising operators there). A shape that would start after ``max_seconds`` is
    a row that says so (``ok`` is ``None``)."""
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name, call in default_calls(device, 48).items():
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            rows.append({"shape": name, "ok": None, "why": f"not run: over {max_seconds:.0f} s"})
            continue
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


def guarded(name: str, action: Callable[[], Any]) -> dict[str, Any]:
    """Run one in-process step; an exception becomes the step's result (the report goes on)."""
    print(f"\n== {name} ==", flush=True)
    start = time.perf_counter()
    try:
        result = action()
    except Exception as error:  # a step that fails says why, and the others still run
        result = {"error": "".join(traceback.format_exception(error))[-3000:]}
    print(json.dumps(result, indent=1, default=str)[-3000:], flush=True)
    return {"seconds": time.perf_counter() - start, "result": result}


class Step(NamedTuple):
    """One step of the run: its name (its key in :data:`BUDGET` and in the report) and what it
    does given its share of time in seconds (it keeps to that share)."""

    name: str
    run: Callable[[float], dict[str, Any]]


class Context(NamedTuple):
    """What the steps share: the device, the mode, the output folder and the children's
    environment."""

    device: torch.device
    mode: str  # "cuda" or "smoke"
    out: Path
    env: dict[str, str]

    @property
    def cuda(self) -> bool:
        return self.mode == "cuda"


def child_seconds(ctx: Context, seconds: float) -> float:
    """How long a child given ``seconds`` may start work: its share less its start-up and its
    wrap-up (at least one second)."""
    return max(1.0, seconds - CHILD_START[ctx.mode] - WRAP_UP[ctx.mode])


def plan(ctx: Context) -> list[Step]:
    """The steps, in order (see the module docs)."""
    device = ctx.device

    def tests(seconds: float) -> dict[str, Any]:
        print("\n== tests ==", flush=True)
        files = TEST_FILES if ctx.cuda else SMOKE_TEST_FILES
        inner = seconds - WRAP_UP[ctx.mode]
        step = run_step(test_command(files, ctx.cuda, inner), ctx.env, seconds)
        lines = step["output"].strip().splitlines()
        step["summary"] = lines[-1] if lines else ""
        return step

    def overhead_step(seconds: float) -> dict[str, Any]:
        if not ctx.cuda:  # no compiles off CUDA: its few eager rows run here
            return guarded("fixed cost against InfoNCE", lambda: overhead.measure(device, seconds))
        print("\n== fixed cost against InfoNCE ==", flush=True)
        path = ctx.out / "overhead.json"
        path.unlink(missing_ok=True)
        command = [sys.executable, str(HERE / "overhead.py"), "--device", "cuda"]
        command += ["--max-seconds", f"{child_seconds(ctx, seconds):.0f}", "--json", str(path)]
        step = run_step(command, ctx.env, seconds)
        # what the child measured, also when it was stopped (it rewrites the file per unit)
        step["result"] = json.loads(path.read_text()) if path.exists() else {"error": "no rows"}
        return step

    def ladder(seconds: float) -> dict[str, Any]:
        print("\n== scale ladder ==", flush=True)
        ladder_out = ctx.out / "ladder"
        command = [sys.executable, str(HERE / "ladder.py"), *LADDER_ARGS[device.type]]
        command += ["--max-seconds", f"{child_seconds(ctx, seconds):.0f}"]
        command += ["--out", str(ladder_out)]
        step = run_step(command, ctx.env, seconds)
        if (ladder_out / "ladder.json").exists():
            step["rows"] = json.loads((ladder_out / "ladder.json").read_text())["rows"]
        return step

    def bench(dtype: str) -> Callable[[float], dict[str, Any]]:
        def run(seconds: float) -> dict[str, Any]:
            print(f"\n== benchmarks, {dtype} ==", flush=True)
            json_path = ctx.out / f"bench_{dtype}.json"
            json_path.unlink(missing_ok=True)
            command = [sys.executable, str(HERE / "run.py"), "--device", device.type]
            command += ["--dtype", dtype, "--json", str(json_path), "--no-per-call"]
            command += ["--max-seconds", f"{child_seconds(ctx, seconds):.0f}"]
            command += ["--repeats", "5"] if ctx.cuda else ["--quick", "--no-memory"]
            step = run_step(command, ctx.env, seconds)
            if json_path.exists():
                step["rows"] = json.loads(json_path.read_text())["rows"]
            return step

        return run

    return [
        Step("tests", tests),
        Step(
            "fused_kernels",
            lambda seconds: guarded(
                "fused attention kernels (impl='sdpa')",
                lambda: survey(device, max_seconds=seconds),
            ),
        ),
        Step(
            "sync",
            lambda seconds: guarded(
                "host synchronisation (default calls)", lambda: sync_check(device, seconds)
            ),
        ),
        Step("overhead", overhead_step),
        Step(
            "trainer",
            lambda seconds: guarded(
                "a trainer's step", lambda: trainer.measure(device, max_seconds=seconds)
            ),
        ),
        Step("ladder", ladder),
        Step("bench_bf16", bench("bf16")),
        Step("bench_float32", bench("float32")),
    ]


def run_plan(
    steps: list[Step],
    budget: dict[str, float],
    deadline: float,
    report: dict[str, Any],
    save: Callable[[], None],
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run ``steps`` in order, each with ``min(its budget, deadline - now)`` seconds
    (``deadline`` on ``clock``), recording each in ``report`` (with the share it was given)
    and saving after each; a step with no time left is recorded as skipped."""
    for step in steps:
        share = min(float(budget[step.name]), deadline - clock())
        if share <= 0:
            report[step.name] = {"skipped": "the deadline was reached", "allotted": 0.0}
        else:
            began = clock()
            record = step.run(share)
            record["allotted"] = share
            record["elapsed"] = clock() - began
            report[step.name] = record
        save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT", "gpu_output"))
    )
    parser.add_argument("--smoke", action="store_true", help="the CPU smoke mode even on CUDA")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    mode = "cuda" if cuda else "smoke"
    deadline = STARTED + DEADLINE[mode]
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
    report: dict[str, Any] = {
        "mode": "cuda" if cuda else "cpu smoke",
        "deadline_seconds": DEADLINE[mode],
        "versions": versions(device),
    }
    print("gpu-check:", json.dumps(report), flush=True)

    def save() -> None:
        report["elapsed_seconds"] = time.monotonic() - STARTED
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "gpu_check.md").write_text(to_markdown(report))

    save()
    context = Context(device, mode, out, env)
    run_plan(plan(context), BUDGET[mode], deadline, report, save)
    print(f"\nwritten: {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")
    print(f"gpu-check took {time.monotonic() - STARTED:.0f} s (deadline {DEADLINE[mode]:.0f} s)")
    tests_ok = report.get("tests", {}).get("status") == 0
    sync_rows = report.get("sync", {}).get("result")
    sync_ok = isinstance(sync_rows, list) and all(r["ok"] is not False for r in sync_rows)
    return 0 if tests_ok and sync_ok else 1


def to_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (pasted into BENCHMARKS.md under a CUDA heading): every step
    that ran, was cut or was skipped, each with the seconds it took and the share it had."""
    v = report["versions"]
    lines = [
        f"# gpu-check ({report['mode']})",
        "",
        ", ".join(f"{k} {value}" for k, value in v.items()),
        "",
        f"{report.get('elapsed_seconds', 0):.0f} s from the interpreter's start, deadline "
        f"{report['deadline_seconds']:.0f} s.",
    ]
    sections: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
        ("tests", "Tests", _tests_markdown),
        (
            "fused_kernels",
            "Fused attention kernels serving `impl='sdpa'`",
            _in_process(fused_markdown),
        ),
        (
            "sync",
            "Host synchronisation: default calls under sync debug mode",
            _in_process(_sync_markdown),
        ),
        ("overhead", "Fixed cost of a step against InfoNCE", _in_process(overhead.markdown)),
        ("trainer", "A trainer's optimizer step", _in_process(_trainer_markdown)),
        ("ladder", "Scale ladder", _ladder_markdown),
        ("bench_bf16", "Benchmarks, bf16", _bench_markdown),
        ("bench_float32", "Benchmarks, float32", _bench_markdown),
    ]
    for key, title, render in sections:
        if key not in report:
            continue
        step = report[key]
        if "skipped" in step:
            lines += ["", f"## {title}", "", f"Skipped: {step['skipped']}."]
            continue
        timing = f"{step['elapsed']:.0f} s of {step['allotted']:.0f}"
        if step.get("status") == -1:
            timing += ", stopped at its share"
        lines += ["", f"## {title} ({timing})", "", render(step)]
    return "\n".join(lines) + "\n"


def _in_process(render: Callable[[Any], str]) -> Callable[[dict[str, Any]], str]:
    """A step's result rendered, or the error it raised."""

    def body(step: dict[str, Any]) -> str:
        result = step.get("result")
        if isinstance(result, dict) and "error" in result:
            return f"```\n{result['error']}\n```"
        return render(result)

    return body


def _tests_markdown(step: dict[str, Any]) -> str:
    return (
        f"`{step['command']}`: exit {step['status']}, {step['seconds']:.0f} s: "
        f"{step['summary']}\n\nFailure reasons, as they happened: `test_failures.md`."
    )


def _ladder_markdown(step: dict[str, Any]) -> str:
    rungs = [line for line in step["output"].splitlines() if "rows per view" in line]
    return "\n".join(["```", *rungs, "```"])


def _bench_markdown(step: dict[str, Any]) -> str:
    table = [line for line in step["output"].splitlines() if line.strip()]
    return "\n".join(["```", *table, "```"])


def _sync_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| call shape | no synchronisation |", "|---|---|"]
    for r in rows:
        ok = {True: "yes", None: r.get("why", "")}.get(r["ok"], f"no: {r.get('why', '')}")
        lines.append(f"| {r['shape']} | {ok} |")
    return "\n".join(lines)


def _trainer_markdown(result: dict[str, Any]) -> str:
    return (
        f"{result['model']}: cct_loss {result['cct_ms']:.2f} ms, InfoNCE "
        f"{result['infonce_ms']:.2f} ms a step: {result['ratio']:.3f}x "
        f"(target at most {result['target']}x)"
    )


if __name__ == "__main__":
    sys.exit(main())
