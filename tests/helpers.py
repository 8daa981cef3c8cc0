"""Input generators and comparison helpers for the tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from cct_loss.implementations.table import TABLE

#: Agreement demanded of every float32 fast path against the float64 reference.
RTOL = 1e-5

#: The implementations the main suite checks everywhere; ``triton`` has its own tests
#: (tests/test_triton.py: through Triton's interpreter on the CPU, natively on CUDA).
IMPLS = [name for name in TABLE if name != "triton"]

#: Where the tests create their tensors: ``CCT_TEST_DEVICE`` (default ``cpu``).
TEST_DEVICE = torch.device(os.environ.get("CCT_TEST_DEVICE", "cpu"))


def seeded(seed: int) -> torch.Generator:
    """A random generator on the test device."""
    return torch.Generator(device=TEST_DEVICE).manual_seed(seed)


def cost_floor(case_tensors: list[Tensor | None], options: dict[str, Any]) -> float:
    """Absolute float32 floor for a value that is a weighted mean of costs.

    A cost near 0 is a difference of O(|x|^2) numbers (``|a|^2 + |b|^2 - 2 a.b`` or ``1 - cos``),
    so float32 can only resolve it to a few ulps of the cost scale: ``8 eps * max cost``.
    """
    if options["normalize"] or options["cost"] == "cosine":
        max_cost = 2.0 if options["cost"] == "cosine" else 4.0
    else:
        sq = max(float(x.detach().pow(2).sum(-1).max()) for x in case_tensors if x is not None)
        max_cost = 4.0 * sq
    return 8.0 * torch.finfo(torch.float32).eps * max_cost


def float32_error(expected: Tensor, float32_reference: Tensor) -> Tensor:
    """Elementwise error of the reference formula itself evaluated in float32."""
    return (float32_reference.detach().double() - expected.detach().double()).abs().cpu()


def assert_close_rel(
    actual: Tensor,
    expected: Tensor,
    rtol: float = RTOL,
    what: str = "",
    scale: Tensor | None = None,
    conditioning: Tensor | None = None,
    atol: float = 0.0,
) -> None:
    """``|a - e| <= rtol * (|e| + max|e| + scale)`` elementwise: relative, with the scale.

    ``max|e|`` keeps entries that are tiny next to the rest of the tensor (a gradient component
    that is almost zero) from demanding more than float32 can give; ``scale`` is the size of
    the parts a value is a difference of (``|alpha * attraction| + |beta * repulsion|`` for a
    loss whose two terms cancel). ``conditioning`` is the error of the reference formula
    itself evaluated in float32 (:func:`float32_error`): where a value is an ill-conditioned
    difference (a gradient whose radial part the normalisation removes), a fast path may be
    off by a few times what the obviously-correct loop is off by in the same precision.
    ``atol`` is an absolute floor (see :func:`cost_floor`).
    """
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    extra = 0.0 if scale is None else scale.detach().double().cpu().abs()
    tol = rtol * (e.abs() + e.abs().max() + extra) + atol + 1e-12
    if conditioning is not None:
        tol = tol + 4.0 * conditioning.max()
    err = (a - e).abs()
    bad = err > tol
    assert not bool(bad.any()), (
        f"{what}: max error {float(err.max()):.3e} (tolerance {float(tol[bad].min()):.3e}); "
        f"actual {a.flatten()[:6].tolist()} expected {e.flatten()[:6].tolist()}"
    )


@dataclass
class Case:
    """One random call of ``cct_loss``."""

    query: Tensor
    positive: Tensor
    negatives: Tensor | None
    options: dict[str, Any]
    layout: str = "all"
    labels: Tensor | None = None
    negative_labels: Tensor | None = None

    def leaves(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor | None]:
        """Fresh leaf copies in ``dtype`` that require grad."""
        q = self.query.to(dtype).requires_grad_()
        p = self.positive.to(dtype).requires_grad_()
        n = None if self.negatives is None else self.negatives.to(dtype).requires_grad_()
        return q, p, n

    @property
    def call_options(self) -> dict[str, Any]:
        """The keywords of this call besides the options: layout and labels."""
        return {
            "layout": self.layout,
            "labels": self.labels,
            "negative_labels": self.negative_labels,
        }


LABEL_PATTERNS = ("none", "equal", "distinct", "random")


def finite_floats(low: float, high: float) -> st.SearchStrategy[float]:
    """Floats in ``[low, high]`` without subnormals: some torch builds set flush-to-zero (the
    CUDA wheels of older releases), where hypothesis refuses to draw subnormal floats."""
    return st.floats(low, high, allow_subnormal=False)


def draw_labels(draw: st.DrawFn, pattern: str, n: int) -> Tensor | None:
    """Labels of ``n`` rows: none, all equal, all distinct, or random with repeats."""
    if pattern == "none":
        return None
    if pattern == "equal":
        return torch.full((n,), 7, dtype=torch.long)
    if pattern == "distinct":
        return torch.arange(n, dtype=torch.long) * 3 - 5
    return torch.tensor(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))


def as_loss(x: object) -> Tensor:
    """A loss call's result as a tensor (the entry points are typed ``Tensor | CCTDetails``)."""
    assert isinstance(x, Tensor)
    return x


def random_embeddings(shape: tuple[int, ...], seed: int, *, scale: float = 1.0) -> Tensor:
    """float32-representable values (so float32 and float64 paths see the same inputs)."""
    return (
        (torch.randn(shape, generator=seeded(seed), dtype=torch.float64) * scale).float().double()
    )


@st.composite
def cases(
    draw: st.DrawFn,
    modes: tuple[str, ...] = ("in_batch", "shared", "per_query"),
    layouts: tuple[str, ...] = ("all",),
    label_patterns: tuple[str, ...] = ("none",),
) -> Case:
    """Random shapes and options over negative modes, layouts and label patterns."""
    layout = draw(st.sampled_from(layouts))
    mode = draw(st.sampled_from(modes))
    pattern = draw(st.sampled_from(label_patterns))
    if layout == "cross" and mode == "per_query":
        mode = "shared"  # cross takes (K, D) negatives only
    if pattern != "none" and mode == "per_query":
        pattern = "none"  # labels take (K, D) negatives only
    single_row_ok = mode != "in_batch" or pattern != "none"
    n = draw(st.integers(1 if single_row_ok else 2, 5))
    m = draw(st.integers(1, 4))
    k = draw(st.integers(1, 6))
    d = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    normalize = draw(st.booleans())
    cost = draw(st.sampled_from(["sqeuclidean", "cosine"]))
    scale = 1.0 if normalize else 0.4
    query = random_embeddings((n, d), seed, scale=scale)
    two_d = m == 1 and draw(st.booleans())
    positive = random_embeddings((n, d) if two_d else (n, m, d), seed + 1, scale=scale)
    negatives = None
    if mode == "shared":
        negatives = random_embeddings((k, d), seed + 2, scale=scale)
    elif mode == "per_query":
        negatives = random_embeddings((n, k, d), seed + 2, scale=scale)
    labels = draw_labels(draw, pattern, n)
    negative_labels = None
    if labels is not None and negatives is not None and (layout == "all" or draw(st.booleans())):
        negative_labels = torch.tensor(draw(st.lists(st.integers(0, 3), min_size=k, max_size=k)))
    options: dict[str, Any] = {
        "t_pos": draw(finite_floats(0.0, 50.0)),
        "t_neg": draw(finite_floats(0.0, 50.0)),
        "alpha": draw(finite_floats(-2.0, 2.0)),
        "beta": draw(finite_floats(-2.0, 2.0)),
        "cost": cost,
        "normalize": normalize,
        "detach_weights": draw(st.booleans()),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
    }
    return Case(query, positive, negatives, options, layout, labels, negative_labels)


def backward_weights(loss: Tensor, seed: int = 0) -> Tensor:
    """Random cotangent for a loss of any shape (so "none" gradients are fully checked)."""
    weights = torch.rand(loss.shape, generator=seeded(seed), dtype=torch.float64)
    return weights.to(loss.dtype) + 0.5


def grads_of(loss: Tensor, inputs: list[Tensor | None]) -> list[Tensor | None]:
    present = [x for x in inputs if x is not None]
    out = torch.autograd.grad((loss * backward_weights(loss)).sum(), present, allow_unused=True)
    it = iter(out)
    return [None if x is None else next(it) for x in inputs]


def impl_options(impl: str, chunk_size: int | None = None) -> dict[str, Any]:
    """``impl`` and, for chunked only, ``chunk_size`` (the other implementations refuse it)."""
    return {"impl": impl, "chunk_size": chunk_size if impl == "chunked" else None}


class LargestTensor(TorchDispatchMode):
    """Records the number of elements of the largest tensor any operator produces."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, tuple | list) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


class AllocatedShapes(TorchDispatchMode):
    """Records the shape and dtype of every tensor an ``empty`` or ``empty_strided`` call
    allocates (the buffers kernels write into), and of every output of the library's own
    custom ops (``cct_loss::``; they allocate their outputs where the mode cannot see)."""

    ALLOCATING = frozenset({"empty.memory_format", "empty_strided.default", "empty_like.default"})

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.shapes: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        namespace, _, op = func._schema.name.partition("::")
        name = f"{op}.{func._overloadname}"
        if name in self.ALLOCATING and isinstance(out, torch.Tensor):
            self.shapes.append((tuple(out.shape), out.dtype))
        if namespace == "cct_loss":
            outputs = out if isinstance(out, tuple | list) else (out,)
            self.shapes += [(tuple(x.shape), x.dtype) for x in outputs if isinstance(x, Tensor)]
        return out

    def count(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """How many buffers of ``shape`` and ``dtype`` were allocated."""
        return sum(1 for s, d in self.shapes if s == shape and d == dtype)


class OperatorLog(TorchDispatchMode):
    """Records the name of every aten operator dispatched (``aten.mm``), and the operators
    that make the host wait for a device or depend on data for their shape."""

    #: A host synchronisation (a value read back), or an output shape that depends on data.
    SYNCHRONISING = frozenset(
        {
            "_local_scalar_dense",
            "item",
            "is_nonzero",
            "equal",
            "allclose",
            "nonzero",
            "nonzero_static",
            "masked_select",
            "unique_dim",
            "_unique",
            "_unique2",
            "unique_consecutive",
        }
    )

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.names: list[str] = []
        self.synchronising: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        self.names.append(name)
        if name in self.SYNCHRONISING or _boolean_index(func, args) or _to_host(func, args, kwargs):
            self.synchronising.append(str(func))
        return func(*args, **(kwargs or {}))


def _boolean_index(func: Any, args: Any) -> bool:
    """``x[mask]``: an output as long as the mask has True entries."""
    if func.overloadpacket.__name__ not in ("index", "index_put", "index_put_"):
        return False
    indices = args[1] if len(args) > 1 else []
    return any(
        isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or []
    )


def _to_host(func: Any, args: Any, kwargs: Any) -> bool:
    """A copy from a device to the CPU (``.cpu()``, ``.tolist()`` of a CUDA tensor)."""
    if func.overloadpacket.__name__ not in ("_to_copy", "copy_"):
        return False
    source = args[0] if func.overloadpacket.__name__ == "_to_copy" else args[1]
    target = (kwargs or {}).get("device")
    if func.overloadpacket.__name__ == "copy_":
        target = args[0].device
    return (
        isinstance(source, Tensor)
        and source.device.type != "cpu"
        and target is not None
        and torch.device(target).type == "cpu"
    )
