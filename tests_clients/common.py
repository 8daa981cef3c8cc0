"""What the real-client runs share: a float64 check of one step's gradient, and the loss going
down over a few steps."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: Steps of each training run, and how many at each end are averaged to say it went down.
STEPS, ENDS = 30, 5


def assert_went_down(losses: Sequence[float]) -> None:
    first = sum(losses[:ENDS]) / ENDS
    last = sum(losses[-ENDS:]) / ENDS
    assert last < first, (
        f"the loss did not go down: {first:.4f} over the first steps, {last:.4f} over the last"
    )


def assert_gradient_matches(
    loss: Tensor, embeddings: Sequence[Tensor], reference: Callable[..., Tensor]
) -> None:
    """The gradient the swapped loss gives ``embeddings`` (a training step's, float32) against
    ``reference``, the float64 loop of tests/reference.py on the same embeddings."""
    got = torch.autograd.grad(loss, embeddings, retain_graph=True)
    doubles = [e.detach().double().requires_grad_() for e in embeddings]
    expected = reference(*doubles)
    want = torch.autograd.grad(expected, doubles)
    torch.testing.assert_close(loss.detach().double(), expected.detach(), rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)
