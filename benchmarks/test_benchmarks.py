"""pytest-benchmark suite: ``make bench-suite`` (the side-by-side table is ``make bench``).

Each benchmark times one forward + backward step of one method on one problem; compare them
with ``pytest-benchmark compare`` or the table pytest-benchmark prints, as ratios.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from problems import CROSS, MOCO, PAPER, SIMCLR, Problem, methods

torch.set_num_threads(2)

CASES = [
    (problem, name)
    for problem in [SIMCLR[0], SIMCLR[1], MOCO[0], MOCO[2], *CROSS, *PAPER]
    for name in methods(Problem(problem.kind, 8, d=4, m=problem.m, k=16, views=problem.views))
]


@pytest.mark.parametrize(("problem", "method"), CASES, ids=[f"{p.label}-{m}" for p, m in CASES])
def test_step(benchmark: Any, problem: Problem, method: str) -> None:
    step = methods(problem)[method]
    benchmark.group = problem.label
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
