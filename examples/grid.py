"""Every loss at every grid value: the design both experiments share, and the statistics they
report from their per-seed runs.

A tuning pick from a few validation runs is noise when the grid is flat, so neither experiment
reports a loss at its pick alone:

* **The grid.** Each loss trains at every value of its grid (the values its tuning tried), on
  the test split, with seeds ``0 .. grid_seeds - 1`` (the same initialisation, augmentations and
  batch order for every loss and value at a seed: paired). The tables and figures show each
  value's mean accuracy and 95% interval, so how flat or peaked each loss is shows.
* **The pick.** Each loss's validation pick (``tune_seeds`` seeds at the full run length) gets
  seeds up to ``pick_seeds - 1`` on the test split: the headline comparison, at the precision
  the seeds buy.
* **The best test value.** Each loss at the grid value with the best mean test accuracy (over the
  grid seeds, per metric): selected on the test split, so an optimistic bound on what each loss
  reaches on this grid, stated as such. A comparison that holds at the picks and at the best
  values does not hinge on the tuning; one that changes sign or significance between them does.

Runs are plain dicts (one per training: the loss, ``tau`` the InfoNCE-temperature equivalent of
its hyper-parameter, ``seed``, the metrics and the keys of its group, such as ``views`` or
``setting``). Everything here is a pure function of those runs, so that a report can be
recomputed from ``results.json`` or ``negatives.json`` and checked (``--from-json``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common import mean_interval

Run = Mapping[str, Any]

#: The metrics reported, by key and name (the few-shot probe is in every run, not in the tables).
METRICS = (("knn", "kNN"), ("linear", "linear probe"))


@dataclass(frozen=True)
class Design:
    """How many seeds each part of an experiment gets.

    Attributes:
        grid_seeds: test seeds at every grid value of every loss (at least 2, for an interval).
        pick_seeds: test seeds at each loss's validation pick (the first ``grid_seeds`` of them
            are the grid's runs at that value).
        tune_seeds: validation seeds per grid value when tuning.
    """

    grid_seeds: int = 6
    pick_seeds: int = 16
    tune_seeds: int = 4

    def __post_init__(self) -> None:
        if self.grid_seeds < 2:
            raise ValueError(f"grid_seeds must be at least 2 (an interval), got {self.grid_seeds}")
        if self.pick_seeds < self.grid_seeds:
            raise ValueError(
                f"pick_seeds must be at least grid_seeds ({self.grid_seeds}), got {self.pick_seeds}"
            )
        if self.tune_seeds < 1:
            raise ValueError(f"tune_seeds must be at least 1, got {self.tune_seeds}")

    def as_json(self) -> dict[str, int]:
        return {
            "grid_seeds": self.grid_seeds,
            "pick_seeds": self.pick_seeds,
            "tune_seeds": self.tune_seeds,
        }


def final_seeds(tau: float, pick: float, design: Design) -> range:
    """The test seeds a loss trains at grid value ``tau``: the grid's, and the pick's at its
    pick."""
    return range(design.pick_seeds if tau == pick else design.grid_seeds)


def per_seed(runs: Iterable[Run], metric: str, seeds: int, **key: Any) -> list[float]:
    """``metric`` of the runs that match ``key`` (for instance ``loss``, ``tau``, ``views``), one
    per seed ``0 .. seeds - 1``, in seed order; runs of later seeds are ignored.

    Raises:
        ValueError: a seed of ``0 .. seeds - 1`` has no run, or has more than one (a corrupted or
            incomplete report).
    """
    found: dict[int, float] = {}
    for run in runs:
        if all(run[name] == value for name, value in key.items()):
            seed = int(run["seed"])
            if seed in found:
                raise ValueError(f"two runs of seed {seed} at {key}")
            found[seed] = float(run[metric])
    missing = [seed for seed in range(seeds) if seed not in found]
    if missing:
        raise ValueError(f"no run of seed(s) {missing} at {key}")
    return [found[seed] for seed in range(seeds)]


def best_on_test(
    runs: Iterable[Run], metric: str, grid: Sequence[float], seeds: int, **key: Any
) -> float:
    """The grid value with the best mean ``metric`` over seeds ``0 .. seeds - 1`` (the first of
    equals, in grid order): selected on the test split, an optimistic choice."""
    listed = list(runs)
    means = {tau: statistics.fmean(per_seed(listed, metric, seeds, tau=tau, **key)) for tau in grid}
    return max(grid, key=lambda tau: means[tau])


def interval_of(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard error and 95% t-interval of per-seed values."""
    return mean_interval(list(values))


def contrast(
    runs: Iterable[Run], metric: str, seeds: int, terms: Sequence[tuple[float, Mapping[str, Any]]]
) -> list[float]:
    """Per seed, ``sum(sign * metric)`` over ``terms`` ``(sign, key)``: a paired difference
    (two terms) or a difference of drops (four), one value per seed."""
    listed = list(runs)
    columns = [
        [sign * value for value in per_seed(listed, metric, seeds, **key)] for sign, key in terms
    ]
    return [sum(values) for values in zip(*columns, strict=True)]


def verdict(d: Mapping[str, float]) -> str:
    """``"+"`` when the 95% interval lies above 0, ``"-"`` below, ``"0"`` when it holds 0."""
    if d["low"] > 0:
        return "+"
    if d["high"] < 0:
        return "-"
    return "0"


def both_ways(
    runs: Iterable[Run],
    metric: str,
    design: Design,
    at_pick: Sequence[tuple[float, Mapping[str, Any]]],
    at_best: Sequence[tuple[float, Mapping[str, Any]]],
) -> dict[str, Any]:
    """One comparison twice: with each loss at its validation pick (``pick_seeds`` seeds) and at
    its best test value (``grid_seeds`` seeds, an optimistic bound); whether its verdict (the
    sign of a 95% interval that excludes 0, or none) changes between the two."""
    listed = list(runs)
    pick = interval_of(contrast(listed, metric, design.pick_seeds, at_pick))
    best = interval_of(contrast(listed, metric, design.grid_seeds, at_best))
    return {
        "at_pick": pick,
        "at_best": best,
        "verdict_at_pick": verdict(pick),
        "verdict_at_best": verdict(best),
        "changes": verdict(pick) != verdict(best),
    }


def signed(d: Mapping[str, float], digits: int = 3) -> str:
    """``+0.012 [+0.004, +0.020]``."""
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def unsigned(d: Mapping[str, float], digits: int = 3) -> str:
    """``0.761 [0.757, 0.766]``."""
    return f"{d['mean']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def conclusion(comparison: Mapping[str, Any]) -> str:
    """``same`` or ``changes`` with the verdicts, for a table cell."""
    pick, best = comparison["verdict_at_pick"], comparison["verdict_at_best"]
    return f"changes ({pick} to {best})" if comparison["changes"] else f"same ({pick})"


def grid_rows(
    runs: Iterable[Run],
    losses: Sequence[str],
    grids: Mapping[str, Sequence[float]],
    picks: Mapping[str, float],
    design: Design,
    label: str,
    value_of: Callable[[str, float], str],
    **key: Any,
) -> list[str]:
    """Markdown rows: per loss and grid value, the mean test kNN and linear probe with 95%
    intervals over the grid seeds; the validation pick marked ``pick``, each metric's best test
    value in bold."""
    listed = list(runs)
    rows = []
    for loss in losses:
        best = {
            metric: best_on_test(listed, metric, grids[loss], design.grid_seeds, loss=loss, **key)
            for metric, _ in METRICS
        }
        for tau in grids[loss]:
            cells = []
            for metric, _ in METRICS:
                cell = unsigned(
                    interval_of(
                        per_seed(listed, metric, design.grid_seeds, loss=loss, tau=tau, **key)
                    )
                )
                cells.append(f"**{cell}**" if tau == best[metric] else cell)
            mark = "pick" if tau == picks[loss] else ""
            rows.append(
                f"| {label} | {loss} | {value_of(loss, tau)} | {mark} | {' | '.join(cells)} |"
            )
    return rows


GRID_HEADER = [
    "| {label} | loss | value | validation pick | kNN (test), 95% interval | linear probe (test) |",
    "|---|---|---|---|---|---|",
]
