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
from ..maths.precision import backward_in_own_precision, cast
from ..maths.reduction import divisors
from ..options import CCTOptions
from ..problem.description import ContrastiveProblem, label_masks
from ..shortcuts import apply, eager_twin
from . import dense_sides as sides
from .dense_sides import NONE, PAIRS, SHARED, Grad, Inputs, Plan, SideResult


def _flags(inputs: Inputs) -> tuple[Tensor | None, Tensor | None]:
    """Which queries have positives and negatives (``None``: every query)."""
    plan, pos, neg = inputs.plan, inputs.pos_excluded, inputs.neg_excluded
    return (
        None if pos is None or not plan.pos_may_be_empty else ~pos.all(-1),
        None if neg is None or not plan.neg_may_be_empty else ~neg.all(-1),
    )


def _shares(
    plan: Plan,
    options: CCTOptions,
    num_queries: int,
    flags: tuple[Tensor | None, Tensor | None] = (None, None),
) -> tuple[Grad | None, Grad | None]:
    """Each query's share of the reduced loss in ``A`` and ``E`` (repulsion is ``-E``), from the
    one reduction's divisors (:func:`cct_loss.maths.reduction.divisors`)."""
    divide = divisors(options, num_queries, *flags)
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
    exclude_own = negatives is not None and not negatives.labelled and negatives.rows is not None
    if negatives is not None and exclude_own:
        rows = negatives.rows
    neg_kind = NONE if negatives is None else SHARED
    return Plan(
        options.cost, options.detach_weights, pos_kind, neg_kind, rows, exclude_own,
        labelled=pos_kind == SHARED or (negatives is not None and negatives.labelled),
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


@eager_twin
class _DenseTerms(torch.autograd.Function):
    """Each query's ``A`` and ``E`` on prepared embeddings and, not differentiable, each side's
    difference, weights, costs and moments (``None`` where absent). ``setup_context`` and
    ``generate_vmap_rule`` make it work under ``torch.func``."""

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
        inputs = Inputs(*saved[:5], *ctx.settings)
        nones = (None,) * 5
        if grad_pos is None and grad_neg is None:
            return None, None, None, *nones
        raw = (inputs.query, inputs.keys, inputs.fixed)
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable

            def formula(q: Tensor, k: Tensor | None, f: Tensor | None) -> tuple[Tensor | None, ...]:
                return sides.formula(inputs._replace(query=q, keys=k, fixed=f))

            needs = ctx.needs_input_grad[:3]
            return (*differentiable_vjp(formula, raw, (grad_pos, grad_neg), needs), *nones)
        pos_value, neg_value, difference, pos_w, neg_w, pos_c, neg_c, pos_m, neg_m = saved[5:]
        if neg_c is None and inputs.plan.positives == inputs.plan.negatives == SHARED:
            neg_c = pos_c  # both sides over one cost matrix
        pos = SideResult(pos_value, pos_w, pos_c, pos_m, difference)
        neg = SideResult(neg_value, neg_w, neg_c, neg_m)
        grads = sides.input_grads(inputs, pos, neg, (grad_pos, grad_neg), ctx.needs_input_grad[:3])
        cast_back = (
            None if g is None or x is None else cast(g, x.dtype)
            for g, x in zip(grads, raw, strict=True)
        )
        return (*cast_back, *nones)


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
        preparation: Preparation,
        needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, ...]:
        raw = (query, keys, fixed)
        prepared = [None if x is None else prepare_rows(x, preparation) for x in raw]
        ready = [None if p is None else p[0] for p in prepared]
        assert ready[0] is not None
        inputs = Inputs(
            ready[0], ready[1], ready[2], pos_excluded, neg_excluded, t_pos, t_neg, plan
        )
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
        query, keys, fixed, pos_excluded, neg_excluded = saved[3:]
        inputs = Inputs(query, keys, fixed, pos_excluded, neg_excluded, t_pos, t_neg, plan)

        def formula(q: Tensor, k: Tensor | None, f: Tensor | None) -> tuple[Tensor]:
            def each(x: Tensor | None) -> Tensor | None:
                return None if x is None else prepare(x, preparation)

            ready = inputs._replace(query=prepare(q, preparation), keys=each(k), fixed=each(f))
            attraction, expected = sides.formula(ready)
            return (_reduced(SideResult(attraction), SideResult(expected), shares),)

        grads = differentiable_vjp(
            formula, (query, keys, fixed), [grad_loss], ctx.needs_input_grad[:3]
        )
        return (*grads, *nones)


class OnePass:
    """The static half of a call's one-pass loss: everything but its tensors (and each query's
    share of the loss, where no label decides it). Every call with the same signature has the
    same one, so it can be kept and replayed (:mod:`cct_loss.shortcuts`)."""

    __slots__ = ("options", "plan", "shares")

    def __init__(self, options: CCTOptions, plan: Plan, num_queries: int) -> None:
        self.options, self.plan = options, plan
        self.shares: tuple[Grad | None, Grad | None] | None = None
        if options.constant and not (plan.pos_may_be_empty or plan.neg_may_be_empty):
            self.shares = _shares(plan, options, num_queries)

    def __call__(self, problem: ContrastiveProblem) -> Tensor:
        """The reduced loss of ``problem`` (raw embeddings), its gradient in the forward pass."""
        inputs = _inputs(problem, self.options, self.plan)
        needs = (False, False, False)
        if torch.is_grad_enabled():
            query, keys, fixed = inputs.query, inputs.keys, inputs.fixed
            needs = (
                query.requires_grad,
                keys is not None and keys.requires_grad,
                fixed is not None and fixed.requires_grad,
            )
        shares = self.shares
        if shares is None:  # the counts of queries that have each term, or a schedule
            shares = _shares(self.plan, self.options, inputs.query.shape[0], _flags(inputs))
        loss: Tensor = apply(_DenseLoss, *inputs, shares, problem.preparation, needs)[0]
        return loss


def one_pass(problem: ContrastiveProblem, options: CCTOptions) -> OnePass:
    """The reduced loss of a call on one process (``"mean"`` or ``"sum"``, no diagnostics) in
    one autograd function: ``one_pass(problem, options)(problem)``."""
    return OnePass(options, plan_of(problem, options), problem.query.shape[0])


def expectations(
    problem: ContrastiveProblem, options: CCTOptions
) -> tuple[ConditionalExpectation | None, ConditionalExpectation | None]:
    """Each side's :class:`ConditionalExpectation` (``None`` for a side the problem lacks), with
    the diagnostics and weights where asked for: ``(Q, K)`` over shared keys (zero where a key
    sits out), ``(Q, M)`` over a query's own positives (in view order)."""
    problem = problem.prepared()
    plan = plan_of(problem, options)
    inputs = _inputs(problem, options, plan)
    pos_value, neg_value, _, pos_w, neg_w, pos_c, neg_c, *_ = apply(_DenseTerms, *inputs)
    if neg_c is None and plan.positives == plan.negatives == SHARED:
        neg_c = pos_c
    details = bool(options.return_details)
    attract = repel = None
    if plan.positives == PAIRS:
        attract = _pairs_expectation(
            inputs, pos_value, pos_w, pos_c, details, options.wants_weights
        )
    elif plan.positives == SHARED:
        attract = weighted_expectation(
            pos_value, pos_w, pos_c, inputs.pos_excluded, "positives",
            details=details, may_be_empty=plan.pos_may_be_empty,
        )  # fmt: skip
    if plan.negatives == SHARED:
        excluded = inputs.neg_excluded
        if details and plan.exclude_own:  # the own rows sit out of the extreme cost
            assert plan.rows is not None
            excluded = torch.zeros_like(neg_w, dtype=torch.bool)
            plan.rows.entries(excluded).fill_(True)
        repel = weighted_expectation(
            neg_value, neg_w, neg_c, excluded, "negatives",
            details=details, may_be_empty=plan.neg_may_be_empty,
        )  # fmt: skip
    return attract, repel


def _pairs_expectation(
    inputs: Inputs,
    value: Tensor,
    weights: Tensor | None,
    costs: Tensor | None,
    details: bool,
    wants: bool,
) -> ConditionalExpectation:
    """The pairs side's result: weights ``(Q, M)`` without the query itself (one positive:
    weight 1, entropy 0, its cost the extreme)."""
    if weights is None or costs is None:
        entropy = extreme = None
        if details:
            extreme, entropy = value.detach().clone(), torch.zeros_like(value).detach()
        ones = value.new_ones((value.shape[0], 1)) if wants else None
        return ConditionalExpectation(value, entropy, extreme, ones)
    if not (details or wants):
        return ConditionalExpectation(value, None, None, None)
    _, _, exclude_self = sides.pairs(inputs)
    num_views, num_keys, rows = weights.shape
    kept = [[w for w in range(num_keys) if not (exclude_self and w == v)] for v in range(num_views)]
    columns = torch.tensor(kept, device=weights.device)[:, None, :].expand(-1, rows, -1)

    def per_query(x: Tensor) -> Tensor:
        """``(V, W, N)`` -> ``(V * N, M)``: each query's own keys, itself left out."""
        return x.permute(0, 2, 1).gather(2, columns).reshape(num_views * rows, -1)

    statistics = weighted_expectation(
        value, per_query(weights), per_query(costs), None, "positives", details=details
    )
    return statistics if wants else statistics._replace(weights=None)
