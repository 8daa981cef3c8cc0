"""The per-call shortcuts (cct_loss/shortcuts.py) change no bit: values and gradients with the
shortcuts on (a first call, then calls that replay it) equal those of calls that take the long
way (``shortcuts.disabled()``), over the call shapes, the implementations and the options; and
the switch does turn every shortcut off."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from cct_loss import CCTLoss, cct_loss, cct_loss_multiview, shortcuts
from cct_loss.front import route
from cct_loss.problem import layouts

from .helpers import TEST_DEVICE, impl_options, random_embeddings

N, M, K, D = 6, 3, 10, 8

#: A call: the leaves it differentiates, then the loss (or details) from those leaves.
Call = tuple[list[Tensor], Callable[[list[Tensor]], Any]]


def _leaves(*shapes: tuple[int, ...]) -> list[Tensor]:
    return [random_embeddings(shape, seed).float().requires_grad_() for seed, shape in
            enumerate(shapes)]  # fmt: skip


def _calls() -> dict[str, Callable[[dict[str, Any]], Call]]:
    """Each call shape of the library, as a builder from options to a :data:`Call`."""
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    negative_labels = torch.arange(K) % 3
    return {
        "simclr": lambda o: (_leaves((N, D), (N, D)), lambda x: cct_loss(x[0], x[1], **o)),
        "moco": lambda o: (
            _leaves((N, D), (N, D), (K, D)),
            lambda x: cct_loss(x[0], x[1], x[2], **o),
        ),
        "per_query": lambda o: (
            _leaves((N, D), (N, D), (N, K, D)),
            lambda x: cct_loss(x[0], x[1], x[2], **o),
        ),
        "multi_positive": lambda o: (
            _leaves((N, D), (N, M, D)),
            lambda x: cct_loss(x[0], x[1], **o),
        ),
        "cross": lambda o: (
            _leaves((N, D), (N, D)),
            lambda x: cct_loss(x[0], x[1], layout="cross", **o),
        ),
        "labels": lambda o: (
            _leaves((N, D), (N, D), (K, D)),
            lambda x: cct_loss(
                x[0], x[1], x[2], labels=labels, negative_labels=negative_labels, **o
            ),
        ),
        "one_view_labels": lambda o: (
            _leaves((N, D)),
            lambda x: cct_loss(x[0], labels=labels, **o),
        ),
        "multiview": lambda o: (
            _leaves((N, D), (N, D), (N, D)),
            lambda x: cct_loss_multiview(x, **o),
        ),
        "paper": lambda o: (
            _leaves((N, D), (N, D), (N, D)),
            lambda x: cct_loss_multiview(x, layout="paper", **o),
        ),
        "module": lambda o: (
            _leaves((N, D), (N, D), (K, D)),
            lambda x: CCTLoss(**o)(x[0], x[1], x[2]),
        ),
    }


OPTIONS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "temperature, cosine": {"temperature": 0.2, "cost": "cosine"},
    "through the weights": {"detach_weights": False, "t_pos": 2.0, "alpha": 0.5},
    "sum, raw": {"reduction": "sum", "normalize": False, "t_neg": 3.0},
    "none": {"reduction": "none"},
    "details": {"return_details": True, "t_neg": 2.0},
    "schedule": {"t_neg": torch.tensor(2.5), "beta": torch.tensor(0.7)},
}


def _outcome(call: Call) -> list[Tensor]:
    """Every tensor of the result, then the gradients of every leaf (of a weighted sum of all
    the result's differentiable tensors, so that each one's backward is checked)."""
    leaves, loss_of = call
    result = loss_of(leaves)
    tensors = [t for t in (result if isinstance(result, tuple) else (result,)) if t is not None]
    differentiable = [t for t in tensors if t.requires_grad]
    total = sum((t.sum() * (i + 1) for i, t in enumerate(differentiable)), torch.zeros(()))
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return [t.detach() for t in tensors] + [torch.zeros(()) if g is None else g for g in grads]


def _assert_bit_identical(first: list[Tensor], second: list[Tensor], what: str) -> None:
    assert len(first) == len(second), what
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: tensor {i}"
        assert torch.equal(a, b), f"{what}: tensor {i} differs by {(a - b).abs().max().item()}"


@pytest.mark.parametrize("impl", ["auto", "dense", "chunked", "sdpa"])
@pytest.mark.parametrize("options_name", list(OPTIONS))
@pytest.mark.parametrize("shape", list(_calls()))
def test_shortcuts_change_no_bit(shape: str, options_name: str, impl: str) -> None:
    if impl == "sdpa" and TEST_DEVICE.type == "cuda":
        pytest.skip("CUDA's fused attention backward is not bitwise repeatable run to run")
    options = {**OPTIONS[options_name], **impl_options(impl, chunk_size=4)}
    build = _calls()[shape]
    for memo in (route._REPLAYS, layouts._INSTANCES):
        memo.clear()
    with shortcuts.disabled():
        long_way = _outcome(build(options))
    first = _outcome(build(options))  # fills the memos
    replayed = [_outcome(build(options)) for _ in range(2)]  # reads them
    _assert_bit_identical(long_way, first, "first call with the shortcuts on")
    for again in replayed:
        _assert_bit_identical(long_way, again, "a replayed call")


def test_autocast_results_equal_both_ways() -> None:
    """A bfloat16 autocast call (its own signature) replays to the same bits."""
    leaves = _leaves((N, D), (N, D), (K, D))

    def run() -> list[Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _outcome((leaves, lambda x: cct_loss(x[0], x[1], x[2], impl="dense")))

    with shortcuts.disabled():
        long_way = run()
    for _ in range(3):
        _assert_bit_identical(long_way, run(), "autocast")


def test_the_switch_turns_every_shortcut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """While disabled: no memo is written or read, autograd functions are applied as they are
    (not through their eager twins), and a fresh context is entered every time."""
    z1, z2 = _leaves((N, D), (N, D))
    memos = (route._REPLAYS, layouts._INSTANCES)
    for memo in memos:
        memo.clear()
    twins_applied: list[str] = []
    for function, twin in shortcuts._TWINS.items():
        original = twin.apply

        def spy(*inputs: Any, _original: Any = original, _name: str = function.__name__) -> Any:
            twins_applied.append(_name)
            return _original(*inputs)

        monkeypatch.setattr(twin, "apply", spy)

    with shortcuts.disabled():
        assert not shortcuts.active()
        for _ in range(2):
            cct_loss(z1, z2, impl="dense").backward()
        assert all(len(memo._table) == 0 for memo in memos), "a memo was written while disabled"
        assert twins_applied == [], f"eager twins applied while disabled: {twins_applied}"
        assert shortcuts.no_context() is not shortcuts.no_context()

    assert shortcuts.active()
    for _ in range(2):
        cct_loss(z1, z2, impl="dense").backward()
    assert len(route._REPLAYS._table) == 1, "the shortcuts on: the call is remembered"
    assert twins_applied, "the shortcuts on: the eager twin runs"
    assert shortcuts.no_context() is shortcuts.no_context()

    # A memo filled while on is not read while off: the long way is taken, not the replay.
    with shortcuts.disabled():
        assert route._REPLAYS.get(next(iter(route._REPLAYS._table))) is None


def test_the_switch_is_restored_after_an_error() -> None:
    with pytest.raises(RuntimeError), shortcuts.disabled():
        raise RuntimeError("inside")
    assert shortcuts.active()


def test_a_memo_tells_true_from_one() -> None:
    """``True == 1`` in Python: a memo keyed by both keeps them apart."""
    memo: shortcuts.Memo[str] = shortcuts.Memo(4)
    assert memo.lookup((True,), lambda: "bool") == "bool"
    assert memo.lookup((1,), lambda: "int") == "int"
    assert memo.lookup((True,), lambda: "again") == "bool"


def test_a_full_memo_starts_again() -> None:
    memo: shortcuts.Memo[int] = shortcuts.Memo(2)
    for i in range(3):
        memo.lookup((i,), lambda i=i: i)  # type: ignore[misc]
    assert len(memo._table) == 1
