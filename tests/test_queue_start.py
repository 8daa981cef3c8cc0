"""The first steps of a queue, with no special case anywhere (docs/queue.md): an empty queue
gives ``(0, D)`` negatives, which ``cct_loss`` reads as "no queue yet: the batch's other keys",
and :class:`CCTLoss` with ``queue=`` reads, computes, then enqueues, as lightly's
``NTXentLoss(memory_bank_size=...)`` and MoCo do. Every value against tests/reference.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cct_loss import CCTLoss, NegativeQueue, cct_loss

from .helpers import IMPLS, TEST_DEVICE, seeded
from .reference import reference_loss


def rows(*shapes: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = seeded(seed)
    return [
        torch.randn(*s, generator=g, device=TEST_DEVICE, dtype=torch.float64).requires_grad_()
        for s in shapes
    ]


def same(loss: torch.Tensor, expected: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    torch.testing.assert_close(loss, expected)
    got = torch.autograd.grad(loss, inputs)
    want = torch.autograd.grad(expected, inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(2, 6),
    m=st.sampled_from([None, 2]),
    impl=st.sampled_from(["auto", *IMPLS]),
    detach_weights=st.booleans(),
    seed=st.integers(0, 99),
)
def test_an_empty_queue_makes_the_other_rows_keys_the_negatives(
    n: int, m: int | None, impl: str, detach_weights: bool, seed: int
) -> None:
    """``cct_loss(q, k, queue.negatives())`` at step 0: each query's positives stay ``k[i]``,
    its negatives are every other row's keys (the cross layout's)."""
    q, k = rows((n, 4), (n, 4) if m is None else (n, m, 4), seed=seed)
    empty = NegativeQueue(16, 4, dtype=torch.float64, device=TEST_DEVICE).negatives()
    options: dict[str, Any] = {"t_neg": 2.0, "detach_weights": detach_weights}
    loss = cct_loss(q, k, empty, impl=impl, **options)
    same(loss, reference_loss(q, k, layout="cross", **options), [q, k])


@pytest.mark.parametrize("m", [None, 2])
def test_an_empty_labelled_queue_takes_the_batch_keys_as_labelled_negatives(m: int | None) -> None:
    """With labels the positives stay ``k[i]``; a key of another label is a negative and one
    of the query's label sits out, as the queue's keys would."""
    q, k = rows((6, 3), (6, 3) if m is None else (6, m, 3), seed=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 1], device=TEST_DEVICE)
    queue = NegativeQueue(8, 3, dtype=torch.float64, with_labels=True, device=TEST_DEVICE)
    loss = cct_loss(q, k, queue.negatives(), labels=labels, negative_labels=queue.labels())
    keys = k if m is None else k.flatten(0, 1)
    key_labels = labels if m is None else labels.repeat_interleave(m)
    expected = reference_loss(q, k, keys, labels=labels, negative_labels=key_labels)
    same(loss, expected, [q, k])


def test_an_empty_queue_in_the_cross_layout_adds_nothing() -> None:
    q, k = rows((5, 3), (5, 3), seed=2)
    loss = cct_loss(q, k, torch.zeros(0, 3, dtype=torch.float64), layout="cross")
    same(loss, reference_loss(q, k, layout="cross"), [q, k])


def test_the_functional_loop_needs_no_first_step_case() -> None:
    """The loop as MoCo writes it, from an empty queue: step 0 against the batch, then each
    step against the keys of the steps before (a partly filled queue gives what it holds)."""
    queue = NegativeQueue(10, 4, dtype=torch.float64, device=TEST_DEVICE)
    seen: list[torch.Tensor] = []
    for step in range(4):
        q, k = rows((4, 4), (4, 4), seed=10 + step)
        loss = cct_loss(q, k, queue.negatives(), temperature=0.2)
        if seen:
            bank = torch.cat(seen)[-10:].detach()
            expected = reference_loss(q, k, bank, t_neg=2.5)
        else:
            expected = reference_loss(q, k, layout="cross", t_neg=2.5)
        same(loss, expected, [q, k])
        queue.enqueue(k)
        seen.append(k)


@pytest.mark.parametrize("labelled", [False, True])
def test_a_module_owning_a_queue_reads_computes_then_enqueues(labelled: bool) -> None:
    queue = NegativeQueue(6, 3, dtype=torch.float64, with_labels=labelled, device=TEST_DEVICE)
    criterion = CCTLoss(temperature=0.25, queue=queue)
    seen: list[torch.Tensor] = []
    seen_labels: list[torch.Tensor] = []
    for step in range(3):
        q, k = rows((4, 3), (4, 3), seed=20 + step)
        y = torch.tensor([0, 1, 1, step], device=TEST_DEVICE)
        extra = {"labels": y} if labelled else {}
        loss = criterion(q, k, **extra)
        assert isinstance(loss, torch.Tensor)
        if not seen:
            if labelled:
                expected = reference_loss(q, k, k, t_neg=2.0, labels=y, negative_labels=y)
            else:
                expected = reference_loss(q, k, layout="cross", t_neg=2.0)
        else:
            bank = torch.cat(seen)[-6:].detach()
            bank_labels = torch.cat(seen_labels)[-6:]
            more: dict[str, Any] = {"labels": y, "negative_labels": bank_labels} if labelled else {}
            expected = reference_loss(q, k, bank, t_neg=2.0, **more)
        same(loss, expected, [q, k])
        seen.append(k)
        seen_labels.append(y)
        assert len(queue) == min(6, 4 * (step + 1))
        assert not queue.keys.requires_grad
    state = criterion.state_dict()
    assert {"queue.keys", "queue.write_position", "queue.fill_level"} <= set(state)
    restored = CCTLoss(
        temperature=0.25,
        queue=NegativeQueue(6, 3, dtype=torch.float64, with_labels=labelled, device=TEST_DEVICE),
    )
    restored.load_state_dict(state)
    assert restored.queue is not None and len(restored.queue) == 6
    torch.testing.assert_close(restored.queue.negatives(), queue.negatives())


def test_a_module_queue_enqueues_every_positive_of_m() -> None:
    queue = NegativeQueue(20, 3)
    criterion = CCTLoss(queue=queue)
    k = torch.randn(4, 2, 3)
    criterion(torch.randn(4, 3, requires_grad=True), k)
    torch.testing.assert_close(queue.negatives(), k.flatten(0, 1))


def test_an_evaluation_leaves_the_module_queue_as_it_was() -> None:
    """As lightly's memory bank: a call whose query needs no gradient enqueues nothing."""
    queue = NegativeQueue(20, 3)
    criterion = CCTLoss(queue=queue)
    criterion(torch.randn(4, 3, requires_grad=True), torch.randn(4, 3))
    before = queue.state_dict()
    with torch.no_grad():
        criterion(torch.randn(4, 3, requires_grad=True), torch.randn(4, 3))
    criterion(torch.randn(4, 3), torch.randn(4, 3))
    for name, value in queue.state_dict().items():
        torch.testing.assert_close(value, before[name], msg=name)


def test_a_module_queue_under_torch_compile() -> None:
    """A compiled trainer's step, fullgraph: the read, the loss and the enqueue (the queue's
    host counters are Python ints that dynamo follows)."""
    criterion = CCTLoss(temperature=0.2, queue=NegativeQueue(16, 4))
    compiled = torch.compile(criterion, backend="eager", fullgraph=True)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        q = torch.randn(4, 4, generator=g).requires_grad_()
        k = torch.randn(4, 4, generator=g)
        assert criterion.queue is not None
        before = criterion.queue.negatives()
        loss = compiled(q, k)
        expected = (  # the float64 reference: against the queue, or the batch's other keys
            reference_loss(q, k, before, t_neg=2.5)
            if len(before)
            else reference_loss(q, k, layout="cross", t_neg=2.5)
        )
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        assert criterion.queue is not None and len(criterion.queue) == 4 * (step + 1)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c, q, k: c(q, k, torch.randn(3, 3)), ValueError, "owns a queue"),
        (lambda c, q, k: c(q), TypeError, "needs the keys"),
        (lambda c, q, k: c(q, k, labels=torch.zeros(4, dtype=torch.long)), ValueError, "with_labels=True"),
    ],
)  # fmt: skip
def test_a_module_queue_bad_calls(call: Any, error: type[Exception], match: str) -> None:
    criterion = CCTLoss(queue=NegativeQueue(8, 3))
    with pytest.raises(error, match=match):
        call(criterion, torch.randn(4, 3), torch.randn(4, 3))


def test_a_module_queue_bad_construction() -> None:
    with pytest.raises(ValueError, match="NegativeQueue\\(size, dim, gather_distributed=True\\)"):
        CCTLoss(gather_distributed=True, queue=NegativeQueue(8, 3))
    later = CCTLoss(queue=NegativeQueue(8, 3))
    later.gather_distributed = True
    with pytest.raises(ValueError, match="gather_distributed=True\\) and leave"):
        later(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(TypeError, match="queue must be a NegativeQueue"):
        CCTLoss(queue=torch.zeros(8, 3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pass the queue by name"):
        CCTLoss(NegativeQueue(8, 3))
    with pytest.raises(TypeError, match=r"CCTLoss\(queue=NegativeQueue\(4096, 128\)\)"):
        CCTLoss(memory_bank_size=(4096, 128))  # type: ignore[call-arg]


def test_an_empty_queue_still_refuses_gathering_and_unlabelled_negatives() -> None:
    q, k, empty = torch.randn(4, 3), torch.randn(4, 3), torch.zeros(0, 3)
    with pytest.raises(ValueError, match="gather them yourself"):
        cct_loss(q, k, empty, gather_distributed=True)
    with pytest.raises(ValueError, match="need negative_labels"):
        cct_loss(q, k, empty, labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="negative_labels must have shape"):
        cct_loss(
            q,
            k,
            empty,
            labels=torch.zeros(4, dtype=torch.long),
            negative_labels=torch.zeros(2, dtype=torch.long),
        )
