"""The autograd contract: higher-order derivatives are exact or refused with a clear error, the
torch.func transforms work, and sdpa keeps its accuracy at every accepted sharpness."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch.func import grad, vmap

from cct_loss import cct_loss
from cct_loss.implementations.sdpa import SDPA_MAX_SHARPNESS, serves
from cct_loss.options import CCTOptions

from .helpers import IMPLS, TEST_DEVICE, impl_options, random_embeddings, seeded
from .reference import reference_loss

#: Call shapes: (layout, negatives, labels) on (N=4, D=3) queries and (N, 2, D) positives.
CALLS = ["in_batch", "shared", "per_query", "cross", "cross_queue", "labels", "cross_labels"]
EXACT_TO_ANY_ORDER = {"dense", "chunked"}


def ours(xs: Sequence[torch.Tensor], **kwargs: Any) -> torch.Tensor:
    """``cct_loss`` on (query, positive[, negatives])."""
    out = cct_loss(xs[0], xs[1], xs[2] if len(xs) > 2 else None, **kwargs)
    assert isinstance(out, torch.Tensor)
    return out


def reference(xs: Sequence[torch.Tensor], **kwargs: Any) -> torch.Tensor:
    return reference_loss(xs[0], xs[1], xs[2] if len(xs) > 2 else None, **kwargs)


def call_inputs(call: str) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """float64 leaves (query, positive[, negatives]) and the call's keywords."""
    q = random_embeddings((4, 3), 21).requires_grad_()
    p = random_embeddings((4, 2, 3), 22).requires_grad_()
    leaves = [q, p]
    kwargs: dict[str, Any] = {}
    if call in ("shared", "cross_queue"):
        leaves.append(random_embeddings((5, 3), 23).requires_grad_())
    if call == "per_query":
        leaves.append(random_embeddings((4, 5, 3), 23).requires_grad_())
    if call.startswith("cross"):
        kwargs["layout"] = "cross"
    if call.endswith("labels"):
        kwargs["labels"] = torch.tensor([0, 1, 0, 2])
    return leaves, kwargs


def hessian_vector_products(
    loss_of: Any, leaves: list[torch.Tensor], seed: int = 0
) -> list[torch.Tensor]:
    """d/dx of <grad loss, v> for a fixed random v: a backward through a create_graph gradient."""
    loss = loss_of(*leaves)
    g = seeded(seed)
    weights = torch.rand(loss.shape, generator=g, dtype=loss.dtype) + 0.5
    grads = torch.autograd.grad((loss * weights).sum(), leaves, create_graph=True)
    directions = [torch.randn(x.shape, generator=g, dtype=x.dtype) for x in leaves]
    inner = sum((gr * v).sum() for gr, v in zip(grads, directions, strict=True))
    assert isinstance(inner, torch.Tensor)
    return list(torch.autograd.grad(inner, leaves, allow_unused=True, materialize_grads=True))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("detach", [True, False])
def test_second_derivatives_are_exact_or_refused(impl: str, call: str, detach: bool) -> None:
    """Against plain autograd through the float64 loop reference (which detaches the weights the
    same way): Hessian-vector products of every implementation, both detach settings."""
    leaves, kwargs = call_inputs(call)
    opts: dict[str, Any] = dict(t_pos=1.3, t_neg=2.1, detach_weights=detach, reduction="none")

    def fast(*xs: torch.Tensor) -> torch.Tensor:
        return ours(xs, **impl_options(impl, 2), **kwargs, **opts)

    def slow(*xs: torch.Tensor) -> torch.Tensor:
        return reference(xs, **kwargs, **opts)

    if impl not in EXACT_TO_ANY_ORDER:
        with pytest.raises(RuntimeError, match=r"impl='sdpa' has no higher-order.*impl='dense'"):
            hessian_vector_products(fast, leaves)
        return
    got = hessian_vector_products(fast, leaves)
    want = hessian_vector_products(slow, [x.detach().requires_grad_() for x in leaves])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("impl", sorted(EXACT_TO_ANY_ORDER))
@pytest.mark.parametrize("call", ["in_batch", "shared", "cross_labels"])
def test_gradgradcheck_through_the_weights(impl: str, call: str) -> None:
    leaves, kwargs = call_inputs(call)

    def fn(*xs: torch.Tensor) -> torch.Tensor:
        return ours(
            xs,
            **impl_options(impl, 2),
            t_pos=1.3,
            t_neg=2.1,
            detach_weights=False,
            reduction="none",
            **kwargs,
        )

    assert torch.autograd.gradgradcheck(fn, tuple(leaves))


@pytest.mark.parametrize("impl", ["auto", *IMPLS])
@pytest.mark.parametrize("call", ["in_batch", "shared", "cross_labels"])
def test_torch_func_grad_and_vmap_match_eager(impl: str, call: str) -> None:
    leaves, kwargs = call_inputs(call)
    q, p, *rest = (x.detach().float() for x in leaves)
    neg = rest[0] if rest else None
    opts: dict[str, Any] = dict(**impl_options(impl, 2), t_neg=2.0, detach_weights=False)

    def loss_of_query(query: torch.Tensor) -> torch.Tensor:
        return ours([query, p, *rest], **kwargs, **opts)

    eager_q = q.clone().requires_grad_()
    (eager,) = torch.autograd.grad(loss_of_query(eager_q), eager_q)
    torch.testing.assert_close(grad(loss_of_query)(q), eager)

    batch = torch.stack([q, q.flip(0), 2 * q])  # a leading batch of independent problems
    positives = torch.stack([p, p.flip(0), p])
    per_problem = torch.stack(
        [ours([a, b, *rest], **kwargs, **opts) for a, b in zip(batch, positives, strict=True)]
    )
    mapped = vmap(lambda a, b: cct_loss(a, b, neg, **kwargs, **opts))(batch, positives)
    torch.testing.assert_close(mapped, per_problem)


@pytest.mark.parametrize("t", [100.0, 1e3, 1e4, 1e6])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_sdpa_holds_its_agreement_at_every_sharpness(t: float, as_tensor: bool) -> None:
    """Above SDPA_MAX_SHARPNESS (or for a tensor sharpness) sdpa hands gradients through the
    weights to chunked, so its documented 1e-4 holds at any t."""
    q64, p64, n64 = (random_embeddings(s, 30 + i) for i, s in enumerate([(6, 8), (6, 8), (40, 8)]))
    xs = [x.float().requires_grad_() for x in (q64, p64, n64)]
    sharp: Any = torch.tensor(t) if as_tensor else t
    loss = cct_loss(*xs, impl="sdpa", t_pos=sharp, t_neg=sharp, detach_weights=False)
    refs = [x.clone().requires_grad_() for x in (q64, p64, n64)]
    want = reference_loss(*refs, t_pos=t, t_neg=t, detach_weights=False)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    for g, w in zip(torch.autograd.grad(loss, xs), torch.autograd.grad(want, refs), strict=True):
        error = float((g.double() - w).abs().max() / w.abs().max())
        assert error < 1e-4, f"t={t}: relative gradient error {error:.1e}"


def test_sdpa_range_constant_is_where_it_still_holds() -> None:
    """At the documented limit of the device under test the fused kernels still hold 1e-4."""
    q64, p64, n64 = (random_embeddings(s, 40 + i) for i, s in enumerate([(6, 8), (6, 8), (40, 8)]))
    xs = [x.float().requires_grad_() for x in (q64, p64, n64)]
    t = SDPA_MAX_SHARPNESS.get(TEST_DEVICE.type, 0.0)
    assert t > 0, f"no sharpness range measured for {TEST_DEVICE.type}"
    loss = cct_loss(*xs, impl="sdpa", t_pos=t, t_neg=t, detach_weights=False)
    refs = [x.clone().requires_grad_() for x in (q64, p64, n64)]
    want = reference_loss(*refs, t_pos=t, t_neg=t, detach_weights=False)
    for g, w in zip(torch.autograd.grad(loss, xs), torch.autograd.grad(want, refs), strict=True):
        assert float((g.double() - w).abs().max() / w.abs().max()) < 1e-4


def test_sdpa_range_is_per_device_type() -> None:
    """Measured ranges only: a device type without a measurement keeps sdpa's own kernels for
    detached weights alone (gradients through the weights go to chunked at any sharpness)."""
    assert SDPA_MAX_SHARPNESS == {"cpu": 500.0, "cuda": 100.0}

    def through_weights(t: float | torch.Tensor) -> CCTOptions:
        return CCTOptions(t_pos=t, t_neg=t, detach_weights=False)

    for device_type, limit in (("cpu", 500.0), ("cuda", 100.0)):
        assert serves(device_type, "negatives", through_weights(limit))
        assert not serves(device_type, "negatives", through_weights(limit * 1.01))
        assert not serves(device_type, "positives", through_weights(limit * 1.01))
        assert not serves(device_type, "negatives", through_weights(torch.tensor(1.0)))
        assert serves(device_type, "negatives", CCTOptions(t_neg=1e6))  # detached: exact
    assert not serves("mps", "negatives", through_weights(0.5))
    assert serves("mps", "negatives", CCTOptions(t_neg=0.5))


def test_functional_call_and_grad_over_parameters() -> None:
    """The torch.func way of training: gradients of the loss over a model's parameters."""
    model = torch.nn.Linear(5, 4)
    x1, x2 = torch.randn(6, 5), torch.randn(6, 5)
    params = dict(model.named_parameters())

    def loss_of(p: dict[str, torch.Tensor]) -> torch.Tensor:
        z1 = torch.func.functional_call(model, p, (x1,))
        z2 = torch.func.functional_call(model, p, (x2,))
        return ours([z1, z2], t_neg=2.0, detach_weights=False)

    grads = grad(loss_of)({k: v.detach() for k, v in params.items()})
    ours([model(x1), model(x2)], t_neg=2.0, detach_weights=False).backward()
    for name, value in params.items():
        assert value.grad is not None
        torch.testing.assert_close(grads[name], value.grad)
