"""Two gloo processes on the CPU: open_clip's ``local_loss`` and ``gather_with_grad`` in
:class:`cct_loss.CCTClipLoss`, each against one process's float64 reference, and a
:class:`cct_loss.CCTLoss` owning a queue with ``gather_distributed=True``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from . import clients_worker as worker
from .reference import reference_loss
from .test_distributed import spawn

pytestmark = pytest.mark.cpu_only

WORLD_SIZE = 2
T_NEG = worker.SCALE / 2  # temperature 1 / logit_scale, default cost


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(worker.run, WORLD_SIZE, tmp_path_factory.mktemp("clients"))


def directions(
    image: torch.Tensor, text: torch.Tensor, rows: slice, keys: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """open_clip's local loss of ``rows`` (the global loss for every row), CCT inside: the
    mean of image->text and text->image, each of these rows' queries against every key."""
    all_images, all_texts = keys
    to_text = reference_loss(
        image[rows], text[rows], _others(all_texts, rows), layout="cross", t_neg=T_NEG
    )
    to_image = reference_loss(
        text[rows], image[rows], _others(all_images, rows), layout="cross", t_neg=T_NEG
    )
    return (to_text + to_image) / 2


def _others(rows: torch.Tensor, own: slice) -> torch.Tensor | None:
    others = torch.cat([rows[: own.start], rows[own.stop :]])
    return others if len(others) else None


@pytest.mark.parametrize(("local", "with_grad"), worker.FLAGS)
def test_clip_flags_match_open_clips_meaning(
    results: list[dict[str, Any]], local: bool, with_grad: bool
) -> None:
    """``local_loss``: each rank's rows are the queries against every rank's candidates (else
    the whole global batch on every rank). ``gather_with_grad``: the gathered rows carry
    gradient back to their rank, so rank r's features get every rank's loss's gradient (else
    only its own loss's)."""
    images, texts = (x.clone().requires_grad_() for x in worker.features(WORLD_SIZE))
    per_rank = [slice(r * worker.ROWS, (r + 1) * worker.ROWS) for r in range(WORLD_SIZE)]
    everything = slice(0, WORLD_SIZE * worker.ROWS)
    losses = [
        directions(images, texts, rows if local else everything, (images, texts))
        for rows in per_rank
    ]
    for rank, rows in enumerate(per_rank):
        loss, image_grad, text_grad = results[rank][f"clip_{local}_{with_grad}"]
        torch.testing.assert_close(loss, losses[rank].detach())
        source = torch.stack(losses).sum() if with_grad else losses[rank]
        want_image, want_text = torch.autograd.grad(source, (images, texts), retain_graph=True)
        torch.testing.assert_close(image_grad, want_image[rows])
        torch.testing.assert_close(text_grad, want_text[rows])


def test_a_module_queue_gathers_every_ranks_keys(results: list[dict[str, Any]]) -> None:
    """Every rank holds the same queue (all ranks' keys, rank order), and each rank's loss is
    its rows against it (step 0: against the batch's other keys of its own rank)."""
    states = [r["queue_state"] for r in results]
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], msg=name)
    batches = worker.queue_batches(WORLD_SIZE, 3)
    seen: list[torch.Tensor] = []
    for step, (q, k) in enumerate(batches):
        for rank in range(WORLD_SIZE):
            own = slice(rank * worker.ROWS, (rank + 1) * worker.ROWS)
            if seen:
                bank = torch.cat(seen)[-10:]
                expected = reference_loss(q[own], k[own], bank, t_neg=2.5)
            else:
                expected = reference_loss(q[own], k[own], layout="cross", t_neg=2.5)
            torch.testing.assert_close(results[rank]["queue_losses"][step], expected)
        seen.append(k)
