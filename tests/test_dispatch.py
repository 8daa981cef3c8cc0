"""``impl="auto"``: the rule of cct_loss/implementations/table.py as a pure function, on a table of calls."""

from __future__ import annotations

import warnings

import pytest
import torch

from cct_loss.implementations import triton_op
from cct_loss.implementations.table import (
    AUTO_DENSE_MAX_ELEMENTS,
    CUDA_DENSE_MAX_ELEMENTS,
    TRITON_AUTO_MAX_DIM,
    TRITON_MIN_ELEMENTS,
    TRITON_MIN_QUERIES,
    Call,
    choose_impl,
    describe_call,
)

BF16, FP32 = torch.bfloat16, torch.float32


def cuda(q: int, k: int, dtype: torch.dtype = BF16, **flags: object) -> Call:
    options: dict[str, object] = {"triton_installed": True, **flags}
    return Call("cuda", q, k, 128, dtype, **options)  # type: ignore[arg-type]


RULE = [
    # the CPU: dense while the cost matrix is within 64 MiB, chunked above
    (Call("cpu", 512, 16384, 128, FP32), "dense"),
    (Call("cpu", 512, AUTO_DENSE_MAX_ELEMENTS // 512 + 1, 128, FP32), "chunked"),
    (Call("cpu", 4096, 65536, 128, FP32, per_query=True), "dense"),
    (Call("cpu", 4096, 65536, 128, BF16), "chunked"),
    # CUDA: small problems stay dense
    (cuda(512, 512), "dense"),  # SimCLR N=256
    (cuda(2048, 2048), "dense"),  # SimCLR N=1024
    (cuda(256, 16384), "dense"),  # MoCo N=256, K=16384
    (cuda(512, 65536), "dense"),  # MoCo N=512, K=65536: too few queries for triton
    # large problems go to triton where it serves the call
    (cuda(TRITON_MIN_QUERIES, TRITON_MIN_ELEMENTS // TRITON_MIN_QUERIES), "triton"),
    (cuda(4096, 65536), "triton"),  # MoCo N=4096, K=65536
    (cuda(16384, 16384), "triton"),  # SimCLR N=8192
    (cuda(16384, 16384, torch.float16), "triton"),
    # ... and not where it does not: IEEE float32, tracing, per-query keys, large D, absent
    (cuda(4096, 65536, FP32), "dense"),
    (cuda(4096, 65536, FP32, tf32=True), "triton"),
    (cuda(32768, 16384, traced=True), "sdpa"),  # above dense's size
    (cuda(4096, 65536, traced=True), "dense"),
    (cuda(4096, 65536, per_query=True), "dense"),
    (Call("cuda", 4096, 65536, TRITON_AUTO_MAX_DIM, BF16, triton_installed=True), "triton"),
    # The kernels take D up to 1024, but above 256 they are untimed: auto keeps dense there.
    (Call("cuda", 4096, 65536, TRITON_AUTO_MAX_DIM + 1, BF16, triton_installed=True), "dense"),
    (Call("cuda", 4096, 65536, 512, BF16, triton_installed=True), "dense"),
    (cuda(4096, 65536, triton_installed=False), "dense"),
    (cuda(32768, 32768, triton_installed=False), "sdpa"),
    (cuda(CUDA_DENSE_MAX_ELEMENTS // 1024 + 1024, 1024, triton_installed=False), "sdpa"),
]


@pytest.mark.parametrize(("call", "expected"), RULE)
def test_the_rule(call: Call, expected: str) -> None:
    assert choose_impl("auto", call) == expected


def test_an_explicit_impl_is_kept() -> None:
    for impl in ("dense", "chunked", "sdpa", "triton"):
        assert choose_impl(impl, cuda(8, 8)) == impl


def test_no_chunked_on_cuda() -> None:
    """chunked ran at a tenth of triton's speed on the H200: auto never picks it there."""
    sizes = [(q, k) for q in (8, 512, 4096, 65536) for k in (8, 4096, 65536, 1 << 20)]
    for q, k in sizes:
        for call in (cuda(q, k), cuda(q, k, traced=True), cuda(q, k, triton_installed=False)):
            assert choose_impl("auto", call) != "chunked"


def test_describe_call_reads_the_call() -> None:
    q, k = torch.zeros(6, 16), torch.zeros(40, 16)
    call = describe_call(q, k)
    assert (call.num_queries, call.num_keys, call.dim, call.dtype) == (6, 40, 16, q.dtype)
    assert describe_call(q, torch.zeros(6, 40, 16)).per_query
    assert describe_call(q, k, torch.bfloat16).dtype == torch.bfloat16  # before preparing


def test_triton_warns_on_its_ieee_float32_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one path far slower than its neighbours says so when asked for explicitly."""
    monkeypatch.setattr(triton_op, "interpreting", lambda: False)
    matmul = torch.backends.cuda.matmul
    allowed = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        with pytest.warns(UserWarning, match=r"IEEE float32 .* impl='auto' never sends"):
            launch = triton_op._launch_options(torch.zeros(2, 4), 4)
        assert launch["PRECISION"] == "ieee"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            half = triton_op._launch_options(torch.zeros(2, 4, dtype=BF16), 4)
            assert half["UPCAST"] is False
            matmul.allow_tf32 = True
            assert triton_op._launch_options(torch.zeros(2, 4), 4)["PRECISION"] == "tf32"
    finally:
        matmul.allow_tf32 = allowed
