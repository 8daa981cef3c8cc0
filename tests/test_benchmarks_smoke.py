"""The benchmark code runs, and its baselines compute what they claim."""

from __future__ import annotations

import json
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


def test_scale_ladder_smoke_run(tmp_path: Path) -> None:
    """The ladder's CPU smoke run (the command the issue names), and its files' contract."""
    command = [sys.executable, str(ROOT / "benchmarks" / "ladder.py"), "--device", "cpu"]
    command += ["--impl", "chunked", "--dims", "16", "--rows", "64", "128", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "ladder.json").read_text())
    rows = report["rows"]
    assert [(r["impl"], r["d"], r["rows_per_view"]) for r in rows] == [
        ("chunked", 16, 64),
        ("chunked", 16, 128),
    ]
    for r in rows:
        assert set(r) == {"impl", "d", "rows_per_view", "seconds", "peak_bytes", "tflops"}
        assert r["seconds"] > 0 and r["tflops"] > 0
    assert "| chunked | 16 | 128 |" in (tmp_path / "ladder.md").read_text()


def test_scale_ladder_stops_before_a_rung_that_would_overrun() -> None:
    """The estimate from the previous rung (work grows with rows**2) skips what cannot fit,
    and a refused implementation is a skipped row, not a crash."""
    import ladder

    rows = ladder.climb(
        ["chunked", "triton", ladder.FLASH], [8], [32, 64, 1 << 16], torch.device("cpu"), 2.0,
        report=str,
    )  # fmt: skip
    by_rung = {(r["impl"], r["rows_per_view"]): r for r in rows}
    assert "seconds" in by_rung[("chunked", 64)] and "seconds" in by_rung[(ladder.FLASH, 64)]
    table = ladder.markdown(rows, {"device": "cpu"})
    ratio = by_rung[("chunked", 64)]["seconds"] / by_rung[(ladder.FLASH, 64)]["seconds"]
    assert f"| {ratio:.2f} |" in table
    assert "estimated" in by_rung[("chunked", 1 << 16)]["skipped"]
    if "TRITON_INTERPRET" not in os.environ:  # on the CPU without the interpreter: refused
        assert by_rung[("triton", 32)]["skipped"].startswith("refused:")
    assert ladder.estimate({"rows_per_view": 100, "seconds": 2.0}, 300) == pytest.approx(18.0)


def test_tuning_script_candidates_and_the_table_it_writes() -> None:
    """benchmarks/tune_triton.py (the timing itself needs CUDA): its candidates are tiles the
    kernels take, and the module it writes holds exactly the table and the run it is given."""
    import tune_triton

    from cct_loss.implementations import triton_tiles

    for d in (16, 128, 256, 257, 512, 1000, 1024):
        tiles = tune_triton.candidates(d)
        assert tiles
        for t in tiles:
            assert all(x > 0 and x & (x - 1) == 0 for x in (t.queries, t.keys, t.features))
            assert t.outputs & (t.outputs - 1) == 0 and t.outputs >= t.features
            single = d <= tune_triton.SINGLE_TILE_MAX
            assert (t.features >= d) == single
    table = {**triton_tiles.TILES, (512, "half"): (128, 64, 64, 128, 8, 3)}
    measured = {"date": "2026-11-30", "gpu": "a GPU"}
    namespace: dict[str, object] = {}
    exec(tune_triton.render_tiles_module(table, measured), namespace)
    assert namespace["TILES"] == table and namespace["MEASURED"] == measured
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tune_triton.py"), "--dry-run", "--dims", "512"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and '"D=512"' in result.stdout, result.stderr
