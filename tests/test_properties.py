"""Exact and limiting cases of the formula, invariances and bounds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cct_loss import cct_loss

from .helpers import Case, cases, impl_options, random_embeddings, seeded

#: The properties hold with and without the per-call shortcuts (each test runs both ways).
pytestmark = pytest.mark.usefixtures("both_shortcut_settings")


def test_closed_form_one_positive_one_negative() -> None:
    """q = e1, p = e2, n = -e1 on the sphere: d+ = 2, d- = 4, loss = 2 - 4."""
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.0, 1.0]])
    n = torch.tensor([[-1.0, 0.0]])
    out = cct_loss(q, p, n, return_details=True)
    assert out.attraction.item() == pytest.approx(2.0)
    assert out.repulsion.item() == pytest.approx(-4.0)
    assert out.loss.item() == pytest.approx(-2.0)
    half = cct_loss(q, p, n, cost="cosine", return_details=True)
    assert half.loss.item() == pytest.approx(-1.0)


def test_closed_form_two_negatives() -> None:
    """Two negatives at costs 2 and 4: weights e^{-2t}, e^{-4t} normalised."""
    t = 0.7
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    n = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    w2 = math.exp(-2 * t) / (math.exp(-2 * t) + math.exp(-4 * t))
    expected = -(w2 * 2 + (1 - w2) * 4)
    assert cct_loss(q, p, n, t_neg=t).item() == pytest.approx(expected, rel=1e-12)


def test_simclr_collinear_views() -> None:
    """z1 = z2 (perfect alignment), rows orthogonal: attraction 0, every negative at cost 2."""
    z = torch.eye(4)
    out = cct_loss(z, z.clone(), return_details=True)
    assert out.attraction.item() == pytest.approx(0.0, abs=1e-7)
    assert out.repulsion.item() == pytest.approx(-2.0)
    assert out.accuracy.item() == 1.0


@given(case=cases())
def test_zero_sharpness_gives_uniform_weights(case: Case) -> None:
    opts = {**case.options, "t_pos": 0.0, "t_neg": 0.0, "reduction": "none"}
    out = cct_loss(case.query, case.positive, case.negatives, return_details="weights", **opts)
    assert out.pos_weights is not None and out.neg_weights is not None
    m = out.pos_weights.shape[1]
    torch.testing.assert_close(out.pos_weights, torch.full_like(out.pos_weights, 1.0 / m))
    nonzero = out.neg_weights > 0
    counts = nonzero.sum(-1, keepdim=True).double()
    torch.testing.assert_close(out.neg_weights, nonzero.double() / counts)


@given(seed=st.integers(0, 10_000), n=st.integers(1, 5), k=st.integers(2, 8))
def test_large_t_neg_selects_nearest_negative(seed: int, n: int, k: int) -> None:
    q = random_embeddings((n, 4), seed)
    p = random_embeddings((n, 4), seed + 1)
    neg = random_embeddings((k, 4), seed + 2)
    out = cct_loss(q, p, neg, t_neg=1e4, return_details=True, reduction="none")
    costs = (
        torch.cdist(
            torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(neg, dim=-1)
        )
        ** 2
    )
    torch.testing.assert_close(out.repulsion, -costs.min(-1).values)
    assert torch.isfinite(out.loss).all()


@given(seed=st.integers(0, 10_000), n=st.integers(1, 5), m=st.integers(2, 4))
def test_large_t_pos_selects_farthest_positive(seed: int, n: int, m: int) -> None:
    q = random_embeddings((n, 4), seed)
    p = random_embeddings((n, m, 4), seed + 1)
    neg = random_embeddings((3, 4), seed + 2)
    out = cct_loss(q, p, neg, t_pos=1e4, return_details=True, reduction="none")
    qn = torch.nn.functional.normalize(q, dim=-1)
    pn = torch.nn.functional.normalize(p, dim=-1)
    costs = ((qn[:, None] - pn) ** 2).sum(-1)
    torch.testing.assert_close(out.attraction, costs.max(-1).values)


@given(case=cases(modes=("shared", "per_query")))
def test_single_positive_attraction_is_plain_cost(case: Case) -> None:
    pos = case.positive.unsqueeze(1) if case.positive.dim() == 2 else case.positive[:, :1]
    opts = {**case.options, "reduction": "none"}
    out = cct_loss(case.query, pos, case.negatives, return_details=True, **opts)
    q, p = case.query, pos[:, 0]
    if case.options["normalize"] or case.options["cost"] == "cosine":
        q, p = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(p, dim=-1)
    plain = ((q - p) ** 2).sum(-1)
    if case.options["cost"] == "cosine":
        plain = plain / 2
    torch.testing.assert_close(out.attraction, plain)


@given(case=cases(), seed=st.integers(0, 1000))
def test_invariant_to_permuting_negatives(case: Case, seed: int) -> None:
    if case.negatives is None:
        return
    g = seeded(seed)
    k_dim = case.negatives.dim() - 2
    perm = torch.randperm(case.negatives.shape[k_dim], generator=g)
    permuted = case.negatives[perm] if k_dim == 0 else case.negatives[:, perm]
    a = cct_loss(case.query, case.positive, case.negatives, **case.options)
    b = cct_loss(case.query, case.positive, permuted, **case.options)
    torch.testing.assert_close(a, b)


@given(case=cases(), seed=st.integers(0, 1000))
def test_equivariant_to_permuting_batch_rows(case: Case, seed: int) -> None:
    g = seeded(seed)
    n = case.query.shape[0]
    perm = torch.randperm(n, generator=g)
    neg = case.negatives
    if neg is not None and neg.dim() == 3:
        neg = neg[perm]
    opts = {**case.options, "reduction": "none"}
    a = cct_loss(case.query, case.positive, case.negatives, **opts)
    b = cct_loss(case.query[perm], case.positive[perm], neg, **opts)
    # "none" is view-major: (views, N) for in-batch, (1, N) otherwise.
    torch.testing.assert_close(a.view(-1, n)[:, perm], b.view(-1, n))


@given(case=cases(), seed=st.integers(0, 1000))
def test_invariant_to_rotating_every_embedding(case: Case, seed: int) -> None:
    d = case.query.shape[-1]
    g = seeded(seed)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    neg = None if case.negatives is None else case.negatives @ rotation
    a = cct_loss(case.query, case.positive, case.negatives, **case.options)
    b = cct_loss(case.query @ rotation, case.positive @ rotation, neg, **case.options)
    torch.testing.assert_close(a, b)


@given(case=cases())
def test_bounds_on_the_sphere(case: Case) -> None:
    opts = {**case.options, "normalize": True, "cost": "sqeuclidean", "reduction": "none"}
    out = cct_loss(case.query, case.positive, case.negatives, return_details=True, **opts)
    eps = 1e-12
    assert bool(((out.attraction >= -eps) & (out.attraction <= 4 + eps)).all())
    assert bool(((out.repulsion >= -4 - eps) & (out.repulsion <= eps)).all())


def test_alpha_beta_do_not_enter_the_weights() -> None:
    q, p, n = (
        random_embeddings((4, 3), 0),
        random_embeddings((4, 3), 1),
        random_embeddings((6, 3), 2),
    )
    base = cct_loss(q, p, n, t_neg=2.0, return_details="weights")
    scaled = cct_loss(q, p, n, t_neg=2.0, alpha=3.0, beta=-0.5, return_details="weights")
    torch.testing.assert_close(base.neg_weights, scaled.neg_weights)
    torch.testing.assert_close(scaled.loss, 3.0 * base.attraction - 0.5 * base.repulsion)


@pytest.mark.parametrize("negatives_shape", [None, (5, 3), (4, 5, 3)])
def test_zero_vectors_give_finite_values_and_gradients(
    negatives_shape: tuple[int, ...] | None,
) -> None:
    q = torch.zeros(4, 3, requires_grad=True)
    p = torch.zeros(4, 2, 3, requires_grad=True)
    n = None if negatives_shape is None else torch.zeros(negatives_shape, requires_grad=True)
    for detach in (True, False):
        loss = cct_loss(q, p, n, detach_weights=detach)
        loss.backward()
        assert torch.isfinite(loss)
        for x in (q, p, n):
            if x is not None:
                assert x.grad is not None and torch.isfinite(x.grad).all()
                x.grad = None


@pytest.mark.parametrize("t", [1e2, 1e3, 1e4])
@pytest.mark.parametrize("detach", [True, False])
def test_large_sharpness_is_finite(t: float, detach: bool) -> None:
    g = seeded(0)
    q = torch.randn(6, 8, generator=g, requires_grad=True)
    p = torch.randn(6, 3, 8, generator=g, requires_grad=True)
    for n in (None, torch.randn(32, 8, generator=g)):
        loss = cct_loss(q, p, n, t_pos=t, t_neg=t, detach_weights=detach, normalize=False)
        loss.backward()
        assert torch.isfinite(loss)
        assert q.grad is not None and torch.isfinite(q.grad).all()
        q.grad = None


@given(seed=st.integers(0, 1000), cost=st.sampled_from(["sqeuclidean", "cosine"]))
def test_detached_repulsion_gradient_is_softmin_gradient(seed: int, cost: str) -> None:
    """docs/specification.md, section 2: with detached weights, grad of repulsion = grad of (1/t) log sum exp(-t d)."""
    t = 1.3
    q = random_embeddings((3, 4), seed).requires_grad_()
    p = random_embeddings((3, 4), seed + 1)
    n = random_embeddings((5, 4), seed + 2)
    out = cct_loss(q, p, n, t_neg=t, alpha=0.0, cost=cost, reduction="sum")
    (grad,) = torch.autograd.grad(out, q)
    qn = torch.nn.functional.normalize(q, dim=-1)
    nn_ = torch.nn.functional.normalize(n, dim=-1)
    d = ((qn[:, None] - nn_) ** 2).sum(-1)
    if cost == "cosine":
        d = d / 2
    softmin = (torch.logsumexp(-t * d, dim=-1) / t).sum()
    (want,) = torch.autograd.grad(softmin, q)
    torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("impl", ["dense", "chunked", "sdpa"])
@pytest.mark.parametrize("mode", ["in_batch", "shared", "per_query"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("cost", ["sqeuclidean", "cosine"])
def test_gradcheck_float64(impl: str, mode: str, normalize: bool, cost: str) -> None:
    """The true derivative (detach_weights=False) of every implementation (chunked with blocks
    of 2 keys). Detached weights are checked against the reference instead: their backward is by
    design not the derivative of the forward."""
    g = seeded(7)
    q = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.randn(3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    inputs = [q, p]
    if mode == "shared":
        inputs.append(torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True))
    elif mode == "per_query":
        inputs.append(torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True))

    def fn(*xs: torch.Tensor) -> torch.Tensor:
        out = cct_loss(
            *xs,
            t_pos=1.3,
            t_neg=2.1,
            alpha=0.7,
            beta=1.1,
            detach_weights=False,
            normalize=normalize,
            cost=cost,
            reduction="none",
            **impl_options(impl, 2),
        )
        assert isinstance(out, torch.Tensor)
        return out

    assert torch.autograd.gradcheck(fn, tuple(inputs))
