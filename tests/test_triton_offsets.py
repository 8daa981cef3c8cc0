"""The Triton kernels address memory with 64-bit offsets: compiled offline (Triton's own
compiler, for an H100/H200's sm_90, no GPU needed), every pointer into an ``(N, D)`` array is
offset by int64, so ``rows * D`` cannot wrap at 2**31 (1,048,576 rows per view at D = 1024 gives
2**31 elements in-batch, and the kernels take that).

The interpreter cannot show this (it would need tensors of 2**31 elements), so the check reads
the compiled Triton IR instead: an int32 offset there is what wrapped.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from cct_loss.implementations.triton_op import interpreting

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(
    interpreting(), reason="under TRITON_INTERPRET=1 the kernels are not compiled"
)

#: The kernels' pointer arguments: embeddings (bf16), ids (int64), the rest float32.
EMBEDDINGS = {"q_ptr", "k_ptr"}
IDS = {"qg_ptr", "kg_ptr", "qs_ptr", "ks_ptr"}
#: ``tt.addptr`` of a 2-D tensor of pointers, and the element type of its offsets.
TWO_D_ADDPTR = re.compile(r"tt\.addptr .*: tensor<\d+x\d+x!tt\.ptr<\w+>>, tensor<\d+x\d+x(i\d+)>")


def ttir(kernel: Any, constants: dict[str, object]) -> str:
    """The Triton IR of ``kernel`` compiled for sm_90 with these constexprs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in EMBEDDINGS:
            signature[name] = "*bf16"
        elif name in IDS:
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "i32"
    constexprs = {(kernel.arg_names.index(k),): v for k, v in constants.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    return str(compiled.asm["ttir"])


FLAGS = {
    "HAS_GROUPS": True,
    "SAME_GROUP": True,
    "HAS_SELF": True,
    "COSINE": False,
    "UPCAST": False,
    "PRECISION": "tf32",
    "BLOCK_Q": 64,
    "BLOCK_K": 64,
}


@pytest.mark.parametrize("single_tile", [True, False])
@pytest.mark.parametrize("kernel", ["forward", "grad_query", "grad_keys"])
def test_row_offsets_are_64_bit(kernel: str, single_tile: bool) -> None:
    from cct_loss.implementations import triton_kernels

    function = getattr(triton_kernels, f"expected_cost_{kernel}")
    constants: dict[str, object] = {**FLAGS, "SINGLE_D": single_tile}
    constants["BLOCK_D"] = 128 if single_tile else 64
    if kernel == "forward":
        constants.update(FARTHER=False, DETAILS=True)
    else:
        constants.update(DETACH=False, ACCUMULATE=True, BLOCK_DOUT=constants["BLOCK_D"])
    text = ttir(function, constants)
    offsets = TWO_D_ADDPTR.findall(text)
    assert offsets, "no 2-D pointer arithmetic found: has the IR's form changed?"
    assert set(offsets) == {"i64"}, f"{offsets.count('i32')} of {len(offsets)} offsets are int32"
