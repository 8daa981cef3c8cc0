"""torch.compile(fullgraph=True): every implementation and layout, recompiles, a MoCo step."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo.testing
from torch import Tensor, nn

from cct_loss import NegativeQueue, cct_loss, cct_loss_multiview

from .helpers import IMPLS, as_loss, impl_options, random_embeddings, seeded

N, M, D, K = 6, 2, 8, 10
NEGATIVES = random_embeddings((K, D), 50).float()
PER_QUERY = random_embeddings((N, 5, D), 51).float()
LABELS = torch.tensor([0, 1, 0, 2, 1, 1])
NEGATIVE_LABELS = torch.arange(K) % 3

Call = Callable[[Tensor, Tensor, str], Tensor]


CALLS: dict[str, Call] = {
    "in_batch": lambda q, p, impl: cct_loss(q, p[:, 0], **impl_options(impl, 4)),
    "multi_positive": lambda q, p, impl: cct_loss(q, p, **impl_options(impl, 4)),
    "shared": lambda q, p, impl: cct_loss(q, p, NEGATIVES, **impl_options(impl, 4)),
    "per_query": lambda q, p, impl: cct_loss(q, p, PER_QUERY, **impl_options(impl, 4)),
    "paper": lambda q, p, impl: as_loss(
        cct_loss_multiview(
            [q, p[:, 0], p[:, 1]], layout="paper", **impl_options(impl, 4), detach_weights=False
        )
    ),
    "cross": lambda q, p, impl: cct_loss(q, p, layout="cross", **impl_options(impl, 4)),
    "cross_queue": lambda q, p, impl: cct_loss(
        q, p, NEGATIVES, layout="cross", **impl_options(impl, 4)
    ),
    "labels": lambda q, p, impl: cct_loss(
        q, p, labels=LABELS, **impl_options(impl, 4), detach_weights=False
    ),
    "cross_labels": lambda q, p, impl: cct_loss(
        q, p, layout="cross", labels=LABELS, **impl_options(impl, 4)
    ),
    "negative_labels": lambda q, p, impl: cct_loss(
        q, p, NEGATIVES, labels=LABELS, negative_labels=NEGATIVE_LABELS, **impl_options(impl, 4)
    ),
}


def compare_compiled(call: Call, impl: str, backend: str) -> None:
    """Values and gradients of the compiled call against eager."""
    q0, p0 = random_embeddings((N, D), 52).float(), random_embeddings((N, M, D), 53).float()
    compiled = torch.compile(call, fullgraph=True, backend=backend)
    q, p = q0.clone().requires_grad_(), p0.clone().requires_grad_()
    out = compiled(q, p, impl)
    out.backward()
    qe, pe = q0.clone().requires_grad_(), p0.clone().requires_grad_()
    expected = call(qe, pe, impl)
    expected.backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for got, want in ((q.grad, qe.grad), (p.grad, pe.grad)):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("call", list(CALLS))
def test_every_layout_and_implementation_compiles(call: str, impl: str) -> None:
    torch._dynamo.reset()
    compare_compiled(CALLS[call], impl, "aot_eager")


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("call", ["in_batch", "shared"])
@pytest.mark.cpu_only  # 4 compiles of ~30 s (CPU) do not fit the 6-minute GPU run
def test_inductor(call: str, impl: str) -> None:
    """A real inductor compile (about 30 s each on 2 CPU threads)."""
    torch._dynamo.reset()
    compare_compiled(CALLS[call], impl, "inductor")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["all", "cross"])
def test_new_batch_sizes_compile_once_more_at_most(impl: str, layout: str) -> None:
    """After the first dynamic recompile, further batch sizes reuse the graph (chunked too: its
    block loop depends on the number of blocks, which stays 1 here; see the README)."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(q: Tensor, p: Tensor) -> Tensor:
        return cct_loss(q, p, impl=impl, layout=layout)

    for n in (8, 12, 16, 11):
        step(torch.randn(n, D), torch.randn(n, D))
    assert counter.frame_count <= 2


class MoCo(nn.Module):
    """A MoCo model whose forward enqueues its keys, as the original code does."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(D, D)
        self.queue = NegativeQueue(32, D)
        self.queue.enqueue(torch.randn(32, D))  # a full queue, as after the first steps

    def forward(self, x_q: Tensor, x_k: Tensor) -> Tensor:
        q = self.encoder(x_q)
        with torch.no_grad():
            k = self.encoder(x_k)
        loss = as_loss(cct_loss(q, k, self.queue.negatives(), t_neg=2.0))
        self.queue.enqueue(k, check_finite=False)  # no host synchronisation inside the graph
        return loss


def test_compiled_moco_step_with_a_queue_does_not_recompile() -> None:
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    model, eager = MoCo(), MoCo()
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    g = seeded(0)
    for _ in range(12):  # wraps around the queue of 32 keys several times
        x_q, x_k = torch.randn(6, D, generator=g), torch.randn(6, D, generator=g)
        torch.testing.assert_close(compiled(x_q, x_k), eager(x_q, x_k))
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles"
    for name, value in eager.queue.state_dict().items():
        torch.testing.assert_close(model.queue.state_dict()[name], value, msg=name)


@pytest.mark.cpu_only  # on CUDA, make gpu-check's overhead step compiles and times it
def test_reduce_overhead_training_step() -> None:
    """A trainer compiles its forward pass and the loss with ``mode="reduce-overhead"`` (CUDA
    graphs on a GPU: the small-batch setting, where launches dominate; on the CPU an inductor
    compile): three optimizer steps give the parameters eager steps give."""
    torch._dynamo.reset()

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, D))

    models = {"compiled": make(), "eager": make()}
    compiled_model = models["compiled"]

    @torch.compile(mode="reduce-overhead", fullgraph=True)
    def compiled_loss(a: Tensor, b: Tensor) -> Tensor:
        return as_loss(cct_loss(compiled_model(a), compiled_model(b), t_neg=2.0))

    def eager_loss(a: Tensor, b: Tensor) -> Tensor:
        return as_loss(cct_loss(models["eager"](a), models["eager"](b), t_neg=2.0))

    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.5) for name, m in models.items()}
    g = seeded(3)
    for _ in range(3):
        a, b = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
        for name, loss_of in (("compiled", compiled_loss), ("eager", eager_loss)):
            optimizers[name].zero_grad()
            loss_of(a, b).backward()
            optimizers[name].step()
    for (name, got), want in zip(
        models["compiled"].state_dict().items(), models["eager"].state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
