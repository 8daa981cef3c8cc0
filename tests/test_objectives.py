"""The paper's large-scale objectives (docs/layouts.md): ``cct_loss_moco`` (MoCo v2 with a
queue and the same view's in-batch negatives) and ``cct_loss_multicrop`` (MoCo v3 with local
crops), each against its float64 loop reference (tests/reference.py), on every implementation
that serves it; the multi-crop objective's limit without local crops; what is refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cct_loss import cct_loss, cct_loss_moco, cct_loss_multicrop

from .helpers import (
    IMPLS,
    TEST_DEVICE,
    as_loss,
    assert_close_rel,
    cost_floor,
    finite_floats,
    float32_error,
    impl_options,
    random_embeddings,
    seeded,
)
from .reference import reference_moco, reference_multicrop
from .test_reference_agreement import RTOL

#: The objectives hold with and without the per-call shortcuts.
pytestmark = pytest.mark.usefixtures("both_shortcut_settings")


def common_options(draw: st.DrawFn) -> dict[str, Any]:
    """The options both objectives take, drawn."""
    return {
        "t_pos": draw(finite_floats(0.0, 20.0)),
        "t_neg": draw(finite_floats(0.0, 20.0)),
        "alpha": draw(finite_floats(-2.0, 2.0)),
        "beta": draw(finite_floats(-2.0, 2.0)),
        "cost": draw(st.sampled_from(["sqeuclidean", "cosine"])),
        "normalize": draw(st.booleans()),
        "detach_weights": draw(st.booleans()),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
    }


def leaves(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [x.to(dtype).requires_grad_() for x in tensors]


Tensor = torch.Tensor


def split_mix(options: dict[str, Any], in_batch_weights: str | None) -> bool:
    """Whether the in-batch weights are treated apart from the queue's (dense only)."""
    if in_batch_weights is None:
        return False
    return (in_batch_weights == "detached") != bool(options["detach_weights"])


@st.composite
def moco_cases(draw: st.DrawFn) -> dict[str, Any]:
    v, k, d = draw(st.integers(2, 4)), draw(st.integers(0, 6)), draw(st.integers(2, 5))
    n = draw(st.integers(2 if k == 0 else 1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    options = common_options(draw)
    scale = 1.0 if options["normalize"] else 0.4
    in_batch = draw(st.sampled_from([None, "live", "detached"]))
    impls = ["dense"] if split_mix(options, in_batch) else IMPLS
    return {
        "queries": [random_embeddings((n, d), seed + x, scale=scale) for x in range(v)],
        "keys": [random_embeddings((n, d), seed + 10 + x, scale=scale) for x in range(v)],
        "queue": random_embeddings((k, d), seed + 20, scale=scale),
        "options": options | {"in_batch_weights": in_batch},
        "impl": draw(st.sampled_from(impls)),
        "seed": seed,
    }


def check_against_reference(
    call: Any,
    reference: Any,
    inputs: list[Tensor],
    options: dict[str, Any],
    seed: int,
    impl: str,
) -> None:
    """Values (relative to the size of the parts) and gradients of every input (relative,
    with the float32 loops' own error as conditioning) of the float32 call against the
    float64 loops, to ``impl``'s agreement (tests/test_reference_agreement.py)."""
    rtol = RTOL[impl]
    ones = {**options, "alpha": 1.0, "beta": 1.0}
    x32, x64 = leaves(inputs, torch.float32), leaves(inputs, torch.float64)
    got = as_loss(call(x32, options))
    want = reference(x64, options)
    parts = [reference(x64, {**ones, "alpha": 1.0, "beta": 0.0})]
    parts.append(reference(x64, {**ones, "alpha": 0.0, "beta": 1.0}))
    scale = abs(options["alpha"]) * parts[0].abs() + abs(options["beta"]) * parts[1].abs()
    nonempty: list[Tensor | None] = [x for x in inputs if x.numel()]
    floor = cost_floor(nonempty, options) * (abs(options["alpha"]) + abs(options["beta"]))
    assert_close_rel(got, want, rtol, what="loss", scale=scale, atol=floor)
    weights = torch.rand(want.shape, generator=seeded(seed), dtype=torch.float64) + 0.5
    g32 = torch.autograd.grad((got * weights.to(got.dtype)).sum(), x32, allow_unused=True)
    g64 = torch.autograd.grad((want * weights).sum(), x64, allow_unused=True)
    loops32 = leaves(inputs, torch.float32)
    ref32 = reference(loops32, {**options, "compute_dtype": torch.float32})
    g_loops = torch.autograd.grad((ref32 * weights.float()).sum(), loops32, allow_unused=True)
    for i, (a, b, c) in enumerate(zip(g32, g64, g_loops, strict=True)):
        if b is None:
            assert a is None or not a.any(), f"gradient {i}: the reference has none"
            continue
        assert a is not None, f"gradient {i} missing"
        conditioning = float32_error(b, c) if c is not None else None
        assert_close_rel(
            a, b, rtol, what=f"gradient of input {i}", conditioning=conditioning, atol=floor
        )


def moco_call(inputs: list[Tensor], v: int, options: dict[str, Any], impl: str) -> Any:
    queries, keys, queue = inputs[:v], inputs[v : 2 * v], inputs[2 * v]
    return cct_loss_moco(queries, keys, queue, **options, **impl_options(impl, 3))


def moco_reference(inputs: list[Tensor], v: int, options: dict[str, Any]) -> Tensor:
    return reference_moco(inputs[:v], inputs[v : 2 * v], inputs[2 * v], **options)


@given(case=moco_cases())
def test_moco_matches_the_reference(case: dict[str, Any]) -> None:
    v = len(case["queries"])
    inputs = [*case["queries"], *case["keys"], case["queue"]]
    check_against_reference(
        lambda x, o: moco_call(x, v, o, case["impl"]),
        lambda x, o: moco_reference(x, v, o),
        inputs,
        case["options"],
        case["seed"],
        case["impl"],
    )


@st.composite
def multicrop_cases(draw: st.DrawFn) -> dict[str, Any]:
    n, d, crops = draw(st.integers(2, 5)), draw(st.integers(2, 5)), draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    options = common_options(draw)
    scale = 1.0 if options["normalize"] else 0.4
    return {
        "queries": [random_embeddings((n, d), seed + x, scale=scale) for x in range(2)],
        "keys": [random_embeddings((n, d), seed + 10 + x, scale=scale) for x in range(2)],
        "crops": [random_embeddings((n, d), seed + 20 + x, scale=scale) for x in range(crops)],
        "options": options,
        "impl": draw(st.sampled_from(IMPLS)),
        "seed": seed,
    }


def multicrop_call(inputs: list[Tensor], options: dict[str, Any], impl: str) -> Any:
    return cct_loss_multicrop(
        inputs[:2], inputs[2:4], inputs[4:], **options, **impl_options(impl, 3)
    )


def multicrop_reference(inputs: list[Tensor], options: dict[str, Any]) -> Tensor:
    return reference_multicrop(inputs[:2], inputs[2:4], inputs[4:], **options)


@given(case=multicrop_cases())
def test_multicrop_matches_the_reference(case: dict[str, Any]) -> None:
    inputs = [*case["queries"], *case["keys"], *case["crops"]]
    check_against_reference(
        lambda x, o: multicrop_call(x, o, case["impl"]),
        multicrop_reference,
        inputs,
        case["options"],
        case["seed"],
        case["impl"],
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("detach", [True, False])
def test_multicrop_without_local_crops_is_the_two_cross_calls(
    impl: str, reduction: str, detach: bool
) -> None:
    """No local crops: p = 1, and the objective is ``(cct_loss(q2, k1, layout="cross") +
    cct_loss(q1, k2, layout="cross")) / 2`` to float32 rounding, values and gradients."""
    q1, q2, k1, k2 = (random_embeddings((6, 5), 7 + i).float().requires_grad_() for i in range(4))
    opts = {"t_neg": 3.0, "detach_weights": detach, "reduction": reduction, **impl_options(impl, 4)}
    got = as_loss(cct_loss_multicrop((q1, q2), (k1, k2), **opts))
    there = as_loss(cct_loss(q2, k1, layout="cross", **opts))
    back = as_loss(cct_loss(q1, k2, layout="cross", **opts))
    want = (there + back) / 2
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    g_got = torch.autograd.grad(got.sum(), [q1, q2, k1, k2])
    g_want = torch.autograd.grad(want.sum(), [q1, q2, k1, k2])
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)


def test_multicrop_cosine_recipe_is_the_specification_s_cross_calls() -> None:
    """The recipe's euclidean branch (docs/specification.md, 3b): cosine cost, ``t_neg = 1 /
    T``, summed over the rows and averaged over the two key views."""
    t = 0.2
    q1, q2, k1, k2 = (random_embeddings((8, 6), 30 + i).float() for i in range(4))
    opts: dict[str, Any] = {"cost": "cosine", "t_neg": 1 / t, "reduction": "sum"}
    got = as_loss(cct_loss_multicrop((q1, q2), (k1, k2), **opts))
    want = (cct_loss(q2, k1, layout="cross", **opts) + cct_loss(q1, k2, layout="cross", **opts)) / 2
    torch.testing.assert_close(got, as_loss(want))


def test_multicrop_view_weights_favour_the_farther_view() -> None:
    """A local crop far from the key weighs more than one near it; t_pos = 0 weighs them
    equally; the weights are the detached softmax of the docs."""
    n, d = 4, 3
    k = torch.eye(n, d) if n <= d else torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    keys = (k, k.roll(1, 0))
    near, far = k + 0.05, -k
    out = cct_loss_multicrop(
        (k.clone(), k.roll(1, 0).clone()), keys, [near, far], t_pos=5.0, return_details="weights"
    )
    assert out.pos_weights is not None and out.pos_weights.shape == (2, n, 3)
    torch.testing.assert_close(out.pos_weights.sum(-1), torch.ones(2, n))
    assert bool((out.pos_weights[0, :, 2] > out.pos_weights[0, :, 1]).all())  # far > near
    flat = cct_loss_multicrop((k.clone(), k.roll(1, 0).clone()), keys, [near, far], t_pos=0.0,
                              return_details="weights")  # fmt: skip
    assert flat.pos_weights is not None
    torch.testing.assert_close(flat.pos_weights, torch.full((2, n, 3), 1 / 3))
    assert out.neg_weights is not None and out.neg_weights.shape == (2, 3, n, n)


@pytest.mark.parametrize("impl", ["chunked", "sdpa", "triton"])
def test_moco_split_weights_are_dense_only(impl: str) -> None:
    q = [torch.randn(4, 3) for _ in range(2)]
    k = [torch.randn(4, 3) for _ in range(2)]
    with pytest.raises(ValueError, match="impl='dense'"):
        cct_loss_moco(q, k, torch.randn(5, 3), in_batch_weights="live", impl=impl)
    with pytest.raises(ValueError, match="impl='dense'"):
        cct_loss_moco(q, k, torch.randn(5, 3), in_batch_weights="detached", impl=impl,
                      detach_weights=False)  # fmt: skip


def test_moco_treatments_share_the_value_and_differ_in_the_gradient() -> None:
    """The in-batch treatment moves the gradient, never the value; "detached" is the default
    with detach_weights=True, and every implementation gives it."""
    q = [random_embeddings((5, 4), i).float().requires_grad_() for i in range(3)]
    k = [random_embeddings((5, 4), 10 + i).float() for i in range(3)]
    queue = random_embeddings((6, 4), 20).float()
    values, grads = {}, {}
    for mode in (None, "live", "detached"):
        loss = as_loss(cct_loss_moco(q, k, queue, t_neg=3.0, in_batch_weights=mode))
        values[mode] = loss.detach()
        grads[mode] = torch.autograd.grad(loss, q)[0]
    assert values[None] == values["live"] == values["detached"]
    torch.testing.assert_close(grads[None], grads["detached"])
    assert (grads["live"] - grads["detached"]).abs().max() > 1e-4
    ref_q = [x.detach().double().requires_grad_() for x in q]
    for mode in ("live", "detached"):
        want = reference_moco(ref_q, k, queue, t_neg=3.0, in_batch_weights=mode)
        assert_close_rel(grads[mode], torch.autograd.grad(want, ref_q)[0], atol=1e-7)
    want = reference_moco(ref_q, k, queue, t_neg=3.0)
    (expected,) = torch.autograd.grad(want, ref_q[:1])
    for impl in IMPLS:
        got = as_loss(cct_loss_moco(q, k, queue, t_neg=3.0, **impl_options(impl, 2)))
        grad = torch.autograd.grad(got, q)[0]
        assert_close_rel(grad, expected, RTOL[impl], what=impl, atol=1e-7)


def test_moco_split_weights_differentiate_twice_as_the_reference() -> None:
    """The split treatment is plain autograd: its second derivatives (a Hessian-vector product
    of the surrogate the detached weights define) are the loops' (gradcheck cannot judge a
    path with detached weights: their gradient is not the value's derivative)."""
    k = [random_embeddings((3, 3), 5 + i) for i in range(2)]
    results = []
    for loss_of in (cct_loss_moco, reference_moco):
        q = [random_embeddings((3, 3), i).requires_grad_() for i in range(2)]
        queue = random_embeddings((4, 3), 9).requires_grad_()
        loss = as_loss(loss_of(q, k, queue, t_neg=2.0, in_batch_weights="live"))
        grads = torch.autograd.grad(loss, [*q, queue], create_graph=True)
        direction = torch.stack(
            [(g * random_embeddings(g.shape, 40 + i)).sum() for i, g in enumerate(grads)]
        ).sum()
        results.append(torch.autograd.grad(direction, [*q, queue]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_moco_with_an_empty_queue_uses_the_in_batch_negatives() -> None:
    q = [random_embeddings((5, 4), i) for i in range(2)]
    k = [random_embeddings((5, 4), 10 + i) for i in range(2)]
    got = cct_loss_moco(q, k, torch.zeros(0, 4, dtype=torch.float64), t_neg=2.0)
    want = reference_moco(q, k, torch.zeros(0, 4, dtype=torch.float64), t_neg=2.0)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("which", ["moco", "multicrop"])
def test_details_add_up_and_hold_their_shapes(which: str) -> None:
    q = [random_embeddings((5, 4), i).float() for i in range(3)]
    k = [random_embeddings((5, 4), 10 + i).float() for i in range(3)]
    opts: dict[str, Any] = {"alpha": 0.7, "beta": 1.4, "t_neg": 2.0, "return_details": "weights"}
    if which == "moco":
        out = cct_loss_moco(q, k, random_embeddings((6, 4), 20).float(), **opts)
        shapes: list[tuple[int, ...]] = [(15, 2), (15, 5 + 6)]
        none = as_loss(cct_loss_moco(q, k, random_embeddings((6, 4), 20).float(), reduction="none"))
        assert none.shape == (15,)
    else:
        out = cct_loss_multicrop(q[:2], k[:2], q[2:], **opts)
        shapes = [(2, 5, 2), (2, 2, 5, 5)]
        assert as_loss(cct_loss_multicrop(q[:2], k[:2], q[2:], reduction="none")).shape == (5,)
    torch.testing.assert_close(out.loss, 0.7 * out.attraction + 1.4 * out.repulsion)
    assert out.pos_weights is not None and out.neg_weights is not None
    assert [tuple(out.pos_weights.shape), tuple(out.neg_weights.shape)] == shapes
    assert 0.0 <= out.accuracy.item() <= 1.0
    assert out.pos_entropy.item() >= 0.0 and out.neg_entropy.item() > 0.0


@pytest.mark.parametrize("which", ["moco", "multicrop"])
def test_autocast_gives_float32_close_to_the_reference(which: str) -> None:
    q = [random_embeddings((6, 8), i).float() for i in range(3)]
    k = [random_embeddings((6, 8), 10 + i).float() for i in range(3)]
    queue = random_embeddings((7, 8), 20).float()
    with torch.autocast(TEST_DEVICE.type, dtype=torch.bfloat16):
        if which == "moco":
            got = as_loss(cct_loss_moco(q, k, queue, t_neg=2.0, in_batch_weights="live"))
        else:
            got = as_loss(cct_loss_multicrop(q[:2], k[:2], q[2:], t_neg=2.0))
    want = (
        reference_moco(q, k, queue, t_neg=2.0, in_batch_weights="live")
        if which == "moco"
        else reference_multicrop(q[:2], k[:2], q[2:], t_neg=2.0)
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("which", ["moco", "multicrop"])
def test_compiles_with_fullgraph(which: str) -> None:
    q = [random_embeddings((4, 6), i).float().requires_grad_() for i in range(3)]
    k = [random_embeddings((4, 6), 10 + i).float() for i in range(3)]
    queue = random_embeddings((5, 6), 20).float()

    def step(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        if which == "moco":
            return as_loss(cct_loss_moco([a, b, c], k, queue, t_neg=2.0, in_batch_weights="live"))
        return as_loss(cct_loss_multicrop([a, b], k[:2], [c], t_neg=2.0))

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(*q)
    want = (
        reference_moco(q, k, queue, t_neg=2.0, in_batch_weights="live")
        if which == "moco"
        else reference_multicrop(q[:2], k[:2], q[2:], t_neg=2.0)
    )
    assert_close_rel(got, want)
    grads = torch.autograd.grad(got, q)
    wants = torch.autograd.grad(want, q)
    for a, b in zip(grads, wants, strict=True):
        assert_close_rel(a, b, atol=1e-6)


@pytest.mark.parametrize("which", ["moco", "moco_live", "multicrop"])
@pytest.mark.parametrize("t", [0.0, 1e38])
def test_the_bounds_of_the_sharpness_are_exact(which: str, t: float) -> None:
    """Uniform weights at 0; at the largest sharpness the farthest positive (view) and the
    nearest negative, finite, as the float64 loops."""
    q = [random_embeddings((5, 3), i).float() for i in range(3)]
    k = [-x + 0.01 * random_embeddings((5, 3), 10 + i).float() for i, x in enumerate(q)]
    queue = random_embeddings((6, 3), 20).float()
    opts: dict[str, Any] = {"t_pos": t, "t_neg": t}
    if which == "multicrop":
        got = as_loss(cct_loss_multicrop(q[:2], k[:2], q[2:], **opts))
        want = reference_multicrop(q[:2], k[:2], q[2:], **opts)
    else:
        opts["in_batch_weights"] = "live" if which == "moco_live" else None
        got = as_loss(cct_loss_moco(q, k, queue, **opts))
        want = reference_moco(q, k, queue, **opts)
    assert torch.isfinite(got)
    assert_close_rel(got, want, atol=1e-6)


BAD_MOCO: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"in_batch_weights": "yes"}, ValueError, "in_batch_weights must be None"),
    ({"layout": "cross"}, ValueError, "has its own layout"),
    ({"queue": torch.randn(4, 9)}, ValueError, "pass queue.T"),
    ({"queue": torch.randn(3, 9, 4)}, ValueError, r"queue must have shape \(K, D\) \(2 dims\)"),
    ({"queue": torch.randn(9, 5)}, ValueError, "queue must have shape .K, D. with D = 4"),
    ({"queries": [torch.randn(6, 4)]}, ValueError, "queries must hold at least 2"),
    ({"keys": [torch.randn(6, 4) for _ in range(3)]}, ValueError, "keys must be 2 tensors"),
    ({"queries": torch.randn(2, 6, 4)}, ValueError, "queries must be a list of V tensors"),
    ({"queue": 0.2}, TypeError, "temperature"),
]


@pytest.mark.parametrize(("change", "error", "match"), BAD_MOCO)
def test_moco_refuses_bad_input(change: dict[str, Any], error: type[Exception], match: str) -> None:
    args: dict[str, Any] = {
        "queries": [torch.randn(6, 4) for _ in range(2)],
        "keys": [torch.randn(6, 4) for _ in range(2)],
        "queue": torch.randn(9, 4),
    }
    options = {k: v for k, v in change.items() if k not in args}
    args |= {k: v for k, v in change.items() if k in args}
    with pytest.raises(error, match=match):
        cct_loss_moco(args["queries"], args["keys"], args["queue"], **options)


BAD_MULTICROP: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"queries": [torch.randn(6, 4)] * 3}, ValueError, "two global views"),
    ({"keys": [torch.randn(6, 4)]}, ValueError, "two global views"),
    ({"local_queries": torch.randn(2, 6, 4)}, ValueError, "list of L tensors"),
    ({"keys": [torch.randn(5, 4), torch.randn(5, 4)]}, ValueError, "keys must be two tensors"),
    ({"layout": "paper"}, ValueError, "has its own layout"),
    ({"local_queries": [torch.randn(6, 5)]}, ValueError, r"queries\[2\] has shape"),
]


@pytest.mark.parametrize(("change", "error", "match"), BAD_MULTICROP)
def test_multicrop_refuses_bad_input(
    change: dict[str, Any], error: type[Exception], match: str
) -> None:
    args: dict[str, Any] = {
        "queries": [torch.randn(6, 4) for _ in range(2)],
        "keys": [torch.randn(6, 4) for _ in range(2)],
        "local_queries": [],
    }
    options = {k: v for k, v in change.items() if k not in args}
    args |= {k: v for k, v in change.items() if k in args}
    with pytest.raises(error, match=match):
        cct_loss_multicrop(args["queries"], args["keys"], args["local_queries"], **options)
