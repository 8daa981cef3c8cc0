"""``make experiment-negatives``: does it matter how many negatives? The paper's first claim.

The paper motivates CCT by InfoNCE's sensitivity to how many negatives it sees. This measures
that sensitivity on the split, encoder, augmentations, optimiser and evaluation of
``make experiment`` (Fashion-MNIST, 4,000 training images; kNN and linear probe on the frozen
encoder, test split), in two sweeps:

* **Queue sweep** (MoCo-style: a momentum key encoder, a FIFO queue of keys): a fixed batch of
  128 and a fixed number of steps; only the queue length ``K`` varies, from 8 (few negatives,
  where the paper's claim would bite) to 16,384. The queue is filled with
  the initial key encoder's keys before the first step, so every step sees ``K`` negatives.
  Losses: InfoNCE and CCT (``cct_loss(q, k, queue)``).
* **Batch sweep** (in-batch, two views): ``N`` images per step for a fixed number of epochs, so
  the number of negatives (``2N - 2`` per query; ``N - 1`` in the paper's layout) moves with the
  number of steps; the learning rate is not rescaled (Adam), as a user who changes only the
  batch would do. Losses: InfoNCE (NT-Xent), CCT in the NT-Xent layout, and the paper's
  configuration (``layout="paper"``, ``detach_weights=False``).

Each loss tunes its temperature (InfoNCE ``tau`` in {0.1, 0.25, 0.5, 1}) or sharpness (CCT
``t_neg`` in {5, 2, 1, 0.5}, the matched ``1 / (2 tau)``) once, at the sweep's tuning point, on
the validation split, and keeps it across the sweep. A pick at the edge of the values tried
widens the grid one step along ``make experiment``'s ladder (``tau`` 0.0125 to 8), until the pick
is interior or the ladder ends (the report says which). The final runs use seeds 0 to
``--seeds - 1`` for every loss and setting (the same initialisation, augmentations and batch
order for every loss at a setting), on the test split. Reported: each loss's mean accuracy at
each setting with its 95% t-interval; per loss, the drop from the largest to the smallest
setting (paired by seed); and the paired difference of drops, CCT minus InfoNCE, the number that
answers the claim (negative: CCT loses less accuracy when it gets fewer negatives).

    python examples/negatives.py [--seeds 16] [--out experiment_output]

Writes ``negatives.json`` (every run), ``negatives.md`` and ``negatives.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import moco
import torch
from common import Split, load_fashion_mnist, make_reproducible, mean_interval, paired_difference
from experiment import TUNE_SEED_BASE, Tuned, tune_widening, tuning_table
from experiment import setting as setting_of
from grid import METRICS
from simclr import Config
from simclr import train as train_in_batch

#: The queue sweep: K, the batch, the steps, where it is tuned.
QUEUE_SIZES = (8, 32, 256, 1024, 4096, 16384)
QUEUE_BATCH = 128
QUEUE_STEPS = 500  # 16 epochs of 31 batches: even K = 16384 is refreshed four times
QUEUE_LOSSES = ("infonce", "cct")

#: The batch sweep: N per step, the epochs, where it is tuned.
BATCHES = (32, 64, 128, 256, 512)
BATCH_EPOCHS = 8
BATCH_LOSSES = ("infonce", "cct", "cct_paper")


class Sweep:
    """One sweep: its settings (tuned at the middle one, the lower middle for an even count),
    its losses, how it runs one training and how many negatives a query gets."""

    def __init__(
        self,
        name: str,
        settings: tuple[int, ...],
        losses: tuple[str, ...],
        run: Callable[[str, int, float, int, Split, float], dict[str, float]],
        negatives: Callable[[str, int], int],
        what: str,
    ) -> None:
        self.name, self.settings, self.losses = name, tuple(sorted(settings)), losses
        self.tune_at = self.settings[(len(self.settings) - 1) // 2]
        self.run, self.negatives, self.what = run, negatives, what


def queue_run(
    loss: str, k: int, tau: float, seed: int, split: Split, length: float
) -> dict[str, float]:
    """MoCo-style training with a queue of ``k`` keys for ``length`` x the sweep's steps."""
    metrics, _ = moco.train(
        loss,
        epochs=10**6,
        max_steps=round(QUEUE_STEPS * length),
        seed=seed,
        batch_size=QUEUE_BATCH,
        queue_size=k,
        temperature=tau,
        t_neg=1.0 / (2.0 * tau),
        split=split,
        progress=False,
        track_knn=False,
        prime_keys=k,
    )
    return metrics


def batch_run(
    loss: str, n: int, tau: float, seed: int, split: Split, length: float
) -> dict[str, float]:
    """In-batch training on two views, ``n`` images per step, ``length`` x the sweep's epochs."""
    cfg = Config(
        loss=loss,
        views=2,
        epochs=round(BATCH_EPOCHS * length),
        seed=seed,
        batch_size=n,
        dataset="fashion",
        progress=False,
        track_knn=False,
        temperature=tau,
        t_neg=1.0 / (2.0 * tau),
    )
    return train_in_batch(cfg, split).metrics


def make_sweeps(queue_sizes: tuple[int, ...], batches: tuple[int, ...]) -> tuple[Sweep, ...]:
    """The queue sweep (tuned at K = 256 by default: the lower middle of six, next to the
    geometric middle of 8 and 16,384, about 362) and the batch sweep (tuned at N = 128)."""
    return (
        Sweep(
            "queue",
            queue_sizes,
            QUEUE_LOSSES,
            queue_run,
            lambda loss, k: k,
            f"MoCo-style, batch {QUEUE_BATCH}, {QUEUE_STEPS} steps; K = queue length",
        ),
        Sweep(
            "batch",
            batches,
            BATCH_LOSSES,
            batch_run,
            lambda loss, n: n - 1 if loss == "cct_paper" else 2 * n - 2,
            f"in-batch, 2 views, {BATCH_EPOCHS} epochs; N = images per step",
        ),
    )


def tune(
    sweep: Sweep, seeds: int, length: float, split: Split, runs: list[dict[str, Any]]
) -> dict[str, Tuned]:
    """Each loss's ``tau`` (equivalent) at the sweep's tuning point, by validation kNN, on
    ``make experiment``'s grid, widened until the pick is interior."""
    tuned = {}
    for loss in sweep.losses:

        def score(tau: float, loss: str = loss) -> float:
            found = [
                sweep.run(loss, sweep.tune_at, tau, TUNE_SEED_BASE + s, split, length)
                for s in range(seeds)
            ]
            for s, metrics in enumerate(found):
                runs.append(
                    {"sweep": sweep.name, "loss": loss, "setting": sweep.tune_at, "tau": tau}
                    | {"seed": TUNE_SEED_BASE + s, **metrics}
                )
            mean = statistics.fmean(m["knn"] for m in found)
            print(
                f"  tune {sweep.name} {loss:<9} at {sweep.tune_at}, tau~{tau}: val kNN {mean:.3f}",
                flush=True,
            )
            return mean

        tuned[loss] = tune_widening(score)
    return tuned


def summarise(sweep: Sweep, final: list[dict[str, Any]], seeds: int) -> dict[str, Any]:
    """Per loss and setting: mean and interval; per loss: the drop; per CCT loss: the paired
    difference of drops against InfoNCE."""

    def accuracies(loss: str, setting: int, key: str) -> list[float]:
        rows = sorted(
            (r for r in final if (r["loss"], r["setting"]) == (loss, setting)),
            key=lambda r: r["seed"],
        )
        assert [r["seed"] for r in rows] == list(range(seeds))
        return [float(r[key]) for r in rows]

    largest, smallest = max(sweep.settings), min(sweep.settings)
    points = {
        f"{loss}/{setting}/{key}": mean_interval(accuracies(loss, setting, key))
        for loss in sweep.losses
        for setting in sweep.settings
        for key, _ in METRICS
    }
    drops = {}
    per_seed_drops: dict[tuple[str, str], list[float]] = {}
    for loss in sweep.losses:
        for key, _ in METRICS:
            big, small = accuracies(loss, largest, key), accuracies(loss, smallest, key)
            drops[f"{loss}/{key}"] = paired_difference(big, small)
            per_seed_drops[(loss, key)] = [b - s for b, s in zip(big, small, strict=True)]
    differences = {
        f"{loss}-infonce/{key}": paired_difference(
            per_seed_drops[(loss, key)], per_seed_drops[("infonce", key)]
        )
        for loss in sweep.losses
        if loss != "infonce"
        for key, _ in METRICS
    }
    return {"points": points, "drops": drops, "difference_of_drops": differences}


def interval(d: dict[str, float], digits: int = 3) -> str:
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def markdown(
    sweeps: tuple[Sweep, ...],
    summaries: dict[str, dict[str, Any]],
    tuned: dict[str, dict[str, Tuned]],
    seeds: int,
    minutes: float,
) -> str:
    lines = [f"# Does it matter how many negatives? ({seeds} paired seeds per point)", ""]
    for sweep in sweeps:
        summary = summaries[sweep.name]
        largest, smallest = max(sweep.settings), min(sweep.settings)
        lines += [
            f"## {sweep.name.capitalize()} sweep: {sweep.what}",
            "",
            "Tuned at "
            + f"{sweep.tune_at}: "
            + ", ".join(
                f"{loss} {setting_of(loss, t.best)}" for loss, t in tuned[sweep.name].items()
            ),
            "",
            *tuning_table({loss: (loss, t) for loss, t in tuned[sweep.name].items()}),
            "",
            "| loss | setting | negatives per query | kNN (test), 95% interval | linear probe (test) |",
            "|---|---|---|---|---|",
        ]
        for loss in sweep.losses:
            for setting in sweep.settings:
                cells = [
                    _mean_cell(summary["points"][f"{loss}/{setting}/{key}"]) for key, _ in METRICS
                ]
                lines.append(
                    f"| {loss} | {setting} | {sweep.negatives(loss, setting)} | "
                    f"{cells[0]} | {cells[1]} |"
                )
        lines += [
            "",
            f"Drop from {largest} to {smallest} (accuracy at {largest} minus at {smallest}, "
            "paired by seed; positive: fewer negatives cost accuracy):",
            "",
            "| loss | kNN drop | linear probe drop |",
            "|---|---|---|",
        ]
        for loss in sweep.losses:
            cells = [interval(summary["drops"][f"{loss}/{key}"]) for key, _ in METRICS]
            lines.append(f"| {loss} | {cells[0]} | {cells[1]} |")
        lines += [
            "",
            "Paired difference of drops (negative: CCT is less sensitive than InfoNCE):",
            "",
            "| difference | kNN | linear probe |",
            "|---|---|---|",
        ]
        for loss in sweep.losses[1:]:
            cells = [
                interval(summary["difference_of_drops"][f"{loss}-infonce/{key}"])
                for key, _ in METRICS
            ]
            lines.append(f"| {loss} - infonce | {cells[0]} | {cells[1]} |")
        lines.append("")
    lines.append(f"{minutes:.0f} minutes on {torch.get_num_threads()} threads")
    return "\n".join(lines) + "\n"


def _mean_cell(d: dict[str, float]) -> str:
    return f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"


def plot(sweeps: tuple[Sweep, ...], summaries: dict[str, dict[str, Any]], path: Path) -> None:
    """Accuracy against negatives per query, one line per loss with its 95% band."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False)
    for row, sweep in enumerate(sweeps):
        for col, (key, name) in enumerate(METRICS):
            ax = axes[row][col]
            for loss in sweep.losses:
                xs = [sweep.negatives(loss, s) for s in sweep.settings]
                points = [
                    summaries[sweep.name]["points"][f"{loss}/{s}/{key}"] for s in sweep.settings
                ]
                means = [p["mean"] for p in points]
                ax.plot(xs, means, marker="o", label=loss)
                ax.fill_between(
                    xs, [p["low"] for p in points], [p["high"] for p in points], alpha=0.2
                )
            ax.set_xscale("log", base=2)
            ax.set_xlabel("negatives per query")
            ax.set_ylabel(f"{name} accuracy (test)")
            ax.set_title(f"{sweep.name} sweep, {name}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Accuracy against the number of negatives (mean and 95% t-interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--tune-seeds", type=int, default=2)
    parser.add_argument("--tune-length", type=float, default=0.75, help="x the final runs' length")
    parser.add_argument("--length", type=float, default=1.0, help="x the sweeps' steps/epochs")
    parser.add_argument("--out", type=Path, default=Path("experiment_output"))
    parser.add_argument("--limit", type=int, default=None, help="training images (smoke tests)")
    parser.add_argument("--queue-sizes", nargs="+", type=int, default=list(QUEUE_SIZES))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    args = parser.parse_args()
    sweeps = make_sweeps(tuple(args.queue_sizes), tuple(args.batches))
    make_reproducible(threads=2)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    validation = load_fashion_mnist("validation", limit=args.limit)
    test = load_fashion_mnist("test", limit=args.limit)
    tuning: list[dict[str, Any]] = []
    final: dict[str, list[dict[str, Any]]] = {}
    tuned: dict[str, dict[str, Tuned]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for sweep in sweeps:
        print(f"== {sweep.name} sweep: {sweep.what}", flush=True)
        tuned[sweep.name] = tune(sweep, args.tune_seeds, args.tune_length, validation, tuning)
        rows: list[dict[str, Any]] = []
        for setting in sweep.settings:
            for loss in sweep.losses:
                tau = tuned[sweep.name][loss].best
                for seed in range(args.seeds):
                    began = time.perf_counter()
                    metrics = sweep.run(loss, setting, tau, seed, test, args.length)
                    row: dict[str, Any] = {"sweep": sweep.name, "loss": loss, "setting": setting}
                    row |= {"negatives": sweep.negatives(loss, setting), "tau": tau, "seed": seed}
                    row |= {**setting_of(loss, tau), **metrics}
                    row["seconds"] = time.perf_counter() - began
                    rows.append(row)
                print(
                    f"  {sweep.name} {loss:<9} at {setting:>5}: kNN "
                    f"{statistics.fmean(r['knn'] for r in rows[-args.seeds :]):.3f}",
                    flush=True,
                )
        final[sweep.name] = rows
        summaries[sweep.name] = summarise(sweep, rows, args.seeds)
    minutes = (time.perf_counter() - start) / 60
    table = markdown(sweeps, summaries, tuned, args.seeds, minutes)
    print("\n" + table)
    (args.out / "negatives.md").write_text(table)
    (args.out / "negatives.json").write_text(
        json.dumps(
            {
                "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), 4000/1000/1000 stratified",
                "seeds": args.seeds,
                "tuning": {"seeds": args.tune_seeds, "length": args.tune_length, "runs": tuning},
                "best_tau_equivalent": {
                    name: {loss: t.best for loss, t in found.items()}
                    for name, found in tuned.items()
                },
                "grids": {
                    name: {loss: t.as_json() for loss, t in found.items()}
                    for name, found in tuned.items()
                },
                "sweeps": {
                    s.name: {
                        "what": s.what,
                        "settings": list(s.settings),
                        "tuned_at": s.tune_at,
                        "runs": final[s.name],
                        **summaries[s.name],
                    }
                    for s in sweeps
                },
                "minutes": minutes,
            },
            indent=1,
        )
    )
    plot(sweeps, summaries, args.out / "negatives.png")
    print(f"wrote {args.out}/negatives.json, negatives.md, negatives.png")


if __name__ == "__main__":
    main()
