"""``make experiment``: does CCT help? A comparison that can tell, on Fashion-MNIST.

The same encoder, augmentations, optimiser and epochs for every loss; rows at 2 and 5 views:

* ``infonce``: multi-positive InfoNCE (NT-Xent for 2 views), temperature ``tau``;
* ``cct``: CCT in the NT-Xent layout (detached weights, ``t_pos = 1``), sharpness ``t_neg``;
* ``cct_paper``: the paper's small-scale configuration (``layout="paper"``,
  ``detach_weights=False``, ``t_pos = 1``), sharpness ``t_neg``.

Each loss gets the same tuning budget on the validation split, on matched grids (InfoNCE
``tau`` in {0.1, 0.25, 0.5, 1}; CCT ``t_neg`` in {5, 2, 1, 0.5}, their equivalents
``1 / (2 tau)``), selected by validation kNN accuracy over 4 seeds at the full run length. A pick
at the edge of the values tried widens that loss's grid one step along ``TAU_LADDER`` (``tau``
0.0125 to 8; ``t_neg`` 40 to 1/16), until the pick is interior or the ladder ends.

Then, on the test split (the design of :mod:`grid`): every loss at every value of its grid with
6 paired seeds (the same initialisation and augmentations per seed for every loss and value),
and each loss's pick with 16. The paired differences against InfoNCE are reported twice, at the
validation picks and at each loss's best test value (an optimistic bound), with whether the
conclusion changes between them. Every run goes to ``experiment_output/results.json``, the
tables to ``results.md``, the figures to ``paired_differences.png`` and ``grid.png``;
``--from-json`` rebuilds the tables and figures from a ``results.json`` without training.

    python examples/experiment.py [--seeds 16] [--grid-seeds 6] [--tune-seeds 4] [--epochs 8]
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
from common import Split, load_fashion_mnist, make_reproducible
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
from simclr import Config, train

LOSSES = ("infonce", "cct", "cct_paper")
VIEWS = (2, 5)
#: The starting grid (InfoNCE ``tau``; CCT ``t_neg = 1 / (2 tau)``) and the ladder it widens along,
#: one step at a time, while a loss's best value sits at the edge of what it has tried.
TAUS = (0.1, 0.25, 0.5, 1.0)
TAU_LADDER = (0.0125, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
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

    @classmethod
    def from_json(cls, found: dict[str, Any]) -> Tuned:
        """The inverse of :meth:`as_json` (``--from-json``)."""
        scores = {float(tau): float(score) for tau, score in found["scores"].items()}
        return cls(scores, float(found["best"]), found["edge"])


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
            cell = f"{value_label(loss, tau)}: {t.scores[tau]:.3f}"
            cells.append(f"**{cell}**" if tau == t.best else cell)
        lines.append(
            f"| {label} | {', '.join(cells)} | {'yes' if t.edge is None else 'no: ' + t.edge} |"
        )
    return lines


def value_label(loss: str, tau: float) -> str:
    """``tau=0.5`` for InfoNCE, ``t_neg=1`` for CCT: the loss's own hyper-parameter."""
    ((name, value),) = setting(loss, tau).items()
    return f"{'tau' if name == 'temperature' else name}={value:g}"


def setting(loss: str, tau: float) -> dict[str, float]:
    """The loss's hyper-parameter at the grid point of InfoNCE temperature ``tau``."""
    return {"temperature": tau} if loss == "infonce" else {"t_neg": 1.0 / (2.0 * tau)}


def run(loss: str, views: int, tau: float, seed: int, epochs: int, split: Split) -> dict[str, Any]:
    """One training of ``loss`` at grid value ``tau`` (its InfoNCE-temperature equivalent),
    evaluated on ``split``'s held-out images."""
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
        "tau": tau,
        **setting(loss, tau),
        "seed": seed,
        "epochs": epochs,
        **result.metrics,
        "seconds": result.seconds,
    }


def collect(args: argparse.Namespace, design: Design) -> dict[str, Any]:
    """Tune every loss on the validation split, then train it at every value of its grid and at
    its pick on the test split; returns every run (the report's raw data)."""
    validation = load_fashion_mnist("validation", limit=args.limit)
    test = load_fashion_mnist("test", limit=args.limit)
    tune_epochs = args.tune_epochs or args.epochs
    print(
        f"Fashion-MNIST: {len(test.train_x)} training, {len(validation.test_x)} validation, "
        f"{len(test.test_x)} test images; tuning {design.tune_seeds} seed(s) x {tune_epochs} "
        f"epochs; test {design.grid_seeds} seeds at every grid value, {design.pick_seeds} at "
        f"each pick, {args.epochs} epochs",
        flush=True,
    )
    tuning: list[dict[str, Any]] = []
    tuned: dict[tuple[str, int], Tuned] = {}
    for views in VIEWS:
        for loss in LOSSES:

            def score(tau: float, loss: str = loss, views: int = views) -> float:
                runs = [
                    run(loss, views, tau, TUNE_SEED_BASE + s, tune_epochs, validation)
                    for s in range(design.tune_seeds)
                ]
                tuning.extend(runs)
                mean = statistics.fmean(r["knn"] for r in runs)
                print(f"  tune {loss:<9} V={views} tau~{tau:<6}: val kNN {mean:.3f}", flush=True)
                return mean

            tuned[(loss, views)] = tune_widening(score, tuple(args.grid))
    final: list[dict[str, Any]] = []
    for views in VIEWS:
        for loss in LOSSES:
            t = tuned[(loss, views)]
            for tau in sorted(t.scores):
                rows = [
                    run(loss, views, tau, seed, args.epochs, test)
                    for seed in final_seeds(tau, t.best, design)
                ]
                final.extend(rows)
                print(
                    f"  test {loss:<9} V={views} tau~{tau:<6}{' (pick)' if tau == t.best else ''}"
                    f": kNN {statistics.fmean(r['knn'] for r in rows):.3f} over {len(rows)} seeds",
                    flush=True,
                )
    return {
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), 4000/1000/1000 stratified",
        "design": design.as_json(),
        "tuning": {
            "seeds": design.tune_seeds,
            "epochs": tune_epochs,
            "select_by": "validation kNN",
            "runs": tuning,
        },
        "grids": {f"{loss}/{views}": t.as_json() for (loss, views), t in tuned.items()},
        "final": {"epochs": args.epochs, "runs": final},
        "threads": torch.get_num_threads(),
    }


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """The paired differences against InfoNCE, per views and metric, at the validation picks
    and at the best test values, from the runs of ``raw`` (what :func:`collect` returns)."""
    design = Design(**raw["design"])
    final = raw["final"]["runs"]
    tuned = {key: Tuned.from_json(found) for key, found in raw["grids"].items()}
    differences: dict[str, Any] = {}
    for views in VIEWS:
        for loss in LOSSES[1:]:
            for metric, _ in METRICS:
                where = {name: {"loss": name, "views": views} for name in (loss, "infonce")}
                best = {
                    name: best_on_test(
                        final,
                        metric,
                        sorted(tuned[f"{name}/{views}"].scores),
                        design.grid_seeds,
                        **where[name],
                    )
                    for name in (loss, "infonce")
                }
                comparison = both_ways(
                    final,
                    metric,
                    design,
                    at_pick=[
                        (sign, where[name] | {"tau": tuned[f"{name}/{views}"].best})
                        for sign, name in ((1.0, loss), (-1.0, "infonce"))
                    ],
                    at_best=[
                        (sign, where[name] | {"tau": best[name]})
                        for sign, name in ((1.0, loss), (-1.0, "infonce"))
                    ],
                )
                differences[f"{loss}-infonce/{views}/{metric}"] = comparison | {"best": best}
    return differences


def budget(raw: dict[str, Any], design: Design) -> str:
    """Where the minutes went: tuning, the grid's runs, the picks' extra seeds, the rest."""
    tuning = sum(r["seconds"] for r in raw["tuning"]["runs"]) / 60
    grid = sum(r["seconds"] for r in raw["final"]["runs"] if r["seed"] < design.grid_seeds) / 60
    picks = sum(r["seconds"] for r in raw["final"]["runs"] if r["seed"] >= design.grid_seeds) / 60
    rest = raw["minutes"] - tuning - grid - picks
    return (
        f"{raw['minutes']:.0f} minutes on {raw['threads']} threads: tuning {tuning:.0f} "
        f"({len(raw['tuning']['runs'])} runs), every grid value {grid:.0f}, the picks' extra "
        f"seeds {picks:.0f}, data and reports {rest:.0f}"
    )


def markdown(raw: dict[str, Any], differences: dict[str, Any]) -> str:
    design = Design(**raw["design"])
    final = raw["final"]["runs"]
    tuned = {key: Tuned.from_json(found) for key, found in raw["grids"].items()}
    lines = [
        f"# Does CCT help? ({design.pick_seeds} paired seeds at each validation pick, "
        f"{design.grid_seeds} at every grid value)",
        "",
        "## At each loss's validation pick",
        "",
        "| views | loss | setting | kNN (test), 95% interval | linear probe (test) |",
        "|---|---|---|---|---|",
    ]
    for views in VIEWS:
        for loss in LOSSES:
            pick = tuned[f"{loss}/{views}"].best
            cells = [
                unsigned(
                    interval_of(
                        per_seed(final, metric, design.pick_seeds, loss=loss, views=views, tau=pick)
                    )
                )
                for metric, _ in METRICS
            ]
            lines.append(
                f"| {views} | {loss} | {value_label(loss, pick)} | {cells[0]} | {cells[1]} |"
            )
    lines += [
        "",
        "## Paired differences against InfoNCE, at the picks and at the best test values",
        "",
        f"At the validation picks: {design.pick_seeds} seeds. At each loss's best test value (the "
        f"grid value with the best mean test accuracy over {design.grid_seeds} seeds, per metric): "
        "selected on the test split, an optimistic bound, not an estimate. Verdict: + or - when "
        "the 95% interval excludes 0, 0 when it holds 0.",
        "",
        "| views | difference | metric | at the validation picks | at the best test values "
        "(upper bound) | best values | conclusion |",
        "|---|---|---|---|---|---|---|",
    ]
    for views in VIEWS:
        for loss in LOSSES[1:]:
            for metric, name in METRICS:
                c = differences[f"{loss}-infonce/{views}/{metric}"]
                values = ", ".join(f"{value_label(n, tau)}" for n, tau in c["best"].items())
                lines.append(
                    f"| {views} | {loss} - infonce | {name} | {signed(c['at_pick'])} | "
                    f"{signed(c['at_best'])} | {values} | {conclusion(c)} |"
                )
    lines += [
        "",
        f"## Every loss at every grid value ({design.grid_seeds} paired seeds; best test value "
        "per metric in bold)",
        "",
        *(line.format(label="views") for line in GRID_HEADER),
    ]
    for views in VIEWS:
        lines += grid_rows(
            final,
            LOSSES,
            {loss: sorted(tuned[f"{loss}/{views}"].scores) for loss in LOSSES},
            {loss: tuned[f"{loss}/{views}"].best for loss in LOSSES},
            design,
            str(views),
            value_label,
            views=views,
        )
    lines += [
        "",
        f"## Tuning: validation kNN, {design.tune_seeds} seeds at {raw['tuning']['epochs']} "
        "epochs (widened along the ladder until each pick is interior)",
        "",
    ]
    lines += tuning_table(
        {
            f"{loss}, {views} views": (loss, tuned[f"{loss}/{views}"])
            for views in VIEWS
            for loss in LOSSES
        }
    )
    lines += ["", f"{raw['final']['epochs']} epochs; {budget(raw, design)}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=16, help="test seeds at each pick")
    parser.add_argument("--grid-seeds", type=int, default=6, help="test seeds at every value")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--tune-seeds", type=int, default=4)
    parser.add_argument("--tune-epochs", type=int, default=None, help="default: --epochs")
    parser.add_argument(
        "--grid", nargs="+", type=float, default=list(TAUS), help="the starting grid (tau)"
    )
    parser.add_argument("--out", type=Path, default=Path("experiment_output"))
    parser.add_argument("--limit", type=int, default=None, help="training images (smoke tests)")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="rebuild the reports from a results.json"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json is not None:
        raw = json.loads(args.from_json.read_text())
    else:
        design = Design(args.grid_seeds, args.seeds, args.tune_seeds)
        make_reproducible(threads=2)
        start = time.perf_counter()
        raw = collect(args, design)
        raw["minutes"] = (time.perf_counter() - start) / 60
    differences = summarise(raw)
    table = markdown(raw, differences)
    print("\n" + table)
    (args.out / "results.md").write_text(table)
    (args.out / "results.json").write_text(
        json.dumps(raw | {"paired_differences": differences}, indent=1)
    )
    plot_differences(raw, differences, args.out / "paired_differences.png")
    plot_grid(raw, args.out / "grid.png")
    print(f"wrote {args.out}/results.json, results.md, paired_differences.png, grid.png")


def plot_differences(raw: dict[str, Any], differences: dict[str, Any], path: Path) -> None:
    """Each paired difference with its 95% interval: at the validation picks (filled) and at
    the best test values (open, an upper bound)."""
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = list(differences)
    for i, name in enumerate(labels):
        for offset, part, style in ((-0.15, "at_pick", "o"), (0.15, "at_best", "s")):
            d = differences[name][part]
            ax.errorbar(
                i + offset,
                d["mean"],
                yerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]],
                fmt=style,
                mfc="C0" if part == "at_pick" else "none",
                color="C0" if part == "at_pick" else "C1",
                capsize=3,
                label=(
                    ("at the validation picks" if part == "at_pick" else "at the best test values")
                    if i == 0
                    else None
                ),
            )
    ax.axhline(0.0, color="grey", lw=1)
    ax.set_xticks(range(len(labels)), [_label(n) for n in labels], fontsize=7)
    ax.set_ylabel("test accuracy difference (paired by seed)")
    ax.set_title("CCT - InfoNCE on Fashion-MNIST, mean and 95% t-interval")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(name: str) -> str:
    """``cct_paper-infonce/2/knn`` -> three short lines for a tick."""
    pair, views, metric = name.split("/")
    return f"{pair.replace('-infonce', '')}\n{views} views\n{dict(METRICS)[metric]}"


def plot_grid(raw: dict[str, Any], path: Path) -> None:
    """Test accuracy against the grid value (InfoNCE ``tau``; CCT at ``t_neg = 1 / (2 tau)``),
    per views and metric, one line per loss with its 95% band; the validation picks starred."""
    design = Design(**raw["design"])
    final = raw["final"]["runs"]
    tuned = {key: Tuned.from_json(found) for key, found in raw["grids"].items()}
    fig, axes = plt.subplots(len(VIEWS), len(METRICS), figsize=(10, 7), squeeze=False)
    for row, views in enumerate(VIEWS):
        for col, (metric, name) in enumerate(METRICS):
            ax = axes[row][col]
            for i, loss in enumerate(LOSSES):
                t = tuned[f"{loss}/{views}"]
                taus = sorted(t.scores)
                points = [
                    interval_of(
                        per_seed(final, metric, design.grid_seeds, loss=loss, views=views, tau=tau)
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
                picked = points[taus.index(t.best)]["mean"]
                ax.plot([t.best], [picked], marker="*", markersize=14, color=f"C{i}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tau (CCT: t_neg = 1 / (2 tau))")
            ax.set_ylabel(f"{name} accuracy (test)")
            ax.set_title(
                f"{views} views, {name} ({design.grid_seeds} seeds; * = pick)", fontsize=10
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
