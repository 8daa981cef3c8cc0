"""The chunked and sdpa paths against the reference in float64 (block sizes, detached
backward, the paper layout, diagnostics), saved memory, and the auto rule.

(Their float64 gradcheck is with dense's in test_properties.py.)
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cct_loss import cct_loss, cct_loss_multiview
from cct_loss.implementations.chunked import default_chunk_size

from .helpers import impl_options, random_embeddings
from .reference import reference_loss, reference_paper, reference_queries

MODES = ["in_batch", "shared", "per_query"]
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def inputs(
    mode: str, n: int = 5, m: int = 2, k: int = 10, d: int = 6, requires_grad: bool = True
) -> Inputs:
    q = random_embeddings((n, d), 11).requires_grad_(requires_grad)
    p = random_embeddings((n, m, d), 12).requires_grad_(requires_grad)
    neg = None
    if mode == "shared":
        neg = random_embeddings((k, d), 13).requires_grad_(requires_grad)
    elif mode == "per_query":
        neg = random_embeddings((n, k, d), 13).requires_grad_(requires_grad)
    return q, p, neg


def weighted_grads(loss: torch.Tensor, xs: Inputs) -> list[torch.Tensor]:
    """Gradients of a fixed weighting of per-query losses (so every query's gradient counts)."""
    present = [x for x in xs if x is not None]
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype)
    return list(torch.autograd.grad((loss * weights).sum(), present))


def assert_matches_reference(xs: Inputs, **opts: Any) -> None:
    """float64 implementation against the float64 loop reference: values and gradients."""
    impl_opts = {k: opts.pop(k) for k in ("impl", "chunk_size") if k in opts}
    got = cct_loss(xs[0], xs[1], xs[2], reduction="none", **impl_opts, **opts)
    want = reference_loss(xs[0], xs[1], xs[2], reduction="none", **opts)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, w in zip(weighted_grads(got, xs), weighted_grads(want, xs), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 10, 11, 64, None])
def test_chunk_sizes_match_reference(mode: str, detach: bool, chunk_size: int | None) -> None:
    """Blocks that divide K, that do not, K < chunk_size, chunk_size = 1: the reference's values
    and gradients (float64, tight)."""
    assert_matches_reference(
        inputs(mode),
        impl="chunked",
        chunk_size=chunk_size,
        t_pos=1.5,
        t_neg=3.0,
        detach_weights=detach,
    )


@pytest.mark.parametrize("impl", ["dense", "sdpa"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("detach", [True, False])
def test_dense_and_sdpa_match_reference_float64(impl: str, mode: str, detach: bool) -> None:
    """In float64 every implementation meets the reference far below the float32 tolerances;
    detach_weights=True has no gradcheck (its backward is not the forward's derivative), so this
    is where its gradient is pinned tightly."""
    assert_matches_reference(inputs(mode), impl=impl, t_pos=1.5, t_neg=2.0, detach_weights=detach)


@pytest.mark.parametrize("mode", ["in_batch", "shared"])
def test_chunked_saves_no_query_by_key_tensor(mode: str) -> None:
    """Bytes saved for backward stay O(N D + K D): no (N, K) tensor is kept alive."""
    n, k, d = 256, 8192, 4
    q = torch.randn(n, d, requires_grad=True)
    p = torch.randn(n, d, requires_grad=True)
    neg = torch.randn(k, d, requires_grad=True) if mode == "shared" else None
    num_queries = 2 * n if mode == "in_batch" else n
    num_keys = 2 * n if mode == "in_batch" else k
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = cct_loss(q, p, neg, impl="chunked", chunk_size=512, t_neg=2.0, detach_weights=False)
    loss.backward()
    largest = max(t.numel() for t in saved)
    total_bytes = sum(t.numel() * t.element_size() for t in saved)
    linear_bytes = (num_queries + num_keys) * d * 4
    assert largest < num_queries * num_keys // 8, f"a saved tensor has {largest} elements"
    assert total_bytes <= 16 * linear_bytes, (
        f"saved {total_bytes} bytes, linear size {linear_bytes}"
    )


@pytest.mark.parametrize("impl", ["dense", "chunked", "sdpa"])
def test_paper_layout_with_every_impl(impl: str) -> None:
    views = random_embeddings((4, 6, 5), 5).requires_grad_()
    got = cct_loss_multiview(
        list(views), layout="paper", **impl_options(impl, 4), t_neg=0.9, detach_weights=False
    )
    want = reference_paper(list(views), t_neg=0.9, detach_weights=False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (gg,) = torch.autograd.grad(got, views)
    (gw,) = torch.autograd.grad(want, views)
    torch.testing.assert_close(gg, gw, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", ["dense", "chunked", "sdpa"])
def test_details_without_weight_matrices(impl: str) -> None:
    xs = inputs("shared", requires_grad=False)
    out = cct_loss(xs[0], xs[1], xs[2], impl=impl, t_neg=2.0, return_details=True)
    assert out.neg_weights is None and out.pos_weights is None  # as for dense: only on request
    results = reference_queries(xs[0], xs[1], xs[2], t_neg=2.0)
    want = {
        "loss": torch.stack([r.loss for r in results]).mean(),
        "attraction": torch.stack([r.attraction for r in results]).mean(),
        "repulsion": torch.stack([r.repulsion for r in results]).mean(),
        "pos_entropy": torch.tensor([r.pos_entropy for r in results], dtype=torch.float64).mean(),
        "neg_entropy": torch.tensor([r.neg_entropy for r in results], dtype=torch.float64).mean(),
        "accuracy": torch.tensor([r.correct for r in results], dtype=torch.float64).mean(),
    }
    for field, value in want.items():
        torch.testing.assert_close(getattr(out, field), value, msg=field)


@pytest.mark.parametrize("impl", ["chunked", "sdpa"])
@pytest.mark.parametrize("mode", MODES)
def test_zero_vectors_and_large_sharpness(impl: str, mode: str) -> None:
    xs = inputs(mode)
    with torch.no_grad():
        for x in xs:
            if x is not None:
                x[0].zero_()
    for t in (1e3, 1e4):
        for detach in (True, False):
            q, p, n = (None if x is None else x.float().detach().requires_grad_() for x in xs)
            assert q is not None and p is not None
            loss = cct_loss(
                q, p, n, impl=impl, t_pos=t, t_neg=t, detach_weights=detach, reduction="none"
            )
            grads = weighted_grads(loss, (q, p, n))
            assert torch.isfinite(loss).all()
            assert all(torch.isfinite(g).all() for g in grads)


def test_no_grad_inputs_and_no_grad_mode() -> None:
    xs = inputs("shared", requires_grad=False)
    with torch.no_grad():
        for impl in ("chunked", "sdpa"):
            assert torch.isfinite(cct_loss(xs[0], xs[1], xs[2], impl=impl))


def test_default_chunk_size() -> None:
    assert default_chunk_size(4096, 65536) == 512
    assert default_chunk_size(256, 65536) == 8192
    assert default_chunk_size(10, 7) == 7
    assert default_chunk_size(1 << 30, 100) == 100
    assert default_chunk_size(4096, 65536, "cuda") == 16384
    assert default_chunk_size(1 << 20, 1 << 20, "cuda") == 128
    assert default_chunk_size(4096, 65536, "mps") == 512


def test_details_do_not_depend_on_what_auto_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same fields whether auto lands on dense or on chunked; asking for the weights makes
    auto pick dense even where it would stream."""
    xs = inputs("shared", requires_grad=False)
    small = cct_loss(xs[0], xs[1], xs[2], return_details=True)
    monkeypatch.setattr(
        "cct_loss.implementations.table.AUTO_DENSE_MAX_ELEMENTS", 1
    )  # auto streams now
    large = cct_loss(xs[0], xs[1], xs[2], return_details=True)
    for field in small._fields:
        a, b = getattr(small, field), getattr(large, field)
        assert (a is None) == (b is None), field
        if a is not None:
            torch.testing.assert_close(a, b, msg=field)
    weights = cct_loss(xs[0], xs[1], xs[2], return_details="weights")
    assert weights.neg_weights is not None and weights.neg_weights.shape == (5, 10)
    assert weights.pos_weights is not None and weights.pos_weights.shape == (5, 2)


@pytest.mark.parametrize("impl", ["chunked", "sdpa"])
def test_weights_from_an_implementation_without_them_is_an_error(impl: str) -> None:
    xs = inputs("shared", requires_grad=False)
    with pytest.raises(ValueError, match=rf"return_details='weights' .* impl='{impl}' never"):
        cct_loss(xs[0], xs[1], xs[2], impl=impl, return_details="weights")


@pytest.mark.parametrize("impl", ["dense", "sdpa"])
def test_chunk_size_without_chunks_is_an_error(impl: str) -> None:
    xs = inputs("shared", requires_grad=False)
    with pytest.raises(ValueError, match=rf"chunk_size is the block width .* impl='{impl}'"):
        cct_loss(xs[0], xs[1], xs[2], impl=impl, chunk_size=4)
    assert torch.isfinite(cct_loss(xs[0], xs[1], xs[2], chunk_size=4))  # auto: used if it streams


@pytest.mark.parametrize("impl", ["chunked", "sdpa"])
def test_entropy_of_nearly_one_hot_weights(impl: str) -> None:
    """A streamed entropy of weights near one-hot at large sharpness (found by hypothesis under
    torch 2.11): log Z - s E cancelled in float32 (13% off); the running offsets do not."""
    q = torch.tensor([[-0.7498, -0.3975, 0.2874, -0.2794, -0.5886]], dtype=torch.float64)
    p = torch.tensor(
        [[[-0.0587, 0.3145, 0.3787, -0.4457, 0.6763], [-0.3579, -0.1423, 0.4930, 0.0553, -0.6729]]],
        dtype=torch.float64,
    )
    labels = torch.tensor([7])
    opts: dict[str, Any] = dict(t_pos=50.0, t_neg=0.0, normalize=False, detach_weights=False)
    want = [r.pos_entropy for r in reference_queries(q, p, labels=labels, **opts)]
    out = cct_loss(
        q.float(),
        p.float(),
        labels=labels,
        impl=impl,
        reduction="none",
        return_details=True,
        **opts,
    )
    torch.testing.assert_close(
        out.pos_entropy.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-3, atol=1e-9
    )
