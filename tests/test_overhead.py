"""What a step costs besides its arithmetic: operators, host synchronisations, and the replay of
checked calls.

A small batch's step is made of fixed costs: every aten operator is a kernel launch on a GPU
and microseconds of dispatch on a CPU, whatever its size, and a host synchronisation stalls the
GPU's queue. These tests count them with a dispatch mode (the time itself is a benchmark:
``make bench`` prints the per-call row).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from cct_loss import CCTLoss, cct_loss, cct_loss_multiview, checks
from cct_loss.baselines import clip_info_nce, info_nce_queue, nt_xent, supcon
from cct_loss.front import validate

from .helpers import IMPLS, OperatorLog, as_loss, grads_of, impl_options, random_embeddings
from .reference import reference_loss

# The shapes of the issue that set the targets: N=256, D=128, a queue of 4096, ten classes.
N, D, K = 256, 128, 4096
LABELS = torch.arange(N) % 10

Step = Callable[[], Tensor]


def leaves(*shape: int, seed: int, grad: bool = True) -> Tensor:
    return random_embeddings(shape, seed).float().requires_grad_(grad)


def shapes() -> dict[str, tuple[Step, Step]]:
    """Each call shape: (the baseline users write, the cct_loss call that replaces it)."""
    z1, z2 = leaves(N, D, seed=0), leaves(N, D, seed=1)
    key = leaves(N, D, seed=2, grad=False)
    queue = F.normalize(random_embeddings((K, D), 3).float(), dim=1)
    labels = LABELS.to(z1.device)
    return {
        "SimCLR": (lambda: nt_xent(z1, z2), lambda: as_loss(cct_loss(z1, z2))),
        "MoCo": (lambda: info_nce_queue(z1, key, queue), lambda: as_loss(cct_loss(z1, key, queue))),
        "CLIP": (lambda: clip_info_nce(z1, z2), lambda: as_loss(cct_loss(z1, z2, layout="cross"))),
        "SupCon": (
            lambda: supcon(z1, z2, labels),
            lambda: as_loss(cct_loss(z1, z2, labels=labels)),
        ),
    }


def operators(step: Step) -> OperatorLog:
    """The operators of one forward and backward, after a first call (a trainer's steady
    state: later calls replay the first one's checks and plan)."""
    step().backward()
    log = OperatorLog()
    with log:
        step().backward()
    return log


@pytest.mark.parametrize("shape", ["SimCLR", "MoCo", "CLIP", "SupCon"])
def test_operators_per_step_within_one_and_a_half_times_the_baseline(shape: str) -> None:
    baseline, ours = shapes()[shape]
    theirs, mine = len(operators(baseline).names), len(operators(ours).names)
    assert mine <= 1.5 * theirs, f"{shape}: {mine} operators, the baseline {theirs}"


def test_the_count_can_fail() -> None:
    """The count sees what a step does: ten more operators are ten more."""

    def padded() -> Tensor:
        loss = nt_xent(leaves(8, 4, seed=0), leaves(8, 4, seed=1))
        for _ in range(10):
            loss = loss * 1.0
        return loss

    assert len(operators(padded).names) >= len(operators(shapes()["SimCLR"][0]).names) + 10


def calls(impl: str) -> dict[str, Callable[[], Any]]:
    """Every call shape, on small inputs, with ``impl``."""
    q, p = leaves(6, 8, seed=4), leaves(6, 8, seed=5)
    p2, queue = leaves(6, 2, 8, seed=6), leaves(10, 8, seed=7)
    per_query = leaves(6, 5, 8, seed=8)
    labels, queue_labels = torch.tensor([0, 1, 0, 2, 1, 1]), torch.arange(10) % 3
    o: dict[str, Any] = impl_options(impl, 4)
    table: dict[str, Callable[[], Any]] = {
        "in_batch": lambda: cct_loss(q, p, **o),
        "multi_positive": lambda: cct_loss(q, p2, **o),
        "queue": lambda: cct_loss(q, p, queue, **o),
        "cross": lambda: cct_loss(q, p, layout="cross", **o),
        "cross_queue": lambda: cct_loss(q, p, queue, layout="cross", **o),
        "labels": lambda: cct_loss(q, p, labels=labels, **o),
        "cross_labels": lambda: cct_loss(q, p, layout="cross", labels=labels, **o),
        "negative_labels": lambda: cct_loss(
            q, p, queue, labels=labels, negative_labels=queue_labels, **o
        ),
        "multiview": lambda: cct_loss_multiview([q, p, p * 2], **o),
        "paper": lambda: cct_loss_multiview([q, p, p * 2], layout="paper", **o),
        "details": lambda: cct_loss(q, p, queue, return_details=True, **o).loss,
        "per_query": lambda: cct_loss(q, p, per_query, **o),
    }
    return table


@pytest.mark.parametrize("impl", ["auto", *IMPLS])
def test_no_host_synchronisation_in_any_call_shape(impl: str) -> None:
    """No value read back, no shape that depends on data, no copy to the host: in the first
    call of a signature (which checks everything) and in the ones that replay it."""
    for name, call in calls(impl).items():
        for attempt in ("first", "replayed"):
            with OperatorLog() as log:
                call().backward()
            assert log.synchronising == [], f"{name} ({impl}, {attempt}): {log.synchronising}"


def test_the_synchronisation_detector_can_fail() -> None:
    x = torch.randn(5)
    with OperatorLog() as log:
        _ = float(x.sum())  # a value read back
        _ = x[x > 0]  # a shape that depends on the data
        _ = x.nonzero()
    assert len(log.synchronising) >= 3


# The replay: a call with the signature of an earlier one repeats its plan without checking
# again what cannot have changed, and checks what can.


def test_replayed_calls_match_the_reference() -> None:
    """Fresh data at every call of one signature: every call is right, values and gradients."""
    for seed in range(3):
        q, p, n = (
            random_embeddings(s, 10 * seed + i) for i, s in enumerate([(5, 4), (5, 4), (7, 4)])
        )
        for negatives in (None, n):
            gq, gp = q.float().requires_grad_(), p.float().requires_grad_()
            got = cct_loss(gq, gp, None if negatives is None else negatives.float(), t_neg=2.0)
            wq, wp = q.clone().requires_grad_(), p.clone().requires_grad_()
            want = reference_loss(wq, wp, negatives, t_neg=2.0)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
            for g, w in zip(grads_of(got, [gq, gp]), grads_of(want, [wq, wp]), strict=True):
                assert g is not None and w is not None
                torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)


def test_replay_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second call of a signature does not check its shapes again (what makes a small
    step cheap); a new signature does."""
    checked: list[str] = []
    original = checks.check_float_tensor

    def counting(name: str, *args: Any) -> Tensor:
        checked.append(name)
        return original(name, *args)

    monkeypatch.setattr(validate, "check_float_tensor", counting)
    q, p = random_embeddings((5, 4), 0).float(), random_embeddings((5, 4), 1).float()
    cct_loss(q, p, t_neg=1.75)
    first = len(checked)
    cct_loss(q * 2, p, t_neg=1.75)
    assert first > 0 and len(checked) == first
    cct_loss(q[:4], p[:4], t_neg=1.75)  # another batch size: checked
    assert len(checked) > first


def test_replay_checks_what_depends_on_the_tensors() -> None:
    """Whether negatives share memory with positive is checked at every call."""
    q, p, n = (random_embeddings(s, i).float() for i, s in enumerate([(5, 4), (5, 4), (5, 4)]))
    cct_loss(q, p, n)
    with pytest.raises(ValueError, match="negatives is the same tensor as positive"):
        cct_loss(q, p, p)


def test_a_changed_option_or_shape_is_checked_and_planned_again() -> None:
    q, p = random_embeddings((5, 4), 0), random_embeddings((5, 4), 1)
    criterion = CCTLoss()
    criterion(q.float(), p.float())
    criterion.t_neg = 3.0
    torch.testing.assert_close(
        as_loss(criterion(q.float(), p.float())).double(),
        reference_loss(q, p, t_neg=3.0),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="positive must have shape"):
        criterion(q.float(), p[:, :3].float())


def test_replay_follows_autocast_and_grad_mode() -> None:
    """The autocast state is part of the signature; whether inputs need gradients is read at
    every call."""
    q, p = random_embeddings((6, 8), 0), random_embeddings((6, 8), 1)
    want = reference_loss(q, p)
    for _ in range(2):
        plain = cct_loss(q.float(), p.float())
        torch.testing.assert_close(plain.double(), want, rtol=1e-5, atol=1e-6)
        with torch.autocast(q.device.type, dtype=torch.bfloat16):
            low = cct_loss(q.float(), p.float())
        assert low.dtype == torch.float32
        assert float((low.double() - want).abs()) < 1e-2
        with torch.no_grad():
            assert not cct_loss(q.float(), p.float()).requires_grad
        leaf, reference_leaf = q.float().requires_grad_(), q.clone().requires_grad_()
        (grad,) = torch.autograd.grad(cct_loss(leaf, p.float()), leaf)
        (want_grad,) = torch.autograd.grad(reference_loss(reference_leaf, p), reference_leaf)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)
