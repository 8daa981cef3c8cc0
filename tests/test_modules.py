"""``CCTLoss`` and ``CCTMultiviewLoss`` behave as ``nn.Module`` losses do: train/eval, ``.to``,
``state_dict`` round trips, deepcopy, pickle, ``torch.compile(fullgraph=True)`` and subclasses
(DDP wrapping is in tests/test_distributed.py)."""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any

import pytest
import torch
from torch import nn

from cct_loss import CCTLoss, CCTMultiviewLoss

from .helpers import random_embeddings

Z1 = random_embeddings((6, 5), 0).float()
Z2 = random_embeddings((6, 5), 1).float()


def modules() -> list[tuple[Any, Any]]:
    """Each module with non-default options, and how to call it."""
    pair = CCTLoss(temperature=0.2, t_pos=0.5, detach_weights=False, reduction="sum")
    views = CCTMultiviewLoss(layout="paper", t_neg=0.9, cost="cosine", impl="chunked")
    return [(pair, lambda m: m(Z1, Z2)), (views, lambda m: m([Z1, Z2, Z1 + Z2]))]


@pytest.mark.parametrize("index", [0, 1])
def test_train_and_eval_change_nothing_but_the_flag(index: int) -> None:
    module, call = modules()[index]
    before = call(module)
    assert module.eval() is module and not module.training
    torch.testing.assert_close(call(module), before, rtol=0, atol=0)
    assert module.train() is module and module.training


@pytest.mark.parametrize("index", [0, 1])
def test_to_keeps_the_options(index: int) -> None:
    module, call = modules()[index]
    before = module.options
    assert module.to(torch.float64) is module
    assert module.to("cpu").options is before
    torch.testing.assert_close(call(module), call(modules()[index][0]), rtol=0, atol=0)


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("assign", [False, True])
def test_state_dict_round_trip(index: int, assign: bool) -> None:
    """The options are not state (as ``nn.CrossEntropyLoss``'s are not): the state dict is
    empty, and loading it into a fresh module works, strict, ``assign=True`` too."""
    module, call = modules()[index]
    state = module.state_dict()
    assert dict(state) == {}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = type(module)(**module.options.as_dict())
    result = fresh.load_state_dict(torch.load(buffer), strict=True, assign=assign)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(call(fresh), call(module), rtol=0, atol=0)


def test_state_dict_of_a_model_that_holds_the_loss() -> None:
    """A trainer's model with the loss as a submodule saves and loads its own weights."""
    model = nn.ModuleDict({"head": nn.Linear(5, 5), "loss": CCTLoss(temperature=0.1)})
    state = model.state_dict()
    assert set(state) == {"head.weight", "head.bias"}
    other = nn.ModuleDict({"head": nn.Linear(5, 5), "loss": CCTLoss(temperature=0.1)})
    other.load_state_dict(state, assign=True)
    for name, value in state.items():
        torch.testing.assert_close(other.state_dict()[name], value)


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_are_equal_and_independent(index: int, how: str) -> None:
    module, call = modules()[index]
    if how == "deepcopy":
        copied = copy.deepcopy(module)
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(module))
    else:
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    assert type(copied) is type(module)
    assert copied.options.as_dict() == module.options.as_dict()
    torch.testing.assert_close(call(copied), call(module), rtol=0, atol=0)
    copied.t_pos = 3.0  # the copy's options are its own
    assert module.t_pos != 3.0
    with pytest.raises(AttributeError, match="did you mean 't_pos'"):
        copied.tpos = 1.0  # the copy still guards its options


@pytest.mark.parametrize("index", [0, 1])
def test_compiles_with_fullgraph(index: int) -> None:
    module, call = modules()[index]
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    torch.testing.assert_close(call(compiled), call(module))


def test_a_compiled_step_follows_an_option_set_between_calls() -> None:
    criterion = CCTLoss(temperature=0.5)
    compiled = torch.compile(criterion, fullgraph=True, backend="eager")
    first = compiled(Z1, Z2)
    criterion.temperature = 0.1
    torch.testing.assert_close(compiled(Z1, Z2), CCTLoss(temperature=0.1)(Z1, Z2))
    assert not torch.equal(first, compiled(Z1, Z2))


class WithHead(CCTMultiviewLoss):
    """A subclass with a submodule, a buffer and attributes of its own."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.head = nn.Linear(5, 4)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.note = "projection head"

    def forward(self, views: Any, labels: Any = None) -> Any:
        self.steps += 1
        return super().forward([self.head(v) for v in views], labels)


def test_a_subclass_with_its_own_submodules_and_state() -> None:
    module = WithHead(temperature=0.3)
    loss = module([Z1, Z2])
    loss.backward()
    assert module.head.weight.grad is not None
    assert set(module.state_dict()) == {"head.weight", "head.bias", "steps"}
    assert module.note == "projection head" and int(module.steps) == 1
    copied = copy.deepcopy(module)
    torch.testing.assert_close(copied([Z1, Z2]), module([Z1, Z2]))
    fresh = WithHead(temperature=0.3)
    fresh.load_state_dict(module.state_dict())
    assert int(fresh.steps) == 2
    torch.testing.assert_close(fresh([Z1, Z2]), module([Z1, Z2]))
    assert "t_neg=" in repr(module) and "(head): Linear" in repr(module)
