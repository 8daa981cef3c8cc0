"""Smoke tests: each example trains a few hundred steps on scikit-learn's digits and its
encoder beats a random-initialised one by a clear margin (kNN accuracy +0.04 or more).

The random baseline is the mean kNN accuracy of five random initialisations of the same
encoder (one initialisation alone varies by about +-0.03 on digits). Which loss wins is not
asserted: at this scale that is a measurement (see ``make demo``), not a guarantee.
"""

from __future__ import annotations

import gzip
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import common  # noqa: E402
import moco  # noqa: E402
from common import Encoder, Split, augment, knn_of, load_dataset, paired_difference  # noqa: E402
from experiment import TAU_LADDER, TAUS, tune_widening  # noqa: E402
from simclr import Config, train  # noqa: E402

#: The examples train on the CPU (MNIST-5k, digits).
pytestmark = pytest.mark.cpu_only

MARGIN = 0.04
STEPS = 300


@pytest.fixture(scope="module")
def digits() -> Split:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def random_knn(digits: Split) -> float:
    scores = []
    for seed in range(5):
        torch.manual_seed(seed)
        scores.append(knn_of(Encoder(), digits))
    return statistics.fmean(scores)


@pytest.mark.parametrize(("views", "supervised"), [(2, False), (1, True)])
def test_simclr_learns(digits: Split, random_knn: float, views: int, supervised: bool) -> None:
    """Self-supervised with 2 views, and supervised with labels in one view (the
    metric-learning call): both learn."""
    cfg = Config(
        loss="cct",
        views=views,
        supervised=supervised,
        epochs=10**6,
        max_steps=STEPS,
        lr=1e-2,
        t_neg=1.0,
        dataset="digits",
        progress=False,
        track_knn=False,
    )
    result = train(cfg, digits)
    assert result.metrics["knn"] >= random_knn + MARGIN, (result.metrics, random_knn)
    assert result.losses[-1] < result.losses[0]


def test_supervised_run_on_mnist_command_line() -> None:
    """The supervised command of examples/simclr.py (and the docs) on MNIST-5k, a few steps."""
    args = ["--loss", "cct", "--supervised", "--views", "2", "--epochs", "1", "--max-steps", "3"]
    stdout = run_example(["simclr.py", *args, "--batch-size", "64"])
    assert "cct supervised views=2" in stdout and "kNN" in stdout


def test_moco_learns(digits: Split, random_knn: float) -> None:
    metrics, losses = moco.train(
        "cct",
        epochs=10**6,
        max_steps=STEPS,
        lr=1e-2,
        t_neg=2.0,
        queue_size=1024,
        split=digits,
        progress=False,
        track_knn=False,
    )
    assert metrics["knn"] >= random_knn + MARGIN, (metrics, random_knn)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "command",
    [
        ["simclr.py", "--loss", "infonce", "--views", "3"],
        ["simclr.py", "--loss", "cct", "--views", "3"],
        ["simclr.py", "--loss", "cct_paper", "--views", "3"],
        ["moco.py", "--loss", "infonce"],
        ["moco.py", "--loss", "cct"],
    ],
)
def test_example_command_lines_run(command: list[str]) -> None:
    """Every --loss of every example runs from its command line (a few steps)."""
    args = [
        *command,
        "--dataset",
        "digits",
        "--epochs",
        "1",
        "--max-steps",
        "3",
        "--batch-size",
        "64",
    ]
    assert "kNN" in run_example(args)


def run_example(args: list[str]) -> str:
    """Run ``examples/<args[0]>`` with the rest as its command line; its standard output."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """The demo's full pipeline (table, results.json, both figures) on a tiny budget."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "demo.py"),
            "--epochs",
            "1",
            "--seeds",
            "2",
            "--limit",
            "256",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cct_paper - InfoNCE" in result.stdout and "95% t-interval" in result.stdout
    for name in ("results.json", "learning_curves.png", "weights.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_augment_is_batched_and_seeded() -> None:
    x = torch.rand(5, 1, 16, 16)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(1)))
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_quickstart_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "step    0" in result.stdout


def write_synthetic_fashion(folder: Path, per_class: int = 600) -> None:
    """IDX files like the Debian package's: 10 classes, each image's pixels encode its index."""
    count = 10 * per_class
    labels = (np.arange(count) % 10).astype(np.uint8)
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(count) % 256
    images[:, 0, 1] = np.arange(count) // 256
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (count, 28, 28))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    label_header = bytes([0, 0, 8, 1]) + count.to_bytes(4, "big")
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(label_header + labels.tobytes())
    )


def image_ids(x: torch.Tensor) -> set[int]:
    pixels = (x[:, 0, 0, :2] * 255).round().long()
    return set((pixels[:, 0] + 256 * pixels[:, 1]).tolist())


def test_fashion_split_is_fixed_stratified_and_disjoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_synthetic_fashion(tmp_path)
    monkeypatch.setattr(common, "FASHION_MNIST_DIR", tmp_path)
    validation, test = common.load_fashion_mnist("validation"), common.load_fashion_mnist("test")
    assert torch.equal(validation.train_x, test.train_x)  # the same training images
    for split, held in ((validation, 100), (test, 100)):
        assert torch.bincount(split.train_y).tolist() == [400] * 10
        assert torch.bincount(split.test_y).tolist() == [held] * 10
    train, val, tst = image_ids(test.train_x), image_ids(validation.test_x), image_ids(test.test_x)
    assert len(train) == 4000 and len(val) == 1000 and len(tst) == 1000
    assert not (train & val) and not (train & tst) and not (val & tst)
    assert torch.equal(common.load_fashion_mnist("test").test_x, test.test_x)  # fixed


def test_missing_fashion_mnist_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(common, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        common.load_fashion_mnist()


def test_paired_difference_by_hand() -> None:
    d = paired_difference([0.81, 0.82, 0.83, 0.80], [0.80, 0.80, 0.80, 0.80])
    # differences 0.01, 0.02, 0.03, 0.00: mean 0.015, sd 0.01291, se 0.006455; t(0.975, 3) = 3.1824
    assert d["n"] == 4
    assert d["mean"] == pytest.approx(0.015)
    assert d["se"] == pytest.approx(0.0064550, rel=1e-4)
    assert d["high"] - d["mean"] == pytest.approx(3.1824 * 0.0064550, rel=1e-3)


def scored(peak: float, calls: list[float]) -> Callable[[float], float]:
    """A score that peaks at ``peak`` on the log scale, recording each value asked for."""

    def score(tau: float) -> float:
        calls.append(tau)
        return -abs(math.log(tau) - math.log(peak))

    return score


@pytest.mark.parametrize("peak", TAU_LADDER)
def test_tuning_widens_until_the_pick_is_interior(peak: float) -> None:
    calls: list[float] = []
    tuned = tune_widening(scored(peak, calls))
    assert tuned.best == peak
    assert calls[: len(TAUS)] == list(TAUS) and len(set(calls)) == len(calls)  # none twice
    tried = sorted(tuned.scores)
    assert tried == sorted(calls)
    first, last = TAU_LADDER.index(tried[0]), TAU_LADDER.index(tried[-1])
    assert tried == list(TAU_LADDER[first : last + 1])  # a contiguous stretch of the ladder
    if peak in (TAU_LADDER[0], TAU_LADDER[-1]):  # stays at the ladder's edge, and says so
        assert tuned.edge is not None and str(peak) in tuned.edge
        assert tuned.as_json()["interior"] is False
    else:  # interior, one step beyond the peak and no further
        i = TAU_LADDER.index(peak)
        assert tuned.edge is None
        assert tried[0] == min(TAU_LADDER[i - 1], TAUS[0])
        assert tried[-1] == max(TAU_LADDER[i + 1], TAUS[-1])


def test_tuning_refuses_a_start_off_the_ladder() -> None:
    with pytest.raises(ValueError, match="ladder"):
        tune_widening(lambda tau: 0.0, start=(0.3,))


def run_on_synthetic_fashion(
    tmp_path: Path, script: str, args: list[str]
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run ``examples/<script>`` on a synthetic Fashion-MNIST, writing into ``tmp_path/out``."""
    data = tmp_path / "data"
    data.mkdir()
    write_synthetic_fashion(data)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "FASHION_MNIST_DIR": str(data)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result, out
