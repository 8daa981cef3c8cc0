"""A broad attack of edge and bad inputs on every entry point and implementation (issue 24;
issue 25 added the first step of a queue and the losses of other libraries, CLIENT_SHAPES).

Every case must end in one of three ways: the float64 reference's result (tests/reference.py),
a clear error (``ValueError`` or ``TypeError`` whose message names what was wrong), or a NaN
where the docs promise one (NaN or inf inputs without ``check_finite``, float32 rows whose
squares overflow, a sharpness times a cost beyond 1e38 without normalising). Anything else is counted against the library: a silently wrong result, a bad
input accepted, a good one refused, a crash (any other exception) or a hang (a case over
:data:`CASE_SECONDS`).

``python -m tests.attack`` prints the counts (``--show`` lists the cases that failed);
tests/test_attack.py asserts that none fails. The cases are drawn from a seeded generator:
``--seed`` draws another set of the same kinds.
"""

from __future__ import annotations

import argparse
import itertools
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cct_loss import (
    CCTClipLoss,
    CCTLoss,
    CCTMetricLoss,
    CCTMultiviewLoss,
    NegativeQueue,
    cct_loss,
    cct_loss_multiview,
)

from .reference import reference_keyed, reference_loss, reference_multiview, reference_paper

IMPLS = ("dense", "chunked", "sdpa")
#: A case that takes longer than this is a hang.
CASE_SECONDS = 20
#: Outcomes that count against the library.
FAILURES = (
    "silently wrong", "unexpected NaN", "bad input accepted", "good input refused", "crash",
    "hang",
)  # fmt: skip


@dataclass
class Attack:
    """One case: ``call`` runs the library; ``expect`` is ``"value"`` (then ``reference``
    gives the float64 result, compared with ``rtol`` and ``atol``), ``"error"`` (a clear
    error, whose message contains ``says``) or ``"nan"``."""

    name: str
    call: Callable[[], Any]
    expect: str
    reference: Callable[[], Tensor] | None = None
    rtol: float = 1e-5
    atol: float = 1e-5
    says: str = ""
    errors: tuple[type[BaseException], ...] = (ValueError, TypeError)
    #: Beyond a documented limit (a sharpness times a cost above 1e38, not normalised): a NaN
    #: or a wrong number is documented; reported apart, not counted as a failure.
    beyond_limit: bool = False


class _Hang(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise _Hang


def _loss_of(result: Any) -> Tensor:
    return result if isinstance(result, Tensor) else result.loss


def outcome(case: Attack) -> str:
    """How ``case`` ended (one of the clean outcomes, or one of :data:`FAILURES`)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        try:
            result = case.call()
        except _Hang:
            return "hang"
        except case.errors as error:
            if case.expect != "error":
                return "good input refused"
            return "clear error" if case.says.lower() in str(error).lower() else "crash"
        except Exception:
            return "crash"
        if case.expect == "error":
            return "bad input accepted"
        loss = _loss_of(result).detach()
        is_nan = bool(torch.isnan(loss).any())
        if case.expect == "nan":
            return "documented NaN" if is_nan else "silently wrong"
        if is_nan:
            return "documented NaN" if case.beyond_limit else "unexpected NaN"
        assert case.reference is not None
        expected = case.reference().detach()
        close = torch.allclose(
            loss.double().cpu(), expected.double().cpu(), rtol=case.rtol, atol=case.atol
        )
        if close:
            return "matched"
        return "beyond a documented limit" if case.beyond_limit else "silently wrong"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _rand(rng: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    """float32-representable values, as float64."""
    return (torch.randn(*shape, generator=rng, dtype=torch.float64) * scale).float().double()


#: How the embeddings of a value case are altered: name -> (alter the float64 rows, dtype in
#: which they are passed, options it needs, rtol, atol per unit cost scale).
PERTURBATIONS: dict[str, tuple[Callable[[Tensor], Tensor], torch.dtype, dict[str, Any], float]] = {
    "plain": (lambda x: x, torch.float32, {}, 1e-5),
    "float64": (lambda x: x, torch.float64, {}, 1e-9),
    "bfloat16": (lambda x: x.bfloat16().double(), torch.bfloat16, {}, 3e-2),
    "float16": (lambda x: x.half().double(), torch.float16, {}, 3e-2),
    "zero rows": (
        lambda x: x * (torch.arange(x.shape[-2]) % 3 != 0)[:, None],
        torch.float32,
        {},
        1e-5,
    ),
    "tiny rows": (lambda x: x * 1e-30, torch.float32, {}, 1e-5),
    "large rows": (lambda x: x * 1e15, torch.float32, {}, 1e-5),
    "offset, not normalised": (lambda x: x + 1000.0, torch.float32, {"normalize": False}, 1e-5),
    "scaled, not normalised": (lambda x: x * 30.0, torch.float32, {"normalize": False}, 1e-5),
    "not normalised": (lambda x: x, torch.float32, {"normalize": False}, 1e-5),
}

#: Options a value case may add.
OPTIONS: list[dict[str, Any]] = [
    {},
    {"t_neg": 0.0},
    {"t_neg": 0.0, "t_pos": 0.0},
    {"t_neg": 1e5, "t_pos": 1e5},
    {"t_neg": 1e38},
    {"t_pos": 7.0, "detach_weights": False},
    {"cost": "cosine"},
    {"temperature": 0.07},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"alpha": 0.0, "beta": 2.5},
    {"alpha": -1.0},
    {"return_details": True},
    {"t_neg": torch.tensor(3.0)},
]


def _value_cases(rng: random.Random, seed: int, count: int) -> Iterator[Attack]:
    """``count`` value cases drawn over call shapes, implementations, perturbations and
    options."""
    shapes = ("simclr", "multi-positive", "moco", "per-query", "cross", "cross queue",
              "labels", "labels queue", "one view labels", "multiview", "paper",
              *CLIENT_SHAPES)  # fmt: skip
    grid = list(itertools.product(shapes, IMPLS, PERTURBATIONS, range(len(OPTIONS))))
    for shape, impl, name, option in rng.sample(grid, count):
        yield _value_case(shape, impl, name, OPTIONS[option], seed + len(name) + option)


#: The calls of issue 25: the first step of a queue, and the losses of other libraries.
CLIENT_SHAPES = ("empty queue", "clip", "ref emb", "mined pairs", "memory")
#: A miner's pairs ``(a1, p, a2, n)`` over the 6 rows of a value case, no pair of both kinds.
MINED = tuple(
    torch.tensor(x) for x in ([0, 0, 1, 2, 4], [1, 2, 3, 0, 5], [0, 1, 1, 3, 5], [3, 4, 5, 1, 2])
)


def _client_call(
    shape: str,
    rows: tuple[Tensor, Tensor, Tensor],
    labels: Tensor,
    key_labels: Tensor,
    given: Callable[[Tensor], Tensor],
    options: dict[str, Any],
    reference_options: dict[str, Any],
) -> tuple[Callable[[], Any], Callable[[], Tensor]]:
    """The call and its float64 reference for one of :data:`CLIENT_SHAPES`, on float64 rows
    ``q``, ``p`` and ``keys`` (the call sees them through ``given``)."""
    q, p, keys = rows
    reduction = options.get("reduction", "mean")
    ref = {**reference_options, "reduction": reduction}
    factor = 0.5 if options.get("cost", "sqeuclidean") == "sqeuclidean" else 1.0
    if shape == "empty queue":  # the first step: the other rows' keys
        return (
            lambda: cct_loss(given(q), given(p), given(keys[:0]), **options),
            lambda: reference_loss(q, p, layout="cross", **ref),
        )
    if shape == "clip":  # logit_scale for the case's t_neg
        t_neg: Any = options.get("t_neg", 1.0)
        scale = 1 / options["temperature"] if "temperature" in options else t_neg / factor
        built = {k: v for k, v in options.items() if k not in ("temperature", "t_neg", "return_details")}  # fmt: skip
        ref.pop("t_neg", None)
        both = {**ref, "layout": "cross", "t_neg": float(scale) * factor}
        return (
            lambda: CCTClipLoss(**built)(given(q), given(p), scale),
            lambda: (reference_loss(q, p, **both) + reference_loss(p, q, **both)) / 2,
        )
    if "t_neg" not in ref:  # CCTMetricLoss's default, PML's temperature 0.1
        ref["t_neg"] = factor / 0.1
    if shape == "ref emb":
        return (
            lambda: CCTMetricLoss(**options)(
                given(q), labels, ref_emb=given(keys), ref_labels=key_labels
            ),
            lambda: reference_keyed(
                q, keys, lambda i, j: bool(labels[i] == key_labels[j]),
                lambda i, j: bool(labels[i] != key_labels[j]), **ref,
            ),
        )  # fmt: skip
    if shape == "mined pairs":
        positive = set(zip(MINED[0].tolist(), MINED[1].tolist(), strict=True))
        negative = set(zip(MINED[2].tolist(), MINED[3].tolist(), strict=True))
        return (
            lambda: CCTMetricLoss(**options)(given(q), labels, MINED),
            lambda: reference_keyed(
                q, q, lambda i, j: (i, j) in positive, lambda i, j: (i, j) in negative, **ref
            ),
        )
    assert shape == "memory"
    everything, every_label = torch.cat([q, keys]), torch.cat([labels, key_labels])

    def with_memory() -> Any:
        memory = NegativeQueue(16, keys.shape[1], dtype=torch.float64, with_labels=True)
        memory.enqueue(keys, labels=key_labels)
        return CCTMetricLoss(queue=memory, **options)(given(q), labels)

    return with_memory, lambda: reference_keyed(
        q, everything, lambda i, j: i != j and bool(labels[i] == every_label[j]),
        lambda i, j: bool(labels[i] != every_label[j]), **ref,
    )  # fmt: skip


def _value_case(
    shape: str, impl: str, perturbation: str, extra: dict[str, Any], seed: int
) -> Attack:
    alter, dtype, needs, rtol = PERTURBATIONS[perturbation]
    options = {**needs, **extra, "impl": impl}
    if impl != "dense" and options.get("return_details") == "weights":
        options.pop("return_details")
    reduction = options.get("reduction", "mean")
    rng = torch.Generator().manual_seed(seed)
    n, d = 6, 5
    labels = torch.tensor([0, 1, 0, 2, 1, 3])

    def rows(*shape: int) -> Tensor:
        """Altered rows as the call receives them (in ``dtype``), in float64 for the reference:
        both see the same numbers."""
        return alter(_rand(rng, *shape)).to(dtype).double()

    q, p, p3 = rows(n, d), rows(n, d), rows(n, 3, d)
    queue, per_query = rows(7, d), rows(n, 4, d)
    views = [rows(n, d) for _ in range(3)]
    negative_labels = torch.tensor([0, 1, 4, 5, 2, 0, 9])

    def given(x: Tensor) -> Tensor:
        return x.to(dtype)

    reference_options: dict[str, Any] = {
        k: float(v) if isinstance(v, Tensor) else v
        for k, v in options.items()
        if k not in ("impl", "return_details", "reduction")
    }
    if "temperature" in reference_options:
        temperature = reference_options.pop("temperature")
        scale = 0.5 if reference_options.get("cost", "sqeuclidean") == "sqeuclidean" else 1.0
        reference_options["t_neg"] = scale / temperature
    call: Callable[[], Any]
    reference: Callable[[], Tensor]
    if shape in CLIENT_SHAPES:
        call, reference = _client_call(
            shape, (q, p, queue), labels, negative_labels, given, options, reference_options
        )
        if shape == "mined pairs" and impl != "dense":
            return Attack(f"{shape} / {impl}", call, "error", says="impl='dense'")
    elif shape == "multiview" or shape == "paper" or shape == "one view labels":
        layout = "paper" if shape == "paper" else "all"
        given_views = [given(v) for v in views]
        if shape == "one view labels":
            call = lambda: cct_loss(given(q), labels=labels, **options)  # noqa: E731
            reference = lambda: reference_multiview([q], labels=labels, reduction=reduction,  # noqa: E731
                                                    **reference_options)  # fmt: skip
        elif shape == "paper":
            call = lambda: cct_loss_multiview(given_views, layout=layout, **options)  # noqa: E731
            reference = lambda: reference_paper(  # noqa: E731
                views, reduction=reduction, **{"detach_weights": True, **reference_options}
            )
        else:
            call = lambda: cct_loss_multiview(given_views, **options)  # noqa: E731
            reference = lambda: reference_multiview(views, reduction=reduction,  # noqa: E731
                                                    **reference_options)  # fmt: skip
    else:
        tensors: dict[str, tuple[Tensor, Tensor | None, dict[str, Any]]] = {
            "simclr": (p, None, {}),
            "multi-positive": (p3, None, {}),
            "moco": (p, queue, {}),
            "per-query": (p, per_query, {}),
            "cross": (p3, None, {"layout": "cross"}),
            "cross queue": (p, queue, {"layout": "cross"}),
            "labels": (p, None, {"labels": labels}),
            "labels queue": (p, queue, {"labels": labels, "negative_labels": negative_labels}),
        }
        positive, negatives, more = tensors[shape]
        if "negative_labels" in more and options.get("layout") == "cross":
            more = {"labels": labels}
        call_options = {**options, **more}

        def call() -> Any:
            tensors = (given(q), given(positive), None if negatives is None else given(negatives))
            if seed % 3:
                return cct_loss(*tensors, **call_options)
            # every third case through the module, as a trainer holds it
            labelled = {k: v for k, v in call_options.items() if k.endswith("labels")}
            built = {k: v for k, v in call_options.items() if not k.endswith("labels")}
            return CCTLoss(**built)(*tensors, **labelled)

        def reference() -> Tensor:
            return reference_loss(q, positive, negatives, reduction=reduction,
                                  **{**reference_options, **more})  # fmt: skip

    normalize = options.get("normalize", True)
    cost_scale = 1.0 if normalize else float(max(x.abs().max() for x in (q, p, queue))) ** 2
    if perturbation == "offset, not normalised":
        cost_scale = 30.0  # the costs are those of the noise, not of the offset
    # The documented limit: without normalising, t times the largest cost below 1e38.
    sharpness = max(float(options.get(k, 1.0)) for k in ("t_pos", "t_neg"))
    return Attack(
        f"{shape} / {impl} / {perturbation} / {extra}",
        call,
        "value",
        reference,
        rtol=rtol,
        atol=rtol * cost_scale,
        beyond_limit=not normalize and sharpness * 4 * cost_scale >= 1e38,
    )


def _errors_of(impl: str) -> Iterator[Attack]:
    """The bad inputs of every implementation."""
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    queue = torch.randn(7, 5)

    def refused(name: str, call: Callable[[], Any], says: str) -> Attack:
        return Attack(name, call, "error", says=says)

    yield refused(f"1-D query / {impl}", lambda: cct_loss(z1[0], z2, impl=impl), "query")
    yield refused(f"3-D query / {impl}", lambda: cct_loss(z1[None], z2, impl=impl), "query")
    yield refused(f"N mismatch / {impl}", lambda: cct_loss(z1, z2[:4], impl=impl), "positive")
    yield refused(f"D mismatch / {impl}", lambda: cct_loss(z1, z2[:, :3], impl=impl), "positive")
    yield refused(f"M = 0 / {impl}", lambda: cct_loss(z1, z2[:, :0, None].expand(6, 0, 5),
                                                      impl=impl), "M = 0")  # fmt: skip
    yield refused(f"empty batch / {impl}", lambda: cct_loss(z1[:0], z2[:0], impl=impl), "empty")
    yield refused(f"D = 0 / {impl}", lambda: cct_loss(z1[:, :0], z2[:, :0], impl=impl), "D = 0")
    yield refused(f"queue D mismatch / {impl}", lambda: cct_loss(z1, z2, queue[:, :3],
                                                                 impl=impl), "negatives")  # fmt: skip
    yield refused(f"(D, K) queue / {impl}", lambda: cct_loss(z1, z2, queue.T.contiguous()[:, :7],
                                                             impl=impl), "negatives")  # fmt: skip
    yield refused(f"int embeddings / {impl}", lambda: cct_loss(z1.long(), z2, impl=impl),
                  "floating")  # fmt: skip
    yield refused(f"int positive / {impl}", lambda: cct_loss(z1, z2.long(), impl=impl),
                  "floating")  # fmt: skip
    yield refused(f"float labels / {impl}", lambda: cct_loss(z1, z2, labels=torch.ones(6),
                                                             impl=impl), "labels")  # fmt: skip
    yield refused(f"short labels / {impl}", lambda: cct_loss(z1, z2, labels=torch.arange(4),
                                                             impl=impl), "labels")  # fmt: skip
    yield refused(f"positive is query / {impl}", lambda: cct_loss(z1, z1, impl=impl),
                  "query itself")  # fmt: skip
    yield refused(f"expanded self-positive / {impl}", lambda: cct_loss(
        z1, z1[:, None].expand(6, 3, 5), impl=impl), "query itself")  # fmt: skip
    yield refused(f"negatives is positive / {impl}", lambda: cct_loss(z1, z2, z2, impl=impl),
                  "cross")  # fmt: skip
    yield refused(f"NaN with check_finite / {impl}", lambda: cct_loss(
        z1 * float("nan"), z2, check_finite=True, impl=impl), "nan")  # fmt: skip
    yield refused(f"same view twice / {impl}", lambda: cct_loss_multiview([z1, z1], impl=impl),
                  "views[1] is views[0]")  # fmt: skip
    stacked: Any = torch.stack([z1, z2])  # a tensor where a list of views belongs
    yield refused(f"stacked views / {impl}", lambda: cct_loss_multiview(stacked, impl=impl),
                  "views")  # fmt: skip
    yield refused(f"views of two shapes / {impl}", lambda: cct_loss_multiview(
        [z1, z2[:4]], impl=impl), "views")  # fmt: skip


def _error_cases() -> Iterator[Attack]:
    """Bad inputs, each with a word its message must contain."""
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)

    def refused(name: str, call: Callable[[], Any], says: str) -> Attack:
        return Attack(name, call, "error", says=says)

    for impl in IMPLS:
        yield from _errors_of(impl)
    for name, value, says in [
        ("t_neg", -1.0, "t_neg"), ("t_neg", float("nan"), "t_neg"), ("t_neg", float("inf"), "t_neg"),
        ("t_neg", 3e38, "at most"), ("t_pos", 2e38, "at most"), ("temperature", 0.0, "temperature"),
        ("temperature", -0.1, "temperature"), ("temperature", 1e-39, "at least"),
        ("reduction", "avg", "reduction"), ("impl", "fast", "impl"), ("cost", "l2", "cost"),
        ("layout", "diag", "layout"), ("chunk_size", 0, "chunk_size"), ("chunk_size", 2.5, "chunk_size"),
        ("return_details", "yes", "return_details"), ("alpha", float("nan"), "alpha"),
        ("alpha", torch.tensor(1.0, requires_grad=True), "weight"),
        ("t_neg", torch.ones(2), "0-dim"), ("t_neg", torch.tensor(1), "floating"),
        ("tneg", 2.0, "t_neg"), ("temprature", 0.1, "temperature"), ("normalize", 1, "bool"),
    ]:  # fmt: skip
        yield refused(f"{name}={value!r}", partial(_call_with, z1, z2, {name: value}), says)
    yield from _client_errors(z1, z2)
    yield refused("temperature and t_neg", lambda: cct_loss(z1, z2, temperature=0.1, t_neg=2.0),
                  "not both")  # fmt: skip
    yield refused("chunk_size with dense", lambda: cct_loss(z1, z2, impl="dense", chunk_size=4),
                  "chunk_size")  # fmt: skip
    yield refused("CCTLoss(tneg=1)", lambda: CCTLoss(tneg=1.0), "t_neg")  # type: ignore[call-arg]
    yield refused("CCTMultiviewLoss(layout='cross')", lambda: CCTMultiviewLoss(layout="cross"),
                  "layout")  # fmt: skip
    yield Attack("misspelt name", lambda: __import__("cct_loss").CCTMultiViewLoss, "error",
                 says="did you mean", errors=(AttributeError,))  # fmt: skip
    yield refused("NegativeQueue(0, 4)", lambda: NegativeQueue(0, 4), "size")
    yield refused("NegativeQueue(4.0, 4)", lambda: NegativeQueue(4.0, 4), "size")  # type: ignore[arg-type]
    yield refused(
        "enqueue D mismatch", lambda: NegativeQueue(8, 4).enqueue(torch.randn(2, 5)), "dim"
    )
    yield refused("labels to a queue without", lambda: NegativeQueue(8, 4).enqueue(
        torch.randn(2, 4), labels=torch.arange(2)), "labels")  # fmt: skip
    yield refused("no labels to a labelled queue", lambda: NegativeQueue(
        8, 4, with_labels=True).enqueue(torch.randn(2, 4)), "labels")  # fmt: skip
    yield refused("non-finite keys", lambda: NegativeQueue(8, 4).enqueue(
        torch.full((2, 4), float("inf"))), "nan or infinite")  # fmt: skip
    yield refused("float16 queue overflow", lambda: NegativeQueue(8, 4, dtype=torch.float16)
                  .enqueue(torch.full((2, 4), 1e5)), "dtype")  # fmt: skip

    def inference_queue() -> None:
        with torch.inference_mode():
            made = NegativeQueue(8, 4)
        made.enqueue(torch.randn(2, 4))

    yield Attack("queue made under inference_mode", inference_queue, "error",
                 says="inference_mode", errors=(ValueError, TypeError, RuntimeError))  # fmt: skip
    # accepted where they should be: NumPy integers
    size: Any = np.int64(8)
    yield Attack("NumPy queue size", lambda: _filled(NegativeQueue(size, np.int32(4))), "value",
                 lambda: torch.tensor(4.0))  # fmt: skip


def _client_errors(z1: Tensor, z2: Tensor) -> Iterator[Attack]:
    """Bad calls of issue 25's entry points, each naming the call meant."""
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    learned = torch.tensor(2.0, requires_grad=True)
    untyped: Any = CCTLoss
    cases: list[tuple[str, Callable[[], Any], str]] = [
        ("learned logit_scale", lambda: CCTClipLoss()(z1, z2, learned.exp()), "requires_grad_(False)"),
        ("CCTClipLoss(temperature=)", lambda: CCTClipLoss(temperature=0.1), "logit_scale"),
        ("logit_scale as negatives", lambda: cct_loss(z1, z2, torch.tensor(14.0)), "CCTClipLoss"),
        ("a number as negatives", lambda: cct_loss(z1, z2, 0.5), "temperature=0.5"),  # type: ignore[call-overload]
        ("CCTLoss(0.5)", lambda: untyped(0.5), "keywords"),
        ("tau=", lambda: untyped(tau=0.2), "'temperature'"),
        ("memory_bank_size=", lambda: untyped(memory_bank_size=(64, 5)), "NegativeQueue(64, 5)"),
        ("a miner's pair of two", lambda: CCTMetricLoss()(z1, labels, MINED[:2]), "indices_tuple"),
        ("mined pairs with chunked", lambda: CCTMetricLoss(impl="chunked")(z1, labels, MINED), "impl='dense'"),
        ("ref_labels without ref_emb", lambda: CCTMetricLoss()(z1, labels, ref_labels=labels), "ref_emb"),
        ("negatives to a queue's owner", lambda: CCTLoss(queue=NegativeQueue(8, 5))(z1, z2, z2 + 1), "owns a queue"),
        ("a memory without labels", lambda: CCTMetricLoss(queue=NegativeQueue(8, 5)), "with_labels=True"),
    ]  # fmt: skip
    for name, call, says in cases:
        yield Attack(name, call, "error", says=says)


def _call_with(query: Tensor, positive: Tensor, options: dict[str, Any]) -> Any:
    return cct_loss(query, positive, **options)


def _filled(queue: NegativeQueue) -> Tensor:
    queue.enqueue(torch.ones(2, queue.dim))
    return torch.tensor(float(queue.dim))


def _nan_cases() -> Iterator[Attack]:
    """Where the docs promise NaN: NaN or inf inputs without ``check_finite``, float32 rows whose
    squares overflow."""
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    bad = z1.clone()
    bad[2, 1] = float("nan")
    queue = torch.randn(7, 5)
    for impl, scale in itertools.product(IMPLS, (1e20, 1e30)):
        options = {"impl": impl}
        yield Attack(f"rows at {scale:g} / {impl}",
                     partial(_call_with, z1 * scale, z2 * scale, options), "nan")  # fmt: skip
        yield Attack(f"queue at {scale:g} / {impl}",
                     partial(_call_with, z1, z2, {**options, "negatives": queue * scale}), "nan")  # fmt: skip
        yield Attack(f"a NaN input / {impl}", partial(_call_with, bad, z2, options), "nan")


def cases(seed: int = 0, values: int = 300) -> list[Attack]:
    """The attack: ``values`` value cases drawn with ``seed``, every error and NaN case."""
    rng = random.Random(seed)
    return [*_value_cases(rng, seed, values), *_error_cases(), *_nan_cases()]


def tally(attacks: list[Attack]) -> tuple[Counter[str], list[tuple[str, str]]]:
    """Each outcome's count, and the failed cases with their outcome."""
    counts: Counter[str] = Counter()
    failed = []
    for case in attacks:
        result = outcome(case)
        counts[result] += 1
        if result in FAILURES:
            failed.append((case.name, result))
    return counts, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--values", type=int, default=300)
    parser.add_argument("--show", action="store_true", help="list the failed cases")
    args = parser.parse_args()
    attacks = cases(args.seed, args.values)
    counts, failed = tally(attacks)
    print(f"{len(attacks)} cases (seed {args.seed}):")
    for result, count in counts.most_common():
        print(f"  {result:22s} {count}")
    if args.show:
        for name, result in failed:
            print(f"  {result}: {name}")


if __name__ == "__main__":
    main()
