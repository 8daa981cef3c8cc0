"""Benchmark problems and the methods compared on them (forward + backward, one step).

Shared by ``benchmarks/run.py`` (the side-by-side table of ``make bench``), the pytest-benchmark
suite (``benchmarks/test_benchmarks.py``) and ``make gpu-check``.

Methods on each problem:

* ``auto``: ``cct_loss`` at its defaults (what a user gets), beside each implementation
  (``dense``, ``chunked``, ``sdpa``; ``triton`` on CUDA only: on the CPU it runs in Triton's
  interpreter, far too slow to time).
* ``infonce``: the loss cct-loss replaces, as trainers write it (:mod:`cct_loss.baselines`):
  the README's NT-Xent (multi-positive NT-Xent for ``M > 1``), MoCo's InfoNCE with the
  positive in column 0, CLIP's cross-entropy in one direction, SupCon. The temperature is
  ``1 / (2 t_neg)``, the one whose softmax weights CCT's negatives share.
* ``matmul``: the query-key product alone, forward and backward (the three products every
  method needs): the floor.
* ``official``: the small-scale paper objective computed the way the official code lays it
  out, with pairwise distances by broadcasting an ``N x N x D`` tensor (written by us from
  docs/specification.md, section 3, not taken from that code).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cct_loss import cct_loss, cct_loss_multiview
from cct_loss.baselines import (
    clip_info_nce,
    info_nce_multiview,
    info_nce_queue,
    nt_xent,
    supcon,
)

Step = Callable[[], None]

#: CCT's sharpness in the benchmarks, and the InfoNCE temperature that matches it.
T_NEG = 2.0
TEMPERATURE = 1.0 / (2.0 * T_NEG)


@dataclass(frozen=True)
class Problem:
    """One benchmark shape. ``kind`` is "simclr", "moco", "cross" (CLIP, one direction),
    "labels" (SupCon, two views, ten classes) or "paper"; ``only`` restricts the methods (a
    stress shape that only some of them can hold)."""

    kind: str
    n: int
    d: int = 128
    m: int = 1
    k: int = 0
    views: int = 0
    only: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        if self.kind == "simclr":
            return f"SimCLR N={self.n} M={self.m} D={self.d}"
        if self.kind == "moco":
            return f"MoCo N={self.n} K={self.k} D={self.d}"
        if self.kind == "cross":
            return f"CLIP N={self.n} D={self.d}"
        if self.kind == "labels":
            return f"SupCon N={self.n} D={self.d}"
        return f"paper V={self.views} N={self.n} D={self.d}"

    @property
    def flops(self) -> float:
        """Nominal FLOPs of one forward + backward step: the query-key products every method
        needs, one forward and two backward (``3 x 2 Q K D``), as for attention."""
        if self.kind == "simclr":
            rows = (self.m + 1) * self.n
            return 6.0 * rows * rows * self.d
        if self.kind == "labels":
            return 6.0 * (2 * self.n) ** 2 * self.d
        if self.kind == "moco":
            return 6.0 * self.n * self.k * self.d
        if self.kind == "cross":
            return 6.0 * self.n * self.n * self.d
        pairs = self.views * (self.views - 1) // 2
        return 6.0 * pairs * self.n * self.n * self.d


SIMCLR = [Problem("simclr", n, m=m) for n in (256, 1024) for m in (1, 4)]
MOCO = [Problem("moco", n, k=k) for n in (256, 512) for k in (16384, 65536)]
CROSS = [Problem("cross", 256), Problem("labels", 256)]
PAPER = [Problem("paper", 256, views=5)]
MEMORY = Problem("moco", 4096, k=65536)
#: The small-batch shape of the overhead target (dense at most 1.15x InfoNCE on the CPU).
SMALL_BATCH = SIMCLR[0]
#: Added on a GPU: a large SimCLR batch, a large MoCo queue, and an in-batch stress shape
#: (65,536 rows per view: a 131,072 x 131,072 cost matrix, 64 GiB in float32) that only the
#: streaming implementations, ``chunked`` and ``triton``, hold.
GPU_EXTRA = [
    Problem("simclr", 8192),
    MEMORY,
    Problem("simclr", 65536, only=("auto", "chunked", "triton")),
]
#: On a GPU, first: the shapes on either side of ``auto``'s thresholds (dense below, triton
#: above), so that a run cut short still says whether the rule holds.
GPU_DECIDING = [
    Problem("simclr", 256),
    Problem("moco", 512, k=65536),
    Problem("simclr", 1024, m=4),
    Problem("simclr", 4096),
    Problem("moco", 4096, k=65536),
    Problem("simclr", 8192),
]
#: The per-call overhead shape: compute is nil, what a step costs is its fixed cost.
PER_CALL = [Problem("simclr", 8, d=16), Problem("moco", 8, d=16, k=64)]


def official_paper_objective(views: Tensor, t_pos: float, t_neg: float) -> Tensor:
    """The paper layout computed with broadcast ``N x N x D`` differences (no detach)."""
    z = F.normalize(views, dim=-1)
    num_views, n, _ = z.shape
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    attraction = []
    for x in range(num_views):
        d_pos = torch.stack(
            [((z[x] - z[w]) ** 2).sum(-1) for w in range(num_views) if w != x], dim=1
        )
        attraction.append((torch.softmax(t_pos * d_pos, dim=1) * d_pos).sum(1).mean())
    repulsion = []
    for x, y in itertools.combinations(range(num_views), 2):
        d_neg = ((z[x][:, None, :] - z[y][None, :, :]) ** 2).sum(-1)  # (N, N, D) then (N, N)
        w = torch.softmax((-t_neg * d_neg).masked_fill(eye, float("-inf")), dim=1)
        repulsion.append(-(w * d_neg).masked_fill(eye, 0.0).sum(1).mean())
    return torch.stack(attraction).mean() + torch.stack(repulsion).mean()


def methods(
    problem: Problem,
    seed: int = 0,
    *,
    device: torch.device | str = "cpu",
    autocast: torch.dtype | None = None,
) -> dict[str, Step]:
    """Forward + backward closures for every method on ``problem``, float32 inputs built once
    on ``device``; with ``autocast`` every step runs inside ``torch.autocast`` of that dtype
    (as a mixed-precision trainer calls the loss)."""
    device = torch.device(device)
    steps = _methods(problem, seed, device)
    if problem.only:
        steps = {name: step for name, step in steps.items() if name in problem.only}
    if autocast is None:
        return steps
    return {name: _under_autocast(step, device, autocast) for name, step in steps.items()}


def _under_autocast(step: Step, device: torch.device, dtype: torch.dtype) -> Step:
    def run() -> None:
        with torch.autocast(device.type, dtype=dtype):
            step()

    return run


def _methods(problem: Problem, seed: int, device: torch.device) -> dict[str, Step]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device)

    impls = ["auto", "dense", "chunked", "sdpa"] + (["triton"] if device.type == "cuda" else [])
    d = problem.d
    if problem.kind in ("simclr", "labels", "cross"):
        z = randn(problem.m + 1, problem.n, d).requires_grad_()
        labels = torch.arange(problem.n, device=device) % 10

        def cct(impl: str) -> Step:
            if problem.kind == "labels":
                return lambda: cct_loss(
                    z[0], z[1], labels=labels, t_neg=T_NEG, impl=impl
                ).backward()
            if problem.kind == "cross":
                return lambda: cct_loss(
                    z[0], z[1], layout="cross", t_neg=T_NEG, impl=impl
                ).backward()
            # two views as users pass them, (N, D) each; more as (N, M, D)
            positive = z[1] if problem.m == 1 else z[1:].transpose(0, 1)
            return lambda: cct_loss(z[0], positive, t_neg=T_NEG, impl=impl).backward()

        def infonce() -> None:
            if problem.kind == "labels":
                loss = supcon(z[0], z[1], labels, TEMPERATURE)
            elif problem.kind == "cross":
                loss = clip_info_nce(z[0], z[1], TEMPERATURE)
            elif problem.m == 1:
                loss = nt_xent(z[0], z[1], TEMPERATURE)
            else:
                loss = info_nce_multiview(z, TEMPERATURE)
            loss.backward()

        def matmul() -> None:
            rows = z[0] if problem.kind == "cross" else z.reshape(-1, d)
            keys = z[1] if problem.kind == "cross" else rows
            (rows @ keys.T).sum().backward()

        return {**{impl: cct(impl) for impl in impls}, "infonce": infonce, "matmul": matmul}
    if problem.kind == "moco":
        q = randn(problem.n, d).requires_grad_()
        k = randn(problem.n, d)
        queue = F.normalize(randn(problem.k, d), dim=-1)

        def cct_moco(impl: str) -> Step:
            return lambda: cct_loss(q, k, queue, t_neg=T_NEG, impl=impl).backward()

        return {
            **{impl: cct_moco(impl) for impl in impls},
            "infonce": lambda: info_nce_queue(q, k, queue, TEMPERATURE).backward(),
            "matmul": lambda: (q @ queue.T).sum().backward(),
        }
    views = randn(problem.views, problem.n, d).requires_grad_()

    def paper(impl: str) -> Step:
        return lambda: cct_loss_multiview(
            list(views.unbind(0)), layout="paper", t_neg=0.9, detach_weights=False, impl=impl
        ).backward()

    return {
        **{impl: paper(impl) for impl in impls if impl != "sdpa"},
        "official": lambda: official_paper_objective(views, 1.0, 0.9).backward(),
    }
