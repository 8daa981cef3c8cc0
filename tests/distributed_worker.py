"""Worker processes for tests/test_distributed.py (spawned; gloo on 127.0.0.1)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import TCPStore  # type: ignore[attr-defined]
from torch.nn.parallel import DistributedDataParallel

from cct_loss import (
    CCTLoss,
    NegativeQueue,
    cct_loss,
    cct_loss_moco,
    cct_loss_multicrop,
    cct_loss_multiview,
)

from .helpers import OperatorLog

N_PER_RANK = 4
DIM_IN, DIM_OUT = 6, 5
STEPS = 3
LR = 0.5
SCENARIOS = {
    # name: (loss on a (V, N, DIM_IN) batch of views, implementation, number of views)
    "nt_xent_dense": ("all", "dense", 2),
    "nt_xent_chunked": ("all", "chunked", 2),
    "multiview_sdpa": ("all", "sdpa", 3),
    "paper_dense": ("paper", "dense", 3),
    # CLIP: both towers get gradients through the gathered positives
    "clip_cross_dense": ("clip", "dense", 2),
    "clip_cross_sdpa": ("clip", "sdpa", 2),
    # MoCo v3: the keys carry no gradient (a momentum encoder's)
    "mocov3_cross_chunked": ("mocov3", "chunked", 2),
    # Supervised: labels gathered with the embeddings; per-rank counts differ
    "labels_all_dense": ("labels_all", "dense", 2),
    "labels_all_chunked": ("labels_all", "chunked", 3),
    "labels_one_view_dense": ("labels_all", "dense", 1),  # singletons: no positives
    "labels_cross_sdpa": ("labels_cross", "sdpa", 2),
    # Mixed precision: under CPU autocast the gathered embeddings are bfloat16
    "nt_xent_dense_autocast": ("all", "dense", 2),
    "clip_cross_chunked_autocast": ("clip", "chunked", 2),
    # The paper's large-scale objectives: multi-crop gathers its keys; MoCo v2 keeps its
    # in-batch negatives local (one process matches it chunk by chunk, summed)
    "multicrop_dense": ("multicrop", "dense", 4),
    "multicrop_sdpa": ("multicrop", "sdpa", 3),
    "moco_dense_live": ("moco_live", "dense", 2),
    "moco_chunked": ("moco", "chunked", 3),
}
#: Scenarios whose loss runs under ``torch.autocast("cpu", dtype=torch.bfloat16)``.
AUTOCAST = ("nt_xent_dense_autocast", "clip_cross_chunked_autocast")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM_IN, 8), nn.Tanh(), nn.Linear(8, DIM_OUT))


#: Rows per rank in the uneven run (the last batch of an epoch with drop_last=False).
UNEVEN_ROWS = (4, 3, 1)
UNEVEN_SCENARIOS = (
    "multicrop_dense",
    "moco_dense_live",
    "nt_xent_dense",
    "nt_xent_chunked",
    "clip_cross_sdpa",
    "paper_dense",
    "labels_one_view_dense",
)


def global_batches(num_views: int, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS batches of views ``(V, rows, DIM_IN)`` and labels ``(rows,)`` (5 classes, so ranks
    hold different numbers of same-label rows), the same on every process."""
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(num_views, rows, DIM_IN, generator=g),
            torch.randint(0, 3, (rows,), generator=g),
        )
        for _ in range(STEPS)
    ]


def loss_fn(
    model: nn.Module,
    views: torch.Tensor,
    labels: torch.Tensor,
    scenario: str,
    gather: bool,
    chunks: tuple[int, ...] = (),
) -> torch.Tensor:
    """The scenario's loss; ``chunks``: the ranks' rows, for one process to hold the MoCo
    objective's in-batch negatives to each rank's rows as DDP does."""
    layout, impl, _ = SCENARIOS[scenario]
    if layout in MOCO_V2 and not gather and chunks:
        z: torch.Tensor = model(views)
        parts = z.split(list(chunks), dim=1)
        total = torch.stack([_moco(part, layout, impl, False, "sum") for part in parts]).sum()
        return total / z.shape[0] / z.shape[1]
    if scenario in AUTOCAST:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _loss(model, views, labels, layout, impl, gather)
    return _loss(model, views, labels, layout, impl, gather)


#: The layouts of the paper's MoCo-v2 objective (in-batch weights as the queue's, or live).
MOCO_V2 = ("moco", "moco_live")
#: The queue of the MoCo scenarios: the same keys on every rank.
QUEUE = torch.randn(6, DIM_OUT, generator=torch.Generator().manual_seed(3))


def _moco(z: torch.Tensor, layout: str, impl: str, gather: bool, reduction: str) -> torch.Tensor:
    """The paper's MoCo-v2 objective of ``(V, N, D)`` embeddings (their detached copy as the
    momentum keys)."""
    loss = cct_loss_moco(
        list(z), list(z.detach()), QUEUE, t_neg=2.0, impl=impl, gather_distributed=gather,
        in_batch_weights="live" if layout == "moco_live" else None, reduction=reduction,
        chunk_size=3 if impl == "chunked" else None,
    )  # fmt: skip
    assert isinstance(loss, torch.Tensor)
    return loss


def _loss(
    model: nn.Module,
    views: torch.Tensor,
    labels: torch.Tensor,
    layout: str,
    impl: str,
    gather: bool,
) -> torch.Tensor:
    z: torch.Tensor = model(views)  # (V, N, DIM_OUT)
    opts: dict[str, Any] = dict(
        t_neg=2.0,
        detach_weights=False,
        impl=impl,
        chunk_size=3 if impl == "chunked" else None,
        gather_distributed=gather,
    )
    loss: torch.Tensor
    if layout == "paper":
        loss = cct_loss_multiview(list(z), layout="paper", **opts)
    elif layout == "clip":
        loss = (
            cct_loss(z[0], z[1], layout="cross", **opts)
            + cct_loss(z[1], z[0], layout="cross", **opts)
        ) / 2
    elif layout == "mocov3":
        k = z.detach()
        loss = cct_loss(z[0], k[1], layout="cross", **opts) + cct_loss(
            z[1], k[0], layout="cross", **opts
        )
    elif layout == "multicrop":
        k = z.detach()
        loss = cct_loss_multicrop(list(z[:2]), list(k[:2]), list(z[2:]), t_pos=3.0, **opts)
    elif layout in MOCO_V2:
        loss = _moco(z, layout, impl, gather, "mean")
    elif layout == "labels_all":
        loss = cct_loss_multiview(list(z), labels=labels, **opts)
    elif layout == "labels_cross":
        loss = cct_loss(z[0], z[1], layout="cross", labels=labels, **opts)
    else:
        loss = cct_loss(z[0], z[1:].transpose(0, 1), **opts)
    return loss


def train(
    model: nn.Module, scenario: str, rank: int, rows_per_rank: tuple[int, ...], gather: bool
) -> None:
    """SGD steps on this rank's rows of each global batch (``gather``) or on all of them."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    start = sum(rows_per_rank[:rank])
    for views, labels in global_batches(SCENARIOS[scenario][2], sum(rows_per_rank)):
        rows = slice(start, start + rows_per_rank[rank])
        local, local_labels = (views[:, rows], labels[rows]) if gather else (views, labels)
        opt.zero_grad()
        loss_fn(model, local, local_labels, scenario, gather, rows_per_rank).backward()
        opt.step()


def train_scenarios(
    scenarios: tuple[str, ...], rank: int, rows_per_rank: tuple[int, ...]
) -> dict[str, object]:
    """Train a DDP model per scenario on this rank's rows; the trained weights by scenario."""
    results: dict[str, object] = {}
    for scenario in scenarios:
        model = DistributedDataParallel(make_model())
        train(model, scenario, rank, rows_per_rank, gather=True)
        results[scenario] = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    return results


class ProjectedLoss(CCTLoss):
    """A subclass of the loss module that adds a submodule (a projection head, trained with
    the loss) and an attribute of its own: the module DDP wraps in ``train_module``."""

    def __init__(self, gather: bool) -> None:
        super().__init__(temperature=0.25, gather_distributed=gather)
        torch.manual_seed(0)
        self.head = nn.Linear(DIM_IN, DIM_OUT)
        self.calls = 0

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        self.calls += 1
        loss = super().forward(self.head(x1), self.head(x2))
        assert isinstance(loss, torch.Tensor)
        return loss


def train_module(module: nn.Module, rank: int, gather: bool) -> None:
    """SGD steps of ``module(x1, x2)`` (a :class:`ProjectedLoss`, bare or wrapped in DDP) on this
    rank's rows of each global batch (``gather``) or on all of them."""
    opt = torch.optim.SGD(module.parameters(), lr=LR)
    rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK) if gather else slice(None)
    for views, _ in global_batches(2, 2 * N_PER_RANK):
        opt.zero_grad()
        module(views[0, rows], views[1, rows]).backward()
        opt.step()


def init(rank: int, world_size: int, out_dir: str) -> None:
    """Join the gloo group. Rank 0 opens the rendezvous store on a port the OS picks and
    publishes it in ``out_dir``; the others read it (no free port to race for)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    published = Path(out_dir) / "store_port"
    if rank == 0:
        store = TCPStore(
            "127.0.0.1", 0, world_size, is_master=True, timeout=_TIMEOUT, wait_for_workers=False
        )
        partial = published.with_suffix(".partial")
        partial.write_text(str(store.port))
        partial.replace(published)  # atomic: the others never read half a number
    else:
        deadline = time.monotonic() + _TIMEOUT.total_seconds()
        while not published.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not publish its store port in {out_dir}")
            time.sleep(0.01)
        port = int(published.read_text())
        store = TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=_TIMEOUT)
    torch.set_num_threads(1)


_TIMEOUT = timedelta(seconds=60)


def leave(rank: int, world_size: int, out_dir: str) -> None:
    """Leave the group in step: every rank lets go of the group, then rank 0, whose process
    serves the rendezvous store, waits until the others have let go. A rank whose work
    succeeded (its results are saved) then exits at once, without the interpreter's teardown:
    there a rank's store client could still outlive the server and abort the process
    ("terminate called without an active exception"), about one run in four with three
    processes on a loaded machine even with the wait. A rank leaving on an exception goes on
    raising it."""
    dist.destroy_process_group()
    (Path(out_dir) / f"left{rank}").write_text("")
    if rank == 0:
        deadline = time.monotonic() + _TIMEOUT.total_seconds()
        others = [Path(out_dir) / f"left{r}" for r in range(1, world_size)]
        while not all(path.exists() for path in others) and time.monotonic() < deadline:
            time.sleep(0.01)
    if sys.exc_info()[0] is None:  # called from a finally block: is an exception on its way?
        os._exit(0)


def run_uneven(rank: int, world_size: int, out_dir: str) -> None:
    """Ranks holding 4, 3 and 1 rows: training parity, the queue, and an empty rank."""
    init(rank, world_size, out_dir)
    try:
        results = train_scenarios(UNEVEN_SCENARIOS, rank, UNEVEN_ROWS)
        queue = NegativeQueue(9, 2, gather_distributed=True, with_labels=True)
        rows = UNEVEN_ROWS[rank]
        queue.enqueue(torch.full((rows, 2), float(rank)), labels=torch.full((rows,), rank))
        results["queue"] = queue.state_dict()
        empty = torch.zeros(0, DIM_OUT) if rank == 1 else torch.randn(2, DIM_OUT)
        try:
            cct_loss(empty, empty.clone(), gather_distributed=True)
            results["empty_rank"] = "no error"
        except ValueError as error:
            results["empty_rank"] = str(error)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        leave(rank, world_size, out_dir)


def synchronising_operators() -> list[str]:
    """The operators that made the host wait, or depended on data for their shape, in one
    forward and backward of each gathering call shape (the second call: a steady step)."""
    g = torch.Generator().manual_seed(7)
    z1, z2 = (torch.randn(N_PER_RANK, DIM_OUT, generator=g).requires_grad_() for _ in range(2))
    labels = torch.tensor([0, 1, 0, 2])[:N_PER_RANK]
    calls: list[Callable[[], Any]] = [
        lambda: cct_loss(z1, z2, gather_distributed=True),
        lambda: cct_loss(z1, z2, layout="cross", gather_distributed=True),
        lambda: cct_loss(z1, z2, labels=labels, gather_distributed=True),
        lambda: cct_loss_multiview([z1, z2, z2 * 2], gather_distributed=True),
        lambda: cct_loss_multiview([z1, z2, z2 * 2], layout="paper", gather_distributed=True),
    ]
    found: list[str] = []
    for call in calls:
        for _ in range(2):
            with OperatorLog() as log:
                call().backward()
            found += log.synchronising
    return found


def run(rank: int, world_size: int, out_dir: str) -> None:
    init(rank, world_size, out_dir)
    try:
        results = train_scenarios(tuple(SCENARIOS), rank, (N_PER_RANK,) * world_size)
        results["synchronising"] = synchronising_operators()
        wrapped = DistributedDataParallel(ProjectedLoss(gather=True))
        train_module(wrapped, rank, gather=True)
        results["loss_module"] = dict(wrapped.module.state_dict(), calls=wrapped.module.calls)

        queue = NegativeQueue(7, 3, gather_distributed=True)
        g = torch.Generator().manual_seed(100 + rank)
        for batch in (2, 3, 1, 2):  # 2 ranks x 16 keys: wraps around a queue of 7 twice
            queue.enqueue(torch.randn(batch, 3, generator=g) + 10 * rank)
        results["queue"] = queue.state_dict()

        labelled = NegativeQueue(5, 2, gather_distributed=True, with_labels=True)
        for step in range(2):  # 2 ranks x 2 steps x 2 keys: wraps around a queue of 5
            labelled.enqueue(
                torch.full((2, 2), float(10 * rank + step)),
                labels=torch.tensor([10 * rank + step, 10 * rank + step]),
            )
        results["labelled_queue"] = labelled.state_dict()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        leave(rank, world_size, out_dir)


def _disagreements(rank: int, last: bool) -> dict[str, Callable[[], Any]]:
    """Calls in which the last rank differs from the others (``last``: this is that rank),
    each expected to fail on every rank: name -> the call."""
    g = torch.Generator().manual_seed(rank)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    d = 6 if last else 4
    labels = torch.tensor([0, 1, 0]) if not last else None
    negatives = randn(5, 4) if last else None
    return {
        "dim": lambda: cct_loss(randn(3, d), randn(3, d), gather_distributed=True),
        "dtype": lambda: cct_loss(
            randn(3, 4, dtype=torch.float64 if last else torch.float32),
            randn(3, 4, dtype=torch.float64 if last else torch.float32),
            gather_distributed=True,
        ),
        "labels": lambda: cct_loss(
            randn(3, 4), randn(3, 4), labels=labels, gather_distributed=True
        ),
        "layout": lambda: cct_loss(
            randn(3, 4), randn(3, 4), layout="cross" if last else "all", gather_distributed=True
        ),
        "negatives": lambda: cct_loss(
            randn(3, 4), randn(3, 4), negatives, layout="cross", gather_distributed=True
        ),
        "views": lambda: cct_loss_multiview(
            [randn(3, 4) for _ in range(3 if last else 2)], gather_distributed=True
        ),
        "queue_dim": lambda: NegativeQueue(8, d, gather_distributed=True).enqueue(randn(2, d)),
        "other_call": lambda: (
            NegativeQueue(8, 4, gather_distributed=True).enqueue(randn(2, 4))
            if not last
            else cct_loss(randn(3, 4), randn(3, 4), gather_distributed=True)
        ),
    }


def unnormalised_rows(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s ``(query, positive)``, 3 rows of D = 4 near ``1000 * ones``."""
    g = torch.Generator().manual_seed(50 + rank)
    q, p = (torch.randn(3, 4, generator=g, dtype=torch.float64) + 1000.0 for _ in range(2))
    return q.float(), p.float()


def run_disagreements(rank: int, world_size: int, out_dir: str) -> None:
    """Ranks that disagree (the last rank differs): each call's error (or its absence) on every
    rank and how long it took; then a call the last rank's bad batch made it skip, and the call
    after that."""
    init(rank, world_size, out_dir)
    last = rank == world_size - 1
    try:
        results: dict[str, Any] = {}
        for name, call in _disagreements(rank, last).items():
            start = time.monotonic()
            try:
                call()
                results[name] = "no error"
            except ValueError as error:
                results[name] = str(error)
            results[f"{name}_seconds"] = time.monotonic() - start
        # A bad batch on the last rank: it raises in validation, is caught, and that rank goes
        # on to its next call while the others are still in this one.
        start = time.monotonic()
        for step in range(2):
            bad = last and step == 0
            positive = torch.randn(2, 4) if bad else torch.randn(3, 4)  # wrong shape: refused
            try:
                cct_loss(torch.randn(3, 4), positive, gather_distributed=True)
                results[f"skipped_{step}"] = "no error"
            except ValueError as error:
                results[f"skipped_{step}"] = str(error)
        results["skipped_seconds"] = time.monotonic() - start
        # Every rank aligned again: the next call computes a loss on every rank.
        loss = cct_loss(torch.randn(3, 4), torch.randn(3, 4), gather_distributed=True)
        results["after"] = float(loss)
        # Not normalised, every row far from the origin: one centre on every rank.
        for layout in ("all", "cross"):
            q, p = unnormalised_rows(rank)
            loss = cct_loss(q, p, normalize=False, layout=layout, gather_distributed=True)
            results[f"unnormalised_{layout}"] = float(loss)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        leave(rank, world_size, out_dir)
