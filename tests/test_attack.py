"""The broad attack of tests/attack.py (issue 24): every edge and bad input ends in the float64
reference's result, a clear error or a documented NaN; none silently wrong, crashing or
hanging. Against the code before issue 24 it counted 54 failures over the cases of seed 0."""

from __future__ import annotations

import pytest
import torch

from . import attack

#: Runs on the CPU (the cases build their tensors there).
pytestmark = pytest.mark.cpu_only


@pytest.mark.parametrize("seed", [0, 1])
def test_the_attack_finds_nothing(seed: int) -> None:
    counts, failed = attack.tally(attack.cases(seed))
    assert not failed, f"{len(failed)} failures of {sum(counts.values())}: {failed[:20]}"
    assert counts["matched"] > 250 and counts["clear error"] > 90, counts


def test_the_attack_can_fail() -> None:
    """A wrong reference is a silently wrong result; a bad input that passes, an accepted one."""
    case = attack.cases(0, values=1)[0]
    wrong = attack.Attack("wrong", case.call, "value", lambda: torch.tensor(1e9))
    assert attack.outcome(wrong) == "silently wrong"
    accepted = attack.Attack("accepted", case.call, "error", says="anything")
    assert attack.outcome(accepted) == "bad input accepted"
