"""Inputs at the edges (issue 24): nothing silently wrong, every refusal a message that leads
somewhere. The distributed half (ranks that disagree) is in tests/test_distributed.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cct_loss as package
from cct_loss import NegativeQueue, cct_loss

from .helpers import TEST_DEVICE, random_embeddings


def test_a_misspelt_public_name_names_the_one_meant() -> None:
    with pytest.raises(ImportError, match="did you mean 'CCTMultiviewLoss'"):
        from cct_loss import CCTMultiViewLoss  # noqa: F401
    with pytest.raises(AttributeError, match="did you mean 'cct_loss_multiview'"):
        _ = package.cct_loss_multview
    with pytest.raises(ImportError, match="its public names are CCTDetails, CCTLoss"):
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
    # a copy, or a stack holding a copy, is a choice: accepted
    cct_loss(z, torch.stack([random_embeddings((4, 3), 1), z.clone()], dim=1))
    cct_loss(stacked[:, 1].clone(), stacked)
