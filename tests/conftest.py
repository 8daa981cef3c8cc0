"""Shared pytest set-up: the test device, hypothesis profiles, deterministic torch.

``CCT_TEST_DEVICE=cuda`` runs the correctness suite on a CUDA device: it becomes PyTorch's
default device, so every tensor a test creates lives there (the library itself always passes
``device=``, which tests/test_device.py checks). Tests marked ``cpu_only`` (processes, examples,
the README, inductor compiles) are skipped there; tests marked ``cuda_only`` (fused-kernel
selection, device memory) are skipped on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

from cct_loss import shortcuts

from .helpers import TEST_DEVICE


def _register(name: str, max_examples: int, *, derandomize: bool) -> None:
    settings.register_profile(
        name,
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        derandomize=derandomize,
    )


_register("default", 60, derandomize=True)
_register("thorough", 500, derandomize=False)
# make gpu-check: the same properties on fewer examples (a GPU run has a time budget).
_register("gpu-check", 6, derandomize=True)
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
settings.load_profile(_PROFILE)

torch.set_num_threads(min(2, torch.get_num_threads()))
if TEST_DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise pytest.UsageError("CCT_TEST_DEVICE=cuda, but torch.cuda.is_available() is False")
if TEST_DEVICE.type != "cpu":
    torch.set_default_device(TEST_DEVICE)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cpu_only: runs only when CCT_TEST_DEVICE is cpu")
    config.addinivalue_line("markers", "cuda_only: runs only when CCT_TEST_DEVICE is cuda")
    config.addinivalue_line(
        "markers", "triton: impl='triton' (on the CPU run apart, with TRITON_INTERPRET=1)"
    )
    # pytest-xdist's own marker (make gpu-check runs --dist loadgroup), declared for runs
    # without the plugin.
    config.addinivalue_line("markers", "xdist_group(name): tests that share one xdist worker")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    on_cuda = TEST_DEVICE.type == "cuda"
    for item in items:
        if on_cuda and item.get_closest_marker("cpu_only"):
            item.add_marker(pytest.mark.skip(reason=f"CPU only; testing on {TEST_DEVICE}"))
        if not on_cuda and item.get_closest_marker("cuda_only"):
            item.add_marker(pytest.mark.skip(reason="needs CCT_TEST_DEVICE=cuda"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With ``CCT_FAILURE_LOG`` set (``make gpu-check``), append each failure's reason to that
    file as it happens, so that a run cut short by its time limit still says why each test
    failed (the summary at the end would be lost). Under pytest-xdist the controller writes."""
    path = os.environ.get("CCT_FAILURE_LOG")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    reason = report.longreprtext.strip()
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"## {report.nodeid} ({report.when})\n\n```\n{reason[-6000:]}\n```\n\n")


#: The shortcut settings the property tests run under. A GPU check (its time is budgeted) runs
#: them as users do, with the shortcuts on, and tests/test_shortcuts.py for the bits.
SHORTCUT_SETTINGS = (
    ["shortcuts on"] if _PROFILE == "gpu-check" else ["shortcuts on", "shortcuts off"]
)


@pytest.fixture(scope="module", params=SHORTCUT_SETTINGS)
def both_shortcut_settings(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a module's tests twice: with the per-call shortcuts (cct_loss/shortcuts.py) and
    with every call taking the long way. Use as ``pytestmark = usefixtures(...)``."""
    if request.param == "shortcuts off":
        with shortcuts.disabled():
            yield request.param
    else:
        yield request.param
