"""Device hygiene: the library never creates a tensor on PyTorch's default device by accident.

The CUDA run of the suite (``CCT_TEST_DEVICE=cuda``) makes the test device the default one, so a
factory call without ``device=`` inside the library would go unnoticed there and put a tensor on
the CPU for every user. This test reads the source instead: every tensor factory in cct_loss/
names its device (or is a ``*_like`` / ``Tensor.new_*`` call, which follow their argument).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from cct_loss import CCTDetails, NegativeQueue, cct_loss, cct_loss_multiview

from .helpers import TEST_DEVICE, random_embeddings

PACKAGE = Path(__file__).resolve().parent.parent / "cct_loss"
FACTORIES = {
    "arange",
    "empty",
    "eye",
    "full",
    "linspace",
    "ones",
    "rand",
    "randint",
    "randn",
    "randperm",
    "scalar_tensor",
    "tensor",
    "zeros",
}


def factory_calls_without_device(folder: Path = PACKAGE) -> list[str]:
    """``file:line torch.factory`` of every factory call in ``folder`` without ``device=``."""
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value
            if not (isinstance(owner, ast.Name) and owner.id == "torch"):
                continue
            if node.func.attr in FACTORIES and "device" not in {k.arg for k in node.keywords}:
                found.append(f"{path.name}:{node.lineno} torch.{node.func.attr}")
    return found


def test_every_factory_call_in_the_library_names_its_device() -> None:
    assert factory_calls_without_device() == []


def test_the_scan_finds_a_factory_without_device(tmp_path: Path) -> None:
    """The scan itself can fail: a planted call is reported, a call with a device is not."""
    planted = "import torch\nx = torch.zeros(3)\ny = torch.ones(2, device=d)\nz = x.new_ones(2)\n"
    (tmp_path / "planted.py").write_text(planted)
    assert factory_calls_without_device(tmp_path) == ["planted.py:2 torch.zeros"]


@pytest.mark.parametrize("impl", ["dense", "chunked", "sdpa"])
def test_results_live_on_the_test_device(impl: str) -> None:
    q = random_embeddings((6, 8), 0).float().requires_grad_()
    p = random_embeddings((6, 8), 1).float()
    queue = NegativeQueue(16, 8, device=TEST_DEVICE)
    queue.enqueue(random_embeddings((16, 8), 2).float())
    out = cct_loss(q, p, queue.negatives(), impl=impl, return_details=True)
    assert isinstance(out, CCTDetails)
    for name, value in out._asdict().items():
        if isinstance(value, torch.Tensor):
            assert value.device.type == TEST_DEVICE.type, name
    (grad,) = torch.autograd.grad(out.loss, q)
    assert grad.device.type == TEST_DEVICE.type
    paper = cct_loss_multiview([q, p, p.clone()], layout="paper", impl=impl)
    assert isinstance(paper, torch.Tensor) and paper.device.type == TEST_DEVICE.type
