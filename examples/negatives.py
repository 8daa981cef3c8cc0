"""``make experiment-negatives``: does it matter how many negatives? The paper's first claim.

The paper motivates CCT by InfoNCE's sensitivity to how many negatives it sees. This measures
that sensitivity on the split, encoder, augmentations, optimiser and evaluation of
``make experiment`` (Fashion-MNIST, 4,000 training images; kNN and linear probe on the frozen
encoder, test split), in two sweeps:

* **Queue sweep** (MoCo-style: a momentum key encoder, a FIFO queue of keys): a fixed batch of
  128 and a fixed number of steps; only the queue length ``K`` varies: 8 (few negatives, where
  the paper's claim would bite), 256 and 4,096 (about one epoch of keys). The queue is filled
  with the initial key encoder's keys before the first step, so every step sees ``K``
  negatives. Losses: InfoNCE and CCT (``cct_loss(q, k, queue)``).
* **Batch sweep** (in-batch, two views): ``N`` = 32, 128 or 512 images per step for a fixed
  number of epochs, so the number of negatives (``2N - 2`` per query; ``N - 1`` in the paper's
  layout) moves with the number of steps; the learning rate is not rescaled (Adam), as a user
  who changes only the batch would do. Losses: InfoNCE (NT-Xent) and the paper's configuration
  (``layout="paper"``, ``detach_weights=False``); CCT in the NT-Xent layout, which tracked
  InfoNCE in this sweep before, is left to the queue sweep and ``make experiment`` (time).

Each loss tunes its temperature (InfoNCE ``tau`` in {0.1, 0.25, 0.5, 1}) or sharpness (CCT
``t_neg`` in {5, 2, 1, 0.5}, the matched ``1 / (2 tau)``) once, at the sweep's tuning point
(K = 256, N = 128), on the validation split with 4 seeds at the full run length, widening along
``make experiment``'s ladder until the pick is interior. Then, on the test split (the design of
:mod:`grid`): every loss at every setting and every value of its grid with 6 paired seeds, and
at its pick with 16. Reported, each at the picks and at the best test values (per setting, an
optimistic bound): each loss's accuracy, CCT minus InfoNCE at each setting, each loss's drop
from the largest to the smallest setting (paired by seed), and the difference of drops, CCT
minus InfoNCE, the number that answers the claim (negative: CCT loses less accuracy when it gets
fewer negatives); with whether each conclusion changes between the two.

    python examples/negatives.py [--seeds 16] [--grid-seeds 6] [--out experiment_output]

Writes ``negatives.json`` (every run), ``negatives.md``, ``negatives.png`` and
``negatives_grid.png``; ``--from-json`` rebuilds them from a ``negatives.json`` without
training.
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
from common import Split, load_fashion_mnist, make_reproducible
from experiment import TAUS, TUNE_SEED_BASE, Tuned, tune_widening, tuning_table, value_label
from experiment import setting as setting_of
from grid import (
    GRID_HEADER,
    METRICS,
    Design,
    best_on_test,
    both_ways,
    conclusion,
    final_seeds,
    grid_rows,
    interval_of,
    per_seed,
    signed,
    unsigned,
)
from simclr import Config
from simclr import train as train_in_batch

#: The queue sweep: K, the batch, the steps, where it is tuned.
QUEUE_SIZES = (8, 256, 4096)
QUEUE_TUNE_AT = 256
QUEUE_BATCH = 128
QUEUE_STEPS = 500  # 16 epochs of 31 batches: even K = 4096 is refreshed 15 times
QUEUE_LOSSES = ("infonce", "cct")

#: The batch sweep: N per step, the epochs, where it is tuned.
BATCHES = (32, 128, 512)
BATCH_TUNE_AT = 128
BATCH_EPOCHS = 8
BATCH_LOSSES = ("infonce", "cct_paper")


class Sweep:
    """One sweep: its settings, where it tunes, its losses, how it runs one training and how
    many negatives a query gets."""

    def __init__(
        self,
        name: str,
        settings: tuple[int, ...],
        tune_at: int,
        losses: tuple[str, ...],
        run: Callable[[str, int, float, int, Split, float], dict[str, float]],
        negatives: Callable[[str, int], int],
        what: str,
    ) -> None:
        if len(settings) < 2:
            raise ValueError(f"a sweep needs two settings or more, got {settings}")
        self.name, self.settings, self.tune_at = name, tuple(sorted(settings)), tune_at
        self.losses, self.run, self.negatives, self.what = losses, run, negatives, what


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
        epochs=max(1, round(BATCH_EPOCHS * length)),
        seed=seed,
        batch_size=n,
        dataset="fashion",
        progress=False,
        track_knn=False,
        temperature=tau,
        t_neg=1.0 / (2.0 * tau),
    )
    return train_in_batch(cfg, split).metrics


def make_sweeps(
    queue_sizes: tuple[int, ...],
    batches: tuple[int, ...],
    queue_tune_at: int = QUEUE_TUNE_AT,
    batch_tune_at: int = BATCH_TUNE_AT,
) -> tuple[Sweep, ...]:
    """The queue sweep (tuned at K = 256, the geometric middle of 8 and 4,096 rounded to a
    power of two) and the batch sweep (tuned at N = 128, the geometric middle of 32 and 512)."""
    return (
        Sweep(
            "queue",
            queue_sizes,
            queue_tune_at,
            QUEUE_LOSSES,
            queue_run,
            lambda loss, k: k,
            f"MoCo-style, batch {QUEUE_BATCH}, {QUEUE_STEPS} steps; K = queue length",
        ),
        Sweep(
            "batch",
            batches,
            batch_tune_at,
            BATCH_LOSSES,
            batch_run,
            lambda loss, n: n - 1 if loss == "cct_paper" else 2 * n - 2,
            f"in-batch, 2 views, {BATCH_EPOCHS} epochs; N = images per step",
        ),
    )


def tune(
    sweep: Sweep,
    design: Design,
    length: float,
    split: Split,
    runs: list[dict[str, Any]],
    start: tuple[float, ...] = TAUS,
) -> dict[str, Tuned]:
    """Each loss's ``tau`` (equivalent) at the sweep's tuning point, by validation kNN, on
    ``make experiment``'s grid, widened until the pick is interior."""
    tuned = {}
    for loss in sweep.losses:

        def score(tau: float, loss: str = loss) -> float:
            found = []
            for s in range(design.tune_seeds):
                began = time.perf_counter()
                metrics = sweep.run(loss, sweep.tune_at, tau, TUNE_SEED_BASE + s, split, length)
                found.append(metrics)
                runs.append(
                    {"sweep": sweep.name, "loss": loss, "setting": sweep.tune_at, "tau": tau}
                    | {"seed": TUNE_SEED_BASE + s, **metrics}
                    | {"seconds": time.perf_counter() - began}
                )
            mean = statistics.fmean(m["knn"] for m in found)
            print(
                f"  tune {sweep.name} {loss:<9} at {sweep.tune_at}, tau~{tau}: val kNN {mean:.3f}",
                flush=True,
            )
            return mean

        tuned[loss] = tune_widening(score, start)
    return tuned


def train_grid(
    sweep: Sweep, tuned: dict[str, Tuned], design: Design, length: float, split: Split
) -> list[dict[str, Any]]:
    """Every loss at every setting and grid value (the grid's seeds; the pick's at its pick)."""
    rows: list[dict[str, Any]] = []
    for setting in sweep.settings:
        for loss in sweep.losses:
            t = tuned[loss]
            for tau in sorted(t.scores):
                for seed in final_seeds(tau, t.best, design):
                    began = time.perf_counter()
                    metrics = sweep.run(loss, setting, tau, seed, split, length)
                    row: dict[str, Any] = {"sweep": sweep.name, "loss": loss, "setting": setting}
                    row |= {"negatives": sweep.negatives(loss, setting), "tau": tau, "seed": seed}
                    row |= {**setting_of(loss, tau), **metrics}
                    row["seconds"] = time.perf_counter() - began
                    rows.append(row)
                mean = statistics.fmean(
                    r["knn"] for r in rows[-len(final_seeds(tau, t.best, design)) :]
                )
                print(
                    f"  {sweep.name} {loss:<9} at {setting:>5}, tau~{tau:<5}"
                    f"{' (pick)' if tau == t.best else ''}: kNN {mean:.3f}",
                    flush=True,
                )
    return rows


def summarise(sweep: Sweep, found: dict[str, Any], design: Design) -> dict[str, Any]:
    """From one sweep's runs: each loss's accuracy at its pick per setting; and, each at the
    picks and at the best test values, CCT minus InfoNCE per setting, each loss's drop from the
    largest to the smallest setting and the difference of drops against InfoNCE."""
    runs = found["runs"]
    tuned = {loss: Tuned.from_json(t) for loss, t in found["grids"].items()}
    largest, smallest = max(sweep.settings), min(sweep.settings)
    points = {
        f"{loss}/{setting}/{metric}": interval_of(
            per_seed(runs, metric, design.pick_seeds, loss=loss, setting=setting, tau=t.best)
        )
        for loss, t in tuned.items()
        for setting in sweep.settings
        for metric, _ in METRICS
    }
    best = {
        f"{loss}/{setting}/{metric}": best_on_test(
            runs, metric, sorted(t.scores), design.grid_seeds, loss=loss, setting=setting
        )
        for loss, t in tuned.items()
        for setting in sweep.settings
        for metric, _ in METRICS
    }

    def at(loss: str, setting: int, metric: str, where: str) -> dict[str, Any]:
        tau = tuned[loss].best if where == "pick" else best[f"{loss}/{setting}/{metric}"]
        return {"loss": loss, "setting": setting, "tau": tau}

    def compare(terms: list[tuple[float, str, int]], metric: str) -> dict[str, Any]:
        return both_ways(
            runs,
            metric,
            design,
            at_pick=[(sign, at(loss, s, metric, "pick")) for sign, loss, s in terms],
            at_best=[(sign, at(loss, s, metric, "best")) for sign, loss, s in terms],
        )

    others = [loss for loss in sweep.losses if loss != "infonce"]
    differences = {
        f"{loss}-infonce/{setting}/{metric}": compare(
            [(1.0, loss, setting), (-1.0, "infonce", setting)], metric
        )
        for loss in others
        for setting in sweep.settings
        for metric, _ in METRICS
    }
    drops = {
        f"{loss}/{metric}": compare([(1.0, loss, largest), (-1.0, loss, smallest)], metric)
        for loss in sweep.losses
        for metric, _ in METRICS
    }
    difference_of_drops = {
        f"{loss}-infonce/{metric}": compare(
            [
                (1.0, loss, largest),
                (-1.0, loss, smallest),
                (-1.0, "infonce", largest),
                (1.0, "infonce", smallest),
            ],
            metric,
        )
        for loss in others
        for metric, _ in METRICS
    }
    return {
        "points": points,
        "best_test_values": best,
        "differences": differences,
        "drops": drops,
        "difference_of_drops": difference_of_drops,
    }


def markdown(sweeps: tuple[Sweep, ...], raw: dict[str, Any]) -> str:
    design = Design(**raw["design"])
    lines = [
        f"# Does it matter how many negatives? ({design.pick_seeds} paired seeds at each "
        f"validation pick, {design.grid_seeds} at every grid value)",
        "",
        "Each comparison twice: at the validation picks (tuned once per loss at the sweep's "
        f"tuning point; {design.pick_seeds} seeds) and at the best test values (the grid value "
        f"with the best mean test accuracy at each setting, per metric, over {design.grid_seeds} "
        "seeds: selected on the test split, an optimistic bound, not an estimate). Verdict: + or "
        "- when the 95% interval excludes 0, 0 when it holds 0.",
        "",
    ]
    for sweep in sweeps:
        found = raw["sweeps"][sweep.name]
        summary = found["summary"]
        tuned = {loss: Tuned.from_json(t) for loss, t in found["grids"].items()}
        largest, smallest = max(sweep.settings), min(sweep.settings)
        lines += [
            f"## {sweep.name.capitalize()} sweep: {sweep.what}",
            "",
            f"### Each loss at its validation pick ({design.pick_seeds} seeds)",
            "",
            "| loss | setting | negatives per query | kNN (test), 95% interval | linear probe (test) |",
            "|---|---|---|---|---|",
        ]
        for loss in sweep.losses:
            for setting in sweep.settings:
                cells = [
                    unsigned(summary["points"][f"{loss}/{setting}/{metric}"])
                    for metric, _ in METRICS
                ]
                lines.append(
                    f"| {loss} {value_label(loss, tuned[loss].best)} | {setting} | "
                    f"{sweep.negatives(loss, setting)} | {cells[0]} | {cells[1]} |"
                )
        lines += [
            "",
            "### The comparisons, at the picks and at the best test values",
            "",
            f"Drop: accuracy at {largest} minus at {smallest}, paired by seed (positive: fewer "
            "negatives cost accuracy). Difference of drops: negative when CCT loses less than "
            "InfoNCE.",
            "",
            "| comparison | metric | at the validation picks | at the best test values "
            "(upper bound) | conclusion |",
            "|---|---|---|---|---|",
        ]
        for label, key in _comparison_rows(sweep):
            for metric, name in METRICS:
                c = summary[key[0]][f"{key[1]}/{metric}"]
                lines.append(
                    f"| {label} | {name} | {signed(c['at_pick'])} | {signed(c['at_best'])} | "
                    f"{conclusion(c)} |"
                )
        lines += [
            "",
            f"### Every loss at every setting and grid value ({design.grid_seeds} paired seeds; "
            "best test value per metric in bold)",
            "",
            *(line.format(label="setting") for line in GRID_HEADER),
        ]
        for setting in sweep.settings:
            lines += grid_rows(
                found["runs"],
                sweep.losses,
                {loss: sorted(t.scores) for loss, t in tuned.items()},
                {loss: t.best for loss, t in tuned.items()},
                design,
                str(setting),
                value_label,
                setting=setting,
            )
        lines += [
            "",
            f"### Tuning at {sweep.tune_at}: validation kNN, {design.tune_seeds} seeds at the "
            "full length (widened along the ladder until each pick is interior)",
            "",
            *tuning_table({loss: (loss, t) for loss, t in tuned.items()}),
            "",
        ]
    lines.append(budget(sweeps, raw, design))
    return "\n".join(lines) + "\n"


def _comparison_rows(sweep: Sweep) -> list[tuple[str, tuple[str, str]]]:
    """The comparisons' rows: a label and where its summary sits (part, key without metric)."""
    largest, smallest = max(sweep.settings), min(sweep.settings)
    others = [loss for loss in sweep.losses if loss != "infonce"]
    rows = [
        (f"{loss} - infonce at {setting}", ("differences", f"{loss}-infonce/{setting}"))
        for loss in others
        for setting in sweep.settings
    ]
    rows += [(f"drop of {loss}, {largest} to {smallest}", ("drops", loss)) for loss in sweep.losses]
    rows += [
        (f"difference of drops, {loss} - infonce", ("difference_of_drops", f"{loss}-infonce"))
        for loss in others
    ]
    return rows


def budget(sweeps: tuple[Sweep, ...], raw: dict[str, Any], design: Design) -> str:
    """Where the minutes went: per sweep tuning, the grid's runs and the picks' extra seeds."""
    parts = []
    spent = 0.0
    for sweep in sweeps:
        runs = raw["sweeps"][sweep.name]["runs"]
        tuning = [r for r in raw["tuning"]["runs"] if r["sweep"] == sweep.name]
        minutes = [
            sum(r["seconds"] for r in tuning) / 60,
            sum(r["seconds"] for r in runs if r["seed"] < design.grid_seeds) / 60,
            sum(r["seconds"] for r in runs if r["seed"] >= design.grid_seeds) / 60,
        ]
        spent += sum(minutes)
        parts.append(
            f"{sweep.name} sweep {sum(minutes):.0f} (tuning {minutes[0]:.0f}, {len(tuning)} runs; "
            f"every grid value {minutes[1]:.0f}; the picks' extra seeds {minutes[2]:.0f})"
        )
    return (
        f"{raw['minutes']:.0f} minutes on {raw['threads']} threads: "
        + "; ".join(parts)
        + f"; data and reports {raw['minutes'] - spent:.0f}"
    )


def plot(sweeps: tuple[Sweep, ...], raw: dict[str, Any], path: Path) -> None:
    """Accuracy against negatives per query, one line per loss: at its validation pick (solid,
    with the 95% band) and at its best test value per setting (dashed, an upper bound)."""
    design = Design(**raw["design"])
    fig, axes = plt.subplots(len(sweeps), len(METRICS), figsize=(10, 7), squeeze=False)
    for row, sweep in enumerate(sweeps):
        found = raw["sweeps"][sweep.name]
        summary = found["summary"]
        for col, (metric, name) in enumerate(METRICS):
            ax = axes[row][col]
            for i, loss in enumerate(sweep.losses):
                xs = [sweep.negatives(loss, s) for s in sweep.settings]
                points = [summary["points"][f"{loss}/{s}/{metric}"] for s in sweep.settings]
                ax.plot(xs, [p["mean"] for p in points], marker="o", color=f"C{i}", label=loss)
                ax.fill_between(
                    xs,
                    [p["low"] for p in points],
                    [p["high"] for p in points],
                    color=f"C{i}",
                    alpha=0.2,
                )
                best = [
                    statistics.fmean(
                        per_seed(
                            found["runs"],
                            metric,
                            design.grid_seeds,
                            loss=loss,
                            setting=s,
                            tau=summary["best_test_values"][f"{loss}/{s}/{metric}"],
                        )
                    )
                    for s in sweep.settings
                ]
                ax.plot(
                    xs, best, ls="--", marker="x", color=f"C{i}", label=f"{loss}, best test value"
                )
            ax.set_xscale("log", base=2)
            ax.set_xlabel("negatives per query")
            ax.set_ylabel(f"{name} accuracy (test)")
            ax.set_title(f"{sweep.name} sweep, {name}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(
        "Accuracy against the number of negatives (solid: validation picks, 95% band; "
        "dashed: best test values)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(sweeps: tuple[Sweep, ...], raw: dict[str, Any], path: Path) -> None:
    """Test kNN against the grid value, one panel per sweep and setting, one line per loss with
    its 95% band over the grid seeds; the validation picks starred."""
    design = Design(**raw["design"])
    columns = max(len(s.settings) for s in sweeps)
    fig, axes = plt.subplots(
        len(sweeps), columns, figsize=(4 * columns, 3.5 * len(sweeps)), squeeze=False
    )
    for row, sweep in enumerate(sweeps):
        found = raw["sweeps"][sweep.name]
        tuned = {loss: Tuned.from_json(t) for loss, t in found["grids"].items()}
        for col in range(columns):
            ax = axes[row][col]
            if col >= len(sweep.settings):
                ax.axis("off")
                continue
            setting = sweep.settings[col]
            for i, loss in enumerate(sweep.losses):
                taus = sorted(tuned[loss].scores)
                points = [
                    interval_of(
                        per_seed(
                            found["runs"],
                            "knn",
                            design.grid_seeds,
                            loss=loss,
                            setting=setting,
                            tau=tau,
                        )
                    )
                    for tau in taus
                ]
                ax.plot(taus, [p["mean"] for p in points], marker="o", color=f"C{i}", label=loss)
                ax.fill_between(
                    taus,
                    [p["low"] for p in points],
                    [p["high"] for p in points],
                    color=f"C{i}",
                    alpha=0.15,
                )
                pick = tuned[loss].best
                ax.plot(
                    [pick],
                    [points[taus.index(pick)]["mean"]],
                    marker="*",
                    markersize=13,
                    color=f"C{i}",
                )
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tau (CCT: t_neg = 1 / (2 tau))", fontsize=8)
            ax.set_ylabel("kNN accuracy (test)", fontsize=8)
            label = "K" if sweep.name == "queue" else "N"
            ax.set_title(f"{sweep.name} sweep, {label} = {setting} (* = pick)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Every grid value, {design.grid_seeds} paired seeds (mean and 95% band)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect(args: argparse.Namespace, sweeps: tuple[Sweep, ...], design: Design) -> dict[str, Any]:
    """Tune each sweep's losses on the validation split, then train every loss at every setting
    and grid value on the test split; returns every run (the report's raw data)."""
    validation = load_fashion_mnist("validation", limit=args.limit)
    test = load_fashion_mnist("test", limit=args.limit)
    tuning: list[dict[str, Any]] = []
    found: dict[str, Any] = {}
    for sweep in sweeps:
        print(f"== {sweep.name} sweep: {sweep.what}", flush=True)
        tuned = tune(
            sweep, design, args.tune_length * args.length, validation, tuning, tuple(args.grid)
        )
        found[sweep.name] = {
            "what": sweep.what,
            "settings": list(sweep.settings),
            "tuned_at": sweep.tune_at,
            "grids": {loss: t.as_json() for loss, t in tuned.items()},
            "runs": train_grid(sweep, tuned, design, args.length, test),
        }
    return {
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), 4000/1000/1000 stratified",
        "design": design.as_json(),
        "length": args.length,
        "tuning": {"seeds": design.tune_seeds, "length": args.tune_length, "runs": tuning},
        "sweeps": found,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=16, help="test seeds at each pick")
    parser.add_argument("--grid-seeds", type=int, default=6, help="test seeds at every value")
    parser.add_argument("--tune-seeds", type=int, default=4)
    parser.add_argument("--tune-length", type=float, default=1.0, help="x the final runs' length")
    parser.add_argument("--length", type=float, default=1.0, help="x the sweeps' steps/epochs")
    parser.add_argument("--out", type=Path, default=Path("experiment_output"))
    parser.add_argument("--limit", type=int, default=None, help="training images (smoke tests)")
    parser.add_argument(
        "--grid", nargs="+", type=float, default=list(TAUS), help="the starting grid (tau)"
    )
    parser.add_argument("--queue-sizes", nargs="+", type=int, default=list(QUEUE_SIZES))
    parser.add_argument("--queue-tune-at", type=int, default=QUEUE_TUNE_AT)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--batch-tune-at", type=int, default=BATCH_TUNE_AT)
    parser.add_argument(
        "--from-json", type=Path, default=None, help="rebuild the reports from a negatives.json"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json is not None:
        raw = json.loads(args.from_json.read_text())
        raw["sweeps"] = {
            name: {k: v for k, v in found.items() if k != "summary"}
            for name, found in raw["sweeps"].items()
        }
        design = Design(**raw["design"])
        queue, batch = raw["sweeps"]["queue"], raw["sweeps"]["batch"]
        sweeps = make_sweeps(
            tuple(queue["settings"]), tuple(batch["settings"]), queue["tuned_at"], batch["tuned_at"]
        )
    else:
        design = Design(args.grid_seeds, args.seeds, args.tune_seeds)
        sweeps = make_sweeps(
            tuple(args.queue_sizes), tuple(args.batches), args.queue_tune_at, args.batch_tune_at
        )
        make_reproducible(threads=2)
        start = time.perf_counter()
        raw = collect(args, sweeps, design)
        raw["minutes"] = (time.perf_counter() - start) / 60
    for sweep in sweeps:
        found = raw["sweeps"][sweep.name]
        found["summary"] = summarise(sweep, found, design)
    table = markdown(sweeps, raw)
    print("\n" + table)
    (args.out / "negatives.md").write_text(table)
    (args.out / "negatives.json").write_text(json.dumps(raw, indent=1))
    plot(sweeps, raw, args.out / "negatives.png")
    plot_grid(sweeps, raw, args.out / "negatives_grid.png")
    print(f"wrote {args.out}/negatives.json, negatives.md, negatives.png, negatives_grid.png")


if __name__ == "__main__":
    main()
