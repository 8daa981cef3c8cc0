"""NegativeQueue: FIFO semantics against a plain list, state_dict, devices, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cct_loss import NegativeQueue, cct_loss

from .helpers import TEST_DEVICE, seeded


class ListQueue:
    """The obviously-correct FIFO: a Python list of the newest `size` keys."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: list[torch.Tensor] = []

    def enqueue(self, keys: torch.Tensor) -> None:
        self.items.extend(keys)
        self.items = self.items[-self.size :]


def as_set(x: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(tuple(row.tolist()) for row in x)


@given(
    size=st.integers(1, 9),
    batches=st.lists(st.integers(0, 13), min_size=1, max_size=8),
    seed=st.integers(0, 1000),
)
def test_fifo_matches_list_reference(size: int, batches: list[int], seed: int) -> None:
    g = seeded(seed)
    queue, reference = NegativeQueue(size, 3), ListQueue(size)
    for b in batches:
        keys = torch.randn(b, 3, generator=g)
        queue.enqueue(keys)
        reference.enqueue(keys)
        assert len(queue) == len(reference.items)
        if reference.items:
            assert as_set(queue.negatives()) == as_set(torch.stack(reference.items))
            assert queue.is_full == (len(reference.items) == size)


def test_empty_queue_gives_no_negatives() -> None:
    queue = NegativeQueue(8, 4)
    labelled = NegativeQueue(8, 4, with_labels=True)
    assert len(queue) == 0
    assert queue.negatives().shape == (0, 4)
    assert labelled.labels().shape == (0,) and labelled.labels().dtype == torch.long


def test_partial_queue_gives_only_written_keys_in_order() -> None:
    queue = NegativeQueue(8, 2)
    keys = torch.arange(6.0).reshape(3, 2)
    queue.enqueue(keys)
    torch.testing.assert_close(queue.negatives(), keys)


def test_larger_batch_keeps_newest_keys() -> None:
    queue = NegativeQueue(3, 1)
    queue.enqueue(torch.arange(7.0)[:, None])
    assert as_set(queue.negatives()) == [(4.0,), (5.0,), (6.0,)]
    queue.enqueue(torch.tensor([[7.0]]))  # overwrites the oldest, 4
    assert as_set(queue.negatives()) == [(5.0,), (6.0,), (7.0,)]


def test_keys_are_detached_and_negatives_are_a_copy() -> None:
    """The queue stores the keys' values cut from their graph, and hands out a copy: writing to
    what :meth:`negatives` returned leaves the queue as it was."""
    queue = NegativeQueue(4, 3)
    k = torch.randn(2, 3, requires_grad=True)
    queue.enqueue(k * 2)
    assert not queue.keys.requires_grad and queue.keys.grad_fn is None
    negatives = queue.negatives()
    assert not negatives.requires_grad and negatives.grad_fn is None
    expected = (k * 2).detach()
    assert torch.equal(negatives, expected)
    assert negatives.untyped_storage().data_ptr() != queue.keys.untyped_storage().data_ptr()
    negatives.zero_()
    assert torch.equal(queue.negatives(), expected), "writing to the copy changed the queue"
    q = torch.randn(2, 3, requires_grad=True)
    cct_loss(q, torch.randn(2, 3), queue.negatives()).backward()
    assert k.grad is None, "a loss on the queue's negatives reached the enqueued keys' graph"


def test_enqueue_after_loss_before_backward_is_safe() -> None:
    """MoCo enqueues inside forward, before backward: saved tensors must not be disturbed."""
    queue = NegativeQueue(16, 4)
    queue.enqueue(torch.randn(8, 4))
    q = torch.randn(4, 4, requires_grad=True)
    k = torch.randn(4, 4)
    for impl in ("dense", "chunked", "sdpa"):
        loss = cct_loss(q, k, queue.negatives(), normalize=False, impl=impl)
        queue.enqueue(k)
        loss.backward()


def test_state_dict_round_trip_and_resume() -> None:
    g = seeded(0)
    queue = NegativeQueue(5, 2)
    for b in (3, 4):
        queue.enqueue(torch.randn(b, 2, generator=g))
    state = queue.state_dict()
    assert set(state) == {"keys", "write_position", "fill_level"}
    restored = NegativeQueue(5, 2)
    restored.load_state_dict(state)
    assert len(restored) == len(queue) and restored.is_full
    torch.testing.assert_close(restored.negatives(), queue.negatives(), rtol=0, atol=0)
    more = torch.randn(3, 2, generator=g)
    queue.enqueue(more)
    restored.enqueue(more)
    torch.testing.assert_close(restored.keys, queue.keys, rtol=0, atol=0)
    assert int(restored.write_position) == int(queue.write_position)


def test_training_resumes_identically_from_state_dict() -> None:
    """Model + queue saved mid-training and restored continue exactly as if never stopped."""

    def step(
        model: torch.nn.Module, opt: torch.optim.Optimizer, queue: NegativeQueue, x: torch.Tensor
    ) -> None:
        q, k = model(x), model(x + 0.1).detach()
        loss = cct_loss(q, k, queue.negatives(), t_neg=2.0)
        queue.enqueue(k)
        opt.zero_grad()
        loss.backward()
        opt.step()

    torch.manual_seed(0)
    data = [torch.randn(4, 6) for _ in range(6)]
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    queue = NegativeQueue(10, 3)
    queue.enqueue(torch.randn(4, 3))
    for x in data[:3]:
        step(model, opt, queue, x)
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "queue": queue.state_dict()}
    saved = {
        k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
        for k, s in saved.items()
    }
    for x in data[3:]:
        step(model, opt, queue, x)

    model2 = torch.nn.Linear(6, 3)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.3)
    queue2 = NegativeQueue(10, 3)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    queue2.load_state_dict(saved["queue"])
    for x in data[3:]:
        step(model2, opt2, queue2, x)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(queue.keys, queue2.keys, rtol=0, atol=0)


def test_to_dtype_moves_keys_and_keeps_counters() -> None:
    queue = NegativeQueue(4, 2).to(torch.float64)
    assert queue.keys.dtype == torch.float64
    assert queue.write_position.dtype == torch.long
    queue.enqueue(torch.randn(2, 2))  # float32 keys are stored in the queue's dtype
    assert queue.negatives().dtype == torch.float64


def test_corrupt_state_is_rejected() -> None:
    queue = NegativeQueue(4, 2)
    state = queue.state_dict()
    state["fill_level"] = torch.tensor(9)
    with pytest.raises(ValueError, match="out of range"):
        NegativeQueue(4, 2).load_state_dict(state)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "pattern"),
    [
        ((0, 4), {}, ValueError, r"size must be an int >= 1, got 0"),
        ((4, 0), {}, ValueError, r"dim must be an int >= 1, got 0"),
        ((4.5, 4), {}, TypeError, r"size must be an int >= 1, got float"),
        ((True, 4), {}, TypeError, r"size must be an int >= 1, got bool"),
        ((4, 4), {"gather_distributed": "yes"}, TypeError, r"gather_distributed must be a bool"),
        ((4, 4), {"dtype": torch.long}, TypeError, r"dtype must be a floating-point dtype"),
    ],
)
def test_bad_construction(
    args: tuple[object, ...], kwargs: dict[str, object], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        NegativeQueue(*args, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("keys", "error", "pattern"),
    [
        (
            torch.randn(3, 5),
            ValueError,
            r"keys must have shape \(B, dim\) = \(B, 4\), got \(3, 5\)",
        ),
        (torch.randn(4), ValueError, r"keys must have shape .* got 1 dims"),
        (torch.ones(3, 4, dtype=torch.long), TypeError, r"keys must have a floating-point dtype"),
        ([[1.0] * 4], TypeError, r"keys must be a torch.Tensor"),
        (
            torch.randn(3, 4, device="meta"),
            ValueError,
            rf"keys is on device meta but the queue is on {TEST_DEVICE.type}",
        ),
    ],
)
def test_bad_enqueue(keys: object, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        NegativeQueue(8, 4).enqueue(keys)  # type: ignore[arg-type]


@given(
    size=st.integers(1, 9),
    batches=st.lists(st.integers(0, 12), min_size=1, max_size=6),
    seed=st.integers(0, 1000),
)
def test_labels_follow_their_keys(size: int, batches: list[int], seed: int) -> None:
    """A labelled queue keeps each key's label beside it, through wrap-around and big batches."""
    queue = NegativeQueue(size, 3, with_labels=True)
    g = seeded(seed)
    for b in batches:
        labels = torch.randint(0, 1000, (b,), generator=g)
        keys = labels[:, None].float().expand(b, 3)  # each key encodes its own label
        queue.enqueue(keys, labels=labels)
    if len(queue) == 0:
        return
    torch.testing.assert_close(queue.labels(), queue.negatives()[:, 0].long())
    assert queue.labels().shape == (len(queue),)


def test_labelled_queue_state_dict_and_plain_checkpoints() -> None:
    queue = NegativeQueue(4, 2, with_labels=True)
    queue.enqueue(torch.randn(3, 2), labels=torch.tensor([5, 6, 7]))
    restored = NegativeQueue(4, 2, with_labels=True)
    restored.load_state_dict(queue.state_dict())
    torch.testing.assert_close(restored.labels(), torch.tensor([5, 6, 7]))
    assert "key_labels" not in NegativeQueue(4, 2).state_dict()
    # A checkpoint of a queue without labels still loads into a queue without labels.
    plain = NegativeQueue(4, 2)
    plain.enqueue(torch.randn(2, 2))
    NegativeQueue(4, 2).load_state_dict(plain.state_dict())


def test_labels_are_required_exactly_when_kept() -> None:
    with pytest.raises(ValueError, match=r"enqueue\(keys, labels=\.\.\.\)"):
        NegativeQueue(4, 2, with_labels=True).enqueue(torch.randn(2, 2))
    with pytest.raises(ValueError, match="with_labels=True"):
        NegativeQueue(4, 2).enqueue(torch.randn(2, 2), labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="keeps no labels"):
        NegativeQueue(4, 2).labels()
    with pytest.raises(ValueError, match=r"labels must have shape \(B,\) = \(2,\)"):
        NegativeQueue(4, 2, with_labels=True).enqueue(
            torch.randn(2, 2), labels=torch.zeros(3).long()
        )
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        NegativeQueue(4, 2, with_labels=True).enqueue(torch.randn(2, 2), labels=torch.zeros(2))
    with pytest.raises(TypeError, match="with_labels must be a bool"):
        NegativeQueue(4, 2, with_labels=1)  # type: ignore[arg-type]


def test_labelled_queue_feeds_negative_labels() -> None:
    """The MoCo call with a labelled queue: same-label keys are left out of the negatives."""
    queue = NegativeQueue(16, 8, with_labels=True)
    queue.enqueue(torch.randn(16, 8), labels=torch.arange(16) % 4)
    q, k, y = torch.randn(6, 8), torch.randn(6, 8), torch.arange(6) % 4
    out = cct_loss(
        q, k, queue.negatives(), labels=y, negative_labels=queue.labels(), return_details="weights"
    )
    assert out.neg_weights is not None
    same = y[:, None] == queue.labels()[None, :]
    assert bool((out.neg_weights[same] == 0).all()) and bool((out.neg_weights[~same] > 0).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_keys_are_refused_and_leave_the_queue_unchanged(bad: float) -> None:
    queue = NegativeQueue(6, 2, with_labels=True)
    queue.enqueue(torch.randn(4, 2), labels=torch.arange(4))
    before = {k: v.clone() for k, v in queue.state_dict().items()}
    keys = torch.randn(3, 2)
    keys[1, 0] = bad
    with pytest.raises(ValueError, match=r"NaN or infinite.*left unchanged.*check_finite=False"):
        queue.enqueue(keys, labels=torch.arange(3))
    for name, value in queue.state_dict().items():
        torch.testing.assert_close(value, before[name], equal_nan=True, msg=name)
    assert len(queue) == 4
    queue.enqueue(keys, labels=torch.arange(3), check_finite=False)  # the documented opt-out
    assert len(queue) == 6


def test_reset_empties_the_queue() -> None:
    queue = NegativeQueue(5, 3)
    queue.enqueue(torch.randn(7, 3))
    queue.reset()
    assert len(queue) == 0 and not queue.is_full
    assert queue.negatives().shape == (0, 3)
    queue.enqueue(torch.ones(2, 3))
    torch.testing.assert_close(queue.negatives(), torch.ones(2, 3))
    assert int(queue.write_position) == 2
