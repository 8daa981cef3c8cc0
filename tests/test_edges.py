"""Inputs at the edges (issue 24): nothing silently wrong, every refusal a message that leads
somewhere. The distributed half (ranks that disagree) is in tests/test_distributed.py."""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cct_loss as package
from cct_loss import NegativeQueue, cct_loss, cct_loss_multiview

from .helpers import IMPLS, RTOL, TEST_DEVICE, impl_options, random_embeddings
from .reference import reference_loss, reference_multiview


def test_a_misspelt_public_name_names_the_one_meant() -> None:
    with pytest.raises(ImportError, match="did you mean 'CCTMultiviewLoss'"):
        from cct_loss import CCTMultiViewLoss  # noqa: F401
    with pytest.raises(AttributeError, match="did you mean 'cct_loss_multiview'"):
        _ = package.cct_loss_multview
    with pytest.raises(ImportError, match="its public names are CCTClipLoss, CCTDetails, CCTLoss"):
        from cct_loss import nothing_like_it  # noqa: F401
    # attribute probes keep working
    assert not hasattr(package, "CCTMultiViewLoss")
    assert getattr(package, "CCTMultiViewLoss", None) is None


def test_numpy_integers_are_taken_where_python_ints_are() -> None:
    queue = NegativeQueue(np.int64(8), np.int32(4))
    assert (queue.size, queue.dim) == (8, 4)
    assert type(queue.size) is int
    q, p = random_embeddings((6, 4), 0), random_embeddings((6, 4), 1)
    expected = cct_loss(q, p, impl="chunked", chunk_size=2)
    torch.testing.assert_close(
        cct_loss(q, p, impl="chunked", chunk_size=np.int64(2)),  # type: ignore[call-overload]
        expected,
        rtol=0,
        atol=0,
    )
    with pytest.raises(TypeError, match="size must be an int"):
        NegativeQueue(np.float64(8.0), 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="chunk_size must be None or an int"):
        cct_loss(q, p, impl="chunked", chunk_size=np.bool_(True))  # type: ignore[call-overload]


@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_a_learned_weight_is_refused_with_what_it_would_do(name: str) -> None:
    q, p = random_embeddings((6, 4), 0), random_embeddings((6, 4), 1)
    weight = torch.tensor(1.0, device=TEST_DEVICE, requires_grad=True)
    with pytest.raises(ValueError) as error:
        cct_loss(q, p, **{name: weight})  # type: ignore[call-overload]
    message = str(error.value)
    assert f"{name} must not require grad" in message
    assert "linear in each weight" in message and "sharpness" not in message
    assert "return_details=True" in message and "details.attraction" in message


def test_a_queue_made_under_inference_mode_says_so() -> None:
    with torch.inference_mode():
        queue = NegativeQueue(8, 4, device=TEST_DEVICE)
    with pytest.raises(RuntimeError, match=r"created under torch\.inference_mode"):
        queue.enqueue(random_embeddings((2, 4), 0))
    with torch.inference_mode():
        queue.enqueue(random_embeddings((2, 4), 0))  # inside it, it works
    assert len(queue) == 2


def test_the_queue_checks_keys_as_it_stores_them() -> None:
    """1e5 is finite in float32, infinite in the float16 queue: refused, the queue unchanged
    (it used to store inf, and every later loss was NaN)."""
    queue = NegativeQueue(8, 4, dtype=torch.float16, device=TEST_DEVICE)
    with pytest.raises(ValueError, match=r"in the queue's dtype torch\.float16"):
        queue.enqueue(torch.full((2, 4), 1e5, device=TEST_DEVICE))
    assert len(queue) == 0
    queue.enqueue(torch.full((2, 4), 6e4, device=TEST_DEVICE))  # the largest float16 is 65504
    assert bool(torch.isfinite(queue.negatives()).all())


def _refusal(query: torch.Tensor, positive: torch.Tensor) -> str:
    with pytest.raises(ValueError) as error:
        cct_loss(query, positive)
    return str(error.value)


def test_a_positive_that_is_the_query_is_refused_for_any_m() -> None:
    """As ``(N, D)``, as ``(N, 1, D)``, expanded to M = 2, and as one of a stack's positives:
    the same refusal (the M > 1 forms used to be accepted, every query its own positive)."""
    z = random_embeddings((4, 3), 0)
    expected = _refusal(z, z)
    assert "positive is query itself" in expected
    assert _refusal(z, z.unsqueeze(1)) == expected
    assert _refusal(z, z.unsqueeze(1).expand(4, 2, 3)) == expected
    stacked = torch.stack([random_embeddings((4, 3), 1), random_embeddings((4, 3), 2)], dim=1)
    assert _refusal(stacked[:, 1], stacked) == expected
    # a call replayed from an earlier signature (shapes checked before) is checked too
    cct_loss(stacked[:, 1].clone(), random_embeddings((4, 2, 3), 3))
    assert _refusal(stacked[:, 1], stacked) == expected
    # a copy, or a stack holding a copy, is a choice: accepted
    cct_loss(z, torch.stack([random_embeddings((4, 3), 1), z.clone()], dim=1))
    cct_loss(stacked[:, 1].clone(), stacked)


def _reference_and_grad(
    tensors: list[torch.Tensor | None], **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference loss of (query, positive, negatives) and its gradient for query."""
    query, positive, negatives = (
        None if x is None else x.detach().double().requires_grad_(i == 0)
        for i, x in enumerate(tensors)
    )
    assert query is not None and positive is not None
    loss = reference_loss(query, positive, negatives, **options)
    (grad,) = torch.autograd.grad(loss, [query])
    return loss.detach(), grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [1e20, 1e30])
@pytest.mark.parametrize("where", ["rows", "queue"])
def test_rows_whose_squares_overflow_are_not_taken_for_zero_vectors(
    impl: str, scale: float, where: str
) -> None:
    """float32 rows above about 1.8e19 (their squares overflow) used to pass for zero vectors:
    the loss 0, or a plausible number with a queue of such keys, hiding a diverged encoder.
    Now the loss is NaN, as for a NaN input, on every implementation; in float64 the same
    rows give the reference's result, value and gradient."""
    q, p, negatives = huge_rows(scale, where)
    check_overflow_shows(impl, scale, where)
    query = q.detach().requires_grad_()
    loss = cct_loss(query, p, negatives, **impl_options(impl))
    (grad,) = torch.autograd.grad(loss, [query])
    expected, expected_grad = _reference_and_grad([q, p, negatives])
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=0)
    # d loss / d query scales as 1 / |query|: compared relative to its largest entry
    torch.testing.assert_close(
        grad, expected_grad, rtol=1e-6, atol=1e-6 * float(expected_grad.abs().max())
    )


def huge_rows(scale: float, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """float64 ``(query, positive, negatives)`` with the rows or the negatives at ``scale``."""
    q, p = random_embeddings((6, 8), 0), random_embeddings((6, 8), 1)
    if where == "rows":
        return q * scale, p * scale, None
    return q, p, random_embeddings((10, 8), 2) * scale


def check_overflow_shows(impl: str, scale: float, where: str) -> None:
    """The float32 loss of :func:`huge_rows` is NaN on ``impl`` (tests/test_triton.py too)."""
    tensors = [None if x is None else x.float() for x in huge_rows(scale, where)]
    q, p, negatives = tensors
    assert q is not None and p is not None
    assert torch.isnan(cct_loss(q, p, negatives, **impl_options(impl)))


def test_a_queue_of_huge_keys_is_not_taken_for_zero_vectors() -> None:
    """Keys of 1e20 through a float32 NegativeQueue (float32 holds them; their norms overflow):
    a NaN loss, where it used to be a plausible number."""
    q, k = random_embeddings((6, 8), 0).float(), random_embeddings((6, 8), 1).float()
    queue = NegativeQueue(16, 8, device=TEST_DEVICE)
    queue.enqueue(random_embeddings((10, 8), 2).float() * 1e20)
    assert torch.isnan(cct_loss(q, k, queue.negatives()))


@settings(deadline=None)
@given(
    offset=st.floats(0.0, 1e3),
    scale=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16),
    n=st.integers(2, 6),
    d=st.integers(1, 8),
    mode=st.sampled_from(["in_batch", "queue", "cross", "multiview"]),
)
def test_unnormalised_costs_do_not_cancel_under_a_common_offset(
    offset: float, scale: float, seed: int, n: int, d: int, mode: str
) -> None:
    """``normalize=False``: every row moved by one common vector (up to 1e3 long) and scaled
    (up to 1e2): each implementation matches the float64 reference to 1e-5 relative, and so
    they agree with each other. ``|a|^2 + |b|^2 - 2 a.b`` lost every digit of the noise before
    the rows were centred (11% off at an offset of 1000, and the implementations disagreed)."""
    check_common_offset(offset, scale, seed, n, d, mode, IMPLS)


def check_common_offset(
    offset: float, scale: float, seed: int, n: int, d: int, mode: str, impls: list[str]
) -> None:
    """One case of the test above on ``impls`` (tests/test_triton.py runs it on triton)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g, dtype=torch.float64)
    shift = offset * direction / direction.norm().clamp_min(1e-12)

    def rows(*shape: int) -> torch.Tensor:
        x = scale * torch.randn(*shape, generator=g, dtype=torch.float64) + shift
        out: torch.Tensor = x.float().to(TEST_DEVICE)
        return out

    q, p = rows(n, d), rows(n, d)
    negatives = rows(7, d) if mode == "queue" else None
    options: dict[str, Any] = {"normalize": False, "layout": "cross" if mode == "cross" else "all"}
    if mode == "multiview":
        views = [q, p, rows(n, d)]
        expected = reference_multiview([v.double() for v in views], normalize=False)
        found = {
            impl: cct_loss_multiview(views, **impl_options(impl), normalize=False) for impl in impls
        }
    else:
        expected, _ = _reference_and_grad([q, p, negatives], **options)
        found = {impl: cct_loss(q, p, negatives, **impl_options(impl), **options) for impl in impls}
    for impl, loss in found.items():  # 1e-5 of the costs' scale (the loss may be near 0)
        torch.testing.assert_close(
            loss.double(), expected, rtol=RTOL, atol=RTOL * scale**2, msg=impl
        )


#: Labels whose arithmetic used to wrap.
EXTREME_LABELS = {
    "uint8 0 and 255": ([0, 255, 0, 255, 7, 255], torch.uint8),
    "int8 extremes": ([-128, 127, -128, 0, 127, 0], torch.int8),
    "int64 min..max": ([-(2**63), 2**63 - 1, -(2**63), 0, 2**63 - 1, 0], torch.int64),
}


def check_extreme_labels(impl: str, name: str) -> None:
    """``cct_loss(q, k, queue, labels=..., layout="cross")`` (the queue's keys belong to no
    label) and the in-batch labelled call with ``name``'s labels, against the float64
    reference on the same labels (tests/test_triton.py runs it on triton)."""
    values, dtype = EXTREME_LABELS[name]
    labels = torch.tensor(values, dtype=dtype, device=TEST_DEVICE)
    q, k = random_embeddings((6, 8), 0), random_embeddings((6, 8), 1)
    queue = random_embeddings((5, 8), 2)
    for negatives, layout in ((queue, "cross"), (None, "all")):
        loss = cct_loss(q.float(), k.float(), None if negatives is None else negatives.float(),
                        labels=labels, layout=layout, **impl_options(impl))  # fmt: skip
        expected = reference_loss(q, k, negatives, labels=labels, layout=layout)
        torch.testing.assert_close(loss.double(), expected, rtol=RTOL, atol=RTOL, msg=layout)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(EXTREME_LABELS))
def test_label_arithmetic_never_wraps(impl: str, name: str) -> None:
    """With uint8 labels 0 and 255, a queue's keys (which belong to no label) used to become
    positives of the label-0 queries (the "unused" id 255 + 1 wrapped to 0); int64 labels
    spanning min..max likewise."""
    check_extreme_labels(impl, name)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"t_neg": 3e38}, "t_neg must be at most 1e+38"),
        ({"t_pos": 2e38}, "t_pos must be at most 1e+38"),
        ({"temperature": 1e-39}, "temperature must be at least 5e-39"),
        ({"temperature": 1e-39, "cost": "cosine"}, "temperature must be at least 1e-38"),
    ],
)
def test_a_sharpness_beyond_the_bound_is_refused(options: dict[str, Any], named: str) -> None:
    """t_neg = 3e38 used to give 2.35 on chunked and triton (2.19 in float64), NaN on sdpa and
    an error naming nothing on dense; temperature = 1e-39 the same."""
    z1, z2 = random_embeddings((4, 3), 0), random_embeddings((4, 3), 1)
    with pytest.raises(ValueError, match=re.escape(named)):
        cct_loss(z1, z2, **options)


def check_sharpness_up_to_the_bound(impl: str, t: float) -> None:
    """Values and query gradients against the float64 reference at sharpness ``t`` on both
    sides, every cost and weight setting, in-batch and with a queue (tests/test_triton.py runs
    it on triton)."""
    q, p = random_embeddings((6, 8), 0).float(), random_embeddings((6, 3, 8), 1).float()
    queue = random_embeddings((9, 8), 2).float()
    for cost, detach, negatives in itertools.product(
        ("sqeuclidean", "cosine"), (True, False), (None, queue)
    ):
        options: dict[str, Any] = {"t_pos": t, "t_neg": t, "cost": cost, "detach_weights": detach}
        query = q.detach().requires_grad_()
        loss = cct_loss(query, p, negatives, **options, **impl_options(impl))
        (grad,) = torch.autograd.grad(loss, [query])
        expected, expected_grad = _reference_and_grad([q, p, negatives], **options)
        where = f"{cost}, detach_weights={detach}, queue={negatives is not None}"
        torch.testing.assert_close(loss.double(), expected, rtol=RTOL, atol=RTOL, msg=where)
        torch.testing.assert_close(
            grad.double(), expected_grad, rtol=1e-4, atol=1e-4 * float(expected_grad.abs().max()),
            msg=where,
        )  # fmt: skip


def far_positives() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries whose every positive sits near the far side of the sphere (costs above 3.4, where
    ``1e38 * cost`` overflows float32), and a few negatives."""
    q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], device=TEST_DEVICE)
    tilt = torch.tensor([[0.0, 0.02, -0.01], [0.03, 0.0, 0.01], [-0.02, 0.01, 0.0]])
    p = torch.stack([-q + tilt.to(TEST_DEVICE), -q - tilt.to(TEST_DEVICE)], dim=1)  # (3, 2, 3)
    return q, p, random_embeddings((4, 3), 5).float()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("call", ["given", "in_batch"])
def test_the_largest_t_pos_over_far_positives_is_finite_and_exact(
    impl: str, detach: bool, call: str
) -> None:
    """At ``t_pos = 1e38`` positives all costing more than 3.4 gave +inf logits and NaN weights
    (the few-positives softmax of every implementation); now the weights pick the farthest
    positive, as the float64 reference does, values and gradients."""
    check_far_positives(impl, detach, call)


def check_far_positives(impl: str, detach: bool, call: str) -> None:
    """:func:`test_the_largest_t_pos_over_far_positives_is_finite_and_exact` on ``impl``
    (tests/test_triton.py runs it on triton)."""
    q, p, negatives = far_positives()
    options: dict[str, Any] = {"t_pos": 1e38, "t_neg": 2.0, "detach_weights": detach}
    given = negatives if call == "given" else None
    query = q.detach().requires_grad_()
    loss = cct_loss(query, p, given, **options, **impl_options(impl))
    (grad,) = torch.autograd.grad(loss, [query])
    expected, expected_grad = _reference_and_grad([q, p, given], **options)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), expected, rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-5)


def test_the_largest_t_pos_over_far_positives_differentiates_twice() -> None:
    """The formula the double backward records shifts its logits as the forward does."""
    q, p, negatives = far_positives()
    query = q.double().requires_grad_()
    loss = cct_loss(query, p.double(), negatives.double(), t_pos=1e38, detach_weights=False)
    (grad,) = torch.autograd.grad(loss, [query], create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), [query])
    assert torch.isfinite(second).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t", [1e5, 1e20, 1e38])
def test_every_sharpness_the_validator_takes_is_exact(impl: str, t: float) -> None:
    """Up to the bound, values and gradients are the float64 reference's (chunked's gradient
    with detached weights was 1% off from t = 1e5: its backward shifted the logits by s |q|^2
    in float32 against the forward pass's normaliser)."""
    check_sharpness_up_to_the_bound(impl, t)
