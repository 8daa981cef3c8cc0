"""The public API as a newcomer meets it: ``temperature=``, signatures, unknown keywords and
misspelt attributes, a query that is its own positive, the metric-learning call, messages that
name a call that works (each such call is run on the next line), and ``check_finite``."""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import fields
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cct_loss import CCTLoss, CCTMultiviewLoss, cct_loss, cct_loss_multiview
from cct_loss.options import CCTOptions

from .helpers import finite_floats, random_embeddings
from .reference import reference_loss, reference_multiview

#: The entry points without their static types: calls that type checkers would refuse, made
#: on purpose to test what the library says at run time.
UNTYPED: dict[str, Any] = {
    "cct_loss": cct_loss,
    "cct_loss_multiview": cct_loss_multiview,
    "CCTLoss": CCTLoss,
    "CCTMultiviewLoss": CCTMultiviewLoss,
}
Z1, Z2 = torch.randn(8, 4), torch.randn(8, 4)

# -- temperature ----------------------------------------------------------------------------


@given(
    tau=finite_floats(0.05, 2.0),
    cost=st.sampled_from(["sqeuclidean", "cosine"]),
    detach=st.booleans(),
)
def test_temperature_is_infonce_tau(tau: float, cost: str, detach: bool) -> None:
    """``temperature=tau`` is ``t_neg = 1 / (2 tau)`` (cosine: ``1 / tau``), against the float64
    reference at that sharpness, values and gradients."""
    q64, p64, n64 = (random_embeddings(s, 10 + i) for i, s in enumerate([(5, 6), (5, 6), (9, 6)]))
    t_neg = 1 / (2 * tau) if cost == "sqeuclidean" else 1 / tau
    xs = [x.clone().requires_grad_() for x in (q64, p64, n64)]
    got = cct_loss(*xs, temperature=tau, cost=cost, detach_weights=detach)
    refs = [x.clone().requires_grad_() for x in (q64, p64, n64)]
    want = reference_loss(*refs, t_neg=t_neg, cost=cost, detach_weights=detach)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, xs), torch.autograd.grad(want, refs), strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("cost", ["sqeuclidean", "cosine"])
def test_temperature_gives_infonce_weights(cost: str) -> None:
    """Closed form: the repulsion's weights are InfoNCE's ``softmax(cos / tau)`` over the
    negatives."""
    tau = 0.2
    q, p, n = (random_embeddings(s, 20 + i) for i, s in enumerate([(4, 8), (4, 8), (12, 8)]))
    details = cct_loss(q, p, n, temperature=tau, cost=cost, return_details="weights")
    unit = torch.nn.functional.normalize
    infonce = torch.softmax(unit(q) @ unit(n).T / tau, dim=1)
    assert details.neg_weights is not None
    torch.testing.assert_close(details.neg_weights, infonce)


def test_every_entry_point_takes_temperature() -> None:
    z1, z2 = random_embeddings((6, 4), 0), random_embeddings((6, 4), 1)
    want = cct_loss(z1, z2, t_neg=2.5)
    torch.testing.assert_close(cct_loss(z1, z2, temperature=0.2), want)
    torch.testing.assert_close(cct_loss_multiview([z1, z2], temperature=0.2), want)
    torch.testing.assert_close(CCTLoss(temperature=0.2)(z1, z2), want)
    torch.testing.assert_close(CCTMultiviewLoss(temperature=0.2)([z1, z2]), want)
    # A tensor temperature (a schedule) converts without reading its value.
    torch.testing.assert_close(cct_loss(z1, z2, temperature=torch.tensor(0.2)), want)


def test_t_neg_defaults_to_one_without_temperature() -> None:
    z1, z2 = random_embeddings((6, 4), 0), random_embeddings((6, 4), 1)
    assert inspect.signature(cct_loss).parameters["t_neg"].default is None
    torch.testing.assert_close(cct_loss(z1, z2), cct_loss(z1, z2, t_neg=1.0))
    assert CCTLoss().t_neg == 1.0


@pytest.mark.parametrize(
    "call",
    [
        lambda: cct_loss(torch.randn(4, 3), torch.randn(4, 3), temperature=0.1, t_neg=2.0),
        lambda: cct_loss_multiview([torch.randn(4, 3)] * 1, temperature=0.1, t_neg=2.0),
        lambda: CCTLoss(temperature=0.1, t_neg=2.0),
        lambda: CCTMultiviewLoss(temperature=0.1, t_neg=2.0),
    ],
)
def test_temperature_and_t_neg_together_are_refused(call: Any) -> None:
    with pytest.raises(ValueError, match=r"either temperature= .* or t_neg=.*not both"):
        call()


@pytest.mark.parametrize(
    ("value", "error", "pattern"),
    [
        (0.0, ValueError, r"temperature must be a finite number > 0"),
        (-0.1, ValueError, r"temperature must be a finite number > 0"),
        (math.inf, ValueError, r"temperature must be a finite number > 0"),
        ("0.1", TypeError, r"temperature must be a real number"),
        (torch.tensor(0.1, requires_grad=True), ValueError, r"temperature must not require grad"),
    ],
)
def test_bad_temperature_is_named(value: object, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        cct_loss(torch.randn(4, 3), torch.randn(4, 3), temperature=value)  # type: ignore[call-overload]
    with pytest.raises(error, match=pattern):
        CCTLoss(temperature=value)  # type: ignore[arg-type]


def test_module_temperature_converts_by_the_current_cost() -> None:
    criterion = CCTLoss(temperature=0.25)
    assert criterion.t_neg == 2.0 and criterion.temperature == 0.25
    criterion.temperature = 0.1
    assert criterion.t_neg == pytest.approx(5.0)
    criterion.cost = "cosine"  # the sharpness stays; in InfoNCE's terms it now reads 0.2
    assert criterion.t_neg == pytest.approx(5.0) and criterion.temperature == pytest.approx(0.2)
    criterion.temperature = 0.5
    assert criterion.t_neg == pytest.approx(2.0)
    criterion.t_neg = 0.0
    assert criterion.temperature == math.inf
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        criterion.temperature = 0.0
    assert criterion.t_neg == 0.0  # a refused setting changes nothing
    cosine = CCTMultiviewLoss(temperature=0.5, cost="cosine")
    assert cosine.t_neg == 2.0


# -- signatures, unknown keywords, misspelt attributes ----------------------------------------

#: The options as the entry points spell them: the fields of CCTOptions, and temperature.
OPTIONS = {f.name for f in fields(CCTOptions) if f.init} | {"temperature"}


@pytest.mark.parametrize("entry", [cct_loss, cct_loss_multiview, CCTLoss, CCTMultiviewLoss])
def test_signatures_show_every_option(entry: Any) -> None:
    """``help`` and IDEs see every option with its default, in step with CCTOptions."""
    parameters = inspect.signature(entry).parameters
    keyword_only = {n for n, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
    data = {"labels", "negative_labels", "queue"}  # (queue: CCTLoss's own)
    assert keyword_only - data == OPTIONS
    for field in fields(CCTOptions):
        if field.init and field.name != "t_neg":
            assert parameters[field.name].default == field.default, field.name
    assert "**" not in str(inspect.signature(entry))
    documented = (cct_loss.__doc__ or "") if isinstance(entry, type) else (entry.__doc__ or "")
    assert "temperature" in documented


def test_the_typed_keywords_mirror_the_one_list() -> None:
    """The options are defined once (CCTOptions, with temperature): the signatures are made from
    it (above), and the TypedDicts that type checkers read repeat it exactly, names and types."""
    from cct_loss import options

    keywords = [k for k in options.KEYWORDS if k != "return_details"]
    assert list(options.OptionKeywords.__annotations__) == keywords
    module = options.ModuleKeywords.__annotations__
    assert set(module) == set(options.KEYWORDS)
    spelt = inspect.signature(cct_loss).parameters
    for name, annotation in module.items():
        assert getattr(annotation, "__forward_arg__", annotation) == spelt[name].annotation, name


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: UNTYPED["cct_loss"](Z1, Z2, tneg=2.0), r"cct_loss\(\)"),
        (lambda: UNTYPED["cct_loss_multiview"]([Z1, Z2], tneg=2.0), r"cct_loss_multiview\(\)"),
        (lambda: UNTYPED["CCTLoss"](tneg=2.0), r"CCTLoss\(\)"),
        (lambda: UNTYPED["CCTMultiviewLoss"](tneg=2.0), r"CCTMultiviewLoss\(\)"),
    ],
)
def test_unknown_keyword_lists_the_options(call: Any, pattern: str) -> None:
    with pytest.raises(TypeError) as raised:
        call()
    message = str(raised.value)
    assert re.search(pattern + r" got an unexpected keyword argument 'tneg'", message)
    assert "did you mean 't_neg'?" in message
    assert all(name in message for name in OPTIONS)
    assert "CCTOptions" not in message and "OptionsModule" not in message


def test_a_subclass_is_named_by_its_own_name() -> None:
    class MyLoss(CCTLoss):
        pass

    with pytest.raises(TypeError, match=r"MyLoss\(\) got an unexpected keyword argument 'tmp'"):
        untyped: Any = MyLoss
        untyped(tmp=1.0)


def test_a_type_error_inside_the_call_is_not_rewritten() -> None:
    with pytest.raises(TypeError, match=r"t_pos must be a real number"):
        UNTYPED["cct_loss"](torch.randn(4, 3), torch.randn(4, 3), t_pos="1")


@pytest.mark.parametrize(
    ("name", "option"),
    [("tneg", "t_neg"), ("t_negs", "t_neg"), ("temprature", "temperature"), ("tpos", "t_pos")],
)
def test_a_misspelt_option_is_an_attribute_error(name: str, option: str) -> None:
    criterion = CCTLoss()
    with pytest.raises(AttributeError, match=rf"no option '{name}'; did you mean '{option}'"):
        setattr(criterion, name, 5.0)
    assert name not in criterion.__dict__
    assert criterion.t_neg == 1.0


def test_unrelated_attributes_and_declared_names_are_left_alone() -> None:
    class Scaled(CCTLoss):
        t_negative: float  # declared: taken as meant, though close to t_neg

        def __init__(self) -> None:
            super().__init__(temperature=0.2)
            self.t_negative = 3.0
            self.scale = 2.0
            self.head = torch.nn.Linear(4, 4)

    loss = Scaled()
    assert loss.t_negative == 3.0 and loss.scale == 2.0
    assert isinstance(loss.head, torch.nn.Linear)
    loss.step_count = 1  # not close to any option


# -- a query that is its own positive -------------------------------------------------------


@pytest.mark.parametrize(
    "positive_of",
    [
        lambda z: z,
        lambda z: z.detach(),
        lambda z: z.view(z.shape),
        lambda z: z.unsqueeze(1),  # (N, 1, D): the one positive is the query
    ],
)
def test_a_query_that_is_its_own_positive_is_refused(positive_of: Any) -> None:
    z = torch.randn(6, 4, requires_grad=True)
    for _ in range(2):  # the second call takes the replay path, which checks it too
        with pytest.raises(ValueError, match=r"positive is query itself") as raised:
            cct_loss(z, positive_of(z))
        assert "cct_loss(z1, z2)" in str(raised.value)
        with pytest.raises(ValueError, match=r"positive is query itself"):
            CCTLoss()(z, positive_of(z))
    # The escape the message names, run on the next line:
    assert torch.isfinite(cct_loss(z, z.clone()))


def test_the_replay_path_refuses_it_after_a_good_call() -> None:
    z, other = torch.randn(6, 4), torch.randn(6, 4)
    cct_loss(z, other)
    cct_loss(z, other)
    with pytest.raises(ValueError, match=r"positive is query itself"):
        cct_loss(z, z)


def test_views_that_share_a_buffer_still_work() -> None:
    """Only exact aliasing is refused: chunks and unbound views of one buffer are fine."""
    z = random_embeddings((12, 4), 0).float()
    torch.testing.assert_close(cct_loss(*z.chunk(2)), cct_loss(z[:6].clone(), z[6:].clone()))
    feats = random_embeddings((6, 2, 4), 1).float()  # the README's SupCon input, (N, 2, D)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    expected = cct_loss(feats[:, 0].clone(), feats[:, 1].clone(), labels=labels)
    torch.testing.assert_close(cct_loss(*feats.unbind(1), labels=labels), expected)
    torch.testing.assert_close(cct_loss_multiview(list(feats.unbind(1)), labels=labels), expected)


def test_a_view_given_twice_is_refused() -> None:
    z = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"views\[1\] is views\[0\]") as raised:
        cct_loss_multiview([z, z])
    assert "cct_loss_multiview([embeddings], labels=labels)" in str(raised.value)
    assert torch.isfinite(cct_loss_multiview([z], labels=torch.tensor([0, 0, 1, 1, 2, 2])))


# -- the metric-learning call ----------------------------------------------------------------


@given(
    n=st.integers(2, 9),
    classes=st.integers(1, 4),
    seed=st.integers(0, 1000),
    detach=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_one_view_with_labels(
    n: int, classes: int, seed: int, detach: bool, reduction: str
) -> None:
    """``cct_loss(emb, labels=y)`` is the one-view supervised call: the float64 reference over
    one view, and exactly ``cct_loss_multiview([emb], labels=y)`` and the modules' call."""
    emb64 = random_embeddings((n, 5), seed)
    labels = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))
    emb = emb64.float().requires_grad_()
    got = cct_loss(emb, labels=labels, detach_weights=detach, reduction=reduction)
    ref = emb64.clone().requires_grad_()
    want = reference_multiview([ref], labels=labels, detach_weights=detach, reduction=reduction)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(got.sum(), emb)
    (w,) = torch.autograd.grad(want.sum(), ref)
    torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
    same = cct_loss_multiview([emb], labels=labels, detach_weights=detach, reduction=reduction)
    torch.testing.assert_close(got, same, rtol=0, atol=0)
    module = CCTLoss(detach_weights=detach, reduction=reduction)
    torch.testing.assert_close(module(emb, labels=labels), same, rtol=0, atol=0)


def test_leaving_out_positive_needs_labels() -> None:
    z = torch.randn(6, 4)
    with pytest.raises(TypeError, match=r"cct_loss\(\) needs positive="):
        cct_loss(z)
    with pytest.raises(ValueError, match="leaving out positive is the one-view call"):
        cct_loss(z, None, torch.randn(10, 4), labels=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="leaving out positive is the one-view call"):
        cct_loss(z, labels=torch.zeros(6, dtype=torch.long), layout="cross")


# -- every message names a call that works: the call is run on the next line ----------------

EMB = torch.randn(8, 4)
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def test_module_labels_given_positionally() -> None:
    with pytest.raises(TypeError, match=r"CCTLoss\(...\)\(query, labels=labels\)"):
        CCTLoss()(EMB, LABELS)
    assert torch.isfinite(CCTLoss()(EMB, labels=LABELS))


def test_function_labels_given_positionally() -> None:
    with pytest.raises(TypeError, match=r"cct_loss\(query, labels=labels\)"):
        cct_loss(EMB, LABELS)
    assert torch.isfinite(cct_loss(EMB, labels=LABELS))


def test_labels_in_the_negatives_slot() -> None:
    with pytest.raises(TypeError, match=r"cct_loss\(query, positive, labels=labels\)"):
        cct_loss(Z1, Z2, LABELS)
    assert torch.isfinite(cct_loss(Z1, Z2, labels=LABELS))


def test_one_tensor_given_as_the_views_with_labels() -> None:
    with pytest.raises(
        ValueError, match=re.escape("CCTMultiviewLoss(...)([embeddings], labels=labels)")
    ):
        UNTYPED["CCTMultiviewLoss"]()(EMB, LABELS)
    assert torch.isfinite(CCTMultiviewLoss()([EMB], LABELS))
    with pytest.raises(ValueError, match=re.escape("cct_loss_multiview([view1, view2])")):
        UNTYPED["cct_loss_multiview"](EMB)
    assert torch.isfinite(cct_loss_multiview([Z1, Z2]))


@pytest.mark.parametrize("stacked_as", ["VND", "NVD"])
def test_stacked_views(stacked_as: str) -> None:
    x = torch.randn(2, 8, 4) if stacked_as == "VND" else torch.randn(8, 2, 4)
    with pytest.raises(ValueError, match=r"cannot be told apart"):
        UNTYPED["cct_loss_multiview"](x)
    dim = 0 if stacked_as == "VND" else 1
    assert torch.isfinite(cct_loss_multiview(list(x.unbind(dim))))


def test_a_moco_queue_kept_as_d_by_k() -> None:
    queue = torch.randn(4, 32)  # (D, K), as MoCo keeps it
    with pytest.raises(ValueError, match=r"pass queue.T"):
        cct_loss(Z1, Z2, queue)
    assert torch.isfinite(cct_loss(Z1, Z2, queue.T))


def test_negatives_that_are_the_positives() -> None:
    with pytest.raises(ValueError, match=r"use layout='cross' and no negatives"):
        cct_loss(Z1, Z2, Z2)
    assert torch.isfinite(cct_loss(Z1, Z2, layout="cross"))


def test_a_layout_of_the_other_entry_point() -> None:
    with pytest.raises(ValueError, match=re.escape("cct_loss_multiview(views, layout='paper')")):
        cct_loss(Z1, Z2, layout="paper")
    assert torch.isfinite(cct_loss_multiview([Z1, Z2], layout="paper"))
    with pytest.raises(ValueError, match=re.escape("cct_loss(query, positive, layout='cross')")):
        cct_loss_multiview([Z1, Z2], layout="cross")
    assert torch.isfinite(cct_loss(Z1, Z2, layout="cross"))


# -- check_finite -----------------------------------------------------------------------------


def test_non_finite_inputs_are_silent_by_default() -> None:
    """As torch's own losses: no check (it would synchronise), the loss is NaN."""
    z1 = Z1.clone()
    z1[2, 1] = math.nan
    assert torch.isnan(cct_loss(z1, Z2))


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda bad: cct_loss(bad, Z2, check_finite=True), "query"),
        (lambda bad: cct_loss(Z1, bad, check_finite=True), "positive"),
        (lambda bad: cct_loss(Z1, Z2, torch.cat([Z2, bad]), check_finite=True), "negatives"),
        (lambda bad: cct_loss_multiview([Z1, bad], check_finite=True), r"views\[1\]"),
        (lambda bad: CCTLoss(check_finite=True)(bad, Z2), "query"),
        (lambda bad: CCTMultiviewLoss(check_finite=True)([bad, Z2]), r"views\[0\]"),
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_check_finite_names_the_input(call: Any, name: str, value: float) -> None:
    bad = Z1.clone()
    bad[3, 2] = value
    row = 11 if name == "negatives" else 3  # (the negatives are Z2 then the bad rows)
    with pytest.raises(ValueError, match=rf"{name} holds 1 non-finite value .* in row {row}"):
        call(bad)
    assert torch.isfinite(call(Z1.clone() + 1.0))


def test_check_finite_is_refused_under_compile() -> None:
    compiled = torch.compile(
        lambda a, b: cct_loss(a, b, check_finite=True), fullgraph=True, backend="eager"
    )
    with pytest.raises(Exception, match="check_finite=True reads the inputs' values"):
        compiled(Z1, Z2)
