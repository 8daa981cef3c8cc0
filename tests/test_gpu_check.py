"""``make gpu-check`` keeps to one deadline and always reports (benchmarks/gpu_check.py).

The GPU run is short and borrowed: its steps must end within the deadline whatever each one
does, every step must be handed its share and keep to it, and the report must be written even
when a step is cut. Checked here with a fake clock and recording stand-ins for the steps'
work, for both modes; the real smoke run is ``make gpu-check-smoke``.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import overhead  # noqa: E402
import trainer  # noqa: E402

pytestmark = pytest.mark.cpu_only

MODES = ["cuda", "smoke"]


@pytest.mark.parametrize("mode", MODES)
def test_budgets_add_up_within_the_deadline(mode: str) -> None:
    """Every step has a budget, and the budgets with the set-up fit the deadline (the child
    start-ups are inside their steps' budgets)."""
    budget = gpu_check.BUDGET[mode]
    steps = gpu_check.plan(context(mode, Path("unused")))
    assert [step.name for step in steps] == list(budget)
    assert gpu_check.SETUP[mode] + sum(budget.values()) <= gpu_check.DEADLINE[mode]
    assert gpu_check.DEADLINE["cuda"] <= 200  # issue 27's target on the H200
    for name in ("tests", "ladder", "bench_bf16", "bench_float32"):  # the children
        assert budget[name] > gpu_check.CHILD_START[mode] + gpu_check.WRAP_UP[mode]


def context(mode: str, out: Path) -> gpu_check.Context:
    return gpu_check.Context(torch.device("cpu"), mode, out, {})


class Clock:
    """A fake monotonic clock that the stand-ins advance."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Stand-ins for every step's work: each records the seconds it was given (a child's
    timeout and the limits on its command line; an in-process function's ``max_seconds``) and
    advances the clock by ``use`` times its share (1: it used all of it; more: it overran)."""

    def __init__(self, clock: Clock, out: Path, use: dict[str, float]) -> None:
        self.clock, self.out, self.use = clock, out, use
        self.given: dict[str, dict[str, float]] = {}

    def spend(self, name: str, seconds: float, **limits: float) -> None:
        self.given[name] = {"share": seconds, **limits}
        self.clock.now += seconds * self.use.get(name, 1.0)

    def run_step(self, command: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
        script = Path(command[1]).name if command[1].endswith(".py") else "pytest"
        name = {"overhead.py": "overhead", "ladder.py": "ladder", "pytest": "tests"}.get(script)
        if script == "run.py":
            name = f"bench_{command[command.index('--dtype') + 1]}"
        assert name is not None, command
        limits = {}
        for flag in ("--max-seconds", "--session-timeout"):
            for i, word in enumerate(command):
                if word == flag:
                    limits[flag] = float(command[i + 1])
                elif word.startswith(flag + "="):
                    limits[flag] = float(word.split("=")[1])
        self.spend(name, timeout, **limits)
        if name == "overhead":  # a child stopped midway leaves the rows it had written
            Path(command[command.index("--json") + 1]).write_text(json.dumps([{"problem": "x"}]))
        return {"command": " ".join(command), "status": 0, "seconds": timeout, "output": "1 passed"}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(gpu_check, "run_step", self.run_step)
        monkeypatch.setattr(gpu_check, "installed", lambda module: True)

        def survey(device: torch.device, *, max_seconds: float) -> list[dict[str, Any]]:
            self.spend("fused_kernels", max_seconds)
            return []

        def sync_check(device: torch.device, max_seconds: float) -> list[dict[str, Any]]:
            self.spend("sync", max_seconds)
            return []

        def overhead_measure(device: torch.device, max_seconds: float) -> list[dict[str, Any]]:
            self.spend("overhead", max_seconds)
            return []

        def trainer_measure(device: torch.device, *, max_seconds: float) -> dict[str, Any]:
            self.spend("trainer", max_seconds)
            return {}

        monkeypatch.setattr(gpu_check, "survey", survey)
        monkeypatch.setattr(gpu_check, "sync_check", sync_check)
        monkeypatch.setattr(overhead, "measure", overhead_measure)
        monkeypatch.setattr(trainer, "measure", trainer_measure)


def run(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use: dict[str, float]
) -> tuple[Recorder, dict[str, Any], Clock]:
    clock = Clock()
    clock.now = gpu_check.SETUP[mode]  # the script's own start-up
    recorder = Recorder(clock, tmp_path, use)
    recorder.install(monkeypatch)
    report: dict[str, Any] = {}
    saves = []
    steps = gpu_check.plan(context(mode, tmp_path))
    deadline = gpu_check.DEADLINE[mode]
    gpu_check.run_plan(
        steps, gpu_check.BUDGET[mode], deadline, report, lambda: saves.append(dict(report)), clock
    )
    assert len(saves) == len(steps)  # the report is saved after every step
    return recorder, report, clock


@pytest.mark.parametrize("mode", MODES)
def test_every_step_receives_its_share_and_keeps_to_it(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step, using all of its share, is handed its budget; its work gets that share (a
    child as its timeout, and as its own limit less its start-up and wrap-up); the whole run
    ends by the deadline."""
    recorder, report, clock = run(mode, tmp_path, monkeypatch, use={})
    budget = gpu_check.BUDGET[mode]
    assert set(recorder.given) == set(budget)
    inner = gpu_check.CHILD_START[mode] + gpu_check.WRAP_UP[mode]
    for name, given in recorder.given.items():
        assert given["share"] == pytest.approx(budget[name]), name
        assert report[name]["allotted"] == pytest.approx(budget[name]), name
        if "--max-seconds" in given:  # a child that runs units of work
            assert given["--max-seconds"] == pytest.approx(round(budget[name] - inner)), name
    if mode == "cuda":  # pytest-timeout's session timeout ends the tests before the kill
        tests = recorder.given["tests"]
        assert tests["--session-timeout"] <= budget["tests"] - gpu_check.WRAP_UP[mode]
        assert "--max-seconds" in recorder.given["overhead"]  # its own process on CUDA
    assert clock.now <= gpu_check.DEADLINE[mode]


@pytest.mark.parametrize("mode", MODES)
def test_an_overrun_shrinks_what_comes_after(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that overruns its share (here the tests, by half) leaves the later steps
    ``min(budget, deadline - now)``; those with nothing left are recorded as skipped, and
    nothing starts after the deadline."""
    recorder, report, clock = run(mode, tmp_path, monkeypatch, use={"tests": 1.5})
    budget, deadline = gpu_check.BUDGET[mode], gpu_check.DEADLINE[mode]
    now = gpu_check.SETUP[mode] + 1.5 * budget["tests"]
    for name in list(budget)[1:]:
        left = deadline - now
        if left <= 0:
            assert report[name] == {"skipped": "the deadline was reached", "allotted": 0.0}
            continue
        assert recorder.given[name]["share"] == pytest.approx(min(budget[name], left)), name
        now += recorder.given[name]["share"]
    assert any("skipped" in report[name] for name in budget)
    assert clock.now <= deadline + 0.5 * budget["tests"]  # only the overrun itself


def test_the_test_step_runs_the_cuda_specific_files_first() -> None:
    """A cut keeps the most CUDA-specific files: the Triton kernels and the fused-kernel
    survey run first, the survey on one xdist worker."""
    assert gpu_check.TEST_FILES[:2] == ["tests/test_triton.py", "tests/test_fused_kernels.py"]
    assert all((ROOT / f).exists() for f in gpu_check.TEST_FILES)
    command = gpu_check.test_command(gpu_check.TEST_FILES, cuda=True, seconds=80)
    if gpu_check.installed("xdist"):
        assert command[command.index("--dist") + 1] == "loadgroup"
    from . import test_fused_kernels

    assert test_fused_kernels.pytestmark.name == "xdist_group"


def test_versions_never_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """No git, no CUDA device, a version that raises: each is "unknown", none stops the run."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    info = gpu_check.versions(torch.device("cuda"))  # there is no GPU here
    assert info["commit"] == gpu_check.UNKNOWN
    assert info["gpu"] == gpu_check.UNKNOWN and info["gpu_memory_gib"] == gpu_check.UNKNOWN
    monkeypatch.setattr(platform, "python_version", lambda: 1 / 0)
    assert gpu_check.versions(torch.device("cpu"))["python"] == gpu_check.UNKNOWN


def test_versions_outside_a_git_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU machine gets a copy of the working tree, which may have no .git."""
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    assert gpu_check.versions(torch.device("cpu"))["commit"] == gpu_check.UNKNOWN


def test_report_written_at_the_start_and_for_skipped_steps() -> None:
    report: dict[str, Any] = {
        "mode": "cuda",
        "deadline_seconds": 200.0,
        "versions": {"torch": "x"},
        "tests": {"skipped": "the deadline was reached", "allotted": 0.0},
    }
    text = gpu_check.to_markdown(report)
    assert "## Tests" in text and "Skipped: the deadline was reached" in text


def test_overhead_takes_every_cheap_row_before_any_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA: eager times and launch counts of every shape first, then the compiles while
    time remains; one shape's failure stays in its row."""
    calls: list[str] = []
    monkeypatch.setattr(overhead, "losses", lambda problem, device: {"problem": problem.label})

    def recorded(kind: str, fail_on: str = "") -> Any:
        def unit(pair: dict[str, Any], *rest: Any) -> dict[str, Any]:
            calls.append(f"{kind} {pair['problem']}")
            if pair["problem"] == fail_on:
                raise RuntimeError("a compile that fails")
            return {kind: 1.0}

        return unit

    second = overhead.SHAPES[1].label
    monkeypatch.setattr(overhead, "_eager", recorded("eager"))
    monkeypatch.setattr(overhead, "_launches", recorded("launches"))
    monkeypatch.setattr(overhead, "_compiled", recorded("reduce_overhead", fail_on=second))
    written: list[int] = []
    rows = overhead.measure(torch.device("cuda"), 60.0, on_row=lambda rows: written.append(1))
    shapes = [p.label for p in overhead.SHAPES]
    cheap = [f"{kind} {s}" for s in shapes for kind in ("eager", "launches")]
    assert calls == cheap + [f"reduce_overhead {s}" for s in shapes]
    assert len(written) == len(calls)  # the rows are handed out after every unit
    assert "RuntimeError" in rows[1]["errors"]["reduce_overhead"]
    assert all("reduce_overhead" in rows[i] for i in (0, 2, 3))
    skipped = overhead.measure(torch.device("cuda"), 0.0)
    assert all(set(r["skipped"]) == {"eager", "launches", "reduce_overhead"} for r in skipped)


def test_overhead_child_writes_its_rows(tmp_path: Path) -> None:
    """The command gpu-check runs on CUDA (here its CPU form): rows in the JSON file."""
    path = tmp_path / "overhead.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--device", "cpu"]
    command += ["--max-seconds", "5", "--json", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    rows = json.loads(path.read_text())
    assert [r["problem"] for r in rows] == [p.label for p in overhead.SMOKE_SHAPES]
    assert all(r["eager"] > 0 for r in rows)


def test_in_process_steps_stop_between_their_units() -> None:
    """With no time left, the survey, the sync check and the trainer start no further unit
    (the trainer keeps one timed round after its warm-up)."""
    from fused_kernels import survey

    rows = survey(torch.device("cpu"), n=8, d=8, max_seconds=0.0)
    assert rows and all(r["served"] is None for r in rows)
    sync = gpu_check.sync_check(torch.device("cpu"), max_seconds=0.0)
    assert sync and all(r["ok"] is None for r in sync)
    assert "not run" in gpu_check._sync_markdown(sync)
    assert trainer.measure(torch.device("cpu"), max_seconds=0.0)["steps"] == 1
