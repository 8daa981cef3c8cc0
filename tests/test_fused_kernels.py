"""``impl="sdpa"`` reaches PyTorch's fused attention kernels (benchmarks/fused_kernels.py).

On CUDA every call shape must be served by at least one fused backend (flash, memory-efficient
or cuDNN) in every dtype, with a result that agrees with ``impl="dense"``; which backends serve
what is recorded by ``make gpu-check``. On the CPU the flash kernel (the only fused one there)
must serve every shape.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from .helpers import TEST_DEVICE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from fused_kernels import SHAPES, survey

#: Largest difference from dense allowed for a served kernel: float32 as the sdpa path's
#: documented 1e-4 agreement (on values of order 1), half precision as the precision policy's
#: bfloat16 tolerance (tests/test_precision.py).
TOLERANCE = {"float32": 1e-4, "bf16": 5e-2, "fp16": 5e-2}

#: Under pytest-xdist (make gpu-check: ``--dist loadgroup``) every test here runs on one worker,
#: so the module's survey is computed once.
pytestmark = pytest.mark.xdist_group("fused_kernels")


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return survey(TEST_DEVICE)


def served_by(rows: list[dict[str, Any]], shape: str, dtype: str) -> list[str]:
    return [
        r["backend"] for r in rows if (r["shape"], r["dtype"]) == (shape, dtype) and r["served"]
    ]


@pytest.mark.cuda_only
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_reaches_a_fused_cuda_kernel(
    rows: list[dict[str, Any]], shape: str, dtype: str
) -> None:
    assert served_by(rows, shape, dtype), f"no fused kernel serves {shape} in {dtype}"


@pytest.mark.cpu_only
@pytest.mark.parametrize("dtype", ["float32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_cpu_flash_kernel_serves_every_shape(
    rows: list[dict[str, Any]], shape: str, dtype: str
) -> None:
    assert served_by(rows, shape, dtype) == ["flash"]


def test_served_kernels_agree_with_dense(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r["served"]:
            assert r["max_diff_vs_dense"] <= TOLERANCE[r["dtype"]], r
