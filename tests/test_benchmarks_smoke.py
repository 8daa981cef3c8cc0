"""The benchmark code runs, and its baselines compute what they claim."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cct_loss import cct_loss_multiview

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from problems import official_paper_objective  # noqa: E402

#: The CPU benchmark script (make gpu-check runs the CUDA one).
pytestmark = pytest.mark.cpu_only


def test_official_formulation_baseline_equals_paper_layout() -> None:
    """The broadcast N x N x D baseline and our paper layout are the same objective."""
    views = torch.randn(5, 12, 8, dtype=torch.float64)
    ours = cct_loss_multiview(
        list(views), layout="paper", t_pos=1.0, t_neg=0.9, detach_weights=False
    )
    torch.testing.assert_close(ours, official_paper_objective(views, 1.0, 0.9))


def test_benchmark_script_quick_run() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for method in ("auto", "dense", "chunked", "sdpa", "infonce", "matmul", "official"):
        assert method in result.stdout
    for shape in ("SimCLR", "MoCo", "CLIP", "SupCon", "paper"):
        assert shape in result.stdout
    assert "per call, one thread" in result.stdout


def test_failure_reasons_are_written_as_they_happen(tmp_path: Path) -> None:
    """make gpu-check sets CCT_FAILURE_LOG: a failing test's reason is in that file even when
    the run is cut before its summary."""
    planted = tmp_path / "test_planted.py"
    planted.write_text("def test_fails():\n    assert 1 == 2, 'a planted failure'\n")
    log = tmp_path / "failures.md"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", str(planted)],
        cwd=ROOT,
        env={**os.environ, "CCT_FAILURE_LOG": str(log)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "test_planted.py::test_fails (call)" in log.read_text()
    assert "a planted failure" in log.read_text()
