"""The cross layout and labels beyond the property tests: what they never allocate, the official
ImageNet-1K objective, the supervised calls, 0-dim tensor options and the modules' attributes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch._dynamo.testing

from cct_loss import CCTLoss, CCTMultiviewLoss, cct_loss, cct_loss_multiview

from .helpers import IMPLS, LargestTensor, impl_options, random_embeddings
from .reference import reference_loss, reference_multiview, unit


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["all", "cross"])
@pytest.mark.parametrize("labelled", [False, True])
def test_never_forms_an_n_by_n_by_d_tensor(impl: str, layout: str, labelled: bool) -> None:
    """Forward and backward of the cross layout and of labels stay below N x N x D: dense and
    sdpa hold a few Q x K matrices, chunked not even those (blocks of Q x chunk)."""
    n, m, d = 48, 2, 64
    q = torch.randn(n, d, requires_grad=True)
    k = torch.randn(n, m, d, requires_grad=True)
    labels = torch.arange(n) % 5 if labelled else None
    mode = LargestTensor()
    with mode:
        loss = cct_loss(
            q, k, layout=layout, labels=labels, **impl_options(impl, 16), detach_weights=False
        )
        loss.backward()
    assert mode.largest < n * (n - 1) * d // 4, f"{impl}: a tensor of {mode.largest} elements"
    if impl == "chunked":  # linear in N: the same-row positives (V N, V - 1, D), or a block
        queries = n if layout == "cross" else (m + 1) * n
        linear = (m + 1) * n * m * d
        assert mode.largest <= max(linear, queries * 16), f"chunked held {mode.largest}"


def test_moco_v3_obvious_attempt_differs_and_cross_is_right() -> None:
    """``cct_loss(q1, k2, k2)`` counts each query's own positive among its negatives: refused;
    the cross layout is the objective written from docs/specification.md, section 3."""
    q1, k2 = random_embeddings((6, 8), 1), random_embeddings((6, 8), 2)
    with pytest.raises(ValueError, match="layout='cross'"):
        cct_loss(q1, k2, k2)
    got = cct_loss(q1, k2, layout="cross", t_neg=2.0)
    want = reference_loss(q1, k2, layout="cross", t_neg=2.0)
    torch.testing.assert_close(got, want)


def official_imagenet_objective(
    q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, temperature: float
) -> torch.Tensor:
    """docs/specification.md (section 3, the ImageNet-1K objective) with explicit loops: for each key view i and the other query view j,
    per row n, ca_n = 1 - q_j[n].k_i[n], cr_n = -sum_m softmax_m(-c_nm / T) c_nm over the other
    rows m (weights detached); summed over rows, averaged over the two key views."""
    total = torch.zeros((), dtype=torch.float64)
    for q, k in ((q2, k1), (q1, k2)):
        qs = [unit(r) for r in q]
        ks = [unit(r).detach() for r in k]  # momentum keys: no gradient
        for n in range(len(qs)):
            ca = 1.0 - (qs[n] * ks[n]).sum()
            costs = [1.0 - (qs[n] * ks[m]).sum() for m in range(len(ks)) if m != n]
            logits = [-(c.detach()) / temperature for c in costs]
            top = max(float(x) for x in logits)
            weights = [torch.exp(x - top) for x in logits]
            z = sum(weights)
            cr = -sum(w / z * c for w, c in zip(weights, costs, strict=True))
            total = total + ca + cr
    return total / 2


def test_official_imagenet_objective_is_two_cross_calls() -> None:
    """docs/specification.md (section 3, the ImageNet-1K objective): (cct_loss(q2, k1, ...) + cct_loss(q1, k2, ...)) / 2 with the cross layout, cosine
    cost, t_neg = 1/T, reduction "sum": values and gradients."""
    temperature = 0.2
    q1 = random_embeddings((7, 5), 10).requires_grad_()
    q2 = random_embeddings((7, 5), 11).requires_grad_()
    k1, k2 = random_embeddings((7, 5), 12), random_embeddings((7, 5), 13)
    opts: dict[str, Any] = dict(
        layout="cross", cost="cosine", t_neg=1 / temperature, reduction="sum"
    )
    got = (cct_loss(q2, k1, **opts) + cct_loss(q1, k2, **opts)) / 2
    want = official_imagenet_objective(q1, q2, k1, k2, temperature)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(got, (q1, q2))
    wants = torch.autograd.grad(want, (q1, q2))
    for g, w in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_supervised_calls_agree(impl: str) -> None:
    """The metric-learning call (one view), SupCon with two views, and the pair form."""
    z1, z2 = random_embeddings((9, 6), 3), random_embeddings((9, 6), 4)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0, 2, 4])  # 3 and 4 are seen once
    one_view = cct_loss_multiview([z1], labels=labels, impl=impl, t_neg=2.0)
    torch.testing.assert_close(one_view, reference_multiview([z1], labels=labels, t_neg=2.0))
    two_views = cct_loss_multiview([z1, z2], labels=labels, impl=impl, t_neg=2.0)
    torch.testing.assert_close(two_views, reference_multiview([z1, z2], labels=labels, t_neg=2.0))
    pair = cct_loss(z1, z2, labels=labels, impl=impl, t_neg=2.0)
    torch.testing.assert_close(pair, two_views)


def test_a_label_seen_once_has_no_attraction_and_counts_are_reported() -> None:
    z = random_embeddings((4, 3), 5)
    out = cct_loss_multiview(
        [z], labels=torch.tensor([0, 0, 1, 2]), reduction="none", return_details=True
    )
    assert out.queries_with_positives.tolist() == [True, True, False, False]
    assert out.attraction[2:].tolist() == [0.0, 0.0]
    mean = cct_loss_multiview([z], labels=torch.tensor([0, 0, 1, 2]), return_details=True)
    assert int(mean.queries_with_positives) == 2 and int(mean.queries_with_negatives) == 4


@pytest.mark.parametrize("impl", IMPLS)
def test_terms_no_query_has_are_zero_not_nan(impl: str) -> None:
    z = torch.randn(5, 4, requires_grad=True)
    distinct = cct_loss_multiview([z], labels=torch.arange(5), impl=impl, return_details=True)
    assert distinct.attraction.item() == 0.0 and torch.isfinite(distinct.loss)
    same = cct_loss_multiview([z], labels=torch.zeros(5, dtype=torch.long), impl=impl)
    detailed = cct_loss_multiview(
        [z], labels=torch.zeros(5, dtype=torch.long), impl=impl, return_details=True
    )
    assert detailed.repulsion.item() == 0.0 and torch.isfinite(same)
    same.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["all", "cross"])
def test_tensor_options_equal_numbers(impl: str, layout: str) -> None:
    q, k = random_embeddings((6, 5), 6).float(), random_embeddings((6, 2, 5), 7).float()
    numbers: dict[str, Any] = dict(t_pos=1.5, t_neg=3.0, alpha=0.7, beta=1.3)
    tensors: dict[str, Any] = {name: torch.tensor(value) for name, value in numbers.items()}
    for detach in (True, False):
        a = cct_loss(q, k, layout=layout, impl=impl, detach_weights=detach, **numbers)
        b = cct_loss(q, k, layout=layout, impl=impl, detach_weights=detach, **tensors)
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_changing_a_tensor_sharpness_does_not_recompile(impl: str) -> None:
    counter = torch._dynamo.testing.CompileCounter()
    q, k = torch.randn(8, 4), torch.randn(8, 4)

    @torch.compile(backend=counter, fullgraph=True)
    def step(t_neg: torch.Tensor) -> torch.Tensor:
        out = cct_loss(q, k, t_neg=t_neg, **impl_options(impl, 4))
        assert isinstance(out, torch.Tensor)
        return out

    for value in (2.0, 3.0, 0.5, 7.0):
        t = torch.tensor(value)
        torch.testing.assert_close(step(t), cct_loss(q, k, t_neg=value, impl=impl))
    assert counter.frame_count == 1


def test_module_options_take_effect_and_state_dict_does_not_change() -> None:
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    crit = CCTLoss(t_neg=2.0)
    before = dict(crit.state_dict())
    crit.t_neg = 5.0
    torch.testing.assert_close(crit(q, k), cct_loss(q, k, t_neg=5.0))
    crit.t_neg = torch.tensor(0.5)
    torch.testing.assert_close(crit(q, k), cct_loss(q, k, t_neg=0.5))
    crit.layout = "cross"
    torch.testing.assert_close(crit(q, k), cct_loss(q, k, t_neg=0.5, layout="cross"))
    assert dict(crit.state_dict()) == before == {}
    with pytest.raises(ValueError, match="t_neg must be a finite number >= 0"):
        crit.t_neg = -1.0
    assert crit.t_neg is not None and float(crit.t_neg) == 0.5  # the failed set left it alone
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    multi = CCTMultiviewLoss(t_neg=2.0)
    torch.testing.assert_close(
        multi([q, k], labels), cct_loss_multiview([q, k], labels=labels, t_neg=2.0)
    )
    torch.testing.assert_close(
        crit(q, k, labels=labels), cct_loss(q, k, labels=labels, t_neg=0.5, layout="cross")
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("labels", [[3, 3, 3, 3], [0, 1, 2, 0]])
def test_gradients_of_queries_without_keys(impl: str, detach: bool, labels: list[int]) -> None:
    """Queries with no negatives (all labels equal) or no positives (a label seen once, one
    view), unnormalised so that no projection hides a wrong radial gradient."""
    z = random_embeddings((4, 3), 60).requires_grad_()
    y = torch.tensor(labels)
    opts: dict[str, Any] = dict(t_neg=1.7, t_pos=0.8, normalize=False, detach_weights=detach)
    got = cct_loss_multiview([z.float()], labels=y, **impl_options(impl), **opts)
    want = reference_multiview([z], labels=y, **opts)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, z)
    (g_want,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
