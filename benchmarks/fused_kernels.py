"""Which of PyTorch's fused attention kernels serve ``impl="sdpa"``, per call shape and dtype.

For every call shape and dtype, ``torch.nn.attention.sdpa_kernel`` restricts the attention to
one backend at a time (flash, memory-efficient, cuDNN); a backend that cannot take the call
(a mask, float32, a head dimension) makes PyTorch raise instead of falling back, so "served"
means that kernel ran forward and backward. Each served result is compared with ``impl="dense"``
(the same dtype policy), so a kernel that runs but computes something else shows up too.

Used by ``tests/test_fused_kernels.py`` (CUDA only) and by ``make gpu-check``, which writes the
table. On the CPU only the flash backend exists (PyTorch's CPU flash kernel).

Usage: ``python benchmarks/fused_kernels.py [--device cuda]``
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from cct_loss import cct_loss, cct_loss_multiview

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
#: ``None``: float32 inputs, no autocast; otherwise float32 inputs under autocast of that dtype.
DTYPES: dict[str, torch.dtype | None] = {
    "float32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
Call = Callable[[Tensor, Tensor, Tensor, str], Tensor]

#: The call shapes, with what their attention call carries.
SHAPES: dict[str, tuple[str, Call]] = {
    "in-batch (SimCLR)": (
        "(Q, Q) mask",
        lambda q, p, n, impl: _tensor(cct_loss(q, p, impl=impl, detach_weights=False)),
    ),
    "shared negatives (MoCo)": (
        "no mask",
        lambda q, p, n, impl: _tensor(cct_loss(q, p, n, impl=impl, detach_weights=False)),
    ),
    "per-query negatives": (
        "Q heads, no mask",
        lambda q, p, n, impl: _tensor(
            cct_loss(q, p, n[: q.shape[0] * 4].view(q.shape[0], 4, -1), impl=impl)
        ),
    ),
    "cross (CLIP, MoCo v3)": (
        "(Q, Q) mask",
        lambda q, p, n, impl: _tensor(cct_loss(q, p, layout="cross", impl=impl)),
    ),
    "labels (SupCon)": (
        "(Q, Q) mask, both terms",
        lambda q, p, n, impl: _tensor(
            cct_loss(q, p, labels=torch.arange(q.shape[0], device=q.device) % 3, impl=impl)
        ),
    ),
    "paper layout": (
        "(N, N) mask",
        lambda q, p, n, impl: _tensor(
            cct_loss_multiview([q, p, p.flip(0)], layout="paper", impl=impl)
        ),
    ),
}


def _tensor(x: Any) -> Tensor:
    assert isinstance(x, Tensor)
    return x


def _run(call: Call, inputs: list[Tensor], impl: str, dtype: torch.dtype | None) -> list[Tensor]:
    """Loss and input gradients of one call (under autocast when ``dtype`` is given)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    device = inputs[0].device
    region = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )
    with region:
        loss = call(leaves[0], leaves[1], leaves[2], impl)
    grads = torch.autograd.grad(loss, leaves[:2])
    return [loss.detach(), *grads]


def survey(
    device: torch.device, n: int = 64, d: int = 64, *, max_seconds: float | None = None
) -> list[dict[str, Any]]:
    """One row per (call shape, dtype, backend): served or not, and the largest difference
    from dense in the loss and the gradients. ``max_seconds``: a (shape, dtype) that would
    start after that long gets rows that say it was not run (``served`` is ``None``)."""
    started = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(shape, generator=g, device="cpu").to(device)
        for shape in ((n, d), (n, d), (4 * n, d))
    ]
    rows = []
    for shape, (carries, call) in SHAPES.items():
        for dtype_name, dtype in DTYPES.items():
            if device.type == "cpu" and dtype is torch.float16:
                continue  # CPU autocast is bfloat16 in practice
            late = max_seconds is not None and time.perf_counter() - started > max_seconds
            reference = None if late else _run(call, inputs, "dense", dtype)
            for backend_name, backend in BACKENDS.items():
                row: dict[str, Any] = {
                    "shape": shape,
                    "attention": carries,
                    "dtype": dtype_name,
                    "backend": backend_name,
                }
                if reference is None:
                    row.update(served=None, why=f"not run: over {max_seconds:.0f} s")
                    rows.append(row)
                    continue
                try:
                    with sdpa_kernel([backend]):
                        got = _run(call, inputs, "sdpa", dtype)
                except RuntimeError as error:
                    row.update(served=False, why=str(error).strip().splitlines()[0][:120])
                else:
                    diff = max(
                        float((a - b).abs().max()) for a, b in zip(got, reference, strict=True)
                    )
                    row.update(served=True, max_diff_vs_dense=diff)
                rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The survey as a Markdown table: for each shape and dtype, the backends that served."""
    lines = [
        "| call shape | attention call | dtype | flash | efficient | cuDNN |",
        "|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((r["shape"], r["attention"], r["dtype"]) for r in rows))
    for shape, carries, dtype in keys:
        cells = []
        for backend in BACKENDS:
            match = [
                r for r in rows if (r["shape"], r["dtype"], r["backend"]) == (shape, dtype, backend)
            ]
            r = match[0]
            if r["served"] is None:
                cells.append("not run")
            else:
                cells.append(f"yes ({r['max_diff_vs_dense']:.1e})" if r["served"] else "no")
        lines.append(f"| {shape} | {carries} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(markdown(survey(torch.device(args.device))))


if __name__ == "__main__":
    main()
