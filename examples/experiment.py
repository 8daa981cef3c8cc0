"""``make experiment``: does CCT help? A comparison that can tell, on Fashion-MNIST.

The same encoder, augmentations, optimiser and epochs for every loss; rows at 2 and 5 views:

* ``infonce``: multi-positive InfoNCE (NT-Xent for 2 views), temperature ``tau``;
* ``cct``: CCT in the NT-Xent layout (detached weights, ``t_pos = 1``), sharpness ``t_neg``;
* ``cct_paper``: the paper's small-scale configuration (``layout="paper"``,
  ``detach_weights=False``, ``t_pos = 1``), sharpness ``t_neg``.

Each loss gets the same tuning budget on the validation split, on matched grids (InfoNCE
``tau`` in {0.1, 0.25, 0.5, 1}; CCT ``t_neg`` in {5, 2, 1, 0.5}, their equivalents
``1 / (2 tau)``), selected by validation kNN accuracy; tuning uses fewer seeds and epochs than
the final runs. A pick at the edge of the values tried widens that loss's grid one step along
``TAU_LADDER`` (``tau`` 0.0125 to 8; ``t_neg`` 40 to 1/16), until the pick is interior or the
ladder ends; the report lists every value tried and says which. The final runs train each loss at its best setting with the same seeds (the same
initialisation and augmentations per seed), evaluate on the test split, and report the paired
differences against InfoNCE with a 95% t-interval. Results (every run) go to
``experiment_output/results.json``, the table to ``results.md``, the figure to
``paired_differences.png``.

    python examples/experiment.py [--seeds 16] [--epochs 8] [--tune-seeds 1] [--tune-epochs 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from common import Split, load_fashion_mnist, make_reproducible, paired_difference
from simclr import Config, train

LOSSES = ("infonce", "cct", "cct_paper")
VIEWS = (2, 5)
#: The starting grid (InfoNCE ``tau``; CCT ``t_neg = 1 / (2 tau)``) and the ladder it widens along,
#: one step at a time, while a loss's best value sits at the edge of what it has tried.
TAUS = (0.1, 0.25, 0.5, 1.0)
TAU_LADDER = (0.0125, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
METRICS = (("knn", "kNN"), ("linear", "linear probe"))
TUNE_SEED_BASE = 100  # tuning seeds are not the final seeds


@dataclass
class Tuned:
    """One loss's tuning: the score of every value tried, the pick, and whether it is interior."""

    scores: dict[float, float]
    best: float
    edge: str | None  # None when the pick has a tried value on each side; otherwise why not

    def as_json(self) -> dict[str, Any]:
        return {
            "tried": sorted(self.scores),
            "scores": {str(tau): self.scores[tau] for tau in sorted(self.scores)},
            "best": self.best,
            "interior": self.edge is None,
            "edge": self.edge,
        }


def tune_widening(
    score: Callable[[float], float],
    start: tuple[float, ...] = TAUS,
    ladder: tuple[float, ...] = TAU_LADDER,
) -> Tuned:
    """Score every value of ``start``; while the best score sits at the smallest (largest) value
    tried, score the ladder's next smaller (larger) value too. Stops when the best is interior,
    or at the ladder's end, which the result then names. Ties go to the value tried first."""
    if not start or any(tau not in ladder for tau in start):
        raise ValueError(f"start must be values of the ladder {ladder}, got {start}")
    scores = {tau: score(tau) for tau in start}
    while True:
        best = max(scores, key=lambda tau: scores[tau])
        low, high = min(scores), max(scores)
        if low < best < high:
            return Tuned(scores, best, None)
        below, above = ladder.index(low) - 1, ladder.index(high) + 1
        if best == low and below >= 0:
            scores[ladder[below]] = score(ladder[below])
        elif best == high and above < len(ladder):
            scores[ladder[above]] = score(ladder[above])
        else:
            side = "smallest" if best == low else "largest"
            return Tuned(scores, best, f"tau~{best} is the {side} value of the ladder")


def tuning_table(tuned: dict[str, tuple[str, Tuned]]) -> list[str]:
    """Markdown rows: per labelled loss, every value tried with its validation kNN (the pick in
    bold), and whether the pick is interior."""
    lines = [
        "| tuned | values tried: validation kNN (pick in bold) | pick interior? |",
        "|---|---|---|",
    ]
    for label, (loss, t) in tuned.items():
        cells = []
        for tau in sorted(t.scores):
            cell = f"{_value(loss, tau)}: {t.scores[tau]:.3f}"
            cells.append(f"**{cell}**" if tau == t.best else cell)
        lines.append(
            f"| {label} | {', '.join(cells)} | {'yes' if t.edge is None else 'no: ' + t.edge} |"
        )
    return lines


def _value(loss: str, tau: float) -> str:
    ((name, value),) = setting(loss, tau).items()
    return f"{'tau' if name == 'temperature' else name}={value:g}"


def setting(loss: str, tau: float) -> dict[str, float]:
    """The loss's hyper-parameter at the grid point of InfoNCE temperature ``tau``."""
    return {"temperature": tau} if loss == "infonce" else {"t_neg": 1.0 / (2.0 * tau)}


def run(loss: str, views: int, tau: float, seed: int, epochs: int, split: Split) -> dict[str, Any]:
    cfg = Config(
        loss=loss,
        views=views,
        epochs=epochs,
        seed=seed,
        dataset="fashion",
        progress=False,
        track_knn=False,
    )
    if loss == "infonce":
        cfg.temperature = tau
    else:
        cfg.t_neg = 1.0 / (2.0 * tau)
    result = train(cfg, split)
    return {
        "loss": loss,
        "views": views,
        "tau_equivalent": tau,
        **setting(loss, tau),
        "seed": seed,
        "epochs": epochs,
        **result.metrics,
        "seconds": result.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--tune-seeds", type=int, default=1)
    parser.add_argument("--tune-epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("experiment_output"))
    parser.add_argument("--limit", type=int, default=None, help="training images (smoke tests)")
    args = parser.parse_args()
    make_reproducible(threads=2)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    validation = load_fashion_mnist("validation", limit=args.limit)
    test = load_fashion_mnist("test", limit=args.limit)
    print(
        f"Fashion-MNIST: {len(test.train_x)} training, {len(validation.test_x)} validation, "
        f"{len(test.test_x)} test images; tuning {args.tune_seeds} seed(s) x {args.tune_epochs} "
        f"epochs, final {args.seeds} seeds x {args.epochs} epochs",
        flush=True,
    )

    tuning: list[dict[str, Any]] = []
    tuned: dict[tuple[str, int], Tuned] = {}
    for views in VIEWS:
        for loss in LOSSES:

            def score(tau: float, loss: str = loss, views: int = views) -> float:
                runs = [
                    run(loss, views, tau, TUNE_SEED_BASE + s, args.tune_epochs, validation)
                    for s in range(args.tune_seeds)
                ]
                tuning.extend(runs)
                mean = statistics.fmean(r["knn"] for r in runs)
                print(f"  tune {loss:<9} V={views} tau~{tau:<6}: val kNN {mean:.3f}", flush=True)
                return mean

            tuned[(loss, views)] = tune_widening(score)
    best = {key: t.best for key, t in tuned.items()}

    final: list[dict[str, Any]] = []
    for views in VIEWS:
        for loss in LOSSES:
            tau = best[(loss, views)]
            for seed in range(args.seeds):
                r = run(loss, views, tau, seed, args.epochs, test)
                final.append(r)
                print(
                    f"  final {loss:<9} V={views} {setting(loss, tau)} seed={seed}: "
                    f"kNN {r['knn']:.3f} probe {r['linear']:.3f} ({r['seconds']:.0f} s)",
                    flush=True,
                )

    def metric(loss: str, views: int, key: str) -> list[float]:
        rows = sorted(
            (r for r in final if r["loss"] == loss and r["views"] == views), key=lambda r: r["seed"]
        )
        return [float(r[key]) for r in rows]

    differences = {}
    lines = [
        "| views | loss | setting | kNN (test) | linear probe (test) |",
        "|---|---|---|---|---|",
    ]
    for views in VIEWS:
        for loss in LOSSES:
            cells = [
                f"{statistics.fmean(metric(loss, views, k)):.3f} ± {statistics.stdev(metric(loss, views, k)):.3f}"
                for k, _ in METRICS
            ]
            lines.append(
                f"| {views} | {loss} | {setting(loss, best[(loss, views)])} | {cells[0]} | {cells[1]} |"
            )
    lines += ["", "Tuning (widened along the ladder until each pick is interior):", ""]
    lines += tuning_table(
        {f"{loss}, {views} views": (loss, t) for (loss, views), t in tuned.items()}
    )
    lines += [
        "",
        "| views | paired difference | metric | mean | SE | 95% t-interval | excludes 0 |",
        "|---|---|---|---|---|---|---|",
    ]
    for views in VIEWS:
        for loss in LOSSES[1:]:
            for key, name in METRICS:
                d = paired_difference(metric(loss, views, key), metric("infonce", views, key))
                differences[f"{loss}-infonce/{views}/{key}"] = d
                excludes = d["low"] > 0 or d["high"] < 0
                lines.append(
                    f"| {views} | {loss} - infonce | {name} | {d['mean']:+.4f} | {d['se']:.4f} | "
                    f"[{d['low']:+.4f}, {d['high']:+.4f}] | {'yes' if excludes else 'no'} |"
                )
    minutes = (time.perf_counter() - start) / 60
    lines.append(
        f"\n{args.seeds} seeds, {args.epochs} epochs; {minutes:.0f} minutes on {torch.get_num_threads()} threads"
    )
    table = "\n".join(lines)
    print("\n" + table)
    (args.out / "results.md").write_text(table + "\n")
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), 4000/1000/1000 stratified",
                "tuning": {
                    "seeds": args.tune_seeds,
                    "epochs": args.tune_epochs,
                    "select_by": "validation kNN",
                    "runs": tuning,
                },
                "best_tau_equivalent": {
                    f"{loss}/{views}": tau for (loss, views), tau in best.items()
                },
                "grids": {f"{loss}/{views}": t.as_json() for (loss, views), t in tuned.items()},
                "final": {"seeds": args.seeds, "epochs": args.epochs, "runs": final},
                "paired_differences": differences,
                "minutes": minutes,
            },
            indent=1,
        )
    )
    plot(differences, args.out / "paired_differences.png")
    print(f"wrote {args.out}/results.json, results.md, paired_differences.png")


def plot(differences: dict[str, dict[str, float]], path: Path) -> None:
    """Each paired difference with its 95% interval."""
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = list(differences)
    for i, name in enumerate(labels):
        d = differences[name]
        ax.errorbar(
            i, d["mean"], yerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o", capsize=4
        )
    ax.axhline(0.0, color="grey", lw=1)
    ax.set_xticks(
        range(len(labels)), [n.replace("-infonce", " - InfoNCE\n") for n in labels], fontsize=7
    )
    ax.set_ylabel("test accuracy difference (paired by seed)")
    ax.set_title("CCT - InfoNCE on Fashion-MNIST, mean and 95% t-interval")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
