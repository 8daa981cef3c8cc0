"""MoCo-v2 style training on MNIST-5k (offline), with InfoNCE or CCT: the swap is one line.

    python examples/moco.py --loss cct --epochs 10
    python examples/moco.py --loss infonce

A query encoder and a momentum (EMA) key encoder embed two augmentations of each image; the
query's positive is its own key, its negatives are the keys of earlier batches in a FIFO
queue (:class:`cct_loss.NegativeQueue`). The frozen query encoder is evaluated like the SimCLR
example: kNN, linear probe, 10 labels per class.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from common import Encoder, Split, augment, evaluate, knn_of, load_dataset, projection_head
from tqdm import tqdm

from cct_loss import NegativeQueue, cct_loss
from cct_loss.baselines import info_nce_queue


def train(
    loss_name: str = "cct",
    *,
    epochs: int = 10,
    seed: int = 0,
    batch_size: int = 256,
    queue_size: int = 2048,
    momentum: float = 0.99,
    t_neg: float = 2.0,
    temperature: float = 0.2,
    lr: float = 3e-3,
    dataset: str = "mnist",
    limit: int | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    track_knn: bool = True,
    split: Split | None = None,
    prime_keys: int | None = None,
) -> tuple[dict[str, float], list[float]]:
    """Train with a momentum encoder and a queue; returns (metrics, mean loss per epoch).

    Before the first step the queue holds the initial key encoder's keys of ``prime_keys``
    augmented training images (``None``: one batch), cycling through the data when that is more
    than the training set: with ``prime_keys=queue_size`` every step sees the full queue.
    """
    split = split or load_dataset(dataset, limit=limit)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    encoder_q = torch.nn.Sequential(Encoder(), projection_head())
    encoder_k = copy.deepcopy(encoder_q).requires_grad_(False)
    opt = torch.optim.Adam(encoder_q.parameters(), lr=lr, weight_decay=1e-5)
    queue = NegativeQueue(queue_size, 32)
    n = len(split.train_x)
    with torch.no_grad():  # prime the queue, so that step 1 has negatives
        # (MoCo keeps normalised keys; CCT normalises its negatives anyway)
        if prime_keys is None:
            queue.enqueue(F.normalize(encoder_k(augment(split.train_x[:batch_size], gen)), dim=1))
        remaining = prime_keys or 0
        while remaining > 0:
            picked = torch.randperm(n, generator=gen)[: min(batch_size, remaining)]
            queue.enqueue(F.normalize(encoder_k(augment(split.train_x[picked], gen)), dim=1))
            remaining -= len(picked)

    losses: list[float] = []
    steps = 0
    bar = tqdm(
        range(epochs), desc=f"moco {loss_name} seed={seed}", disable=not progress, leave=False
    )
    for _ in bar:
        order = torch.randperm(n, generator=gen)
        epoch = []
        for i in range(0, n - batch_size + 1, batch_size):
            x = split.train_x[order[i : i + batch_size]]
            q = encoder_q(augment(x, gen))
            with torch.no_grad():
                for p_k, p_q in zip(encoder_k.parameters(), encoder_q.parameters(), strict=True):
                    p_k.mul_(momentum).add_(p_q.detach(), alpha=1 - momentum)
                k = encoder_k(augment(x, gen))
            if loss_name == "cct":
                loss = cct_loss(q, k, queue.negatives(), t_neg=t_neg)  # CCT
            else:
                loss = info_nce_queue(q, k, queue.negatives(), temperature)  # InfoNCE
            queue.enqueue(F.normalize(k, dim=1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            epoch.append(loss.item())
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        losses.append(sum(epoch) / max(len(epoch), 1))
        if track_knn:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", knn=f"{knn_of(encoder_q[0], split):.3f}")
        if max_steps is not None and steps >= max_steps:
            break
    return evaluate(encoder_q[0], split), losses


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loss", choices=["infonce", "cct"], default="cct")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queue-size", type=int, default=2048)
    parser.add_argument(
        "--t-neg",
        type=float,
        default=2.0,
        help="CCT negative sharpness (an InfoNCE temperature tau corresponds to 1 / (2 tau))",
    )
    parser.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature")
    parser.add_argument("--dataset", choices=["mnist", "digits"], default="mnist")
    parser.add_argument(
        "--limit", type=int, default=None, help="use at most this many training images"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    metrics, _ = train(
        args.loss,
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        queue_size=args.queue_size,
        t_neg=args.t_neg,
        temperature=args.temperature,
        lr=args.lr,
        dataset=args.dataset,
        limit=args.limit,
        max_steps=args.max_steps,
    )
    print(
        f"moco {args.loss} seed={args.seed}: kNN {metrics['knn']:.3f}  linear {metrics['linear']:.3f}  "
        f"10-shot {metrics['few_shot']:.3f}  ({time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
