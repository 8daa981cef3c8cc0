"""Precision promises: autocast and dtypes; a compiled module (the rest of torch.compile is in
test_compile.py)."""

from __future__ import annotations

import pytest
import torch

from cct_loss import CCTLoss, cct_loss, cct_loss_multiview

from .helpers import TEST_DEVICE, random_embeddings


def _inputs(mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    q = random_embeddings((8, 16), 0).float()
    p = random_embeddings((8, 2, 16), 1).float()
    n = {
        "in_batch": None,
        "shared": random_embeddings((32, 16), 2).float(),
        "per_query": random_embeddings((8, 5, 16), 3).float(),
    }[mode]
    return q, p, n


@pytest.mark.parametrize("mode", ["in_batch", "shared", "per_query"])
@pytest.mark.parametrize("t", [1.0, 1e4])
def test_bf16_autocast_is_float32_finite_and_close(mode: str, t: float) -> None:
    q, p, n = _inputs(mode)
    lin = torch.nn.Linear(16, 16)
    ref = cct_loss(lin(q), lin(p), None if n is None else lin(n), t_pos=t, t_neg=t)
    with torch.autocast(TEST_DEVICE.type, dtype=torch.bfloat16):
        qa, pa = lin(q), lin(p)
        na = None if n is None else lin(n)
        assert qa.dtype == torch.bfloat16
        out = cct_loss(qa, pa, na, t_pos=t, t_neg=t)
    assert out.dtype == torch.float32
    assert torch.isfinite(out)
    # bf16 embeddings carry ~3 significant digits; the loss is computed in float32 from them.
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
    out.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_half_inputs_give_float32_result() -> None:
    q, p, n = _inputs("shared")
    out = cct_loss(q.half(), p.bfloat16(), n.half() if n is not None else None)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out,
        cct_loss(
            q.half().float(), p.bfloat16().float(), n.half().float() if n is not None else None
        ),
    )


def test_float64_stays_float64() -> None:
    q, p, n = _inputs("shared")
    assert (
        cct_loss(q.double(), p.double(), None if n is None else n.double()).dtype == torch.float64
    )


def test_multiview_and_module_compile_fullgraph() -> None:
    views = torch.randn(3, 6, 8)
    paper = torch.compile(
        lambda v: cct_loss_multiview(list(v), layout="paper", detach_weights=False),
        fullgraph=True,
        backend="aot_eager",
    )
    torch.testing.assert_close(
        paper(views), cct_loss_multiview(list(views), layout="paper", detach_weights=False)
    )
    module = CCTLoss(t_neg=0.9)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(views[0], views[1]), module(views[0], views[1]))
