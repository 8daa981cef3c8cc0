"""``impl="triton"`` against the float64 loop reference: values, gradients, diagnostics.

On the CPU these run through Triton's interpreter, which must be switched on before ``triton``
is imported: ``make test`` runs this file on its own as ``TRITON_INTERPRET=1 pytest -m triton``
(the main run leaves it out). On CUDA (``make gpu-check``) the kernels run natively. The
interpreter costs about 15 ms per block iteration, so the shapes are small (N <= 64, K <= 512,
D <= 64), with sizes that end mid-block (blocks of 16 queries and 32 keys there).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from torch import Tensor

from cct_loss import CCTDetails, cct_loss, cct_loss_moco, cct_loss_multicrop, cct_loss_multiview
from cct_loss.implementations import triton_op
from cct_loss.implementations.triton_op import INTERPRETER_TILES, interpreting

from . import test_edges
from .helpers import (
    LABEL_PATTERNS,
    TEST_DEVICE,
    AllocatedShapes,
    Case,
    LargestTensor,
    cases,
    grads_of,
    random_embeddings,
)
from .reference import (
    reduce_results,
    reference_loss,
    reference_moco,
    reference_multicrop,
    reference_paper,
    reference_queries,
)
from .test_precision import BF16_GRAD_RTOL, BF16_VALUE_RTOL, assert_bf16_close
from .test_reference_agreement import check_against_reference

pytestmark = [
    pytest.mark.triton,
    # The interpreter's own numpy warnings (an index from a 1-element array; log(0) for a
    # query without keys, whose -inf is intended).
    pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
    pytest.mark.skipif(
        TEST_DEVICE.type != "cuda" and not interpreting(),
        reason="impl='triton' on the CPU needs TRITON_INTERPRET=1 before triton is imported "
        "(make test runs this file that way)",
    ),
]
RTOL = 1e-5


@settings(max_examples=min(20, settings().max_examples))  # the profile's, at most 20
@given(
    case=cases(
        modes=("in_batch", "shared"), layouts=("all", "cross"), label_patterns=LABEL_PATTERNS
    )
)
def test_matches_reference(case: Case) -> None:
    """Random layouts, label patterns and options (both detach settings, both costs, every
    reduction): values, gradients, entropies, counts, as every other implementation."""
    check_against_reference(case, "triton")


def edge_inputs(n: int, k: int, d: int, m: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    q = random_embeddings((n, d), n * 1000 + k).float()
    p = random_embeddings((n, m, d) if m > 1 else (n, d), n + 7).float()
    negatives = random_embeddings((k, d), k + 11).float()
    return q, p, negatives


#: (N, K, D): 17 queries (one past a block of 16), 33 queries in-batch with M = 1 (66 rows),
#: K one short of, one past and two blocks of 32 keys, D mid-block (5, 17) and a full 64.
EDGES = [(17, 31, 5), (17, 33, 17), (33, 64, 64), (40, 65, 8), (64, 512, 32)]


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize(("n", "k", "d"), EDGES)
def test_block_edges_shared_negatives(n: int, k: int, d: int, detach: bool) -> None:
    assert n % INTERPRETER_TILES.queries or k % INTERPRETER_TILES.keys or (n, k) == (64, 512)
    q, p, negatives = edge_inputs(n, k, d)
    compare(q, p, negatives, {"detach_weights": detach, "t_neg": 3.0, "t_pos": 2.0})


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize(("n", "d"), [(17, 5), (33, 20)])
@pytest.mark.parametrize("m", [1, 3])
def test_block_edges_in_batch(n: int, d: int, m: int, detach: bool) -> None:
    q, p, _ = edge_inputs(n, 1, d, m)
    compare(q, p, None, {"detach_weights": detach, "cost": "cosine" if m > 1 else "sqeuclidean"})


@pytest.mark.parametrize("call", ["cross", "labels", "negative_labels", "cross_labels"])
def test_block_edges_layouts_and_labels(call: str) -> None:
    q, p, negatives = edge_inputs(37, 45, 12)
    labels = torch.arange(37) % 5
    options: dict[str, Any] = {"detach_weights": False, "t_neg": 2.0, "t_pos": 1.5}
    if call == "cross":
        compare(q, p, None, {**options, "layout": "cross"})
    elif call == "labels":
        compare(q, p, None, {**options, "labels": labels})
    elif call == "negative_labels":
        compare(
            q, p, negatives, {**options, "labels": labels, "negative_labels": torch.arange(45) % 4}
        )
    else:
        compare(q, p, None, {**options, "layout": "cross", "labels": labels})


#: Dimensions above one feature tile: the products tile D (the interpreter's feature tile is
#: 256, its output tile 512), 1000 not a power of two, so the last tiles end mid-tile.
LARGE_DIMS = [512, 768, 1000]


@pytest.mark.parametrize("d", LARGE_DIMS)
@pytest.mark.parametrize(
    "call", ["in_batch", "shared", "cross", "labels", "negative_labels", "cross_labels"]
)
def test_large_dims(d: int, call: str) -> None:
    """D = 512, 768 and 1000 against the float64 reference, every layout and label pattern the
    kernels take, values, gradients and diagnostics; the detach setting and the cost alternate
    across the cases."""
    assert d > INTERPRETER_TILES.features
    q, p, negatives = edge_inputs(19, 37, d)
    labels = torch.arange(19) % 4
    index = LARGE_DIMS.index(d) + ["in_batch", "shared", "cross"].count(call)
    options: dict[str, Any] = {
        "detach_weights": index % 2 == 0,
        "cost": "cosine" if call in ("shared", "labels") else "sqeuclidean",
        "t_neg": 2.0,
        "t_pos": 1.5,
    }
    if call == "in_batch":
        compare(q, p, None, options)
    elif call == "shared":
        compare(q, p, negatives, options)
    elif call == "cross":
        compare(q, p, None, {**options, "layout": "cross"})
    elif call == "labels":
        compare(q, p, None, {**options, "labels": labels})
    elif call == "negative_labels":
        neg_labels = torch.arange(37) % 3
        compare(q, p, negatives, {**options, "labels": labels, "negative_labels": neg_labels})
    else:
        compare(q, p, None, {**options, "layout": "cross", "labels": labels})


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("call", ["in_batch", "shared", "cross_labels"])
def test_tiled_dims_at_small_tiles(
    monkeypatch: pytest.MonkeyPatch, call: str, detach: bool
) -> None:
    """The tiled path with tiles much smaller than D (D = 40: three feature tiles of 16, the
    last mid-tile, and three output tiles), cheap enough to cover both detach settings."""
    if TEST_DEVICE.type == "cpu":
        monkeypatch.setattr(triton_op, "INTERPRETER_TILES", INTERPRETER_TILES._replace(
            features=16, outputs=16
        ))  # fmt: skip
    else:
        monkeypatch.setattr(
            triton_op, "tiles_for", lambda dim, dtype: triton_op.Tiles(32, 32, 16, 16, 4, 2)
        )
    q, p, negatives = edge_inputs(21, 35, 40)
    options: dict[str, Any] = {"detach_weights": detach, "t_neg": 2.0}
    if call == "in_batch":
        compare(q, p, None, options)
    elif call == "shared":
        compare(q, p, negatives, options)
    else:
        compare(q, p, None, {**options, "layout": "cross", "labels": torch.arange(21) % 3})


@pytest.mark.parametrize("d", [8, 600])
def test_in_batch_gradients_share_one_buffer(d: int) -> None:
    """In-batch the keys are the queries: the backward allocates one float32 ``(Q, D)``
    gradient buffer for both (the key kernel adds into it), not three."""
    q, p, _ = edge_inputs(24, 1, d)
    leaves = [q.requires_grad_(), p.requires_grad_()]
    loss = cct_loss(*leaves, impl="triton")
    with AllocatedShapes() as allocated:
        loss.backward()
    rows = 2 * 24
    assert allocated.count((rows, d), torch.float32) == 1, allocated.shapes


def test_leaves_that_share_memory_keep_their_own_gradients() -> None:
    """Negatives that are another leaf over the queries' memory (``q.detach().requires_grad_()``)
    get their own gradient: only the queries' own view shares the gradient buffer. (Without
    normalisation the kernels see the raw tensors, so the two really share memory there.)"""
    q, p, _ = edge_inputs(20, 1, 12)
    q = q.requires_grad_()
    negatives = q.detach().requires_grad_()
    loss = cct_loss(q, p, negatives, impl="triton", detach_weights=False, normalize=False)
    got_q, got_n = torch.autograd.grad(loss, [q, negatives])
    q64, p64 = q.detach().double().requires_grad_(), p.double()
    n64 = q64.detach().clone().requires_grad_()
    want = reference_loss(q64, p64, n64, detach_weights=False, normalize=False)
    want_q, want_n = torch.autograd.grad(want, [q64, n64])
    for got, expected in ((got_q, want_q), (got_n, want_n)):
        error = float((got.double() - expected).abs().max())
        assert error <= RTOL * (float(expected.abs().max()) + 1e-3), error


def compare(q: Tensor, p: Tensor, negatives: Tensor | None, options: dict[str, Any]) -> None:
    """Loss, gradients and the diagnostics of triton against the float64 reference."""
    leaves = [
        x.clone().requires_grad_() for x in (q, p) + ((negatives,) if negatives is not None else ())
    ]
    out = cct_loss(*leaves, impl="triton", return_details=True, **options)
    assert isinstance(out, CCTDetails)
    ref_leaves = [x.double().requires_grad_() for x in leaves]
    opts = {"t_pos": 1.0, "t_neg": 1.0, **options}
    results = reference_queries(*ref_leaves, **opts)
    expected = reduce_results(results, "mean", opts)
    loss, want_loss = float(out.loss.detach()), float(expected.detach())
    assert abs(loss - want_loss) <= RTOL * (abs(want_loss) + 1.0), (loss, want_loss)
    got_grads = grads_of(out.loss, list[Tensor | None](leaves))
    want_grads = grads_of(expected, list[Tensor | None](ref_leaves))
    for got, want in zip(got_grads, want_grads, strict=True):
        assert got is not None and want is not None
        err = float((got.double() - want).abs().max())
        assert err <= RTOL * (float(want.abs().max()) + 1e-3), err
    per_query = cct_loss(
        *[x.detach() for x in leaves],
        impl="triton",
        reduction="none",
        return_details=True,
        **options,
    )
    assert isinstance(per_query, CCTDetails)
    assert per_query.accuracy.tolist() == [float(r.correct) for r in results]  # extreme costs
    has_neg = [r.has_negatives for r in results]
    entropies = [r.neg_entropy for r, f in zip(results, has_neg, strict=True) if f]
    want_entropy = sum(entropies) / max(len(entropies), 1)
    assert abs(float(out.neg_entropy) - want_entropy) <= 1e-4


@pytest.mark.parametrize("detach", [True, False])
def test_paper_layout(detach: bool) -> None:
    views = [random_embeddings((21, 10), seed).float().requires_grad_() for seed in range(3)]
    loss = cct_loss_multiview(
        views, layout="paper", impl="triton", detach_weights=detach, t_neg=0.9
    )
    ref_views = [v.detach().double().requires_grad_() for v in views]
    expected = reference_paper(ref_views, t_neg=0.9, detach_weights=detach)
    assert abs(float(loss) - float(expected)) <= RTOL * (float(expected.abs()) + 1.0)
    assert isinstance(loss, Tensor)
    for got, want in zip(
        torch.autograd.grad(loss, views), torch.autograd.grad(expected, ref_views), strict=True
    ):
        assert float((got.double() - want).abs().max()) <= RTOL * (float(want.abs().max()) + 1e-3)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("call", ["given", "in_batch"])
def test_the_largest_t_pos_over_far_positives_is_finite_and_exact(detach: bool, call: str) -> None:
    test_edges.check_far_positives("triton", detach, call)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("which", ["moco", "multicrop"])
def test_large_scale_objectives(which: str, detach: bool) -> None:
    """The paper's MoCo-v2 objective (every weight treated alike: the split treatment is
    dense's) and its multi-crop objective, sizes ending mid-block."""
    q = [random_embeddings((19, 10), seed).float().requires_grad_() for seed in range(3)]
    k = [random_embeddings((19, 10), 10 + seed).float() for seed in range(3)]
    queue = random_embeddings((37, 10), 20).float()
    opts: dict[str, Any] = {"t_neg": 2.0, "t_pos": 3.0, "detach_weights": detach}
    ref_q = [v.detach().double().requires_grad_() for v in q]
    if which == "moco":
        loss = cct_loss_moco(q, k, queue, impl="triton", **opts)
        expected = reference_moco(ref_q, k, queue, **opts)
    else:
        loss = cct_loss_multicrop(q[:2], k[:2], q[2:], impl="triton", **opts)
        expected = reference_multicrop(ref_q[:2], k[:2], ref_q[2:], **opts)
    assert isinstance(loss, Tensor)
    assert abs(float(loss) - float(expected)) <= RTOL * (float(expected.abs()) + 4.0)
    for got, want in zip(
        torch.autograd.grad(loss, q), torch.autograd.grad(expected, ref_q), strict=True
    ):
        assert float((got.double() - want).abs().max()) <= RTOL * (float(want.abs().max()) + 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_follows_the_policy(dtype: torch.dtype) -> None:
    """Half inputs, and float32 inputs under autocast, against the float64 reference within
    half-precision accuracy (the other implementations' bfloat16 tolerances, the gradients'
    relative to their largest entry): a float32 loss, and gradients in the inputs' dtype."""
    q, p, negatives = edge_inputs(19, 40, 24)
    for detach in (True, False):
        for half_inputs in (True, False):
            leaves = [
                x.to(dtype if half_inputs else torch.float32).requires_grad_()
                for x in (q, p, negatives)
            ]
            with torch.autocast(TEST_DEVICE.type, dtype=dtype, enabled=not half_inputs):
                loss = cct_loss(*leaves, impl="triton", detach_weights=detach, t_neg=2.0)
            assert loss.dtype == torch.float32
            ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
            expected = reference_loss(*ref_leaves, detach_weights=detach, t_neg=2.0)
            assert_bf16_close(loss, expected, BF16_VALUE_RTOL, "loss")
            for leaf, got, want in zip(
                leaves,
                torch.autograd.grad(loss, leaves),
                torch.autograd.grad(expected, ref_leaves),
                strict=True,
            ):
                assert got.dtype == leaf.dtype
                # Relative to the largest gradient (about 1.5e-2 here): measured up to 9e-3 of
                # it for bfloat16 and 1.2e-3 for float16, for triton and dense alike.
                assert_bf16_close(got, want, BF16_GRAD_RTOL, "grad", floor=0.0)


def test_second_derivatives_are_exact() -> None:
    """A backward that is itself differentiable (``create_graph=True``): Hessian-vector products
    against plain autograd through the float64 reference."""
    q, p, negatives = edge_inputs(9, 20, 6)
    direction = random_embeddings((9, 6), 99)
    hvps = []
    for dtype in (torch.float32, torch.float64):
        x = q.to(dtype).requires_grad_()
        inputs = (x, p.to(dtype), negatives.to(dtype))
        if dtype == torch.float32:
            loss = cct_loss(*inputs, impl="triton", detach_weights=False)
        else:
            loss = reference_loss(*inputs, detach_weights=False)
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        (hvp,) = torch.autograd.grad((grad * direction.to(dtype)).sum(), x)
        hvps.append(hvp)
    got, want = hvps
    err = float((got.double() - want).abs().max())
    assert err <= 1e-4 * (float(want.abs().max()) + 1e-3), err


@pytest.mark.parametrize("labelled", [False, True])
def test_never_forms_a_query_key_tensor(labelled: bool) -> None:
    """No ``Q x K`` tensor forward or backward, and no mask tensor: the exclusions come from
    ids inside the kernels (in-batch: Q = K = 2 x 40 rows, D = 8)."""
    q, p, _ = edge_inputs(40, 1, 8)
    q.requires_grad_()
    labels = torch.arange(40) % 3 if labelled else None
    with LargestTensor() as seen:
        loss = cct_loss(q, p, impl="triton", labels=labels, return_details=True)
        assert isinstance(loss, CCTDetails)
        loss.loss.backward()
    assert seen.largest < 80 * 80, seen.largest


def test_unsupported_calls_name_the_path_that_works(monkeypatch: pytest.MonkeyPatch) -> None:
    q, p, negatives = edge_inputs(6, 10, 4)
    with pytest.raises(ValueError, match=r"per-query .* impl='dense' or 'chunked'"):
        cct_loss(q, p, torch.stack([negatives] * 6), impl="triton")
    with pytest.raises(TypeError, match=r"float64.*'dense' or 'chunked'"):
        cct_loss(q.double(), p.double(), negatives.double(), impl="triton")
    wide = random_embeddings((4, 1025), 1).float()
    with pytest.raises(ValueError, match=r"D = 1024; got D = 1025. Use impl='chunked'"):
        cct_loss(wide, wide.flip(0), impl="triton")
    with pytest.raises(RuntimeError, match=r"torch\.func"):
        torch.func.vmap(lambda x: cct_loss(x, p, negatives, impl="triton"))(q.unsqueeze(0))
    if TEST_DEVICE.type == "cpu":
        monkeypatch.setattr(triton_op, "interpreting", lambda: False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            cct_loss(q, p, negatives, impl="triton")


def test_weights_are_refused() -> None:
    q, p, negatives = edge_inputs(6, 10, 4)
    with pytest.raises(ValueError, match="weights"):
        cct_loss(q, p, negatives, impl="triton", return_details="weights")


@pytest.mark.parametrize(
    "call",
    [
        lambda q, p, n: cct_loss(q, p, impl="triton"),
        lambda q, p, n: cct_loss(q, p, n, impl="triton", detach_weights=False, t_neg=3.0),
        lambda q, p, n: cct_loss(
            q, p, n, layout="cross", labels=torch.arange(q.shape[0]) % 2, impl="triton"
        ),
        lambda q, p, n: cct_loss(q, p, n, impl="triton", return_details=True).accuracy,
    ],
    ids=["in_batch", "queue_through_weights", "cross_labels_queue", "details"],
)
def test_compiles_with_fullgraph(call: Any) -> None:
    """The kernels' launches are torch.library custom ops with fake implementations: the whole
    call traces with ``fullgraph=True`` and gives eager's values and gradients."""
    q, p, negatives = edge_inputs(10, 20, 8)
    torch._dynamo.reset()
    compiled: Any = torch.compile(call, backend="aot_eager", fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in (q, p, negatives)]
    got = compiled(*leaves)
    eager_leaves = [x.clone().requires_grad_() for x in (q, p, negatives)]
    want = call(*eager_leaves)
    torch.testing.assert_close(got, want)
    if want.requires_grad:
        for g, w in zip(
            torch.autograd.grad(got.sum(), leaves, allow_unused=True),
            torch.autograd.grad(want.sum(), eager_leaves, allow_unused=True),
            strict=True,
        ):
            assert (g is None) == (w is None)
            if g is not None and w is not None:
                torch.testing.assert_close(g, w)


def test_custom_ops_pass_opcheck() -> None:
    """``torch.library.opcheck``: the registered launches' schemas, fake (meta) shapes,
    autograd registration and traced forms agree with running them."""
    q, _, negatives = edge_inputs(10, 20, 8)
    scale = torch.full((1,), -2.0)
    ids = [None, None, None, None]
    forward = torch.ops.cct_loss.triton_expected_cost.default
    for flags in ((False, False, True, False, True), (False, True, False, True, False)):
        torch.library.opcheck(forward, (q.requires_grad_(), negatives, *ids, scale, *flags))
    expected, lse, _, _ = forward(q.detach(), negatives, *ids, scale, *flags)
    backward = torch.ops.cct_loss.triton_expected_cost_backward.default
    grad = torch.ones(10)
    for need_query, need_keys in ((True, True), (True, False), (False, True)):
        args = (q.detach(), negatives, *ids, scale, grad, expected, lse, False, False, True)
        torch.library.opcheck(backward, (*args, need_query, need_keys, False))


@pytest.mark.parametrize("scale", [1e20, 1e30])
@pytest.mark.parametrize("where", ["rows", "queue"])
def test_rows_whose_squares_overflow_are_not_taken_for_zero_vectors(
    scale: float, where: str
) -> None:
    """tests/test_edges.py's check on triton (float32 only): rows whose squares overflow."""
    test_edges.check_overflow_shows("triton", scale, where)


@pytest.mark.parametrize("mode", ["in_batch", "queue", "cross", "multiview"])
@pytest.mark.parametrize(("offset", "scale"), [(1e3, 1.0), (1e3, 1e2), (10.0, 1e-2)])
def test_unnormalised_costs_do_not_cancel_under_a_common_offset(
    offset: float, scale: float, mode: str
) -> None:
    """tests/test_edges.py's property on triton, at a few corners of its range."""
    test_edges.check_common_offset(offset, scale, 0, 5, 8, mode, ["triton"])


@pytest.mark.parametrize("name", list(test_edges.EXTREME_LABELS))
def test_label_arithmetic_never_wraps(name: str) -> None:
    """tests/test_edges.py's check on triton."""
    test_edges.check_extreme_labels("triton", name)


@pytest.mark.parametrize("t", [1e5, 1e38])
def test_every_sharpness_the_validator_takes_is_exact(t: float) -> None:
    """tests/test_edges.py's check on triton."""
    test_edges.check_sharpness_up_to_the_bound("triton", t)
