"""Two gloo processes on the CPU: gathered in-batch negatives and the distributed queue."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from cct_loss import NegativeQueue, cct_loss
from cct_loss.distributed import gather_rows, is_active, rank_and_world_size

from . import distributed_worker as worker
from .reference import reference_loss

#: Gloo processes on the CPU.
pytestmark = pytest.mark.cpu_only

WORLD_SIZE = 2
TIMEOUT_S = 120


def spawn(target: Any, world_size: int, out: Path) -> list[dict[str, Any]]:
    """Run ``target(rank, world_size, out)`` in gloo processes; their saved results."""
    context = mp.start_processes(  # type: ignore[attr-defined, no-untyped-call]
        target,
        args=(world_size, str(out)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(worker.run, WORLD_SIZE, tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(worker.run_uneven, len(worker.UNEVEN_ROWS), tmp_path_factory.mktemp("uneven"))


@pytest.mark.parametrize("scenario", list(worker.SCENARIOS))
def test_ddp_with_gathered_negatives_equals_single_process(
    results: list[dict[str, Any]], scenario: str
) -> None:
    """After a few SGD steps, DDP + gather_distributed matches one process on the whole batch."""
    single = worker.make_model()
    worker.train(single, scenario, 0, (worker.N_PER_RANK,) * WORLD_SIZE, gather=False)
    # Under autocast, products of differently shaped matrices may round their bfloat16 outputs
    # differently (2**-9 relative): measured up to 2.4e-3 after the three steps.
    tol = 1e-2 if scenario in worker.AUTOCAST else 1e-5
    for rank in range(WORLD_SIZE):
        for name, value in single.state_dict().items():
            got = results[rank][scenario][name]
            assert torch.allclose(got, value, rtol=tol, atol=tol), (
                f"rank {rank} {name}: max difference {float((got - value).abs().max()):.2e}"
            )


def test_ddp_wraps_a_subclass_of_the_loss_module(results: list[dict[str, Any]]) -> None:
    """DDP around a CCTLoss subclass with its own head and attributes trains like one process
    on the whole batch (world size 2, ``gather_distributed=True``)."""
    assert WORLD_SIZE * worker.N_PER_RANK == 8
    single = worker.ProjectedLoss(gather=False)
    worker.train_module(single, 0, gather=False)
    for rank in range(WORLD_SIZE):
        state = results[rank]["loss_module"]
        assert state["calls"] == worker.STEPS
        for name, value in single.state_dict().items():
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-5)


def test_gathering_calls_do_not_synchronise(results: list[dict[str, Any]]) -> None:
    """Across processes too: the row counts travel on the CPU (no device value is read back),
    and nothing depends on data for its shape."""
    for rank, result in enumerate(results):
        assert result["synchronising"] == [], f"rank {rank}: {result['synchronising']}"


def test_queues_agree_across_ranks_after_wrapping(results: list[dict[str, Any]]) -> None:
    states = [r["queue"] for r in results]
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=0, atol=0)
    # 16 gathered keys into 7 slots: full, write position 16 mod 7 = 2.
    assert int(states[0]["fill_level"]) == 7
    assert int(states[0]["write_position"]) == 2
    # The newest keys are there: the last enqueue was rank 0's then rank 1's 2 keys.
    keys = states[0]["keys"]
    assert (keys[0:2] > 5).all() and (keys[5:7] < 5).all()


def test_helpers_are_no_ops_without_process_group() -> None:
    assert not is_active()
    assert rank_and_world_size() == (0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    gathered, offset = gather_rows(x, [3])
    assert gathered is x and offset == 0
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(cct_loss(z1, z2, gather_distributed=True), cct_loss(z1, z2))
    queue = NegativeQueue(4, 3, gather_distributed=True)
    queue.enqueue(z1)
    torch.testing.assert_close(queue.negatives(), torch.nn.functional.pad(z1, (0, 0))[:4])


def test_gather_with_explicit_negatives_is_an_error() -> None:
    with pytest.raises(ValueError, match="gather_distributed=True gathers in-batch negatives"):
        cct_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(5, 3), gather_distributed=True)


def test_labelled_queues_agree_and_labels_follow_keys(results: list[dict[str, Any]]) -> None:
    states = [r["labelled_queue"] for r in results]
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=0, atol=0)
    keys, labels = states[0]["keys"], states[0]["key_labels"]
    torch.testing.assert_close(keys[:, 0].long(), labels)


@pytest.mark.parametrize("scenario", worker.UNEVEN_SCENARIOS)
def test_uneven_ranks_train_like_one_process(uneven: list[dict[str, Any]], scenario: str) -> None:
    """Ranks with 4, 3 and 1 rows: every rank applies the single-process gradient of the mean
    over the concatenated 8 rows."""
    single = worker.make_model()
    worker.train(single, scenario, 0, worker.UNEVEN_ROWS, gather=False)
    for rank, result in enumerate(uneven):
        for name, value in single.state_dict().items():
            got = result[scenario][name]
            assert torch.allclose(got, value, rtol=1e-5, atol=1e-5), (
                f"rank {rank} {name}: max difference {float((got - value).abs().max()):.2e}"
            )


def test_uneven_ranks_fill_the_same_queue_in_rank_order(uneven: list[dict[str, Any]]) -> None:
    states = [r["queue"] for r in uneven]
    for state in states[1:]:
        for key in state:
            torch.testing.assert_close(state[key], states[0][key], rtol=0, atol=0)
    # 4 keys of rank 0, 3 of rank 1, 1 of rank 2, in rank order, no unwritten row among them
    assert states[0]["key_labels"][:8].tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    assert int(states[0]["fill_level"]) == 8


def test_an_empty_rank_is_an_error_on_every_rank(uneven: list[dict[str, Any]]) -> None:
    for result in uneven:
        assert "every rank needs at least one row" in result["empty_rank"]
        assert "[2, 0, 2]" in result["empty_rank"]


@pytest.fixture(scope="module")
def disagreements(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(worker.run_disagreements, 3, tmp_path_factory.mktemp("disagree"))


#: Each disagreement of tests/distributed_worker.py (the last of 3 ranks differs), and what
#: every rank's error must say: the field and each rank's value.
DISAGREEMENTS = {
    "dim": ["the embedding dim D", "rank 0: 4, rank 1: 4, rank 2: 6"],
    "dtype": ["the dtype", "rank 0: torch.float32, rank 1: torch.float32, rank 2: torch.float64"],
    "labels": ["labels", "rank 0: given, rank 1: given, rank 2: absent", "on some ranks only"],
    "layout": ["the layout", "rank 0: all, rank 1: all, rank 2: cross"],
    "negatives": ["negatives", "rank 0: absent, rank 1: absent, rank 2: given"],
    "views": ["the number of views", "rank 0: 2, rank 1: 2, rank 2: 3"],
    "queue_dim": ["the embedding dim D", "rank 0: 4, rank 1: 4, rank 2: 6"],
    "other_call": [
        "the call",
        "rank 0: NegativeQueue.enqueue, rank 1: NegativeQueue.enqueue, rank 2: cct_loss",
    ],
}


@pytest.mark.parametrize("name", list(DISAGREEMENTS))
def test_ranks_that_disagree_fail_on_every_rank(
    disagreements: list[dict[str, Any]], name: str
) -> None:
    """D, dtype, labels, layout, negatives, views, a queue's key dim, or a different call on
    one rank of three: a ValueError on every rank, naming what differs and each rank's value,
    within seconds (before, a size mismatch aborted rank 0, or labels on one rank hung)."""
    for rank, result in enumerate(disagreements):
        for text in DISAGREEMENTS[name]:
            assert text in result[name], f"rank {rank}: {result[name]}"
        assert result[f"{name}_seconds"] < 10


def test_a_rank_that_refuses_its_batch_fails_the_call_on_every_rank(
    disagreements: list[dict[str, Any]],
) -> None:
    """The last rank's batch is refused by the checks (the others' are fine): every rank fails
    that call, the next call and the one after it compute a loss on every rank (before, the
    others gathered that rank's next batch as this one's, then hung)."""
    *others, last = disagreements
    assert "positive must have shape" in last["skipped_0"]
    for result in others:
        assert "rank 2 refused its part of this call" in result["skipped_0"]
    for result in disagreements:
        assert result["skipped_1"] == "no error"
        assert isinstance(result["after"], float)
        assert result["skipped_seconds"] < 10


@pytest.mark.parametrize("layout", ["all", "cross"])
def test_unnormalised_rows_far_from_the_origin_gather_exactly(
    disagreements: list[dict[str, Any]], layout: str
) -> None:
    """``normalize=False`` across 3 ranks, every row near 1000: each rank moves its rows and the
    gathered ones by one centre (the gathered rows' mean, the same on every rank), so the
    ranks' mean loss is the float64 loss of the whole batch on one process."""
    rows = [worker.unnormalised_rows(rank) for rank in range(3)]
    query = torch.cat([q for q, _ in rows]).double()
    positive = torch.cat([p for _, p in rows]).double()
    expected = float(reference_loss(query, positive, normalize=False, layout=layout))
    got = sum(r[f"unnormalised_{layout}"] for r in disagreements) / 3
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)
