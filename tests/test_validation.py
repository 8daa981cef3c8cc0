"""Every bad input of docs/specification.md, section 5 gets a clear ValueError or TypeError."""

from __future__ import annotations

import math
import re
import sys
from typing import Any

import pytest
import torch

import cct_loss as cct_loss_package
from cct_loss import CCTLoss, CCTMultiviewLoss, cct_loss, cct_loss_multiview

from .helpers import TEST_DEVICE

Q = torch.randn(4, 8)
P = torch.randn(4, 8)


def call(**overrides: Any) -> Any:
    args: dict[str, Any] = {"query": Q, "positive": P, "negatives": None}
    args.update(overrides)
    return cct_loss(args.pop("query"), args.pop("positive"), args.pop("negatives"), **args)


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        (
            {"query": torch.randn(4, 8, 1)},
            ValueError,
            r"query must have shape \(N, D\).*got 3 dims with shape \(4, 8, 1\)",
        ),
        ({"query": torch.randn(8)}, ValueError, r"query must have shape \(N, D\).*\(8\)"),
        (
            {"positive": torch.randn(4, 1, 1, 8)},
            ValueError,
            r"positive must have shape \(N, D\) or \(N, M, D\).*4 dims",
        ),
        (
            {"positive": torch.randn(5, 8)},
            ValueError,
            r"positive must have shape .*\(4, 8\).*got \(5, 8\)",
        ),
        ({"positive": torch.randn(4, 7)}, ValueError, r"positive must have shape .*got \(4, 7\)"),
        ({"positive": torch.randn(4, 0, 8)}, ValueError, r"positive has M = 0"),
        (
            {"query": torch.randn(0, 8), "positive": torch.randn(0, 8)},
            ValueError,
            r"query is an empty batch",
        ),
        ({"query": torch.randn(4, 0), "positive": torch.randn(4, 0)}, ValueError, r"D = 0"),
        ({"negatives": torch.randn(4, 0, 8)}, ValueError, r"negatives has K = 0"),
        (
            {"negatives": torch.randn(8, 100)},
            ValueError,
            r"MoCo queue stored as \(D, K\).*pass queue\.T",
        ),
        (
            {"negatives": torch.randn(100, 7)},
            ValueError,
            r"negatives must have shape \(K, D\) with D = 8.*\(100, 7\)",
        ),
        (
            {"negatives": torch.randn(3, 5, 8)},
            ValueError,
            r"per-query negatives must have shape \(N, K, D\) = \(4, K, 8\).*\(3, 5, 8\)",
        ),
        (
            {"negatives": torch.randn(2, 3, 4, 8)},
            ValueError,
            r"negatives must have shape \(K, D\) or \(N, K, D\)",
        ),
        (
            {"query": torch.randn(1, 8), "positive": torch.randn(1, 8)},
            ValueError,
            r"in-batch mode .* at least 2 rows",
        ),
        (
            {"query": torch.ones(4, 8, dtype=torch.long)},
            TypeError,
            r"query must have a floating-point dtype.*torch.int64",
        ),
        (
            {"positive": torch.ones(4, 8, dtype=torch.bool)},
            TypeError,
            r"positive must have a floating-point dtype",
        ),
        (
            {"negatives": torch.ones(5, 8, dtype=torch.int32)},
            TypeError,
            r"negatives must have a floating-point dtype",
        ),
        ({"query": [[1.0] * 8] * 4}, TypeError, r"query must be a torch.Tensor.*got list"),
        ({"negatives": "queue"}, TypeError, r"negatives must be a torch.Tensor"),
        ({"t_pos": -1.0}, ValueError, r"t_pos must be a finite number >= 0.*-1.0"),
        ({"t_neg": -0.1}, ValueError, r"t_neg must be a finite number >= 0.*-0.1"),
        ({"t_neg": math.inf}, ValueError, r"t_neg must be a finite number"),
        ({"t_pos": math.nan}, ValueError, r"t_pos must be a finite number"),
        ({"t_neg": "2"}, TypeError, r"t_neg must be a real number.*str"),
        ({"t_neg": torch.tensor([2.0])}, TypeError, r"t_neg must be .*0-dim.*shape \(1\)"),
        ({"t_pos": torch.tensor(2)}, TypeError, r"t_pos must be .*floating-point.*torch.int64"),
        (
            {"t_neg": torch.tensor(2.0, requires_grad=True)},
            ValueError,
            r"t_neg must not require grad.*collapses towards uniform weights",
        ),
        ({"alpha": torch.ones(2)}, TypeError, r"alpha must be a real number or a 0-dim"),
        (
            {"negatives": P},
            ValueError,
            r"negatives is the same tensor as positive.*use layout='cross'",
        ),
        (
            {"negatives": P[1:]},
            ValueError,
            r"negatives is the same tensor as positive \(or a view of its memory\)",
        ),
        (
            {"negatives": P.detach()},
            ValueError,
            r"negatives is the same tensor as positive",
        ),
        (
            {"positive": torch.arange(4)},
            TypeError,
            r"positive must have a floating-point dtype.*int64. To pass class labels, name them: cct_loss\(query, labels=labels\)",
        ),
        ({"labels": torch.zeros(4)}, TypeError, r"labels must have an integer dtype.*float32"),
        ({"labels": [0, 1, 2, 3]}, TypeError, r"labels must be a 1-D integer tensor.*list"),
        (
            {"labels": torch.zeros(5, dtype=torch.long)},
            ValueError,
            r"labels must have shape \(N,\) = \(4,\).*\(5\)",
        ),
        (
            {"labels": torch.zeros(4, 1, dtype=torch.long)},
            ValueError,
            r"labels must have shape \(N,\)",
        ),
        (
            {"labels": torch.zeros(4, dtype=torch.bool)},
            TypeError,
            r"labels must have an integer dtype",
        ),
        (
            {"labels": torch.zeros(4, dtype=torch.long), "negatives": torch.randn(6, 8)},
            ValueError,
            r"labels with explicit negatives .* need negative_labels=",
        ),
        (
            {"negative_labels": torch.zeros(6, dtype=torch.long), "negatives": torch.randn(6, 8)},
            ValueError,
            r"negative_labels needs labels=",
        ),
        (
            {"negative_labels": torch.zeros(6, dtype=torch.long)},
            ValueError,
            r"negative_labels labels the rows of \(K, D\) negatives; got negatives=None",
        ),
        (
            {
                "labels": torch.zeros(4, dtype=torch.long),
                "negative_labels": torch.zeros(5, dtype=torch.long),
                "negatives": torch.randn(6, 8),
            },
            ValueError,
            r"negative_labels must have shape \(K,\) = \(6,\)",
        ),
        (
            {"layout": "cross", "negatives": torch.randn(4, 5, 8)},
            ValueError,
            r"layout='cross' takes shared negatives of shape \(K, D\)",
        ),
        (
            {"labels": torch.zeros(4, dtype=torch.long), "negatives": torch.randn(4, 5, 8)},
            ValueError,
            r"labels takes shared negatives of shape \(K, D\)",
        ),
        (
            {"layout": "cross", "query": torch.randn(1, 8), "positive": torch.randn(1, 8)},
            ValueError,
            r"layout='cross' needs at least 2 rows",
        ),
        (
            {"layout": "paper"},
            ValueError,
            r"layout must be one of 'all', 'cross' for cct_loss; got 'paper' \(use cct_loss_multiview",
        ),
        (
            {"layout": "both"},
            ValueError,
            r"layout must be one of 'all', 'cross', 'paper'; got 'both'",
        ),
        ({"t_neg": True}, TypeError, r"t_neg must be a real number.*bool"),
        ({"alpha": math.nan}, ValueError, r"alpha must be finite"),
        ({"beta": None}, TypeError, r"beta must be a real number"),
        (
            {"cost": "euclidean"},
            ValueError,
            r"cost must be one of 'sqeuclidean', 'cosine'; got 'euclidean'",
        ),
        (
            {"reduction": "avg"},
            ValueError,
            r"reduction must be one of 'mean', 'sum', 'none'; got 'avg'",
        ),
        ({"impl": "flash"}, ValueError, r"impl must be one of .*got 'flash'"),
        ({"chunk_size": 0}, ValueError, r"chunk_size must be None or an int >= 1, got 0"),
        ({"chunk_size": 2.5}, TypeError, r"chunk_size must be None or an int >= 1"),
        ({"normalize": 1}, TypeError, r"normalize must be a bool"),
        ({"detach_weights": "yes"}, TypeError, r"detach_weights must be a bool"),
        ({"return_details": None}, TypeError, r"return_details must be a bool"),
    ],
)
def test_bad_input_is_named(
    overrides: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        call(**overrides)


def test_mixed_devices() -> None:
    meta = torch.randn(4, 8, device="meta")
    with pytest.raises(
        ValueError, match=rf"positive is on device meta but query is on {TEST_DEVICE.type}"
    ):
        call(positive=meta)


def test_square_queue_is_accepted_as_k_by_d() -> None:
    """A (D, D) tensor cannot be told apart from (K, D) with K = D: it is taken as (K, D)."""
    assert torch.isfinite(call(negatives=torch.randn(8, 8)))


def test_mixed_float_dtypes_are_promoted() -> None:
    out = call(negatives=torch.randn(16, 8, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert call(query=Q.half(), negatives=torch.randn(16, 8)).dtype == torch.float32


@pytest.mark.parametrize(
    ("views", "kwargs", "error", "pattern"),
    [
        ([torch.randn(4, 8)], {}, ValueError, r"views must hold at least 2 views .*got 1"),
        (
            torch.randn(3, 4, 8),
            {},
            ValueError,
            r"views must be a list of V tensors \(N, D\), got one tensor of shape \(3, 4, 8\).*"
            r"cct_loss_multiview\(list\(x.unbind\(1\)\)\) for \(N, V, D\)",
        ),
        ([torch.randn(4, 8)], {}, ValueError, r"at least 2 views \(or 1 view with labels=\)"),
        (
            [torch.randn(4, 8), torch.randn(4, 8)],
            {"layout": "paper", "labels": torch.zeros(4, dtype=torch.long)},
            ValueError,
            r"labels are not defined for layout='paper'",
        ),
        (
            [torch.randn(4, 8)],
            {"labels": torch.zeros(3, dtype=torch.long)},
            ValueError,
            r"labels must have shape \(N,\) = \(4,\)",
        ),
        (
            [torch.randn(4, 8), torch.randn(4, 8)],
            {"layout": "cross"},
            ValueError,
            r"layout must be one of 'all', 'paper' for cct_loss_multiview; got 'cross'",
        ),
        (
            [torch.randn(4, 8), torch.randn(5, 8)],
            {},
            ValueError,
            r"views\[1\] has shape \(5, 8\) but views\[0\] has \(4, 8\)",
        ),
        ([torch.randn(1, 8), torch.randn(1, 8)], {}, ValueError, r"N >= 2"),
        (torch.randn(4, 8), {}, ValueError, r"views must be a list of V tensors"),
        ("views", {}, TypeError, r"views must be a list of V tensors \(N, D\), got str"),
        (
            [torch.randn(4, 8), torch.ones(4, 8, dtype=torch.long)],
            {},
            TypeError,
            r"views\[1\] must have a floating-point dtype",
        ),
        (
            [torch.randn(4, 8), torch.randn(4, 8)],
            {"layout": "official"},
            ValueError,
            r"layout must be one of 'all', 'cross', 'paper'; got 'official'",
        ),
        (
            [torch.randn(4, 8), torch.randn(4, 8)],
            {"t_neg": -2},
            ValueError,
            r"t_neg must be a finite number >= 0",
        ),
    ],
)
def test_bad_multiview_input(
    views: Any, kwargs: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        cct_loss_multiview(views, **kwargs)


def test_modules_validate_at_construction() -> None:
    with pytest.raises(ValueError, match="t_neg"):
        CCTLoss(t_neg=-1.0)
    with pytest.raises(ValueError, match="layout"):
        CCTMultiviewLoss(layout="nope")
    with pytest.raises(ValueError, match=re.escape("reduction must be one of")):
        CCTMultiviewLoss(reduction="max")


def test_modules_reject_a_layout_they_do_not_serve() -> None:
    with pytest.raises(ValueError, match="for CCTLoss; got 'paper'"):
        CCTLoss(layout="paper")
    with pytest.raises(ValueError, match="for CCTMultiviewLoss; got 'cross'"):
        CCTMultiviewLoss(layout="cross")
    crit = CCTLoss()
    with pytest.raises(ValueError, match="for CCTLoss; got 'paper'"):
        crit.layout = "paper"
    assert crit.layout == "all"


def test_negatives_from_the_same_buffer_without_overlap_are_fine() -> None:
    """A positive and a queue that are disjoint slices of one buffer are not the same data."""
    buffer = torch.randn(10, 8)
    assert torch.isfinite(cct_loss(Q, buffer[:4], buffer[4:]))
    assert torch.isfinite(cct_loss(Q, P, P.clone()))  # the documented way to mean it


def test_triton_without_triton_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the optional dependency impl='triton' says what to install; nothing else
    changes (every other implementation runs)."""
    monkeypatch.setitem(
        sys.modules, "cct_loss.implementations.triton_kernels", None
    )  # an import that fails
    # and the package forgets a kernel module that an earlier test imported
    monkeypatch.delattr(cct_loss_package.implementations, "triton_kernels", raising=False)
    q, p = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"pip install cct-loss\[triton\].*'chunked'"):
        cct_loss(q, p, impl="triton")
    for impl in ("auto", "dense", "chunked", "sdpa"):
        assert torch.isfinite(cct_loss(q, p, impl=impl))


@pytest.mark.cpu_only
def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        cct_loss(torch.randn(4, 8), torch.randn(4, 8), impl="triton")
