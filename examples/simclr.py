"""SimCLR on MNIST-5k (offline), with InfoNCE or CCT: the swap is one line.

    python examples/simclr.py --loss cct --views 5 --epochs 10
    python examples/simclr.py --loss infonce --views 2
    python examples/simclr.py --loss cct --supervised --views 2   # supervised CCT (labels)

Each image gets ``--views`` augmentations; a small CNN and an MLP head embed them; the loss
treats the other views of an image as its positives and every view of every other image as
its negatives. With ``--supervised`` (CCT only) the batch's class labels are passed too
(``cct_loss_multiview(views, labels=y)``, the SupCon setting): every view of every same-class
image is a positive and every view of every other-class image a negative; ``--views 1`` then
is the plain metric-learning call. The frozen encoder is then evaluated on a fixed held-out split: kNN accuracy,
linear-probe accuracy, and a linear probe trained on 10 labels per class.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch
from common import Encoder, Split, augment, evaluate, knn_of, load_dataset, projection_head
from tqdm import tqdm

from cct_loss import cct_loss_multiview
from cct_loss.baselines import info_nce_multiview


@dataclass
class Config:
    loss: str = "cct"
    views: int = 2
    epochs: int = 10
    seed: int = 0
    batch_size: int = 256
    lr: float = 3e-3
    t_pos: float = 1.0
    t_neg: float = 2.0
    temperature: float = 0.2
    dataset: str = "mnist"
    limit: int | None = None
    max_steps: int | None = None
    progress: bool = True
    track_knn: bool = True  # kNN accuracy after every epoch (the learning curve)
    supervised: bool = False  # pass the batch's class labels (CCT only)


@dataclass
class Result:
    config: Config
    metrics: dict[str, float]
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean loss per epoch
    knn_curve: list[float] = field(default_factory=list)  # kNN accuracy after each epoch
    encoder: Encoder | None = None
    head: torch.nn.Module | None = None


def contrastive_loss(z: torch.Tensor, cfg: Config, labels: torch.Tensor) -> torch.Tensor:
    """``z``: ``(V, B, D)`` embeddings of V views of B images with class ``labels`` ``(B,)``."""
    if cfg.supervised:  # supervised CCT: positives are the same-class images' views
        return cct_loss_multiview(list(z), labels=labels, t_pos=cfg.t_pos, t_neg=cfg.t_neg)
    if cfg.loss == "cct":
        # CCT (with 2 views this is exactly cct_loss(z[0], z[1])): V - 1 positives per query
        return cct_loss_multiview(list(z), t_pos=cfg.t_pos, t_neg=cfg.t_neg)
    if cfg.loss == "cct_paper":  # the paper's small-scale configuration
        return cct_loss_multiview(
            list(z), layout="paper", detach_weights=False, t_pos=cfg.t_pos, t_neg=cfg.t_neg
        )
    return info_nce_multiview(z, temperature=cfg.temperature)  # InfoNCE / NT-Xent


def train(cfg: Config, split: Split | None = None) -> Result:
    """Train encoder + head with the chosen loss; evaluate the frozen encoder."""
    split = split or load_dataset(cfg.dataset, limit=cfg.limit)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    encoder, head = Encoder(), projection_head()
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=1e-5)
    n = len(split.train_x)
    result = Result(cfg, {}, 0.0, encoder=encoder, head=head)
    start = time.perf_counter()
    steps = 0
    bar = tqdm(
        range(cfg.epochs),
        desc=f"{cfg.loss} V={cfg.views} seed={cfg.seed}",
        disable=not cfg.progress,
        leave=False,
    )
    for _ in bar:
        order = torch.randperm(n, generator=gen)
        epoch_losses = []
        for i in range(0, n - cfg.batch_size + 1, cfg.batch_size):
            batch = order[i : i + cfg.batch_size]
            x = split.train_x[batch]
            views = torch.cat([augment(x, gen) for _ in range(cfg.views)])  # (V * B, 1, H, W)
            z = head(encoder(views)).view(cfg.views, len(x), -1)
            loss = contrastive_loss(z, cfg, split.train_y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            epoch_losses.append(loss.item())
            steps += 1
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
        result.losses.append(sum(epoch_losses) / max(len(epoch_losses), 1))
        if cfg.track_knn:
            result.knn_curve.append(knn_of(encoder, split))
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", knn=f"{result.knn_curve[-1]:.3f}")
        if cfg.max_steps is not None and steps >= cfg.max_steps:
            break
    result.seconds = time.perf_counter() - start
    result.metrics = evaluate(encoder, split)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loss", choices=["infonce", "cct", "cct_paper"], default="cct")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument(
        "--supervised", action="store_true", help="CCT with the batch's class labels"
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--t-neg",
        type=float,
        default=2.0,
        help="CCT negative sharpness (an InfoNCE temperature tau corresponds to 1 / (2 tau))",
    )
    parser.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature")
    parser.add_argument("--dataset", choices=["mnist", "digits", "fashion"], default="mnist")
    parser.add_argument(
        "--limit", type=int, default=None, help="use at most this many training images"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    args = parser.parse_args()
    if args.supervised and args.loss != "cct":
        parser.error("--supervised is for --loss cct")
    if args.views < (1 if args.supervised else 2):
        parser.error("--views must be at least 2 (1 with --supervised)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cfg = Config(
        loss=args.loss,
        views=args.views,
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        t_neg=args.t_neg,
        temperature=args.temperature,
        dataset=args.dataset,
        limit=args.limit,
        max_steps=args.max_steps,
        supervised=args.supervised,
    )
    result = train(cfg)
    m = result.metrics
    print(
        f"{cfg.loss}{' supervised' if cfg.supervised else ''} views={cfg.views} seed={cfg.seed}: kNN {m['knn']:.3f}  linear {m['linear']:.3f}  "
        f"10-shot {m['few_shot']:.3f}  ({result.seconds:.0f} s)"
    )


if __name__ == "__main__":
    main()
