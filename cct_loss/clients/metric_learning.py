""":class:`CCTMetricLoss`: the CCT loss called as pytorch-metric-learning (PML) calls its
losses, ``loss_func(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``.

What each argument means here, as in PML's ``SupConLoss`` (docs/clients.md):

* ``labels`` ``(N,)``: every other embedding with the same label is a positive, every embedding
  with another label a negative (``cct_loss(embeddings, labels=labels)``).
* ``ref_emb`` ``(R, D)`` and ``ref_labels`` ``(R,)`` (PML's ``CrossBatchMemory`` pattern): the
  keys are the reference embeddings instead of the batch; same label positive, other label
  negative, no key left out as "itself".
* ``queue=NegativeQueue(K, D, with_labels=True)`` (PML's ``CrossBatchMemory`` as one module,
  which PML's own wrapper cannot hold: it accepts its own losses by class name): each call takes
  the batch and the memory as keys (the batch as in the call with labels alone, each embedding
  left out of its own positives), then enqueues the batch (when it requires grad). An empty
  memory is the batch alone.
* ``indices_tuple``, a miner's output: pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``
  (taken as the pairs ``(a, p)`` and ``(a, n)``). Then only the mined pairs take part: the
  positives of anchor ``i`` are the ``p[j]`` with ``a1[j] = i``, its negatives the ``n[j]``
  with ``a2[j] = i``; the labels are not read, as in PML. An anchor with no mined positive has
  no attraction term, one with no mined negative no repulsion term. Only ``impl="dense"`` can
  restrict a query to mined pairs; the others refuse, naming it.

Defaults beside PML's ``SupConLoss``: ``temperature=0.1`` as there (``t_neg = 5``; the
functional :func:`cct_loss.cct_loss` defaults to ``t_neg = 1``, InfoNCE's ``tau = 0.5``). PML
reduces with its ``AvgNonZeroReducer``; this loss takes the library's ``reduction``
(``"mean"``: each term over the anchors that have it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..checks import shape_str
from ..front import route
from ..front.modules import OptionsModule
from ..maths.reduction import CCTDetails
from ..options import spell_out_options
from ..queue import NegativeQueue

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..options import ModuleKeywords

#: PML ``SupConLoss``'s default temperature, this loss's too.
PML_TEMPERATURE = 0.1


class CCTMetricLoss(OptionsModule):
    """The CCT loss with pytorch-metric-learning's call: a one-line swap for
    ``losses.SupConLoss(temperature=0.1)`` (module docs above; docs/clients.md).

    Takes the options of :func:`cct_loss.cct_loss` as keywords, with ``temperature=0.1`` unless
    ``temperature`` or ``t_neg`` is given (PML's default; ``t_neg = 1 / (2 * 0.1) = 5``).

    Examples:
        >>> import torch
        >>> from cct_loss import CCTMetricLoss
        >>> loss_func = CCTMetricLoss(temperature=0.1)
        >>> embeddings, labels = torch.randn(16, 8), torch.randint(0, 4, (16,))
        >>> loss = loss_func(embeddings, labels)
        >>> memory, memory_labels = torch.randn(64, 8), torch.randint(0, 4, (64,))
        >>> loss = loss_func(embeddings, labels, ref_emb=memory, ref_labels=memory_labels)
    """

    _layouts = ("all",)
    queue: NegativeQueue | None

    @spell_out_options
    def __init__(
        self,
        *positional: object,
        queue: NegativeQueue | None = None,
        **options: Unpack[ModuleKeywords],
    ) -> None:
        if "temperature" not in options and "t_neg" not in options:
            options["temperature"] = PML_TEMPERATURE
        super().__init__(*positional, **options)
        if queue is not None and not (isinstance(queue, NegativeQueue) and queue.with_labels):
            raise TypeError(
                "queue must be a NegativeQueue that keeps labels, "
                "NegativeQueue(size, dim, with_labels=True), or None; got "
                + (
                    "a NegativeQueue without labels"
                    if isinstance(queue, NegativeQueue)
                    else type(queue).__name__
                )
            )
        if queue is not None and self.options.gather_distributed:
            raise ValueError(
                "CCTMetricLoss(gather_distributed=True) gathers the batch, not a memory; share "
                "the memory across processes with NegativeQueue(..., gather_distributed=True)"
            )
        self.queue = queue

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: Sequence[Tensor] | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor | CCTDetails:
        """The loss of ``embeddings`` ``(N, D)``: see the module docs for each argument."""
        entry = self._call_name()
        if self.queue is not None:
            return self._with_memory(self.queue, embeddings, labels, indices_tuple, ref_emb)
        if isinstance(ref_emb, Tensor) and ref_emb.dim() == 2 and ref_emb.shape[0] == 0:
            ref_emb = ref_labels = None  # an empty memory's: no memory yet, the batch itself
        if ref_labels is not None and ref_emb is None:
            raise ValueError("ref_labels labels the rows of ref_emb: pass ref_emb too")
        if ref_emb is embeddings and (ref_labels is None or ref_labels is labels):
            ref_emb = ref_labels = None  # the batch against itself, as PML reads it
        if indices_tuple is None and ref_emb is None:
            if labels is None:
                raise ValueError(f"{entry} needs labels, or a miner's indices_tuple")
            return route.pairs_loss(embeddings, None, None, labels, None, self.options, entry)
        if indices_tuple is None and ref_labels is None:
            raise ValueError(f"{entry} with ref_emb needs ref_labels (R,), one per row of ref_emb")
        pairs = None
        if indices_tuple is not None:
            if not isinstance(embeddings, Tensor):
                raise TypeError(
                    f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}"
                )
            rows = embeddings.shape[0] if ref_emb is None else ref_emb.shape[0]
            pairs = mined_pairs(indices_tuple, embeddings.shape[0], rows, embeddings.device)
        return route.keyed_loss(embeddings, ref_emb, labels, ref_labels, pairs, self.options, entry)

    def _with_memory(
        self,
        queue: NegativeQueue,
        embeddings: Tensor,
        labels: Tensor | None,
        indices_tuple: object,
        ref_emb: Tensor | None,
    ) -> Tensor | CCTDetails:
        """The batch against itself and the memory (PML's ``CrossBatchMemory``), then the
        batch enqueued (a training step)."""
        entry = self._call_name()
        if indices_tuple is not None or ref_emb is not None:
            raise ValueError(
                f"this {type(self).__name__} owns a memory (queue=), whose keys are the "
                "references: call it as loss_func(embeddings, labels), or build it without "
                "queue= to pass indices_tuple or ref_emb yourself"
            )
        if labels is None:
            raise ValueError(f"{entry} with a memory needs labels: loss_func(embeddings, labels)")
        if not isinstance(embeddings, Tensor) or not isinstance(labels, Tensor):
            return route.pairs_loss(embeddings, None, None, labels, None, self.options, entry)
        memory, memory_labels = queue.negatives(), queue.labels()
        keys, key_labels = embeddings, labels
        if len(queue):  # the batch first, then the memory
            keys = torch.cat([embeddings, memory.to(embeddings.dtype)])
            key_labels = torch.cat([labels, memory_labels.to(labels.dtype)])
        loss = route.keyed_loss(
            embeddings, keys, labels, key_labels, None, self.options, entry, queries_first=True
        )
        if embeddings.requires_grad:  # a training step; an evaluation leaves the memory be
            queue.enqueue(embeddings.detach(), labels, check_finite=self.options.check_finite)
        return loss


def mined_pairs(
    indices_tuple: Sequence[Tensor], num_anchors: int, num_keys: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The ``(num_anchors, num_keys)`` boolean masks of a miner's positive and negative pairs,
    from PML's ``(a1, p, a2, n)`` or ``(a, p, n)``. Refuses indices out of range and a pair
    mined as both (the two read back in one host synchronisation, as a miner's own
    ``torch.where`` costs one)."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        got = type(indices_tuple).__name__
        if isinstance(indices_tuple, (tuple, list)):
            got = f"a {got} of {len(indices_tuple)}"
        raise ValueError(
            f"indices_tuple must be a miner's pairs (a1, p, a2, n) or triplets (a, p, n), got {got}"
        )
    names = ("a1", "p", "a2", "n") if len(indices_tuple) == 4 else ("a", "p", "n")
    for name, index in zip(names, indices_tuple, strict=True):
        if not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point():
            what = type(index).__name__
            if isinstance(index, Tensor):
                what = f"{index.dtype} {shape_str(index)}"
            raise TypeError(f"indices_tuple's {name} must be a 1-D integer tensor, got {what}")
    if len(indices_tuple) == 3:  # triplets: the pairs (a, p) and (a, n)
        a, p, n = indices_tuple
        sides = ((("a", a), ("p", p)), (("a", a), ("n", n)))
    else:
        a1, p, a2, n = indices_tuple
        sides = ((("a1", a1), ("p", p)), (("a2", a2), ("n", n)))
    masks, out_of_range = [], []
    for (anchor_name, anchors), (key_name, keys) in sides:
        if anchors.shape != keys.shape:
            raise ValueError(
                f"indices_tuple's {anchor_name} and {key_name} must have the same length, got "
                f"{anchors.shape[0]} and {keys.shape[0]}"
            )
        anchors, keys = anchors.to(device=device, dtype=torch.long), keys.to(device, torch.long)
        out_of_range += [
            ((anchors < 0) | (anchors >= num_anchors)).any(),
            ((keys < 0) | (keys >= num_keys)).any(),
        ]
        # built from clamped indices, so that a bad one is reported below, not by index_put_
        where = (anchors.clamp(0, num_anchors - 1), keys.clamp(0, num_keys - 1))
        mask = torch.zeros(num_anchors, num_keys, dtype=torch.bool, device=device)
        masks.append(mask.index_put_(where, torch.ones((), dtype=torch.bool, device=device)))
    positive, negative = masks
    # every check read back at once: one host synchronisation
    flags = torch.stack([torch.stack(out_of_range).any(), (positive & negative).any()])
    bad_range, both = flags.tolist()
    if bad_range:
        raise ValueError(
            f"indices_tuple's anchors must index the {num_anchors} embeddings and its positives "
            f"and negatives the {num_keys} keys (ref_emb, or the embeddings); got an index out "
            "of range"
        )
    if both:
        raise ValueError(
            "indices_tuple pairs an anchor with the same key as a positive and as a negative; "
            "each pair must be one or the other (as pytorch-metric-learning requires)"
        )
    return positive, negative
