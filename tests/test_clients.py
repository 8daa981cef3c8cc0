"""The losses called as other libraries call theirs (cct_loss.clients): pytorch-metric-learning's
``loss_func(embeddings, labels, indices_tuple, ref_emb, ref_labels)`` and open_clip's
``ClipLoss``, each against the float64 reference of tests/reference.py. The real packages are
exercised by ``make test-clients`` (tests_clients/)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cct_loss import CCTClipLoss, CCTMetricLoss, cct_loss

from .helpers import IMPLS, TEST_DEVICE, seeded
from .reference import reference_keyed, reference_loss, reference_multiview

OPTIONS = st.fixed_dictionaries(
    {
        "t_pos": st.sampled_from([0.0, 1.0, 3.0]),
        "temperature": st.sampled_from([0.1, 0.5]),
        "cost": st.sampled_from(["sqeuclidean", "cosine"]),
        "normalize": st.booleans(),
        "detach_weights": st.booleans(),
    }
)


def reference_options(options: dict[str, Any]) -> dict[str, Any]:
    """The reference's spelling of ``options``: ``t_neg`` from ``temperature``."""
    scale = 0.5 if options["cost"] == "sqeuclidean" else 1.0
    out = {k: v for k, v in options.items() if k != "temperature"}
    out["t_neg"] = scale / options["temperature"]
    return out


def leaves(*shapes: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = seeded(seed)
    return [
        torch.randn(*s, generator=g, device=TEST_DEVICE, dtype=torch.float64).requires_grad_()
        for s in shapes
    ]


def assert_same_loss_and_grads(
    loss: torch.Tensor, expected: torch.Tensor, inputs: list[torch.Tensor]
) -> None:
    got = torch.autograd.grad(loss, inputs, allow_unused=True)
    want = torch.autograd.grad(expected, inputs, allow_unused=True)
    torch.testing.assert_close(loss.detach(), expected.detach().to(loss.dtype))
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w)


# --- pytorch-metric-learning ---------------------------------------------------------------


def test_metric_loss_defaults_to_pml_temperature() -> None:
    assert CCTMetricLoss().t_neg == pytest.approx(5.0)  # 1 / (2 * 0.1)
    assert CCTMetricLoss(temperature=0.5).t_neg == pytest.approx(1.0)
    assert CCTMetricLoss(t_neg=2.0).t_neg == 2.0


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 7), classes=st.integers(1, 3), options=OPTIONS, seed=st.integers(0, 99))
def test_metric_loss_with_labels_is_the_one_view_call(
    n: int, classes: int, options: dict[str, Any], seed: int
) -> None:
    (embeddings,) = leaves((n, 4), seed=seed)
    labels = torch.randint(0, classes, (n,), generator=seeded(seed), device=TEST_DEVICE)
    loss = CCTMetricLoss(**options)(embeddings, labels)
    expected = reference_multiview([embeddings], labels=labels, **reference_options(options))
    assert_same_loss_and_grads(loss, expected, [embeddings])


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    rows=st.integers(1, 8),
    options=OPTIONS,
    impl=st.sampled_from(["auto", *IMPLS]),
    seed=st.integers(0, 99),
)
def test_metric_loss_with_reference_embeddings(
    n: int, rows: int, options: dict[str, Any], impl: str, seed: int
) -> None:
    """PML's CrossBatchMemory pattern: the keys are ref_emb; a key is a positive where its
    label is the query's, a negative where it differs; none is left out as the query itself."""
    embeddings, memory = leaves((n, 4), (rows, 4), seed=seed)
    g = seeded(seed + 1)
    labels = torch.randint(0, 3, (n,), generator=g, device=TEST_DEVICE)
    memory_labels = torch.randint(0, 3, (rows,), generator=g, device=TEST_DEVICE)
    loss_func = CCTMetricLoss(impl=impl, **options)
    loss = loss_func(embeddings, labels, ref_emb=memory, ref_labels=memory_labels)
    expected = reference_keyed(
        embeddings, memory,
        lambda i, j: bool(labels[i] == memory_labels[j]),
        lambda i, j: bool(labels[i] != memory_labels[j]),
        **reference_options(options),
    )  # fmt: skip
    assert_same_loss_and_grads(loss, expected, [embeddings, memory])


def mined(n: int, rows: int, count: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A miner's ``(a1, p, a2, n)``: random anchor-key pairs, each pair one kind only."""
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randperm(n * rows, generator=g)[: 2 * count]
    anchors, keys = pairs // rows, pairs % rows
    split = count if count < len(pairs) else len(pairs) // 2
    return tuple(
        x.to(TEST_DEVICE) for x in (anchors[:split], keys[:split], anchors[split:], keys[split:])
    )


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 6),
    rows=st.integers(2, 7),
    count=st.integers(1, 10),
    with_ref=st.booleans(),
    triplets=st.booleans(),
    options=OPTIONS,
    seed=st.integers(0, 99),
)
def test_metric_loss_restricted_to_mined_pairs(
    n: int,
    rows: int,
    count: int,
    with_ref: bool,
    triplets: bool,
    options: dict[str, Any],
    seed: int,
) -> None:
    """Only the mined pairs take part (labels unread, as in PML); an anchor with no mined
    positive (negative) has no attraction (repulsion) term."""
    embeddings, memory = leaves((n, 4), (rows, 4), seed=seed)
    keys = memory if with_ref else embeddings
    a1, p, a2, neg = mined(n, keys.shape[0], count, seed)
    if triplets:  # (a, p, n): the pairs (a, p) and (a, n)
        length = min(len(a1), len(a2))
        a1, a2 = a1[:length], a1[:length]
        # positives at even keys, negatives at odd ones: no pair is mined as both
        p = p[:length] - p[:length] % 2
        neg = neg[:length] | 1
        neg = torch.where(neg >= keys.shape[0], neg - 2, neg)
        indices: tuple[torch.Tensor, ...] = (a1, p, neg)
    else:
        indices = (a1, p, a2, neg)
    positive_pairs = set(zip(a1.tolist(), p.tolist(), strict=True))
    negative_pairs = set(zip(a2.tolist(), neg.tolist(), strict=True))
    labels = torch.zeros(n, dtype=torch.long, device=TEST_DEVICE)  # unread with a miner
    ref = {"ref_emb": memory, "ref_labels": labels.new_zeros(rows)} if with_ref else {}
    loss = CCTMetricLoss(**options)(embeddings, labels, indices, **ref)
    expected = reference_keyed(
        embeddings, keys,
        lambda i, j: (i, j) in positive_pairs,
        lambda i, j: (i, j) in negative_pairs,
        **reference_options(options),
    )  # fmt: skip
    assert_same_loss_and_grads(loss, expected, [embeddings, memory] if with_ref else [embeddings])


def test_mined_pairs_gradcheck_through_the_weights() -> None:
    """The dense backward of a masked problem, live weights, in float64."""
    embeddings, memory = leaves((4, 3), (5, 3), seed=3)
    indices = tuple(
        torch.tensor(x, device=TEST_DEVICE)
        for x in ([0, 0, 1, 3], [1, 2, 0, 4], [0, 1, 2, 2, 3], [0, 3, 1, 4, 2])
    )
    loss_func = CCTMetricLoss(detach_weights=False, t_pos=2.0)

    def loss(e: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        value = loss_func(e, None, indices, ref_emb=m)
        assert isinstance(value, torch.Tensor)
        return value

    assert torch.autograd.gradcheck(loss, (embeddings, memory))
    assert torch.autograd.gradgradcheck(loss, (embeddings, memory))


@pytest.mark.parametrize("impl", ["chunked", "sdpa"])
def test_streaming_implementations_refuse_mined_pairs_naming_dense(impl: str) -> None:
    embeddings = torch.randn(4, 3, device=TEST_DEVICE)
    indices = tuple(torch.tensor(x, device=TEST_DEVICE) for x in ([0, 1], [1, 0], [0, 1], [2, 3]))
    with pytest.raises(ValueError, match=r"impl='dense'"):
        CCTMetricLoss(impl=impl)(embeddings, None, indices)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda f, e, y: f(e), ValueError, "needs labels, or a miner"),
        (lambda f, e, y: f(e, y, ref_labels=y), ValueError, "pass ref_emb too"),
        (lambda f, e, y: f(e, y, ref_emb=e.clone()), ValueError, "needs ref_labels"),
        (lambda f, e, y: f(e, y, (y, y)), ValueError, "pairs .* or triplets"),
        (lambda f, e, y: f(e, y, (y, y + 10, y)), ValueError, "out of range"),
        (lambda f, e, y: f(e, y, (y, y[:2], y, y)), ValueError, "same length"),
        (lambda f, e, y: f(e, y, (y, y.float(), y, y)), TypeError, "1-D integer"),
        (lambda f, e, y: f(e, y, (y[:1], y[1:2], y[:1], y[1:2])), ValueError, "one or the other"),
        (lambda f, e, y: f(e, y, ref_emb=torch.randn(3, 5), ref_labels=y[:3]), ValueError, "ref_emb must have shape"),
    ],
)  # fmt: skip
def test_metric_loss_bad_calls(call: Any, error: type[Exception], match: str) -> None:
    embeddings = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 0, 2])
    with pytest.raises(error, match=match):
        call(CCTMetricLoss(), embeddings, labels)


def test_metric_loss_refuses_positional_options_and_gathering_with_references() -> None:
    with pytest.raises(TypeError, match=r"CCTMetricLoss\(temperature=0.1\)"):
        CCTMetricLoss(0.1)
    loss_func = CCTMetricLoss(gather_distributed=True)
    e, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="gather ref_emb yourself"):
        loss_func(e, y, ref_emb=torch.randn(5, 3), ref_labels=torch.zeros(5, dtype=torch.long))


# --- open_clip ------------------------------------------------------------------------------


def clip_reference(
    image: torch.Tensor, text: torch.Tensor, scale: float, **options: Any
) -> torch.Tensor:
    """ClipLoss's two directions, CCT inside: the mean of image->text and text->image."""
    t_neg = scale * (0.5 if options.get("cost", "sqeuclidean") == "sqeuclidean" else 1.0)
    to_text = reference_loss(image, text, layout="cross", t_neg=t_neg, **options)
    to_image = reference_loss(text, image, layout="cross", t_neg=t_neg, **options)
    return (to_text + to_image) / 2


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(2, 6),
    scale=st.sampled_from([1.0, 14.3, 100.0]),
    as_tensor=st.booleans(),
    detach_weights=st.booleans(),
    impl=st.sampled_from(["auto", *IMPLS]),
    seed=st.integers(0, 99),
)
def test_clip_loss_is_both_cross_directions(
    n: int, scale: float, as_tensor: bool, detach_weights: bool, impl: str, seed: int
) -> None:
    image, text = leaves((n, 5), (n, 5), seed=seed)
    logit_scale: Any = torch.tensor(scale, dtype=torch.float64) if as_tensor else scale
    loss_fn = CCTClipLoss(detach_weights=detach_weights, impl=impl)
    loss = loss_fn(image, text, logit_scale)
    assert isinstance(loss, torch.Tensor)
    expected = clip_reference(image, text, scale, detach_weights=detach_weights)
    assert_same_loss_and_grads(loss, expected, [image, text])


def test_clip_loss_output_dict_and_logit_bias() -> None:
    image, text = torch.randn(6, 4), torch.randn(6, 4)
    loss_fn = CCTClipLoss()
    plain = loss_fn(image, text, torch.tensor(20.0))
    out = loss_fn(image, text, torch.tensor(20.0), logit_bias=torch.tensor(-3.0), output_dict=True)
    assert isinstance(out, dict) and set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], plain)
    expected = (
        cct_loss(image, text, layout="cross", temperature=1 / 20)
        + cct_loss(text, image, layout="cross", temperature=1 / 20)
    ) / 2
    torch.testing.assert_close(plain, expected)


def test_clip_loss_refuses_a_learned_scale_with_the_fix() -> None:
    scale = torch.nn.Parameter(torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"requires_grad_\(False\)"):
        CCTClipLoss()(torch.randn(4, 3), torch.randn(4, 3), scale.exp())


def test_clip_loss_for_model_fixes_the_scale_of_the_model_and_its_ddp_wrapper() -> None:
    class Clip(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.tensor(2.659))

    class Wrapper(torch.nn.Module):  # DistributedDataParallel keeps the model as .module
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    for model in (Clip(), Wrapper(Clip())):
        loss_fn = CCTClipLoss.for_model(model, local_loss=True)
        inner = getattr(model, "module", model)
        assert not inner.logit_scale.requires_grad and loss_fn.local_loss
        scale = inner.logit_scale
        assert isinstance(scale, torch.Tensor)
        loss_fn(torch.randn(4, 3), torch.randn(4, 3), scale.exp())
    with pytest.raises(TypeError, match="logit_scale parameter"):
        CCTClipLoss.for_model(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: CCTClipLoss(temperature=0.1), TypeError, "1 / logit_scale"),
        (lambda: CCTClipLoss(layout="all"), TypeError, "layout is 'cross'"),
        (lambda: CCTClipLoss(use_horovod=True), ValueError, "torch.distributed only"),
        (lambda: CCTClipLoss(rank=2, world_size=2), ValueError, "0 <= rank < world_size"),
        (
            lambda: CCTClipLoss(local_loss=1),  # type: ignore[arg-type]
            TypeError,
            "local_loss must be a bool",
        ),
        (lambda: CCTClipLoss(return_details=True), TypeError, "return_details=True"),
    ],
)
def test_clip_loss_bad_constructor(make: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_clip_loss_takes_open_clips_positional_constructor() -> None:
    loss_fn = CCTClipLoss(True, True, True, 0, 1, False)  # ClipLoss's order
    assert (loss_fn.local_loss, loss_fn.gather_with_grad, loss_fn.cache_labels) == (True,) * 3


def test_clip_loss_without_a_process_group_refuses_world_size_above_one() -> None:
    with pytest.raises(ValueError, match=r"initialised torch\.distributed process group"):
        CCTClipLoss(rank=0, world_size=2)(torch.randn(4, 3), torch.randn(4, 3), 10.0)


@pytest.mark.parametrize("bad", [torch.zeros(2), torch.tensor(3), "10", float("inf"), -1.0])
def test_clip_loss_bad_scale(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="logit_scale"):
        CCTClipLoss()(torch.randn(4, 3), torch.randn(4, 3), bad)


# --- a memory of earlier batches (PML's CrossBatchMemory) -----------------------------------


@pytest.mark.parametrize("impl", ["auto", *IMPLS])
def test_metric_loss_owning_a_memory_takes_the_batch_and_the_memory(impl: str) -> None:
    """Step by step against the reference: the keys are the batch (each embedding left out of
    its own positives) and then the memory of the batches before; the first step is the call
    with labels alone."""
    from cct_loss import NegativeQueue

    queue = NegativeQueue(10, 4, dtype=torch.float64, with_labels=True, device=TEST_DEVICE)
    loss_func = CCTMetricLoss(queue=queue, impl=impl)
    seen: list[torch.Tensor] = []
    seen_labels: list[torch.Tensor] = []
    for step in range(4):
        (embeddings,) = leaves((4, 4), seed=40 + step)
        labels = torch.tensor([0, 1, step % 2, 2], device=TEST_DEVICE)
        loss = loss_func(embeddings, labels)
        memory = torch.cat(seen)[-10:] if seen else embeddings.new_zeros(0, 4)
        memory_labels = torch.cat(seen_labels)[-10:] if seen else labels.new_zeros(0)
        keys = torch.cat([embeddings, memory])
        key_labels = torch.cat([labels, memory_labels])
        expected = reference_keyed(
            embeddings, keys,
            lambda i, j, y=labels, ky=key_labels: i != j and bool(y[i] == ky[j]),
            lambda i, j, y=labels, ky=key_labels: bool(y[i] != ky[j]),
            t_neg=5.0,
        )  # fmt: skip
        assert isinstance(loss, torch.Tensor)
        assert_same_loss_and_grads(loss, expected, [embeddings])
        seen.append(embeddings.detach())
        seen_labels.append(labels)
    assert {"queue.keys", "queue.key_labels"} <= set(loss_func.state_dict())
    before = queue.state_dict()
    with torch.no_grad():  # an evaluation leaves the memory be
        loss_func(torch.randn(4, 4, dtype=torch.float64, device=TEST_DEVICE), labels)
    for name, value in queue.state_dict().items():
        torch.testing.assert_close(value, before[name], msg=name)


def test_metric_loss_memory_refusals() -> None:
    from cct_loss import NegativeQueue

    with pytest.raises(TypeError, match="with_labels=True"):
        CCTMetricLoss(queue=NegativeQueue(8, 3))
    loss_func = CCTMetricLoss(queue=NegativeQueue(8, 3, with_labels=True))
    e, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="owns a memory"):
        loss_func(e, y, ref_emb=torch.randn(2, 3), ref_labels=y[:2])
    with pytest.raises(ValueError, match="needs labels"):
        loss_func(e)


def test_an_empty_reference_set_is_the_batch_itself() -> None:
    """``ref_emb`` from an empty memory (0 rows): no memory yet, so the batch alone."""
    e, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    loss_func = CCTMetricLoss()
    torch.testing.assert_close(
        loss_func(e, y, ref_emb=e.new_zeros(0, 3), ref_labels=y[:0]), loss_func(e, y)
    )


# --- CLIP's two directions from one cost matrix (dense's two_way) ---------------------------


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(2, 6),
    alpha=st.sampled_from([1.0, 0.5]),
    beta=st.sampled_from([1.0, 2.0]),
    cost=st.sampled_from(["sqeuclidean", "cosine"]),
    normalize=st.booleans(),
    detach_weights=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 99),
)
def test_two_way_cross_is_the_two_directions(
    n: int,
    alpha: float,
    beta: float,
    cost: str,
    normalize: bool,
    detach_weights: bool,
    reduction: str,
    seed: int,
) -> None:
    from cct_loss.front.route import two_way_loss
    from cct_loss.options import CCTOptions

    image, text = leaves((n, 3), (n, 3), seed=seed)
    options: dict[str, Any] = dict(
        alpha=alpha, beta=beta, cost=cost, normalize=normalize, t_neg=2.0,
        detach_weights=detach_weights, reduction=reduction,
    )  # fmt: skip
    loss = two_way_loss(image, text, CCTOptions(layout="cross", **options), "test")
    assert isinstance(loss, torch.Tensor)
    more = dict(layout="cross", **options)
    expected = (reference_loss(image, text, **more) + reference_loss(text, image, **more)) / 2
    assert_same_loss_and_grads(loss, expected, [image, text])


def test_two_way_cross_takes_one_matrix_product_and_is_twice_differentiable() -> None:
    from .helpers import OperatorLog

    image, text = leaves((5, 3), (5, 3), seed=7)
    loss_fn = CCTClipLoss(detach_weights=False)
    with OperatorLog() as log:
        loss = loss_fn(image.detach(), text.detach(), 3.0)
    assert log.names.count("mm") == 1, log.names  # both directions from one cost matrix
    assert isinstance(loss, torch.Tensor)

    def both(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        value = loss_fn(a, b, 3.0)
        assert isinstance(value, torch.Tensor)
        return value

    assert torch.autograd.gradcheck(both, (image, text))
    assert torch.autograd.gradgradcheck(both, (image, text))


def test_two_way_cross_under_autocast_and_compile() -> None:
    """Against the float64 reference: bf16 products under CPU autocast give a float32 result
    to bf16's precision; ``torch.compile(fullgraph=True)`` (a tensor scale) to float32's."""
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    loss_fn = CCTClipLoss()
    expected = clip_reference(image, text, 10.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss_fn(image, text, 10.0)
    assert isinstance(mixed, torch.Tensor) and mixed.dtype == torch.float32
    torch.testing.assert_close(mixed.double(), expected, rtol=0.05, atol=0.02)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="eager")
    got = compiled(image, text, torch.tensor(10.0))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


# --- messages that lead to the call meant ---------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda z: untyped(z, z.clone(), 0.5), TypeError,
         r"got float 0\.5; to set the temperature, name it: cct_loss\(query, positive, temperature=0\.5\)"),
        (lambda z: CCTLossFor()(z, z.clone(), 0.5), TypeError,
         r"CCTLoss\(temperature=0\.5\)\(query, positive\)"),
        (lambda z: untyped(z, z.clone(), torch.tensor(14.3)), ValueError,
         r"layout='cross', temperature=1 / logit_scale\).*CCTClipLoss"),
        (lambda z: CCTLossFor(0.5), TypeError,
         r"CCTLoss\(\) takes its options as keywords only.*CCTLoss\(temperature=0\.5\)"),
        (lambda z: untyped(z, z.clone(), temp=0.5), TypeError, r"did you mean 'temperature'\?"),
        (lambda z: untyped(z, z.clone(), tau=0.5), TypeError, r"did you mean 'temperature'\?"),
        (lambda z: untyped(z, z.clone(), t_negative=2.0), TypeError, r"did you mean 't_neg'\?"),
        (lambda z: CCTLossFor(logit_scale=14.3), TypeError, r"temperature=1 / logit_scale"),
    ],
)  # fmt: skip
def test_messages_name_the_call_meant(call: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as raised:
        call(torch.randn(4, 3))
    assert "OptionsModule" not in str(raised.value)


#: ``cct_loss`` untyped, for the calls that type checkers would refuse.
untyped: Any = cct_loss


def CCTLossFor(*args: Any, **kwargs: Any) -> Any:
    """``CCTLoss`` untyped, for the calls that type checkers would refuse."""
    from cct_loss import CCTLoss

    return CCTLoss(*args, **kwargs)


def test_a_module_attribute_named_as_another_library_names_an_option() -> None:
    from cct_loss import CCTLoss

    criterion = CCTLoss()
    with pytest.raises(AttributeError, match=r"no option 'tau'; did you mean 'temperature'\?"):
        criterion.tau = 0.2
    assert "tau" not in criterion.__dict__


def test_a_zero_logit_scale_gives_uniform_weights_as_clip_loss_does() -> None:
    image, text = leaves((5, 3), (5, 3), seed=11)
    loss = CCTClipLoss()(image, text, 0.0)
    expected = clip_reference(image, text, 0.0)
    assert isinstance(loss, torch.Tensor)
    assert_same_loss_and_grads(loss, expected, [image, text])


@pytest.mark.parametrize("name", ["temperature", "t_neg", "layout", "gather_distributed"])
def test_clip_loss_refuses_an_option_each_call_sets(name: str) -> None:
    loss_fn = CCTClipLoss()
    with pytest.raises(AttributeError, match=f"CCTClipLoss takes no {name}"):
        setattr(loss_fn, name, 0.5)
    loss_fn.alpha = 0.5  # the others are set as on any module
    assert loss_fn.alpha == 0.5


@pytest.mark.parametrize("detach_weights", [True, False])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_two_way_cross_at_the_largest_sharpness(detach_weights: bool, as_tensor: bool) -> None:
    """Every other row nearly antipodal: ``t_neg`` times each cost overflows float32 at
    ``t_neg = 1e38``, where the two calls are exact; so must one matrix be (shifted logits)."""
    for t_neg in (1e30, 5e37, 1e38):
        image = torch.tensor([[1.0, 0.01], [-1.0, 0.01], [0.01, 1.0]], requires_grad=True)
        text = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], requires_grad=True)
        scale: Any = torch.tensor(2 * t_neg) if as_tensor else 2 * t_neg
        loss = CCTClipLoss(detach_weights=detach_weights)(image, text, scale)
        expected = clip_reference(image, text, 2 * t_neg, detach_weights=detach_weights)
        assert isinstance(loss, torch.Tensor) and torch.isfinite(loss)
        torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad(loss, (image, text))
        want = torch.autograd.grad(expected, (image, text))
        for g, w in zip(got, want, strict=True):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-5)
