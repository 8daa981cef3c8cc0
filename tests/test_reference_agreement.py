"""Every implementation against the float64 loop reference: values, gradients, diagnostics."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cct_loss import CCTDetails, cct_loss

from .helpers import (
    IMPLS,
    LABEL_PATTERNS,
    Case,
    assert_close_rel,
    cases,
    cost_floor,
    float32_error,
    grads_of,
    impl_options,
    seeded,
)
from .reference import reduce, reduce_results, reference_queries

#: The properties hold with and without the per-call shortcuts (each test runs both ways).
pytestmark = pytest.mark.usefixtures("both_shortcut_settings")

#: Relative agreement with the float64 reference. PyTorch's fused CPU attention kernel (sdpa)
#: evaluates its softmax less exactly than a plain float32 softmax (about 1e-5 relative error
#: in the attention output at logit scale 20, against 3e-6 for torch's math kernel), which
#: gradients through the weights amplify by up to t_neg; it is held to 1e-4.
RTOL = {"dense": 1e-5, "chunked": 1e-5, "sdpa": 1e-4, "triton": 1e-5}
#: Every negative mode, both pair layouts and every label pattern.
EVERY_LAYOUT = cases(
    modes=("in_batch", "shared", "per_query"),
    layouts=("all", "cross"),
    label_patterns=LABEL_PATTERNS,
)


def present_mean(values: list[float], flags: list[bool]) -> float:
    kept = [v for v, f in zip(values, flags, strict=True) if f]
    return sum(kept) / len(kept) if kept else 0.0


def check_against_reference(
    case: Case, impl: str, chunk_size: int | None = None, *, details: bool = True
) -> None:
    """Loss and gradients (and with ``details`` every diagnostic) against the reference;
    without details dense takes its moments path (no cost matrix)."""
    opts = dict(case.options)
    reduction = str(opts.pop("reduction"))
    q, p, n = case.leaves(torch.float32)
    out = cct_loss(
        q,
        p,
        n,
        **impl_options(impl, chunk_size),
        reduction=reduction,
        return_details=details,
        **case.call_options,
        **opts,
    )
    loss = out.loss if isinstance(out, CCTDetails) else out
    assert isinstance(out, CCTDetails) == details
    assert loss.dtype == torch.float32

    rq, rp, rn = case.leaves(torch.float64)
    results = reference_queries(rq, rp, rn, **case.call_options, **opts)
    expected = reduce_results(results, reduction, opts)

    alpha, beta = float(opts["alpha"]), float(opts["beta"])
    if reduction == "mean":  # the size of the parts, averaged as the loss averages them
        parts = abs(alpha) * present_mean(
            [abs(float(r.attraction.detach())) for r in results], [r.has_positives for r in results]
        ) + abs(beta) * present_mean(
            [abs(float(r.repulsion.detach())) for r in results], [r.has_negatives for r in results]
        )
        scale = torch.tensor(parts, dtype=torch.float64)
    else:
        scale = reduce(
            [abs(alpha) * r.attraction.abs() + abs(beta) * r.repulsion.abs() for r in results],
            reduction,
        )
    rtol = RTOL[impl]
    floor = cost_floor([case.query, case.positive, case.negatives], opts)
    weight = abs(alpha) + abs(beta)
    assert_close_rel(loss, expected, rtol=rtol, what="loss", scale=scale, atol=weight * floor)
    if details:
        check_details(out, results, reduction, opts, rtol, floor)
    check_gradients(case, (q, p, n), loss, expected, reduction, opts, rtol)


def check_details(
    out: Any, results: list[Any], reduction: str, opts: dict[str, Any], rtol: float, floor: float
) -> None:
    """The attraction, repulsion, entropies and counts of a :class:`CCTDetails`."""
    unit = {**opts, "alpha": 1.0, "beta": 0.0}
    assert_close_rel(
        out.attraction,
        reduce_results(results, reduction, unit)
        if reduction == "mean"
        else reduce([r.attraction for r in results], reduction),
        rtol=rtol,
        what="attraction",
        atol=floor,
    )
    unit = {**opts, "alpha": 0.0, "beta": 1.0}
    assert_close_rel(
        out.repulsion,
        reduce_results(results, reduction, unit)
        if reduction == "mean"
        else reduce([r.repulsion for r in results], reduction),
        rtol=rtol,
        what="repulsion",
        atol=floor,
    )

    def stat(xs: list[float], flags: list[bool]) -> torch.Tensor:
        if reduction == "none":
            return torch.tensor(
                [x if f else 0.0 for x, f in zip(xs, flags, strict=True)], dtype=torch.float64
            )
        return torch.tensor(present_mean(xs, flags), dtype=torch.float64)

    has_pos = [r.has_positives for r in results]
    has_neg = [r.has_negatives for r in results]
    # Entropies are diagnostics in nats: an absolute tolerance (near-one-hot weights have an
    # entropy close to 0 whose relative error float32 cannot bound).
    for got_h, want_h in (
        (out.pos_entropy, stat([r.pos_entropy for r in results], has_pos)),
        (out.neg_entropy, stat([r.neg_entropy for r in results], has_neg)),
    ):
        torch.testing.assert_close(got_h.double(), want_h, rtol=1e-4, atol=1e-5)
    counts = (out.queries_with_positives, out.queries_with_negatives)
    if reduction == "none":
        assert counts[0].tolist() == has_pos and counts[1].tolist() == has_neg
    else:
        assert (int(counts[0]), int(counts[1])) == (sum(has_pos), sum(has_neg))


def check_gradients(
    case: Case,
    leaves: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    loss: torch.Tensor,
    expected: torch.Tensor,
    reduction: str,
    opts: dict[str, Any],
    rtol: float,
) -> None:
    """Gradients of ``loss`` against those of the float64 ``expected``; an ill-conditioned
    component is allowed a few times the error of the same loops in float32."""
    q, p, n = leaves
    rq, rp, rn = case.leaves(torch.float64)
    got = grads_of(loss, [q, p, n])
    want = grads_of(expected, [rq, rp, rn])
    for index, (name, g, w) in enumerate(
        zip(["query", "positive", "negatives"], got, want, strict=True)
    ):
        if w is None:
            continue
        assert g is not None
        try:
            assert_close_rel(g, w, rtol=rtol, what=f"grad {name}")
        except AssertionError:
            # Ill-conditioned? Measure the same loops in float32 and allow a few times that.
            fq, fp, fn = case.leaves(torch.float32)
            f32 = reference_queries(
                fq, fp, fn, compute_dtype=torch.float32, **case.call_options, **opts
            )
            f32_grad = grads_of(reduce_results(f32, reduction, opts), [fq, fp, fn])[index]
            assert f32_grad is not None
            assert_close_rel(
                g, w, rtol=rtol, what=f"grad {name}", conditioning=float32_error(w, f32_grad)
            )


@pytest.mark.parametrize("impl", IMPLS)
@given(case=cases(), chunk_size=st.one_of(st.none(), st.integers(1, 8)))
def test_matches_reference(impl: str, case: Case, chunk_size: int | None) -> None:
    """Values, gradients and diagnostics of every implementation against the reference.

    ``chunk_size`` from 1 to 8 against K up to 6 (in-batch up to 24): blocks that divide K,
    blocks that do not, and blocks larger than K.
    """
    check_against_reference(case, impl, chunk_size)


@pytest.mark.parametrize("impl", IMPLS)
@given(
    case=EVERY_LAYOUT,
    chunk_size=st.one_of(st.none(), st.integers(1, 8)),
)
def test_layouts_and_labels_match_reference(impl: str, case: Case, chunk_size: int | None) -> None:
    """The cross layout and labels (variable positives; queries without positives or
    negatives; explicit-negative labels) on every implementation: values, gradients,
    diagnostics."""
    check_against_reference(case, impl, chunk_size)


@pytest.mark.parametrize("impl", IMPLS)
@given(
    case=EVERY_LAYOUT,
)
def test_loss_without_details_matches_reference(impl: str, case: Case) -> None:
    """The plain loss (no diagnostics): dense's moments path, which forms no cost matrix and
    takes ``E`` from ``|q|^2 + pi |n|^2 - 2 q.(pi n)``, and the other paths as called by
    training code."""
    check_against_reference(case, impl, details=False)


@given(case=cases(), seed=st.integers(0, 100))
def test_weights_match_reference_shared_and_per_query(case: Case, seed: int) -> None:
    if case.negatives is None:
        return
    opts = dict(case.options)
    opts.pop("reduction")
    out = cct_loss(
        case.query.float(),
        case.positive.float(),
        case.negatives.float(),
        impl="dense",
        return_details="weights",
        **opts,
    )
    results = reference_queries(case.query, case.positive, case.negatives, **opts)
    assert out.pos_weights is not None and out.neg_weights is not None
    assert_close_rel(
        out.pos_weights, torch.stack([torch.stack(r.pos_weights) for r in results]), rtol=1e-4
    )
    assert_close_rel(
        out.neg_weights, torch.stack([torch.stack(r.neg_weights) for r in results]), rtol=1e-4
    )


def test_in_batch_weight_layout() -> None:
    """In-batch neg_weights is (Q, Q) with zeros on same-instance columns, in view-major order."""
    g = seeded(3)
    z1, z2, z3 = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    out = cct_loss(z1, torch.stack([z2, z3], 1), t_neg=1.7, return_details="weights")
    results = reference_queries(z1, torch.stack([z2, z3], 1), t_neg=1.7)
    n, views = 4, 3
    assert out.neg_weights is not None and out.pos_weights is not None
    for r, res in enumerate(results):
        i = r % n
        cols = [w * n + j for w in range(views) for j in range(n) if j != i]
        same = [w * n + i for w in range(views)]
        torch.testing.assert_close(out.neg_weights[r, cols], torch.stack(res.neg_weights))
        assert torch.all(out.neg_weights[r, same] == 0)
        torch.testing.assert_close(out.pos_weights[r], torch.stack(res.pos_weights))


@pytest.mark.parametrize("impl", IMPLS)
@given(case=cases())
def test_accuracy_matches_reference(impl: str, case: Case) -> None:
    opts = dict(case.options)
    opts.pop("reduction")
    q, p = case.query.double(), case.positive.double()
    n = None if case.negatives is None else case.negatives.double()
    out = cct_loss(q, p, n, impl=impl, reduction="none", return_details=True, **opts)
    results = reference_queries(q, p, n, **opts)
    assert out.accuracy.tolist() == [r.correct for r in results]
