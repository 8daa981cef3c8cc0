"""CCT relative to the losses it replaces, checked against formulas written here.

docs/specification.md, section 2: with ``detach_weights=True`` and one positive, the gradient of the in-batch
loss equals ``2 tau`` times the gradient of the decoupled contrastive loss (DCL, arXiv
2110.06848: InfoNCE without the positive in the denominator) at ``t_neg = 1 / (2 tau)``,
``alpha = beta = 1``. CCT departs from DCL through gradients through the weights or through
several positives; the README's "Does it help?" states this relation.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from cct_loss import cct_loss

from .helpers import IMPLS, as_loss, random_embeddings


def decoupled_contrastive_loss(views: Tensor, tau: float) -> Tensor:
    """Symmetric DCL over ``(2, N, D)`` views, from its definition: for each of the 2N
    embeddings ``z_i`` with its other view ``z_j``,
    ``-s_ij / tau + log sum_{k != i, j} exp(s_ik / tau)`` (``s`` the cosine), averaged."""
    _, n, d = views.shape
    z = F.normalize(views.reshape(2 * n, d), dim=-1)
    similarity = z @ z.T / tau
    terms = []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = [k for k in range(2 * n) if k not in (i, j)]
        terms.append(-similarity[i, j] + torch.logsumexp(similarity[i, others], dim=0))
    return torch.stack(terms).mean()


def gradient(loss_of: Callable[[Tensor], Tensor], views: Tensor) -> Tensor:
    leaf = views.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_of(leaf), leaf)
    return grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tau", [0.1, 0.2, 0.5, 1.0])
def test_detached_two_view_gradient_is_two_tau_times_dcl(impl: str, tau: float) -> None:
    views = random_embeddings((2, 9, 6), int(tau * 100))
    cct = gradient(lambda v: as_loss(cct_loss(v[0], v[1], t_neg=1 / (2 * tau), impl=impl)), views)
    dcl = gradient(lambda v: decoupled_contrastive_loss(v, tau), views)
    torch.testing.assert_close(cct, 2 * tau * dcl, rtol=1e-4 if impl == "sdpa" else 1e-7, atol=1e-9)


def test_gradients_through_the_weights_depart_from_dcl() -> None:
    """The relation is specific to detached weights (a control: the test above can fail)."""
    tau = 0.5
    views = random_embeddings((2, 9, 6), 3)
    live = gradient(lambda v: as_loss(cct_loss(v[0], v[1], t_neg=1.0, detach_weights=False)), views)
    dcl = gradient(lambda v: decoupled_contrastive_loss(v, tau), views)
    assert float((live - 2 * tau * dcl).abs().max()) > 1e-3
