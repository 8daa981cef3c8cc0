"""``impl="dense"``: both terms of every query from full matrices, in one autograd function
with closed-form gradients (:mod:`.dense_sides`), so that no operator of autograd's own graph
runs between the embeddings and the loss (at per-GPU batches a step is made of such fixed
costs). :func:`one_pass` computes a call's reduced loss with its gradient in the forward pass,
as Liger-Kernel's fused losses do (the backward only scales it); :func:`expectations` gives
each query's terms with the diagnostics. docs/implementations.md has the maths."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..maths.costs import Preparation, differentiable_vjp, prepare, prepare_rows, prepare_rows_vjp
from ..maths.expectation import ConditionalExpectation, weighted_expectation
from ..maths.precision import accumulation_dtype, backward_in_own_precision, cast
from ..maths.reduction import divisors
from ..options import CCTOptions
from ..problem.description import ContrastiveProblem, KeySet, label_masks
from ..shortcuts import apply, eager_twin
from . import dense_sides as sides
from .dense_sides import NONE, PAIRS, SHARED, Grad, Inputs, Plan, SideResult


def _shares(
    plan: Plan,
    options: CCTOptions,
    num_queries: int,
    excluded: tuple[Tensor | None, Tensor | None] = (None, None),
    dtype: torch.dtype = torch.float32,
) -> tuple[Grad | None, Grad | None]:
    """Each query's share of the reduced loss in ``A`` and ``E`` (repulsion is ``-E``), from the
    one reduction's divisors (:func:`cct_loss.maths.reduction.divisors`); ``excluded``: the label
    masks, which say who has a term where a query may have none; ``dtype``: the counts', then
    (the accumulation dtype of the embeddings)."""
    empty = (plan.pos_may_be_empty, plan.neg_may_be_empty)
    pos, neg = (
        None if x is None or not e else ~x.all(-1) for x, e in zip(excluded, empty, strict=True)
    )
    divide = divisors(options, num_queries, pos, neg, dtype=dtype)
    grad_pos = None if plan.positives == NONE else options.alpha / divide.attraction
    grad_neg = None if plan.negatives == NONE else -options.beta / divide.repulsion
    return grad_pos, grad_neg


def _reduced(pos: SideResult, neg: SideResult, grads: tuple[Grad | None, Grad | None]) -> Tensor:
    """``sum_q A_q grad_pos + sum_q E_q grad_neg``, the reduced loss."""
    loss: Tensor | None = None
    for side, grad in ((pos, grads[0]), (neg, grads[1])):
        if grad is None:
            continue
        assert side.value is not None
        weight = grad * side.copies if side.copies > 1 else grad
        total = side.value if side.value.dim() == 0 else side.value.sum()  # a fresh tensor
        if loss is None:
            loss = total.mul_(weight)
        elif isinstance(weight, Tensor):  # a count: out of place (vmap batches it)
            loss = loss + total * weight
        else:
            loss.add_(total, alpha=weight)
    assert loss is not None
    return loss


def plan_of(problem: ContrastiveProblem, options: CCTOptions) -> Plan:
    """The :class:`Plan` of ``problem``."""
    positives, negatives = problem.positives, problem.negatives
    keep = bool(options.return_details) or not options.detach_weights
    rows, pos_kind, pos_may_be_empty = None, NONE, False
    if isinstance(positives, Tensor):
        pos_kind = PAIRS
    elif positives is not None:
        pos_kind = PAIRS if positives.own_rows_only else SHARED
        rows = positives.rows if positives.own_rows_only else None
        pos_may_be_empty = positives.may_be_empty
    exclude_own = negatives is not None and not negatives.per_pair and negatives.rows is not None
    if negatives is not None and exclude_own:
        rows = negatives.rows
    neg_kind = NONE if negatives is None else SHARED
    return Plan(
        options.cost, options.detach_weights, pos_kind, neg_kind, rows, exclude_own,
        labelled=pos_kind == SHARED or (negatives is not None and negatives.per_pair),
        pos_may_be_empty=pos_may_be_empty,
        neg_may_be_empty=negatives is not None and negatives.may_be_empty,
        keep_pos_costs=keep or isinstance(options.t_pos, Tensor),
        keep_neg_costs=keep or problem.key_rows.dim() == 3 or isinstance(options.t_neg, Tensor),
    )  # fmt: skip


def _inputs(problem: ContrastiveProblem, options: CCTOptions, plan: Plan) -> Inputs:
    """Either autograd function's inputs."""
    pos = problem.positives
    fixed = pos if isinstance(pos, Tensor) else None
    masks: tuple[Tensor | None, Tensor | None] = (None, None)
    if plan.labelled:
        masks = label_masks(pos, problem.negatives, problem.num_keys, problem.query.device)
    return Inputs(problem.query, problem.keys, fixed, *masks, options.t_pos, options.t_neg, plan)


def _sides_of(outputs: tuple[Tensor | None, ...], plan: Plan) -> tuple[SideResult, SideResult]:
    """Both sides' results from :class:`_DenseTerms`' outputs (after the values: the
    difference, then each side's weights, costs and moments); a cost matrix both sides share
    is output once."""
    pos_value, neg_value, difference, pos_w, neg_w, pos_c, neg_c, pos_m, neg_m = outputs
    if neg_c is None and plan.positives == plan.negatives == SHARED:
        neg_c = pos_c
    return SideResult(pos_value, pos_w, pos_c, pos_m, difference), SideResult(
        neg_value, neg_w, neg_c, neg_m
    )


def _differentiable_backward(
    inputs: Inputs,
    grads: tuple[Tensor | None, ...],
    needs: tuple[bool, ...],
    preparation: Preparation | None = None,
    shares: tuple[Grad | None, Grad | None] | None = None,
) -> list[Tensor | None]:
    """Either function's backward pass under ``create_graph=True``: the vector-Jacobian product
    of the formula (:func:`.dense_sides.formula`), recorded by autograd so that higher
    derivatives are exact; with ``preparation`` and ``shares``, of the reduced loss of raw
    embeddings."""

    def formula(*raw: Tensor | None) -> tuple[Tensor | None, ...]:
        ready = (x if x is None or preparation is None else prepare(x, preparation) for x in raw)
        terms = sides.formula(Inputs._make((*ready, *inputs[3:])))
        if shares is None:
            return terms
        return (_reduced(SideResult(terms[0]), SideResult(terms[1]), shares),)

    return differentiable_vjp(formula, (inputs.query, inputs.keys, inputs.fixed), grads, needs)


@eager_twin
class _DenseTerms(torch.autograd.Function):
    """Each query's ``A`` and ``E`` on prepared embeddings (:class:`Inputs`) and, not differentiable, each side's difference, weights, costs and
    moments (``None`` where absent). ``setup_context`` and ``generate_vmap_rule`` make it work
    under ``torch.func``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        query: Tensor,
        keys: Tensor | None,
        fixed: Tensor | None,
        pos_excluded: Tensor | None,
        neg_excluded: Tensor | None,
        t_pos: float | Tensor,
        t_neg: float | Tensor,
        plan: Plan,
    ) -> tuple[Tensor | None, ...]:
        inputs = Inputs(query, keys, fixed, pos_excluded, neg_excluded, t_pos, t_neg, plan)
        pos, neg = sides.forward(inputs)
        pos_value = pos.value
        if pos.copies > 1 and pos_value is not None:
            pos_value = pos_value.repeat(pos.copies)  # each row's cost, for its queries
        neg_costs = None if neg.costs is pos.costs else neg.costs  # one tensor, one output
        rest = (pos.weights, neg.weights, pos.costs, neg_costs, pos.moments, neg.moments)
        return pos_value, neg.value, pos.difference, *rest

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor | None, ...]) -> None:
        # The values come back only through the weights (saving an output costs operators).
        values = (None, None) if inputs[7].detach else output[:2]
        ctx.save_for_backward(*inputs[:5], *values, *output[2:])
        ctx.settings = inputs[5:]
        ctx.mark_non_differentiable(*(x for x in output[2:] if x is not None))
        ctx.set_materialize_grads(False)  # no zero-filled gradients for unused outputs

    @staticmethod
    @backward_in_own_precision
    def backward(ctx: Any, grad_pos: Tensor | None, grad_neg: Tensor | None, *_: Any) -> Any:
        saved = ctx.saved_tensors
        inputs, needs = Inputs(*saved[:5], *ctx.settings), ctx.needs_input_grad[:3]
        nones = (None,) * 5
        if grad_pos is None and grad_neg is None:
            return None, None, None, *nones
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable
            return (*_differentiable_backward(inputs, (grad_pos, grad_neg), needs), *nones)
        pos, neg = _sides_of(saved[5:], inputs.plan)
        grads = sides.input_grads(inputs, pos, neg, (grad_pos, grad_neg), needs)
        raw = (inputs.query, inputs.keys, inputs.fixed)
        return (
            *(
                None if g is None or x is None else cast(g, x.dtype)
                for g, x in zip(grads, raw, strict=True)
            ),
            *nones,
        )


@eager_twin
class _DenseLoss(torch.autograd.Function):
    """The reduced loss of raw embeddings, each query's share of it in each term given
    (``shares``): the forward pass prepares the embeddings, computes the loss and, where an
    input needs one (``needs``), its gradient; the backward pass scales that."""

    generate_vmap_rule = True
    saved_outputs = True  # the outputs after the loss are its gradients, saved (shortcuts)

    @staticmethod
    def forward(
        query: Tensor,
        keys: Tensor | None,
        fixed: Tensor | None,
        pos_excluded: Tensor | None,
        neg_excluded: Tensor | None,
        t_pos: float | Tensor,
        t_neg: float | Tensor,
        plan: Plan,
        shares: tuple[Grad | None, Grad | None],
        preparation: Preparation | None,
        needs: tuple[bool, ...],
    ) -> tuple[Tensor | None, ...]:
        raw = (query, keys, fixed)
        prepared = [None if x is None else prepare_rows(x, preparation) for x in raw]
        ready = (None if p is None else p[0] for p in prepared)
        inputs = Inputs._make((*ready, pos_excluded, neg_excluded, t_pos, t_neg, plan))
        pos, neg = sides.forward(inputs, totals=True)
        loss = _reduced(pos, neg, shares)
        if not any(needs):
            return loss, None, None, None
        found = sides.input_grads(inputs, pos, neg, shares, needs)
        return loss, *(
            None if g is None or p is None or x is None else prepare_rows_vjp(g, p[1], p[2], x)
            for g, p, x in zip(found, prepared, raw, strict=True)
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor | None, ...]) -> None:
        grads = output[1:]
        ctx.save_for_backward(*grads, *inputs[:5])  # the inputs: for a differentiable backward
        ctx.settings = inputs[5:10]
        ctx.mark_non_differentiable(*(g for g in grads if g is not None))
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Any) -> Any:
        nones = (None,) * 8
        if grad_loss is None:
            return None, None, None, *nones
        saved = ctx.saved_tensors
        if not torch.is_grad_enabled():  # a scaling (autocast would leave it alone)
            return (*(None if g is None else g * grad_loss for g in saved[:3]), *nones)
        t_pos, t_neg, plan, shares, preparation = ctx.settings  # create_graph=True
        inputs = Inputs._make((*saved[3:], t_pos, t_neg, plan))
        needs = ctx.needs_input_grad[:3]
        grads = _differentiable_backward(inputs, (grad_loss,), needs, preparation, shares)
        return (*grads, *nones)


class OnePass:
    """The reduced loss of a call on one process (``"mean"`` or ``"sum"``, no diagnostics) in
    one autograd function: ``OnePass(problem, options)(problem)``. It holds everything but the
    tensors (and each query's share of the loss, where no label decides it): every call with
    the same signature has the same one, so it can be kept and replayed
    (:mod:`cct_loss.shortcuts`)."""

    __slots__ = ("options", "plan", "shares")

    def __init__(self, problem: ContrastiveProblem, options: CCTOptions) -> None:
        self.options, self.plan = options, plan_of(problem, options)
        self.shares: tuple[Grad | None, Grad | None] | None = None
        if options.constant and not (self.plan.pos_may_be_empty or self.plan.neg_may_be_empty):
            self.shares = _shares(self.plan, options, problem.query.shape[0])

    def __call__(self, problem: ContrastiveProblem) -> Tensor:
        """The reduced loss of ``problem`` (raw embeddings), its gradient in the forward pass."""
        inputs = _inputs(problem, self.options, self.plan)
        query, keys, fixed = inputs.query, inputs.keys, inputs.fixed
        needs = (False, False, False)
        if torch.is_grad_enabled():
            needs = (
                query.requires_grad,
                keys is not None and keys.requires_grad,
                fixed is not None and fixed.requires_grad,
            )
        # The counts of queries that have each term, or a schedule: computed every call.
        shares = self.shares or _shares(
            self.plan, self.options, len(query), inputs[3:5], accumulation_dtype(query.dtype)
        )
        loss: Tensor = apply(_DenseLoss, *inputs, shares, problem.preparation, needs)[0]
        return loss


def expectations(
    problem: ContrastiveProblem, options: CCTOptions
) -> tuple[ConditionalExpectation | None, ConditionalExpectation | None]:
    """Each side's :class:`ConditionalExpectation` (``None`` for a side the problem lacks), with
    the diagnostics and weights where asked for: ``(Q, K)`` over shared keys (zero where a key
    sits out), ``(Q, M)`` over a query's own positives (in view order)."""
    problem = problem.prepared()
    plan = plan_of(problem, options)
    inputs = _inputs(problem, options, plan)
    pos, neg = _sides_of(apply(_DenseTerms, *inputs), plan)
    details = bool(options.return_details)
    attract = repel = None
    if plan.positives == PAIRS:
        attract = _pairs_expectation(inputs, pos, details, options.wants_weights)
    elif plan.positives == SHARED:
        attract = weighted_expectation(
            pos.value, pos.weights, pos.costs, inputs.pos_excluded, "positives",  # type: ignore[arg-type]
            details=details, may_be_empty=plan.pos_may_be_empty,
        )  # fmt: skip
    if plan.negatives == SHARED:
        excluded = inputs.neg_excluded
        if details and plan.exclude_own:  # the own rows sit out of the extreme cost
            excluded = KeySet(rows=plan.rows).excluded_mask(problem.num_keys, problem.query.device)
        repel = weighted_expectation(
            neg.value, neg.weights, neg.costs, excluded, "negatives",  # type: ignore[arg-type]
            details=details, may_be_empty=plan.neg_may_be_empty,
        )  # fmt: skip
    return attract, repel


def _pairs_expectation(
    inputs: Inputs, side: SideResult, details: bool, wants: bool
) -> ConditionalExpectation:
    """The pairs side's result: weights ``(Q, M)`` without the query itself (one positive:
    weight 1, entropy 0, its cost the extreme)."""
    assert side.value is not None
    if not (details or wants):
        return ConditionalExpectation(side.value, None, None, None)
    if side.weights is None or side.costs is None:  # one positive
        weights, costs = torch.ones_like(side.value)[:, None], side.value.detach()[:, None]
    else:
        _, _, exclude_self = sides.pairs(inputs)
        weights, costs = (sides.per_query(x, exclude_self) for x in (side.weights, side.costs))
    statistics = weighted_expectation(
        side.value, weights, costs, None, "positives", details=details
    )
    return statistics if wants else statistics._replace(weights=None)
