"""The two experiments' reports, end to end on a synthetic Fashion-MNIST and a tiny budget.

Each report's numbers must be a function of its per-seed runs: the tests recompute a table cell
and a paired difference (at the validation picks and at the best test values) from the runs in
the JSON, with their own arithmetic (not :mod:`grid`'s), find them in the markdown table, and
check that the same recomputation fails on a corrupted report (a changed accuracy, a missing or
a repeated seed). ``--from-json`` must rebuild the same table from the runs, and a different one
from corrupted runs.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from scipy import stats

from .test_examples import ROOT, run_on_synthetic_fashion

sys.path.insert(0, str(ROOT / "examples"))

import grid
from experiment import TAU_LADDER

pytestmark = pytest.mark.cpu_only

#: The smoke budget: 3 seeds at each pick, 2 at every grid value, 1 tuning seed, a two-value
#: starting grid (the tuning widens it to three values or more).
SMOKE = ["--seeds", "3", "--grid-seeds", "2", "--tune-seeds", "1", "--grid", "0.25", "0.5"]
PICK_SEEDS, GRID_SEEDS = 3, 2

Runs = list[dict[str, Any]]


def values(runs: Runs, metric: str, seeds: int, **key: Any) -> list[float]:
    """The test's own lookup: ``metric`` of seeds 0 .. seeds - 1 at ``key``; a seed missing or
    seen twice is a corrupted report."""
    found: dict[int, list[float]] = {}
    for r in runs:
        if all(r[k] == v for k, v in key.items()) and r["seed"] < seeds:
            found.setdefault(r["seed"], []).append(r[metric])
    if sorted(found) != list(range(seeds)) or any(len(v) != 1 for v in found.values()):
        raise ValueError(
            f"seeds {sorted(found)} at {key}, counts {[len(v) for v in found.values()]}"
        )
    return [found[s][0] for s in range(seeds)]


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval, from the textbook formula."""
    mean = sum(xs) / len(xs)
    half = stats.t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def cell(xs: list[float]) -> str:
    mean, low, high = t_interval(xs)
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def signed(xs: list[float]) -> str:
    mean, low, high = t_interval(xs)
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def best_value(runs: Runs, metric: str, taus: list[float], **key: Any) -> float:
    """The grid value with the best mean over the grid seeds (the first of equals)."""
    means = [sum(values(runs, metric, GRID_SEEDS, tau=t, **key)) / GRID_SEEDS for t in taus]
    return taus[means.index(max(means))]


def corrupted(runs: Runs, change: str, **key: Any) -> Runs:
    """A copy of ``runs`` with the first run at ``key`` (seed 0) changed: its kNN moved, the
    run removed, or the run repeated."""
    out = copy.deepcopy(runs)
    i = next(
        i for i, r in enumerate(out) if r["seed"] == 0 and all(r[k] == v for k, v in key.items())
    )
    if change == "value":
        out[i]["knn"] += 0.1
    elif change == "missing":
        del out[i]
    else:
        out.append(copy.deepcopy(out[i]))
    return out


def check_fails_on_corruption(
    runs: Runs, recompute: Callable[[Runs], str], table: str, **key: Any
) -> None:
    """The recomputation matches the table on ``runs`` and fails on each corruption of them."""
    assert recompute(runs) in table
    assert recompute(corrupted(runs, "value", **key)) not in table
    for change in ("missing", "repeated"):
        with pytest.raises(ValueError, match="seeds"):
            recompute(corrupted(runs, change, **key))


def rebuild(script: str, report: Path, out: Path) -> str:
    """``--from-json``: the markdown table rebuilt from a report's runs alone."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / script),
            "--from-json",
            str(report),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return (out / ("results.md" if script == "experiment.py" else "negatives.md")).read_text()


def check_grids(grids: dict[str, Any], tuning: Runs) -> None:
    """Each pick is interior or at the ladder's end, and its score is its tuning runs' mean
    (grids named ``loss`` or ``loss/views``)."""
    for name, found in grids.items():
        assert {0.25, 0.5} <= set(found["tried"]) and len(found["tried"]) >= 3
        assert found["interior"] == (found["tried"][0] < found["best"] < found["tried"][-1])
        if not found["interior"]:
            assert found["best"] in (TAU_LADDER[0], TAU_LADDER[-1]), found
        loss, *views = name.split("/")
        scores = [
            r["knn"]
            for r in tuning
            if (r["loss"], r["tau"]) == (loss, found["best"])
            and (not views or r["views"] == int(views[0]))
        ]
        assert scores and found["scores"][str(found["best"])] == pytest.approx(
            statistics.fmean(scores)
        )


def test_experiment_report_is_a_function_of_its_runs(tmp_path: Path) -> None:
    """make experiment: every loss trains at every grid value (grid seeds) and at its pick
    (pick seeds); a pick cell, a grid cell and the cct_paper - infonce difference (at the picks
    and at the best test values) are recomputed from the runs."""
    args = [*SMOKE, "--epochs", "1", "--limit", "256"]
    result, out = run_on_synthetic_fashion(tmp_path, "experiment.py", args)
    assert (
        "at the best test values" in result.stdout
        and "values tried: validation kNN" in result.stdout
    )
    report = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    runs = report["final"]["runs"]
    assert report["design"] == {"grid_seeds": 2, "pick_seeds": 3, "tune_seeds": 1}
    check_grids(report["grids"], report["tuning"]["runs"])
    for name, found in report["grids"].items():  # every grid value, the pick with more seeds
        loss, views = name.split("/")
        for tau in found["tried"]:
            seeds = PICK_SEEDS if tau == found["best"] else GRID_SEEDS
            assert len(values(runs, "knn", seeds, loss=loss, views=int(views), tau=tau)) == seeds
            assert (
                len(
                    [
                        r
                        for r in runs
                        if (r["loss"], r["views"], r["tau"]) == (loss, int(views), tau)
                    ]
                )
                == seeds
            )
    grids = {name: found for name, found in report["grids"].items()}
    pick = {name: found["best"] for name, found in grids.items()}

    def pick_cell(rs: Runs) -> str:  # infonce, 2 views, at its pick, pick seeds
        return cell(values(rs, "knn", PICK_SEEDS, loss="infonce", views=2, tau=pick["infonce/2"]))

    check_fails_on_corruption(
        runs, pick_cell, table, loss="infonce", views=2, tau=pick["infonce/2"]
    )
    other = next(t for t in grids["cct/5"]["tried"] if t != pick["cct/5"])

    def grid_cell(rs: Runs) -> str:  # cct, 5 views, a value other than its pick, grid seeds
        return cell(values(rs, "knn", GRID_SEEDS, loss="cct", views=5, tau=other))

    check_fails_on_corruption(runs, grid_cell, table, loss="cct", views=5, tau=other)

    def at_picks(rs: Runs) -> str:
        a = values(rs, "knn", PICK_SEEDS, loss="cct_paper", views=2, tau=pick["cct_paper/2"])
        b = values(rs, "knn", PICK_SEEDS, loss="infonce", views=2, tau=pick["infonce/2"])
        return signed([x - y for x, y in zip(a, b, strict=True)])

    def at_best(rs: Runs) -> str:
        best = {
            loss: best_value(rs, "knn", grids[f"{loss}/2"]["tried"], loss=loss, views=2)
            for loss in ("cct_paper", "infonce")
        }
        a = values(rs, "knn", GRID_SEEDS, loss="cct_paper", views=2, tau=best["cct_paper"])
        b = values(rs, "knn", GRID_SEEDS, loss="infonce", views=2, tau=best["infonce"])
        return signed([x - y for x, y in zip(a, b, strict=True)])

    row = next(
        line for line in table.splitlines() if line.startswith("| 2 | cct_paper - infonce | kNN |")
    )
    check_fails_on_corruption(runs, at_picks, row, loss="infonce", views=2, tau=pick["infonce/2"])
    assert at_best(runs) in row
    for name in ("results.json", "results.md", "paired_differences.png", "grid.png"):
        assert (out / name).stat().st_size > 0
    # --from-json: the same table from the runs; another from corrupted runs
    assert rebuild("experiment.py", out / "results.json", tmp_path / "again") == table
    bad = copy.deepcopy(report)
    bad["final"]["runs"] = corrupted(runs, "value", loss="infonce", views=2, tau=pick["infonce/2"])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert rebuild("experiment.py", tmp_path / "bad.json", tmp_path / "bad") != table


def test_negatives_report_is_a_function_of_its_runs(tmp_path: Path) -> None:
    """make experiment-negatives: both sweeps train every loss at every setting and grid value;
    a pick cell and the difference of drops (at the picks and at the best test values per
    setting) are recomputed from the runs."""
    args = [*SMOKE, "--length", "0.02", "--limit", "128"]
    args += ["--queue-sizes", "16", "64", "--queue-tune-at", "32"]
    args += ["--batches", "16", "32", "--batch-tune-at", "16"]
    _, out = run_on_synthetic_fashion(tmp_path, "negatives.py", args)
    report = json.loads((out / "negatives.json").read_text())
    table = (out / "negatives.md").read_text()
    queue, batch = report["sweeps"]["queue"], report["sweeps"]["batch"]
    assert (queue["settings"], queue["tuned_at"]) == ([16, 64], 32)
    assert (batch["settings"], batch["tuned_at"]) == ([16, 32], 16)
    tuning = report["tuning"]["runs"]
    for name, sweep in report["sweeps"].items():
        check_grids(sweep["grids"], [r for r in tuning if r["sweep"] == name])
        assert {r["setting"] for r in tuning if r["sweep"] == name} == {sweep["tuned_at"]}
        for loss, found in sweep["grids"].items():
            for setting in sweep["settings"]:
                for tau in found["tried"]:
                    seeds = PICK_SEEDS if tau == found["best"] else GRID_SEEDS
                    at = [
                        r
                        for r in sweep["runs"]
                        if (r["loss"], r["setting"], r["tau"]) == (loss, setting, tau)
                    ]
                    assert sorted(r["seed"] for r in at) == list(range(seeds))
    assert set(batch["summary"]["difference_of_drops"]) == {
        f"cct_paper-infonce/{key}" for key in ("knn", "linear")
    }
    runs = queue["runs"]
    pick = {loss: found["best"] for loss, found in queue["grids"].items()}

    def pick_cell(rs: Runs) -> str:  # cct at K = 16, at its pick
        return cell(values(rs, "knn", PICK_SEEDS, loss="cct", setting=16, tau=pick["cct"]))

    check_fails_on_corruption(runs, pick_cell, table, loss="cct", setting=16, tau=pick["cct"])

    def drops(rs: Runs, loss: str, seeds: int, taus: dict[int, float]) -> list[float]:
        big = values(rs, "knn", seeds, loss=loss, setting=64, tau=taus[64])
        small = values(rs, "knn", seeds, loss=loss, setting=16, tau=taus[16])
        return [b - s for b, s in zip(big, small, strict=True)]

    def at_picks(rs: Runs) -> str:
        cct = drops(rs, "cct", PICK_SEEDS, {64: pick["cct"], 16: pick["cct"]})
        infonce = drops(rs, "infonce", PICK_SEEDS, {64: pick["infonce"], 16: pick["infonce"]})
        return signed([c - i for c, i in zip(cct, infonce, strict=True)])

    def at_best(rs: Runs) -> str:
        best = {
            loss: {
                s: best_value(rs, "knn", queue["grids"][loss]["tried"], loss=loss, setting=s)
                for s in (16, 64)
            }
            for loss in ("cct", "infonce")
        }
        cct = drops(rs, "cct", GRID_SEEDS, best["cct"])
        infonce = drops(rs, "infonce", GRID_SEEDS, best["infonce"])
        return signed([c - i for c, i in zip(cct, infonce, strict=True)])

    queue_part = table[: table.index("## Batch sweep")]
    row = next(
        line
        for line in queue_part.splitlines()
        if line.startswith("| difference of drops, cct - infonce | kNN |")
    )
    check_fails_on_corruption(runs, at_picks, row, loss="cct", setting=64, tau=pick["cct"])
    assert at_best(runs) in row
    for name in ("negatives.json", "negatives.md", "negatives.png", "negatives_grid.png"):
        assert (out / name).stat().st_size > 0
    assert rebuild("negatives.py", out / "negatives.json", tmp_path / "again") == table
    bad = copy.deepcopy(report)
    bad["sweeps"]["queue"]["runs"] = corrupted(
        runs, "value", loss="cct", setting=16, tau=pick["cct"]
    )
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert rebuild("negatives.py", tmp_path / "bad.json", tmp_path / "bad") != table


def test_per_seed_refuses_a_missing_or_repeated_seed() -> None:
    runs = [{"loss": "a", "tau": 1.0, "seed": s, "knn": 0.5 + s / 10} for s in range(3)]
    assert grid.per_seed(runs, "knn", 2, loss="a") == [0.5, 0.6]  # later seeds ignored
    with pytest.raises(ValueError, match=r"seed\(s\) \[3\]"):
        grid.per_seed(runs, "knn", 4, loss="a")
    with pytest.raises(ValueError, match="two runs of seed 1"):
        grid.per_seed([*runs, runs[1]], "knn", 3, loss="a")


def test_best_on_test_and_verdicts_by_hand() -> None:
    runs = [
        {"tau": tau, "seed": s, "knn": score + s / 100}
        for tau, score in ((0.1, 0.5), (0.25, 0.7), (0.5, 0.7), (1.0, 0.6))
        for s in range(2)
    ]
    assert grid.best_on_test(runs, "knn", [0.1, 0.25, 0.5, 1.0], 2) == 0.25  # first of equals
    assert grid.verdict({"low": 0.01, "high": 0.02}) == "+"
    assert grid.verdict({"low": -0.02, "high": -0.01}) == "-"
    assert grid.verdict({"low": -0.01, "high": 0.02}) == "0"
    # a difference of drops by hand: (a1 - a0) - (b1 - b0) per seed
    rows = [
        {"loss": loss, "setting": k, "tau": 1.0, "seed": s, "knn": v}
        for (loss, k, s), v in {
            ("a", 1, 0): 0.9,
            ("a", 0, 0): 0.7,
            ("b", 1, 0): 0.8,
            ("b", 0, 0): 0.7,
            ("a", 1, 1): 0.8,
            ("a", 0, 1): 0.7,
            ("b", 1, 1): 0.9,
            ("b", 0, 1): 0.7,
        }.items()
    ]
    terms = [
        (1.0, {"loss": "a", "setting": 1}),
        (-1.0, {"loss": "a", "setting": 0}),
        (-1.0, {"loss": "b", "setting": 1}),
        (1.0, {"loss": "b", "setting": 0}),
    ]
    assert grid.contrast(rows, "knn", 2, terms) == pytest.approx([0.1, -0.1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid_seeds": 1}, "grid_seeds must be at least 2"),
        ({"grid_seeds": 6, "pick_seeds": 4}, "pick_seeds must be at least grid_seeds"),
        ({"tune_seeds": 0}, "tune_seeds must be at least 1"),
    ],
)
def test_design_refuses_too_few_seeds(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        grid.Design(**kwargs)
