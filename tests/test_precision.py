"""The precision policy (cct_loss/maths/precision.py): under autocast, and for half-precision inputs,
the matrix products run in the low-precision dtype; norms, softmax, sums and the result stay
float32. Checked two ways: which dtype every operator actually ran in (recorded at dispatch),
and the values and gradients against the float64 loop reference with a bfloat16 tolerance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from cct_loss import cct_loss, cct_loss_multiview

from .helpers import (
    IMPLS,
    LABEL_PATTERNS,
    TEST_DEVICE,
    Case,
    cases,
    grads_of,
    impl_options,
    random_embeddings,
)
from .reference import reduce_results, reference_paper, reference_queries

aten = torch.ops.aten

#: Operators with an inner dimension of D (or of the batch, in the gradients): the products.
PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
#: Everything the policy keeps in float32: normalising, norms, softmax, sums, the reduction.
FULL_PRECISION = {
    aten._softmax.default,
    aten.exp.default,
    aten.exp_.default,
    aten.sum.dim_IntList,
    aten.sum.default,
    aten.mean.default,
    aten.linalg_vector_norm.default,
    aten.logsumexp.default,
    aten.xlogy.Tensor,
    aten.mv.default,
}


class DtypeRecorder(TorchDispatchMode):
    """Records ``(operator, floating dtypes of its tensor inputs)`` for every call."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.calls: list[tuple[Any, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        dtypes = tuple(
            a.dtype for a in args if isinstance(a, Tensor) and a.is_floating_point() and a.dim()
        )
        self.calls.append((func, dtypes))
        return func(*args, **(kwargs or {}))

    def dtypes_of(self, ops: set[Any]) -> set[torch.dtype]:
        return {d for func, dtypes in self.calls if func in ops for d in dtypes}

    def product_dtypes(self) -> set[torch.dtype]:
        """Operand dtypes of the matrix products and attention calls (their first three
        tensors: query, key, value forward; the output gradient, query, key backward; the
        float32 log-sum-exp a backward also takes is a statistic, not an operand)."""
        attention = {
            d
            for func, dtypes in self.calls
            if "scaled_dot_product" in str(func)
            for d in dtypes[:3]
        }
        return self.dtypes_of(PRODUCTS) | attention


SHAPES = ["in_batch", "shared", "per_query", "cross", "labels", "paper"]


def run_shape(shape: str, impl: str, detach: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """One call of ``shape`` on leaves of ``dtype``; returns the loss and the query gradient."""
    q = random_embeddings((6, 16), 0).to(dtype).requires_grad_()
    p = random_embeddings((6, 16), 1).to(dtype).requires_grad_()
    options: dict[str, Any] = {"impl": impl, "detach_weights": detach, "t_neg": 2.0}
    if shape == "paper":
        loss = cct_loss_multiview([q, p, p * 0.5], layout="paper", **options)
    elif shape == "shared":
        loss = cct_loss(q, p, random_embeddings((40, 16), 2).to(dtype), **options)
    elif shape == "per_query":
        loss = cct_loss(q, p, random_embeddings((6, 7, 16), 2).to(dtype), **options)
    elif shape == "cross":
        loss = cct_loss(q, p, layout="cross", **options)
    elif shape == "labels":
        loss = cct_loss(q, p, labels=torch.tensor([0, 1, 0, 2, 1, 0]), **options)
    else:
        loss = cct_loss(q, p, **options)
    (grad,) = torch.autograd.grad(loss, q)
    return loss, grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("detach", [True, False])
def test_products_follow_autocast_the_rest_is_float32(impl: str, shape: str, detach: bool) -> None:
    with DtypeRecorder() as recorder, torch.autocast(TEST_DEVICE.type, dtype=torch.bfloat16):
        loss, grad = run_shape(shape, impl, detach, torch.float32)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    products = recorder.product_dtypes()
    assert products == {torch.bfloat16}, f"products ran in {products}"
    rest = recorder.dtypes_of(FULL_PRECISION)
    assert rest == {torch.float32}, f"norms, softmax and sums ran in {rest}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_run_products_in_their_dtype(impl: str, dtype: torch.dtype) -> None:
    with DtypeRecorder() as recorder:
        loss, grad = run_shape("shared", impl, False, dtype)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert recorder.product_dtypes() == {dtype}
    assert recorder.dtypes_of(FULL_PRECISION) == {torch.float32}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_inputs_outside_autocast_keep_their_dtype(
    impl: str, dtype: torch.dtype
) -> None:
    with DtypeRecorder() as recorder:
        loss, _ = run_shape("in_batch", impl, False, dtype)
    assert loss.dtype == dtype
    assert recorder.product_dtypes() == {dtype}


def test_float64_under_autocast_stays_float64() -> None:
    """Autocast never casts float64; neither does the policy."""
    with DtypeRecorder() as recorder, torch.autocast(TEST_DEVICE.type, dtype=torch.bfloat16):
        loss, _ = run_shape("shared", "dense", False, torch.float64)
    assert loss.dtype == torch.float64
    assert recorder.dtypes_of(PRODUCTS) == {torch.float64}


#: bfloat16 keeps 8 significant bits: an input or a product carries a relative error of
#: 2**-9, so a cost on the unit sphere (at most 4) is off by up to about 1e-2. Measured over
#: 300 cases per implementation (t <= 5): loss errors up to 4.5e-3 and gradient errors up to
#: 2.0e-2 of ``max|expected| + 1``; the tolerances leave a factor of 2 to 2.5.
BF16_VALUE_RTOL = 1e-2
BF16_GRAD_RTOL = 5e-2


def bf16_cases() -> st.SearchStrategy[Case]:
    """Every layout and label pattern, on the unit sphere, with sharpness up to 5 (a cost error
    of 1e-2 moves a softmax weight by ``t`` times that)."""

    def moderate(case: Case, t_pos: float, t_neg: float) -> Case:
        case.options.update(t_pos=t_pos, t_neg=t_neg, normalize=True, reduction="mean")
        case.options.update(alpha=1.0, beta=1.0)
        return case

    return st.builds(
        moderate,
        cases(
            modes=("in_batch", "shared"), layouts=("all", "cross"), label_patterns=LABEL_PATTERNS
        ),
        st.floats(0.0, 5.0),
        st.floats(0.0, 5.0),
    )


def assert_bf16_close(
    actual: Tensor, expected: Tensor, rtol: float, what: str, *, floor: float = 1.0
) -> None:
    """``|a - e| <= rtol * (max|e| + floor)``: bfloat16 errors are absolute, of the costs' size
    (``floor = 1``). A test whose expected values are all of one known scale (no tiny
    hypothesis cases where a gradient cancels) passes ``floor = 0``: relative to ``max|e|``."""
    a, e = actual.detach().double(), expected.detach().double()
    err = float((a - e).abs().max())
    tol = rtol * (float(e.abs().max()) + floor)
    assert err <= tol, f"{what}: error {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=25)
@given(case=bf16_cases(), half_inputs=st.booleans())
def test_bf16_matches_float64_reference(impl: str, case: Case, half_inputs: bool) -> None:
    """Under CPU autocast (or with bfloat16 inputs) every implementation stays within bfloat16
    accuracy of the float64 reference, values and gradients, every layout and label pattern."""
    opts = dict(case.options)
    reduction = str(opts.pop("reduction"))
    q, p, n = case.leaves(torch.bfloat16 if half_inputs else torch.float32)
    with torch.autocast(TEST_DEVICE.type, dtype=torch.bfloat16, enabled=not half_inputs):
        loss = cct_loss(
            q, p, n, **impl_options(impl), reduction=reduction, **case.call_options, **opts
        )
    assert loss.dtype == torch.float32
    rq, rp, rn = case.leaves(torch.float64)
    expected = reduce_results(
        reference_queries(rq, rp, rn, **case.call_options, **opts), reduction, opts
    )
    assert_bf16_close(loss, expected, BF16_VALUE_RTOL, "loss")
    for name, g, w in zip(
        ["query", "positive", "negatives"],
        grads_of(loss, [q, p, n]),
        grads_of(expected, [rq, rp, rn]),
        strict=True,
    ):
        if w is not None:
            assert g is not None
            assert_bf16_close(g, w, BF16_GRAD_RTOL, f"grad {name}")


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("detach", [True, False])
def test_bf16_paper_layout_matches_reference(impl: str, detach: bool) -> None:
    views = [random_embeddings((9, 12), seed) for seed in range(4)]
    leaves = [v.float().requires_grad_() for v in views]
    with torch.autocast(TEST_DEVICE.type, dtype=torch.bfloat16):
        loss = cct_loss_multiview(
            leaves, layout="paper", impl=impl, detach_weights=detach, t_neg=0.9
        )
    ref_leaves = [v.requires_grad_() for v in views]
    expected = reference_paper(ref_leaves, t_neg=0.9, detach_weights=detach)
    assert_bf16_close(loss, expected, BF16_VALUE_RTOL, "loss")
    for g, w in zip(
        torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, ref_leaves), strict=True
    ):
        assert_bf16_close(g, w, BF16_GRAD_RTOL, "grad")


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_zero_rows_and_large_sharpness(impl: str) -> None:
    """A zero row after normalisation has cost |n|^2 = 1 to every unit key (not 2 - 2 q.n = 2),
    and t = 1e4 gives neither inf nor NaN under autocast."""
    q = random_embeddings((5, 16), 0).float()
    q[2] = 0.0
    p = random_embeddings((5, 16), 1).float()
    negatives = random_embeddings((30, 16), 2).float()
    for t in (1.0, 1e4):
        with torch.autocast(TEST_DEVICE.type, dtype=torch.bfloat16):
            out = cct_loss(
                q, p, negatives, impl=impl, t_neg=t, reduction="none", return_details=True
            )
        assert torch.isfinite(out.loss).all()
        torch.testing.assert_close(out.repulsion[2], torch.tensor(-1.0), atol=1e-2, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_under_autocast_matches_eager(impl: str) -> None:
    """``torch.compile(fullgraph=True)`` of a call inside an autocast region: the policy's
    casts and its autocast-free region trace without a graph break."""
    q = random_embeddings((6, 16), 0).float().requires_grad_()
    p = random_embeddings((6, 16), 1).float()
    negatives = random_embeddings((20, 16), 2).float()

    def step(q: Tensor, p: Tensor, negatives: Tensor) -> Tensor:
        with torch.autocast(TEST_DEVICE.type, dtype=torch.bfloat16):
            return cct_loss(q, p, negatives, impl=impl, detach_weights=False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(q, p, negatives), step(q, p, negatives)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, q)[0], torch.autograd.grad(want, q)[0])


# TF32: PyTorch's two APIs. Each setting is made in a fresh forked process: once the new API
# has set TF32, reading the legacy flag raises, and no setter puts every flag back as it was.
#: (what the user runs, whether float32 products may then use TF32)
TF32_SETTINGS = [
    ("pass", False),
    ("matmul.allow_tf32 = True", True),
    ("matmul.allow_tf32 = False", False),
    ("torch.set_float32_matmul_precision('high')", True),
    ("torch.set_float32_matmul_precision('highest')", False),
    ("matmul.fp32_precision = 'tf32'", True),
    ("matmul.fp32_precision = 'ieee'", False),
    ("torch.backends.fp32_precision = 'tf32'", True),
    ("torch.backends.fp32_precision = 'ieee'", False),
    ("torch.backends.fp32_precision = 'tf32'; matmul.fp32_precision = 'ieee'", False),
    ("torch.backends.fp32_precision = 'ieee'; matmul.fp32_precision = 'tf32'", True),
    ("matmul.allow_tf32 = True; matmul.fp32_precision = 'ieee'", False),
    ("matmul.fp32_precision = 'tf32'; matmul.allow_tf32 = False", False),
]


def _tf32_paths(setting: str) -> dict[str, object]:
    """In a forked child: make ``setting``, then ask every path that consults TF32."""
    import warnings

    from cct_loss.implementations import triton_op
    from cct_loss.implementations.table import choose_impl, cuda_call, triton_installed
    from cct_loss.maths.precision import tf32_matmul_allowed

    # PyTorch's defaults first (an earlier test of the parent may have set a flag): "none" is
    # "inherit" at both levels, where the legacy read still works.
    torch.backends.fp32_precision = "none"  # type: ignore[attr-defined]
    torch.backends.cuda.matmul.fp32_precision = "none"
    exec(setting, {"torch": torch, "matmul": torch.backends.cuda.matmul})
    triton_op.interpreting = lambda: False  # (the child's own copy of the module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        launch = triton_op._launch_options(torch.zeros(2, 4), 4)
    # MoCo N=4096, K=65536 in float32: triton exactly when TF32 is allowed, else dense.
    call = cuda_call(4096, 65536, 128, torch.float32)
    return {
        "helper": tf32_matmul_allowed(),
        "call": call.tf32,
        "auto": choose_impl("auto", call),
        "triton_installed": triton_installed(),
        "precision": launch["PRECISION"],
        "warned": any("IEEE float32" in str(w.message) for w in caught),
    }


def _in_fork(function: Any, *args: Any) -> Any:
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(function, args)


@pytest.mark.cpu_only  # (a forked child must not touch CUDA)
@pytest.mark.parametrize(("setting", "allowed"), TF32_SETTINGS)
def test_tf32_read_from_either_api(setting: str, allowed: bool) -> None:
    """Whichever API set it, the one helper reads TF32 without raising, and the auto rule and
    the Triton float32 path agree with it (the legacy read alone raises after the new API)."""
    got = _in_fork(_tf32_paths, setting)
    assert got["helper"] is allowed and got["call"] is allowed, got
    assert got["precision"] == ("tf32" if allowed else "ieee"), got
    assert got["warned"] is (not allowed), got
    if got["triton_installed"]:
        assert got["auto"] == ("triton" if allowed else "dense"), got


def test_tf32_without_the_new_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch without ``fp32_precision``: the legacy flag is read."""
    import types

    from cct_loss.maths.precision import tf32_matmul_allowed

    for flag in (True, False):
        legacy = types.SimpleNamespace(allow_tf32=flag)
        monkeypatch.setattr(torch.backends.cuda, "matmul", legacy)
        assert tf32_matmul_allowed() is flag


def test_tf32_is_read_through_one_helper() -> None:
    """No module of the library reads the legacy flag itself (which raises after the new API
    set TF32): only the helper's fallback for a torch without the new API does."""
    import ast

    import cct_loss

    package = Path(cct_loss.__file__).parent
    readers = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Attribute) and node.attr in (
                    "allow_tf32",
                    "fp32_precision",
                ):
                    readers.append(f"{path.name}:{function.name}")
    assert sorted(set(readers)) == ["precision.py:tf32_matmul_allowed"], readers
