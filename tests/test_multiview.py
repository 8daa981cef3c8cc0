"""cct_loss_multiview: layout "all" equals the symmetric call; "paper" equals the official objective."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cct_loss import CCTMultiviewLoss, cct_loss, cct_loss_multiview

from .helpers import assert_close_rel, finite_floats, float32_error, random_embeddings, seeded
from .reference import reference_paper


@given(
    v=st.integers(2, 5),
    n=st.integers(2, 5),
    seed=st.integers(0, 10_000),
    detach=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    as_tuple=st.booleans(),
)
def test_layout_all_is_the_symmetric_call(
    v: int, n: int, seed: int, detach: bool, reduction: str, as_tuple: bool
) -> None:
    views = [random_embeddings((n, 6), seed + i).float() for i in range(v)]
    got = cct_loss_multiview(
        tuple(views) if as_tuple else views,
        t_neg=0.9,
        detach_weights=detach,
        reduction=reduction,
    )
    want = cct_loss(
        views[0],
        torch.stack(views[1:], dim=1),
        t_neg=0.9,
        detach_weights=detach,
        reduction=reduction,
    )
    torch.testing.assert_close(got, want)


@given(
    v=st.integers(2, 5),
    n=st.integers(2, 5),
    d=st.integers(2, 6),
    seed=st.integers(0, 10_000),
    t_pos=finite_floats(0.0, 10.0),
    t_neg=finite_floats(0.0, 10.0),
    alpha=finite_floats(0.1, 2.0),
    beta=finite_floats(0.1, 2.0),
    detach=st.booleans(),
    cost=st.sampled_from(["sqeuclidean", "cosine"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_paper_layout_matches_official_objective(
    v: int,
    n: int,
    d: int,
    seed: int,
    t_pos: float,
    t_neg: float,
    alpha: float,
    beta: float,
    detach: bool,
    cost: str,
    reduction: str,
) -> None:
    views64 = [random_embeddings((n, d), seed + i).requires_grad_() for i in range(v)]
    views32 = [x.detach().float().requires_grad_() for x in views64]
    opts: dict[str, Any] = dict(
        t_pos=t_pos,
        t_neg=t_neg,
        alpha=alpha,
        beta=beta,
        cost=cost,
        detach_weights=detach,
        reduction=reduction,
    )
    got = cct_loss_multiview(views32, layout="paper", **opts)
    want = reference_paper(views64, **opts)
    assert_close_rel(got, want, what="paper loss", scale=want.abs() + 4 * (alpha + beta))
    weights = torch.rand(want.shape, generator=seeded(seed), dtype=torch.float64) + 0.5
    g32 = torch.autograd.grad((got * weights.float()).sum(), views32)
    g64 = torch.autograd.grad((want * weights).sum(), views64)
    # The reference loops in float32: how well conditioned each gradient entry is.
    loops32 = [x.detach().float().requires_grad_() for x in views64]
    ref32 = reference_paper(loops32, compute_dtype=torch.float32, **opts)
    g_loops32 = torch.autograd.grad((ref32 * weights.float()).sum(), loops32)
    for a, b, c in zip(g32, g64, g_loops32, strict=True):
        assert_close_rel(a, b, what="paper grad", conditioning=float32_error(b, c))


def test_paper_layout_reproduces_paper_setting() -> None:
    """CIFAR-10 setting of the official scripts: 5 views, t_pos 1, t_neg 0.9, no detach."""
    views = [random_embeddings((16, 32), 100 + i).float() for i in range(5)]
    got = cct_loss_multiview(views, layout="paper", t_pos=1.0, t_neg=0.9, detach_weights=False)
    want = reference_paper([x.double() for x in views], t_pos=1.0, t_neg=0.9, detach_weights=False)
    assert_close_rel(got, want)


def test_paper_details_shapes_and_identity() -> None:
    views = list(torch.randn(4, 6, 8))
    out = cct_loss_multiview(views, layout="paper", return_details="weights", alpha=2.0, beta=0.5)
    torch.testing.assert_close(out.loss, 2.0 * out.attraction + 0.5 * out.repulsion)
    assert out.pos_weights is not None and out.pos_weights.shape == (4, 6, 3)
    assert out.neg_weights is not None and out.neg_weights.shape == (6, 6, 6)
    assert torch.all(out.neg_weights.diagonal(dim1=1, dim2=2) == 0)
    torch.testing.assert_close(out.neg_weights.sum(-1), torch.ones(6, 6))
    assert 0.0 <= out.accuracy.item() <= 1.0
    none = cct_loss_multiview(views, layout="paper", reduction="none")
    assert none.shape == (6,)


@pytest.mark.parametrize("layout", ["all", "paper"])
def test_module_delegates(layout: str) -> None:
    views = [torch.randn(5, 4) for _ in range(3)]
    module = CCTMultiviewLoss(layout=layout, t_neg=2.0)
    torch.testing.assert_close(module(views), cct_loss_multiview(views, layout=layout, t_neg=2.0))
    assert f"layout='{layout}'" in repr(module)
